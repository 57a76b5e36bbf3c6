"""The labeling web app: FastAPI, server-rendered Jinja2 pages, a little vanilla JS.

``instructrl label serve db=sqlite:///labels.db port=8000`` (configs/label.yaml).
See docs/labeling.md for the walk-through. Roles:

* **admin** -- creates projects and labeler accounts, imports prompts (hygiene
  runs on import and its report is shown), starts generation of K completions,
  assigns tasks, watches agreement, exports. Only admins can export or see labels.
* **labeler** -- sees and answers only their own assignments.

Every POST needs the session's CSRF token; every refusal is a 4xx page whose
text says what was wrong (:class:`~instructrl.labeling.store.LabelError`).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the string annotations here

from instructrl.config import check, param
from instructrl.data import RATING_FLAGS
from instructrl.hygiene import HygieneConfig
from instructrl.labeling.generate import GenConfig
from instructrl.labeling.store import LabelError, Store

HERE = Path(__file__).parent


@dataclass
class LabelConfig:
    db: str = param("sqlite:///labeling.db", "SQLAlchemy URL of the store (SQLite file or postgresql+psycopg://...)")
    host: str = param("127.0.0.1", "interface to listen on")
    port: int = param(8000, "TCP port")
    admin_user: str = param("admin", "admin account created on first start when the store has no admin")
    admin_password: str = param("", "its password; empty = read $INSTRUCTRL_ADMIN_PASSWORD (needed only on first start)")
    session_hours: float = param(12.0, "a login lasts this long")
    cookie_secure: bool = param(False, "mark the session cookie Secure (set true behind HTTPS)")
    max_text_chars: int = param(20000, "longest demonstration / chat message accepted (longer gets 413)")
    max_upload_mb: float = param(50.0, "largest prompt file accepted on import")
    assign_seed: int = param(0, "seed of task -> labeler assignment")
    gen: GenConfig = param(GenConfig(), "sampling of completions")
    hygiene: HygieneConfig = param(HygieneConfig(), "prompt hygiene applied on import (instructrl.hygiene)")

    def validate(self) -> None:
        check(1 <= self.port <= 65535, "port must be 1..65535")
        check(self.max_text_chars >= 1, "max_text_chars must be >= 1")
        check(self.session_hours > 0, "session_hours must be > 0")


# ---------------------------------------------------------------------------
# Validation of answers (pure; unit-tested)
# ---------------------------------------------------------------------------


def parse_order(raw: str | None, k: int) -> list[int]:
    """``"2,0,1,3"`` -> [2, 0, 1, 3]; must be a permutation of 0..k-1 (best first)."""
    try:
        order = [int(x) for x in (raw or "").split(",") if x.strip() != ""]
    except ValueError:
        raise LabelError(400, f"invalid ranking {raw!r}: expected comma-separated completion numbers") from None
    if sorted(order) != list(range(k)):
        raise LabelError(400, f"invalid ranking {raw!r}: must order each of the {k} completions exactly once "
                              f"(a permutation of 0..{k - 1}, best first)")
    return order


def parse_submission(kind: str, form, k: int, max_chars: int) -> dict:
    """Turn a task form into the stored payload, or raise a 4xx LabelError."""
    if kind == "demonstration":
        text = (form.get("response") or "").strip()
        if not text:
            raise LabelError(400, "the demonstration is empty")
        if len(text) > max_chars:
            raise LabelError(413, f"the demonstration is {len(text)} characters; the limit is {max_chars}")
        return {"response": text}
    if kind == "rank":
        return {"order": parse_order(form.get("order"), k), "all_bad": form.get("all_bad") in ("on", "true", "1")}
    if kind == "rate":
        try:
            rating = int(form.get("rating") or "")
        except ValueError:
            raise LabelError(400, f"rating must be a whole number from 1 to 7, got {form.get('rating')!r}") from None
        if not 1 <= rating <= 7:
            raise LabelError(400, f"rating must be from 1 to 7, got {rating}")
        unknown = [key[5:] for key in form.keys() if key.startswith("flag_") and key[5:] not in RATING_FLAGS]
        if unknown:
            raise LabelError(400, f"unknown flags {unknown}; known: {', '.join(RATING_FLAGS)}")
        flags = {f: form.get(f"flag_{f}") in ("on", "true", "1") for f in RATING_FLAGS}
        return {"rating": rating, "flags": flags}
    raise LabelError(400, f"{kind} tasks are answered turn by turn, not with one form")


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


def create_app(cfg: LabelConfig, store: Store | None = None):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates
    from starlette.concurrency import run_in_threadpool

    from instructrl.labeling.export import EXPORT_KINDS, agreement, build_records
    from instructrl.labeling.security import Sessions

    store = store or Store(cfg.db)
    sessions = Sessions(store.secret_key(), int(cfg.session_hours * 3600))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app = FastAPI(title="instructrl labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.store = store
    generators: dict[str, object] = {}
    gen_lock = threading.Lock()
    jobs: dict[int, threading.Thread] = {}

    def generator(model: str):
        from instructrl.labeling.generate import Generator

        with gen_lock:
            if model not in generators:
                generators[model] = Generator(model or None, cfg.gen)
            return generators[model]

    app.state.generator = generator

    # -- plumbing ---------------------------------------------------------------

    @app.exception_handler(LabelError)
    async def _label_error(request: Request, e: LabelError):
        if e.status == 401 and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"error": e.message}, status_code=e.status)
        return templates.TemplateResponse(request, "error.html", {"status": e.status, "message": e.message, "user": None},
                                          status_code=e.status)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:"
        resp.headers["Referrer-Policy"] = "same-origin"
        return resp

    def who(request: Request, role: str | None = None):
        data = sessions.read(request.cookies.get(Sessions.COOKIE))
        if data is None:
            raise LabelError(401, "log in first")
        user = store.get_user(data["uid"])
        if user is None:
            raise LabelError(401, "your account no longer exists")
        if role == "admin" and user.role != "admin":
            raise LabelError(403, "only admins may do this")
        return user, data["sid"]

    async def posted(request: Request, role: str | None = None):
        """(user, form) for a state-changing request, after the session and CSRF checks."""
        form = await request.form(max_part_size=max(cfg.max_text_chars * 4, 1 << 20))
        user, sid = await run_in_threadpool(who, request, role)
        token = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not sessions.csrf_ok(sid, token if isinstance(token, str) else None):
            raise LabelError(403, "missing or wrong CSRF token: reload the page and try again")
        return user, form

    def page(request: Request, name: str, ctx: dict, status: int = 200):
        user, sid = ctx.get("_who", (None, None))
        ctx = {**ctx, "user": user, "csrf": sessions.csrf(sid) if sid else "", "flags": RATING_FLAGS}
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def back(url: str):
        return RedirectResponse(url, status_code=303)

    # -- login ------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        return page(request, "login.html", {"error": None})

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        name, pw = str(form.get("name") or ""), str(form.get("password") or "")
        user = await run_in_threadpool(store.authenticate, name, pw)
        if user is None:
            return page(request, "login.html", {"error": "wrong user name or password"}, status=401)
        cookie, _ = sessions.new(user.id)
        resp = back("/")
        resp.set_cookie(Sessions.COOKIE, cookie, max_age=sessions.max_age_s, httponly=True, samesite="lax",
                        secure=cfg.cookie_secure)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        await posted(request)
        resp = back("/login")
        resp.delete_cookie(Sessions.COOKIE)
        return resp

    # -- labeler pages ------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        user, sid = who(request)
        if user.role == "admin":
            projects = [(p, store.counts(p.id)) for p in store.projects()]
            return page(request, "admin.html", {"_who": (user, sid), "projects": projects, "users": store.users()})
        mine = store.assignments_for(user.id)
        return page(request, "home.html", {"_who": (user, sid), "pending": [a for a in mine if a["status"] == "pending"],
                                           "done": sum(1 for a in mine if a["status"] == "submitted")})

    @app.get("/next")
    def next_task(request: Request):
        user, _ = who(request)
        pending = store.assignments_for(user.id, status="pending", limit=1)
        return back(f"/tasks/{pending[0]['id']}" if pending else "/")

    @app.get("/tasks/{aid}", response_class=HTMLResponse)
    def task_page(request: Request, aid: int):
        user, sid = who(request)
        view = store.task_view(aid, user.id)
        if view["kind"] == "rank" and view["status"] == "pending":
            random.Random(aid).shuffle(view["completions"])  # display order: no position bias across labelers
        return page(request, "task.html", {"_who": (user, sid), "t": view})

    @app.post("/tasks/{aid}/submit")
    async def submit(request: Request, aid: int):
        user, form = await posted(request)
        view = await run_in_threadpool(store.task_view, aid, user.id)
        if view["status"] == "submitted":
            raise LabelError(409, f"task {aid} was already submitted; answers cannot be changed")
        payload = parse_submission(view["kind"], form, view["k"], cfg.max_text_chars)
        await run_in_threadpool(store.submit, aid, user.id, payload)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": True, "assignment": aid})
        return back("/next")

    # HH mode (Bai et al. 2022 §2.2): at each turn two sampled replies; the pick continues the chat.
    def hh_context(view: dict, message: str) -> list[dict]:
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

    @app.post("/tasks/{aid}/hh/say")
    async def hh_say(request: Request, aid: int):
        user, form = await posted(request)
        message = str(form.get("message") or "").strip()
        if len(message) > cfg.max_text_chars:
            raise LabelError(413, f"the message is {len(message)} characters; the limit is {cfg.max_text_chars}")
        view = await run_in_threadpool(store.task_view, aid, user.id)
        if view["kind"] != "hh":
            raise LabelError(400, "not an HH conversation task")
        if view["status"] == "submitted":
            raise LabelError(409, f"task {aid} was already submitted")
        if view["turns"] and view["turns"][-1]["choice"] is None:
            raise LabelError(409, "pick one of the two replies before writing the next message")
        ctx = hh_context(view, message)

        def two():
            out = generator(view["model"]).distinct([ctx], 2)[0]
            if out is None:
                raise LabelError(503, "the model did not produce two different replies; try again")
            return out

        a, b = await run_in_threadpool(two)
        await run_in_threadpool(store.hh_add_turn, aid, user.id, ctx, a, b)
        return back(f"/tasks/{aid}")

    @app.post("/tasks/{aid}/hh/choose")
    async def hh_choose(request: Request, aid: int):
        user, form = await posted(request)
        try:
            turn = int(form.get("turn") or "")
        except ValueError:
            raise LabelError(400, "turn must be a number") from None
        await run_in_threadpool(store.hh_choose, aid, user.id, turn, str(form.get("choice") or ""))
        return back(f"/tasks/{aid}")

    @app.post("/tasks/{aid}/hh/finish")
    async def hh_finish(request: Request, aid: int):
        user, form = await posted(request)
        view = await run_in_threadpool(store.task_view, aid, user.id)
        chosen = sum(1 for t in view.get("turns", []) if t["choice"])
        if chosen == 0:
            raise LabelError(400, "pick a reply in at least one turn before finishing")
        await run_in_threadpool(store.submit, aid, user.id, {"turns": chosen})
        return back("/next")

    # -- admin ----------------------------------------------------------------------

    @app.post("/admin/users")
    async def add_user(request: Request):
        _, form = await posted(request, "admin")
        await run_in_threadpool(store.create_user, str(form.get("name") or ""), str(form.get("password") or ""),
                                str(form.get("role") or "labeler"), form.get("held_out") in ("on", "true", "1"))
        return back("/")

    @app.post("/admin/projects")
    async def add_project(request: Request):
        _, form = await posted(request, "admin")
        try:
            k = int(form.get("k") or 4)
            frac = float(form.get("overlap_fraction") or 0.1)
            nlab = int(form.get("overlap_labelers") or 2)
        except ValueError:
            raise LabelError(400, "k and overlap_labelers must be whole numbers, overlap_fraction a number") from None
        pid = await run_in_threadpool(store.create_project, str(form.get("name") or ""), str(form.get("kind") or ""),
                                      k, str(form.get("model") or ""), str(form.get("hh_mode") or "helpful"), frac, nlab)
        return back(f"/admin/projects/{pid}")

    @app.get("/admin/projects/{pid}", response_class=HTMLResponse)
    def project_page(request: Request, pid: int):
        user, sid = who(request, "admin")
        proj = store.project(pid)
        labeled = store.labeled(pid)
        return page(request, "project.html", {
            "_who": (user, sid), "p": proj, "counts": store.counts(pid), "job": store.job(pid),
            "reports": json.loads(proj.hygiene_report or "[]"), "agreement": agreement(labeled),
            "kinds": EXPORT_KINDS, "splits": cfg.hygiene.split_names})

    @app.post("/admin/projects/{pid}/import")
    async def import_prompts(request: Request, pid: int):
        _, form = await posted(request, "admin")
        up = form.get("file")
        if up is None or not hasattr(up, "read"):
            raise LabelError(400, "choose a prompts .jsonl file to import")
        data = await up.read(int(cfg.max_upload_mb * 2**20) + 1)
        if len(data) > cfg.max_upload_mb * 2**20:
            raise LabelError(413, f"the file is larger than {cfg.max_upload_mb} MB")
        name = Path(up.filename or "prompts.jsonl").name
        report = await run_in_threadpool(do_import, pid, name, data)
        return page(request, "imported.html", {"_who": who(request), "p": store.project(pid), "report": report})

    def do_import(pid: int, name: str, data: bytes) -> dict:
        from instructrl.data import load_prompts
        from instructrl.hygiene import clean_prompts
        from instructrl.io import DataError

        proj = store.project(pid)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / (name if name.endswith((".jsonl", ".gz")) else name + ".jsonl")
            path.write_bytes(data)
            try:
                records = load_prompts(path)
            except DataError as e:  # name the uploaded file, not our temp path
                raise LabelError(400, f"nothing imported: {str(e).replace(str(path), name)}") from None
            except UnicodeDecodeError:
                raise LabelError(400, f"nothing imported: {name} is not UTF-8 text") from None
        if not records:
            raise LabelError(400, f"nothing imported: {name} has no prompts")
        splits, rep = clean_prompts(records, cfg.hygiene)
        report = {"file": name, **rep.__dict__, "summary": rep.summary()}
        report["imported"] = store.import_prompts(pid, splits, report)
        if proj.kind in ("demonstration", "hh"):
            store.make_tasks(pid)
        return report

    @app.post("/admin/projects/{pid}/generate")
    async def generate(request: Request, pid: int):
        await posted(request, "admin")
        proj = await run_in_threadpool(store.project, pid)
        if proj.kind not in ("rank", "rate"):
            raise LabelError(400, f"{proj.kind} projects need no pre-generated completions")
        t = jobs.get(pid)
        if t is not None and t.is_alive():
            raise LabelError(409, "generation is already running for this project")

        def run():
            from instructrl.labeling.generate import generate_for_project

            try:
                store.job_update(pid, status="running", done=0, total=0, error="loading model")
                generate_for_project(store, pid, generator(proj.model), proj.k)
                store.make_tasks(pid)
            except Exception as e:  # shown on the project page
                store.job_update(pid, status="failed", error=f"{type(e).__name__}: {e}")

        jobs[pid] = threading.Thread(target=run, daemon=True, name=f"generate-{pid}")
        jobs[pid].start()
        return back(f"/admin/projects/{pid}")

    @app.get("/admin/projects/{pid}/progress")
    def progress(request: Request, pid: int):
        who(request, "admin")
        return store.job(pid)

    @app.post("/admin/projects/{pid}/assign")
    async def assign(request: Request, pid: int):
        await posted(request, "admin")
        await run_in_threadpool(store.make_tasks, pid)
        await run_in_threadpool(store.assign, pid, cfg.assign_seed)
        return back(f"/admin/projects/{pid}")

    @app.get("/admin/projects/{pid}/agreement.json")
    def agreement_json(request: Request, pid: int):
        who(request, "admin")
        return agreement(store.labeled(pid))

    @app.get("/admin/projects/{pid}/export/{kind}.jsonl")
    def export(request: Request, pid: int, kind: str, split: str = "train", labelers: str = "train"):
        who(request, "admin")
        if kind not in EXPORT_KINDS:
            raise LabelError(404, f"no export {kind!r}; exports: {', '.join(EXPORT_KINDS)}")
        if labelers not in ("train", "held_out", "all"):
            raise LabelError(400, "labelers must be train, held_out or all")
        proj = store.project(pid)
        rows = build_records(store.labeled(pid), proj.hh_mode, labelers)[kind].get(split, [])
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fname = f"{proj.name}-{split}-{kind}.jsonl".replace(" ", "_")
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{fname}"'})

    @app.get("/healthz")
    def healthz():
        return PlainTextResponse("ok")

    return app


def ensure_admin(store: Store, cfg: LabelConfig) -> None:
    if store.count_admins() > 0:
        return
    pw = cfg.admin_password or os.environ.get("INSTRUCTRL_ADMIN_PASSWORD", "")
    if not pw:
        from instructrl.config import ConfigError

        raise ConfigError("the store has no admin yet: set admin_password=... or $INSTRUCTRL_ADMIN_PASSWORD "
                          "(8+ characters) for the first start")
    store.create_user(cfg.admin_user, pw, "admin")
    print(f"[instructrl] created admin account {cfg.admin_user!r}")


def serve(cfg: LabelConfig) -> None:
    """``instructrl label serve``: run the app with uvicorn (one process; SQLite-safe)."""
    import uvicorn

    store = Store(cfg.db)
    ensure_admin(store, cfg)
    app = create_app(cfg, store)
    print(f"[instructrl] labeling app on http://{cfg.host}:{cfg.port}/ (store: {cfg.db.split('://')[0]})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


@dataclass
class LabelExportConfig:
    db: str = param("sqlite:///labeling.db", "SQLAlchemy URL of the store")
    project: str = param("", "project name to export")
    out: str = param("", "output folder: <split>/<kind>.jsonl, agreement.json, export.json")
    labelers: str = param("train", "whose labels: train (not held-out), held_out, or all")

    def validate(self) -> None:
        check(bool(self.project), "project is required: project=NAME")
        check(bool(self.out), "out is required: out=DIR")
        check(self.labelers in ("train", "held_out", "all"), "labelers must be train, held_out or all")


def export_command(cfg: LabelExportConfig) -> dict:
    from instructrl.config import ConfigError
    from instructrl.labeling.export import export_project

    store = Store(cfg.db, create=False)
    match = [p for p in store.projects() if p.name == cfg.project]
    if not match:
        raise ConfigError(f"no project {cfg.project!r} in {cfg.db}; projects: {[p.name for p in store.projects()]}")
    counts = export_project(store, match[0].id, cfg.out, cfg.labelers)
    for f, n in counts.items():
        print(f"[instructrl] {cfg.out}/{f}: {n} rows")
    return counts
