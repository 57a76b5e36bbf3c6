"""The labeling web app: FastAPI, server-rendered Jinja2 pages, a little vanilla JS.

``instructrl label serve db=sqlite:///labels.db port=8000`` (configs/label.yaml).
See docs/labeling.md for the walk-through. Roles:

* **admin** -- creates projects and labeler accounts, imports prompts (hygiene
  runs on import and its report is shown), starts generation of K completions,
  assigns tasks, watches agreement, exports. Only admins can export or see labels.
* **labeler** -- sees and answers only their own assignments.

Every POST needs a live server-side session and its CSRF token; every refusal is a
4xx page whose text says what was wrong (:class:`~instructrl.labeling.store.LabelError`).
Routes live in ``routes_auth`` / ``routes_tasks`` / ``routes_admin``; what they share
(state, ``Depends`` helpers, the pre-body guard) in ``web``; answer validation in ``forms``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from instructrl.config import ConfigError, check, param
from instructrl.hygiene import HygieneConfig
from instructrl.labeling.forms import parse_order, parse_submission
from instructrl.labeling.generate import GenConfig
from instructrl.labeling.store import MIN_PASSWORD, LabelError, Store
from instructrl.runtime import device_field, make_runtime, precision_field

HERE = Path(__file__).parent
__all__ = ["LabelConfig", "LabelExportConfig", "create_app", "ensure_admin", "export_command", "parse_order",
           "parse_submission", "serve"]


@dataclass
class LabelConfig:
    db: str = param("sqlite:///labeling.db", "SQLAlchemy URL of the store (SQLite file or postgresql+psycopg://...)")
    host: str = param("127.0.0.1", "interface to listen on")
    port: int = param(8000, "TCP port", min=1, max=65535)
    admin_user: str = param("admin", "admin account created on first start when the store has no admin")
    admin_password: str = param("", "its password; empty = read $INSTRUCTRL_ADMIN_PASSWORD (needed only on first start)")
    key_file: str = param("", "cookie-signing key file (made 0600 on first start); empty = <sqlite file>.key, or "
                              "~/.instructrl/labeling.key for a server database; $INSTRUCTRL_LABEL_SECRET wins")
    session_hours: float = param(12.0, "a login lasts this long", min=0, min_exclusive=True)
    cookie_secure: bool = param(False, "mark the session cookie Secure (set true behind HTTPS)")
    max_text_chars: int = param(20000, "longest demonstration / chat message accepted (longer gets 413)", min=1)
    max_upload_mb: float = param(50.0, "largest prompt file accepted on import", min=0, min_exclusive=True)
    max_request_mb: float = param(64.0, "largest request body of a logged-in user (413 beyond); "
                                        "must hold max_upload_mb", min=0, min_exclusive=True)
    login_max_failures: int = param(5, "failed logins per account or per client address within login_window_minutes "
                                       "before further tries get 429", min=1)
    login_window_minutes: float = param(5.0, "window of the failed-login count", min=0, min_exclusive=True)
    assign_seed: int = param(0, "seed of task -> labeler assignment", min=0, max=2**32 - 1)
    device: str = device_field()
    precision: str = precision_field("fp32")
    gen: GenConfig = param(GenConfig(), "sampling of completions")
    hygiene: HygieneConfig = param(HygieneConfig(), "prompt hygiene applied on import (instructrl.hygiene)")

    def validate(self) -> None:
        check(1 <= self.port <= 65535, "port must be 1..65535")
        check(self.max_text_chars >= 1, "max_text_chars must be >= 1")
        check(self.session_hours > 0, "session_hours must be > 0")
        check(self.max_request_mb >= self.max_upload_mb, "max_request_mb must be >= max_upload_mb")
        check(self.login_max_failures >= 1, "login_max_failures must be >= 1")
        check(self.login_window_minutes > 0, "login_window_minutes must be > 0")
        check(self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32")
        if self.gen.dtype and self.precision == "fp32":  # the old key, still read; a non-default precision wins
            self.precision = self.gen.dtype


def create_app(cfg: LabelConfig, store: Store | None = None, rt=None):
    """The app: state made once, then the three routers behind the guard."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from fastapi.staticfiles import StaticFiles
    from fastapi.templating import Jinja2Templates

    from instructrl.labeling import routes_admin, routes_auth, routes_tasks
    from instructrl.labeling.security import LoginThrottle, Sessions
    from instructrl.labeling.web import Guard, LabState, error_response

    store = store or Store(cfg.db, key_file=cfg.key_file)
    app = FastAPI(title="instructrl labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lab = LabState(
        cfg=cfg, store=store, sessions=Sessions(store.secret_key(), int(cfg.session_hours * 3600)),
        templates=Jinja2Templates(directory=str(HERE / "templates")),
        rt=rt or make_runtime(cfg.device, cfg.precision),
        throttle=LoginThrottle(cfg.login_max_failures, cfg.login_window_minutes * 60))
    app.state.store = store
    app.state.generator = app.state.lab.generator
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_exception_handler(LabelError, lambda request, e: error_response(request, e.status, e.message))
    app.add_middleware(Guard)
    for r in (routes_auth.router, routes_tasks.router, routes_admin.router):
        app.include_router(r)
    app.add_api_route("/healthz", lambda: PlainTextResponse("ok"))
    return app


def ensure_admin(store: Store, cfg: LabelConfig) -> None:
    if store.count_admins() > 0:
        return
    pw = cfg.admin_password or os.environ.get("INSTRUCTRL_ADMIN_PASSWORD", "")
    if not pw:
        raise ConfigError("the store has no admin yet: set admin_password=... or $INSTRUCTRL_ADMIN_PASSWORD "
                          f"({MIN_PASSWORD}+ characters) for the first start")
    if len(pw) < MIN_PASSWORD:
        raise ConfigError(f"admin_password (or $INSTRUCTRL_ADMIN_PASSWORD) must be at least {MIN_PASSWORD} characters, "
                          f"got {len(pw)}")
    store.create_user(cfg.admin_user, pw, "admin")
    print(f"[instructrl] created admin account {cfg.admin_user!r}")


def check_host(host: str, port: int) -> None:
    """ConfigError for a host name that does not resolve: uvicorn would print its own error and exit 3."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"host={host!r} cannot be used: {getattr(e, 'strerror', None) or e}") from None


def serve(cfg: LabelConfig) -> None:
    """``instructrl label serve``: run the app with uvicorn (one process; SQLite-safe)."""
    import logging

    import uvicorn

    from instructrl.engines import resolve_engine

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")  # the audit log goes to stderr
    check_host(cfg.host, cfg.port)
    cfg.gen.engine, why = resolve_engine(cfg.gen.engine)  # once for the app: every Generator gets it resolved
    rt = make_runtime(cfg.device, cfg.precision)
    store = Store(cfg.db, key_file=cfg.key_file)
    ensure_admin(store, cfg)
    app = create_app(cfg, store, rt)
    print(f"[instructrl] labeling app on http://{cfg.host}:{cfg.port}/ (store: {cfg.db.split('://')[0]}, "
          f"generation on {rt.device} {rt.precision}, {why})", flush=True)
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
    from instructrl.labeling.export import export_project

    store = Store(cfg.db, create=False)
    match = [p for p in store.projects() if p.name == cfg.project]
    if not match:
        raise ConfigError(f"no project {cfg.project!r} in {cfg.db}; projects: {[p.name for p in store.projects()]}")
    counts = export_project(store, match[0].id, cfg.out, cfg.labelers)
    for f, n in counts.items():
        print(f"[instructrl] {cfg.out}/{f}: {n} rows")
    return counts
