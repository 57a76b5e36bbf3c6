"""A labeler's pages: home, next task, a task page, submitting an answer, and HH chat turns."""

from __future__ import annotations

import random

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from instructrl.labeling.forms import parse_submission
from instructrl.labeling.store import LabelError
from instructrl.labeling.web import LabState, Posted, Who, back, current, lab, page, posted, valid_ids

router = APIRouter(dependencies=[Depends(valid_ids)])


@router.get("/", response_class=HTMLResponse)
def home(request: Request, who: Who = Depends(current), st: LabState = Depends(lab)):
    store = st.store
    if who.user.role == "admin":
        projects = [(p, store.counts(p.id)) for p in store.projects()]
        return page(request, "admin.html", {"projects": projects, "users": store.users()}, who)
    mine = store.assignments_for(who.user.id)
    return page(request, "home.html", {"pending": [a for a in mine if a["status"] == "pending"],
                                       "done": sum(1 for a in mine if a["status"] == "submitted")}, who)


@router.get("/next")
def next_task(who: Who = Depends(current), st: LabState = Depends(lab)):
    pending = st.store.assignments_for(who.user.id, status="pending", limit=1)
    return back(f"/tasks/{pending[0]['id']}" if pending else "/")


@router.get("/tasks/{aid}", response_class=HTMLResponse)
def task_page(request: Request, aid: int, who: Who = Depends(current), st: LabState = Depends(lab)):
    view = st.store.task_view(aid, who.user.id)
    if view["kind"] == "rank" and view["status"] == "pending":
        random.Random(aid).shuffle(view["completions"])  # display order: no position bias across labelers
    return page(request, "task.html", {"t": view}, who)


@router.post("/tasks/{aid}/submit")
async def submit(request: Request, aid: int, p: Posted = Depends(posted), st: LabState = Depends(lab)):
    view = await run_in_threadpool(st.store.task_view, aid, p.user.id)
    if view["status"] == "submitted":
        raise LabelError(409, f"task {aid} was already submitted; answers cannot be changed")
    payload = parse_submission(view["kind"], p.form, view["k"], st.cfg.max_text_chars)
    await run_in_threadpool(st.store.submit, aid, p.user.id, payload)
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"ok": True, "assignment": aid})
    return back("/next")


def hh_context(view: dict, message: str) -> list[dict]:
    """HH mode (Bai et al. 2022 §2.2): at each turn two sampled replies; the pick continues the chat."""
    turns = view["turns"]
    if not turns:
        ctx = list(view["messages"])
        if message:
            ctx.append({"role": "user", "content": message})
        return ctx
    last = turns[-1]
    chosen = last["a"] if last["choice"] == "a" else last["b"]
    if not message:
        raise LabelError(400, "write your next message first")
    return last["context"] + [{"role": "assistant", "content": chosen}, {"role": "user", "content": message}]


@router.post("/tasks/{aid}/hh/say")
async def hh_say(aid: int, p: Posted = Depends(posted), st: LabState = Depends(lab)):
    message = str(p.form.get("message") or "").strip()
    if len(message) > st.cfg.max_text_chars:
        raise LabelError(413, f"the message is {len(message)} characters; the limit is {st.cfg.max_text_chars}")
    view = await run_in_threadpool(st.store.task_view, aid, p.user.id)
    if view["kind"] != "hh":
        raise LabelError(400, "not an HH conversation task")
    if view["status"] == "submitted":
        raise LabelError(409, f"task {aid} was already submitted")
    if view["turns"] and view["turns"][-1]["choice"] is None:
        raise LabelError(409, "pick one of the two replies before writing the next message")
    ctx = hh_context(view, message)

    def two():
        out = st.generator(view["model"]).distinct([ctx], 2)[0]
        if out is None:
            raise LabelError(503, "the model did not produce two different replies; try again")
        return out

    a, b = await run_in_threadpool(two)
    await run_in_threadpool(st.store.hh_add_turn, aid, p.user.id, ctx, a, b)
    return back(f"/tasks/{aid}")


@router.post("/tasks/{aid}/hh/choose")
async def hh_choose(aid: int, p: Posted = Depends(posted), st: LabState = Depends(lab)):
    try:
        turn = int(p.form.get("turn") or "")
    except ValueError:
        raise LabelError(400, "turn must be a number") from None
    await run_in_threadpool(st.store.hh_choose, aid, p.user.id, turn, str(p.form.get("choice") or ""))
    return back(f"/tasks/{aid}")


@router.post("/tasks/{aid}/hh/finish")
async def hh_finish(aid: int, p: Posted = Depends(posted), st: LabState = Depends(lab)):
    view = await run_in_threadpool(st.store.task_view, aid, p.user.id)
    chosen = sum(1 for t in view.get("turns", []) if t["choice"])
    if chosen == 0:
        raise LabelError(400, "pick a reply in at least one turn before finishing")
    await run_in_threadpool(st.store.submit, aid, p.user.id, {"turns": chosen})
    return back("/next")
