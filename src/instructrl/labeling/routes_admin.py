"""Admin routes: accounts (create, disable, reset password), projects, import, generation, assignment, exports."""

from __future__ import annotations

import json
import re
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from instructrl.labeling.export import EXPORT_KINDS, agreement, build_records
from instructrl.labeling.store import LabelError
from instructrl.labeling.web import LabState, Posted, Who, admin, back, lab, page, posted_admin, valid_ids

router = APIRouter(prefix="/admin", dependencies=[Depends(valid_ids)])


def _on(form, key: str) -> bool:
    return form.get(key) in ("on", "true", "1")


@router.post("/users")
async def add_user(p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    f = p.form
    await run_in_threadpool(st.store.create_user, str(f.get("name") or ""), str(f.get("password") or ""),
                            str(f.get("role") or "labeler"), _on(f, "held_out"))
    return back("/")


@router.post("/users/{uid}/disable")
async def disable_user(uid: int, p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    """``disabled=on`` disables the account (its sessions end at once); anything else enables it again."""
    disabled = _on(p.form, "disabled")
    if disabled and uid == p.user.id:
        raise LabelError(409, "you cannot disable your own account")
    await run_in_threadpool(st.store.set_disabled, uid, disabled)
    return back("/")


@router.post("/users/{uid}/password")
async def reset_password(uid: int, p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    await run_in_threadpool(st.store.set_password, uid, str(p.form.get("password") or ""))
    return back("/")


@router.post("/projects")
async def add_project(p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    f = p.form
    try:
        k = int(f.get("k") or 4)
        frac = float(f.get("overlap_fraction") or 0.1)
        nlab = int(f.get("overlap_labelers") or 2)
    except ValueError:
        raise LabelError(400, "k and overlap_labelers must be whole numbers, overlap_fraction a number") from None
    pid = await run_in_threadpool(st.store.create_project, str(f.get("name") or ""), str(f.get("kind") or ""),
                                  k, str(f.get("model") or ""), str(f.get("hh_mode") or "helpful"), frac, nlab)
    return back(f"/admin/projects/{pid}")


@router.get("/projects/{pid}", response_class=HTMLResponse)
def project_page(request: Request, pid: int, who: Who = Depends(admin), st: LabState = Depends(lab)):
    proj = st.store.project(pid)
    return page(request, "project.html", {
        "p": proj, "counts": st.store.counts(pid), "job": st.store.job(pid),
        "reports": json.loads(proj.hygiene_report or "[]"), "agreement": agreement(st.store.labeled(pid)),
        "kinds": EXPORT_KINDS, "splits": st.cfg.hygiene.split_names}, who)


@router.post("/projects/{pid}/import", response_class=HTMLResponse)
async def import_prompts(request: Request, pid: int, p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    up = p.form.get("file")
    if up is None or not hasattr(up, "read"):
        raise LabelError(400, "choose a prompts .jsonl file to import")
    cap = st.cfg.max_upload_mb * 2**20
    data = await up.read(int(cap) + 1)
    if len(data) > cap:
        raise LabelError(413, f"the file is larger than {st.cfg.max_upload_mb} MB")
    name = Path(up.filename or "prompts.jsonl").name
    report = await run_in_threadpool(do_import, st, pid, name, data)
    return page(request, "imported.html", {"p": st.store.project(pid), "report": report}, Who(p.user, p.sid))


def do_import(st: LabState, pid: int, name: str, data: bytes) -> dict:
    from instructrl.data import load_prompts
    from instructrl.hygiene import clean_prompts
    from instructrl.io import DataError

    proj = st.store.project(pid)
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
    splits, rep = clean_prompts(records, st.cfg.hygiene)
    report = {"file": name, **rep.__dict__, "summary": rep.summary()}
    report["imported"] = st.store.import_prompts(pid, splits, report)
    if proj.kind in ("demonstration", "hh"):
        st.store.make_tasks(pid)
    return report


@router.post("/projects/{pid}/generate")
async def generate(pid: int, p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    proj = await run_in_threadpool(st.store.project, pid)
    if proj.kind not in ("rank", "rate"):
        raise LabelError(400, f"{proj.kind} projects need no pre-generated completions")
    t = st.jobs.get(pid)
    if t is not None and t.is_alive():
        raise LabelError(409, "generation is already running for this project")

    def run():
        from instructrl.labeling.generate import generate_for_project

        try:
            st.store.job_update(pid, status="running", done=0, total=0, error="loading model")
            generate_for_project(st.store, pid, st.generator(proj.model), proj.k,
                                 before_done=lambda: st.store.make_tasks(pid))
        except Exception as e:  # shown on the project page
            st.store.job_update(pid, status="failed", error=f"{type(e).__name__}: {e}")

    st.jobs[pid] = threading.Thread(target=run, daemon=True, name=f"generate-{pid}")
    st.jobs[pid].start()
    return back(f"/admin/projects/{pid}")


@router.get("/projects/{pid}/progress")
def progress(pid: int, who: Who = Depends(admin), st: LabState = Depends(lab)):
    return st.store.job(pid)


@router.post("/projects/{pid}/assign")
async def assign(pid: int, p: Posted = Depends(posted_admin), st: LabState = Depends(lab)):
    await run_in_threadpool(st.store.make_tasks, pid)
    await run_in_threadpool(st.store.assign, pid, st.cfg.assign_seed)
    return back(f"/admin/projects/{pid}")


@router.get("/projects/{pid}/agreement.json")
def agreement_json(pid: int, who: Who = Depends(admin), st: LabState = Depends(lab)):
    return agreement(st.store.labeled(pid))


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII-only fallback name and the exact UTF-8 name (RFC 6266 / RFC 5987)."""
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", filename).strip("._") or "export.jsonl"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get("/projects/{pid}/export/{kind}.jsonl")
def export(pid: int, kind: str, split: str = "train", labelers: str = "train", who: Who = Depends(admin),
           st: LabState = Depends(lab)):
    if kind not in EXPORT_KINDS:
        raise LabelError(404, f"no export {kind!r}; exports: {', '.join(EXPORT_KINDS)}")
    if labelers not in ("train", "held_out", "all"):
        raise LabelError(400, "labelers must be train, held_out or all")
    proj = st.store.project(pid)
    rows = build_records(st.store.labeled(pid), proj.hh_mode, labelers)[kind].get(split, [])
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    fname = f"{proj.name}-{split}-{kind}.jsonl".replace(" ", "_")
    return Response(body, media_type="application/x-ndjson",
                    headers={"Content-Disposition": content_disposition(fname)})
