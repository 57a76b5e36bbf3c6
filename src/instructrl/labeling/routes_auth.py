"""Login (throttled, audited), logout (revokes the server-side session), and a user's own password change."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from instructrl.labeling.security import Sessions
from instructrl.labeling.web import LabState, Posted, Who, audit, back, client_addr, current, lab, page, posted

router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return page(request, "login.html", {"error": None})


@router.post("/login")
async def login(request: Request, st: LabState = Depends(lab)):
    form = await request.form()
    name, pw = str(form.get("name") or ""), str(form.get("password") or "")
    addr = client_addr(request)
    wait = st.throttle.retry_after(name, addr)
    if wait:
        audit.warning("login refused (throttled): user=%r addr=%s retry_after=%ds", name, addr, wait)
        return page(request, "login.html", {"error": f"too many failed logins: try again in {wait} s"}, status=429,
                    headers={"Retry-After": str(wait)})
    user = await run_in_threadpool(st.store.authenticate, name, pw)
    if user is None:
        st.throttle.failed(name, addr)
        audit.warning("failed login: user=%r addr=%s", name, addr)
        return page(request, "login.html", {"error": "wrong user name or password"}, status=401)
    st.throttle.succeeded(name)
    sid = await run_in_threadpool(st.store.create_session, user.id, st.sessions.max_age_s)
    resp = back("/")
    resp.set_cookie(Sessions.COOKIE, st.sessions.cookie(sid), max_age=st.sessions.max_age_s, httponly=True,
                    samesite="lax", secure=st.cfg.cookie_secure)
    return resp


@router.post("/logout")
async def logout(p: Posted = Depends(posted), st: LabState = Depends(lab)):
    await run_in_threadpool(st.store.revoke_session, p.sid)
    resp = back("/login")
    resp.delete_cookie(Sessions.COOKIE)
    return resp


@router.get("/account/password", response_class=HTMLResponse)
def password_page(request: Request, who: Who = Depends(current)):
    return page(request, "password.html", {"done": False}, who)


@router.post("/account/password", response_class=HTMLResponse)
async def change_password(request: Request, p: Posted = Depends(posted), st: LabState = Depends(lab)):
    new = str(p.form.get("new_password") or "")
    if new != str(p.form.get("repeat_password") or ""):
        from instructrl.labeling.store import LabelError

        raise LabelError(400, "the two new passwords differ")
    await run_in_threadpool(st.store.change_own_password, p.user.id, str(p.form.get("password") or ""), new, p.sid)
    return page(request, "password.html", {"done": True}, Who(p.user, p.sid))
