"""What every route shares: the app's state, the ``Depends`` helpers (user, admin, CSRF-checked form),
pages and error pages, and the guard that runs before any body is read.

The guard (pure ASGI, outermost) resolves the session cookie once per request, refuses a
state-changing request without a live session before reading a byte of its body (``/login``
excepted), caps every body by Content-Length and by counting the bytes actually streamed
(413), and adds the security headers to every reply.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request  # at module level: FastAPI resolves the string annotations here
from starlette.concurrency import run_in_threadpool

from instructrl.data import RATING_FLAGS
from instructrl.labeling.security import LoginThrottle, Sessions
from instructrl.labeling.store import MAX_ID, LabelError, Store, User

audit = logging.getLogger("instructrl.labeling.audit")
LOGIN_BODY_LIMIT = 64 * 1024  # what an unauthenticated request (the login form) may send
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
           (b"content-security-policy", b"default-src 'self'; img-src 'self' data:"),
           (b"referrer-policy", b"same-origin")]


@dataclass
class LabState:
    """Everything the routes need, made once by ``create_app`` (``app.state.lab``)."""

    cfg: Any  # LabelConfig
    store: Store
    sessions: Sessions
    templates: Any
    rt: Any  # instructrl.runtime.Runtime of the generation models
    throttle: LoginThrottle
    generators: dict = field(default_factory=dict)
    gen_lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict = field(default_factory=dict)

    def generator(self, model: str):
        from instructrl.labeling.generate import Generator

        with self.gen_lock:
            if model not in self.generators:
                self.generators[model] = Generator(model or None, self.cfg.gen, self.rt)
            return self.generators[model]


@dataclass
class Who:
    user: User
    sid: str


@dataclass
class Posted:
    """A state-changing request that passed the session and CSRF checks."""

    user: User
    sid: str
    form: Any


def lab(request: Request) -> LabState:
    return request.app.state.lab


def valid_ids(request: Request) -> None:
    """Path ids beyond what the database can hold name nothing: 404, never an overflow."""
    for key in ("aid", "pid", "uid"):
        raw = request.path_params.get(key)
        if raw is not None and raw.isdigit() and not 1 <= int(raw) <= MAX_ID:
            raise LabelError(404, f"no such {'task' if key == 'aid' else 'project' if key == 'pid' else 'user'} {raw}")


def current(request: Request) -> Who:
    who = getattr(request.state, "who", None)
    if who is None:
        raise LabelError(401, "log in first")
    return who


def admin(who: Who = Depends(current)) -> Who:
    if who.user.role != "admin":
        raise LabelError(403, "only admins may do this")
    return who


async def _checked_form(request: Request, who: Who, st: LabState) -> Posted:
    form = await request.form(max_part_size=max(st.cfg.max_text_chars * 4, 1 << 20))
    token = form.get("csrf_token") or request.headers.get("x-csrf-token")
    if not st.sessions.csrf_ok(who.sid, token):
        raise LabelError(403, "missing or wrong CSRF token: reload the page and try again")
    return Posted(who.user, who.sid, form)


async def posted(request: Request, who: Who = Depends(current), st: LabState = Depends(lab)) -> Posted:
    return await _checked_form(request, who, st)


async def posted_admin(request: Request, who: Who = Depends(admin), st: LabState = Depends(lab)) -> Posted:
    return await _checked_form(request, who, st)


def page(request: Request, name: str, ctx: dict, who: Who | None = None, status: int = 200,
         headers: dict | None = None):
    st = lab(request)
    ctx = {**ctx, "user": who.user if who else None, "csrf": st.sessions.csrf(who.sid) if who else "",
           "flags": RATING_FLAGS}
    return st.templates.TemplateResponse(request, name, ctx, status_code=status, headers=headers)


def error_response(request: Request, status: int, message: str):
    from fastapi.responses import JSONResponse, RedirectResponse

    if status == 401 and request.method == "GET":
        return RedirectResponse("/login", status_code=303)
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"error": message}, status_code=status)
    return page(request, "error.html", {"status": status, "message": message}, status=status)


def back(url: str):
    from fastapi.responses import RedirectResponse

    return RedirectResponse(url, status_code=303)


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Guard:
    """Pure ASGI middleware: session lookup, pre-body authentication, body size cap, security headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        request = Request(scope)
        st: LabState = scope["app"].state.lab
        who = None
        if not scope["path"].startswith("/static/") and scope["path"] != "/healthz":
            sid = st.sessions.read(request.cookies.get(Sessions.COOKIE))
            user = await run_in_threadpool(st.store.session_user, sid) if sid else None
            who = Who(user, sid) if user is not None else None
        scope.setdefault("state", {})["who"] = who
        if scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send_with_headers)
        if who is None and scope["path"] != "/login":
            resp = error_response(request, 401, "log in first")  # before reading any of the body
            return await resp(scope, receive, send_with_headers)
        limit = int(st.cfg.max_request_mb * 2**20) if who else LOGIN_BODY_LIMIT
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            resp = error_response(request, 413, f"the request is larger than the limit of {limit} bytes")
            return await resp(scope, receive, send_with_headers)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # a body larger than it declared, or sent without a length
                raise LabelError(413, f"the request is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send_with_headers)
