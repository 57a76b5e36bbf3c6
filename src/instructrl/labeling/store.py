"""The labeling store: SQLAlchemy tables and every operation the app performs.

Any SQLAlchemy URL works (``sqlite:///labels.db`` by default, PostgreSQL in CI).
Every operation is one transaction; a submission is a single INSERT into
``labels`` (unique per assignment) plus the assignment's status flip, committed
before the HTTP reply -- so an acknowledged label survives a crash and a
double submission is refused by the database itself, not by a racy check.

Tables::

    users(name, pw_hash, role admin|labeler, held_out, disabled)
    sessions(id random, user, created_at, expires_at, revoked)      -- the cookie carries only the signed id
    projects(name, kind demonstration|rank|rate|hh, k, model, hh_mode, overlap_*, hygiene_report)
    prompts(project, ext_id, messages JSON, user_id, split)          -- after hygiene (instructrl.hygiene)
    completions(prompt, idx, text, model)                            -- K per prompt, generated
    tasks(project, prompt, slot)                                     -- slot = completion idx for rate tasks
    assignments(task, labeler, status pending|submitted)             -- 1, or 2+ for the overlap share
    labels(assignment UNIQUE, payload JSON)                          -- the answer
    hh_turns(assignment, turn, context JSON, reply_a, reply_b, choice)
    gen_jobs(project, total, done, status, error)                    -- generation progress
"""

from __future__ import annotations

import json
import random
import secrets
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event,
                        func, inspect, select, text)
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from instructrl.config import ConfigError
from instructrl.data import PromptRecord
from instructrl.labeling.security import hash_password, load_secret, verify_password

TASK_KINDS = ("demonstration", "rank", "rate", "hh")
HH_MODES = ("helpful", "red_team")
MIN_PASSWORD = 8
MAX_ID = 2**63 - 1  # larger ids cannot exist (and overflow SQLite's integer binding)


class LabelError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the app returns."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    pw_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))  # admin | labeler
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AuthSession(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    k: Mapped[int] = mapped_column(Integer, default=4)
    model: Mapped[str] = mapped_column(Text, default="")
    hh_mode: Mapped[str] = mapped_column(String(16), default="helpful")
    overlap_fraction: Mapped[float] = mapped_column(default=0.1)
    overlap_labelers: Mapped[int] = mapped_column(Integer, default=2)
    hygiene_report: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, one report per import
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "ext_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    ext_id: Mapped[str] = mapped_column(String(256))
    messages: Mapped[str] = mapped_column(Text)  # JSON list of {role, content}
    user_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    split: Mapped[str] = mapped_column(String(32), default="train")


class Completion(Base):
    __tablename__ = "completions"
    __table_args__ = (UniqueConstraint("prompt_id", "idx"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text, default="")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("prompt_id", "slot"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    slot: Mapped[int] = mapped_column(Integer, default=0)  # completion idx of a rate task, else 0


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class HHTurn(Base):
    __tablename__ = "hh_turns"
    __table_args__ = (UniqueConstraint("assignment_id", "turn"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), index=True)
    turn: Mapped[int] = mapped_column(Integer)
    context: Mapped[str] = mapped_column(Text)  # JSON messages ending with the user's turn
    reply_a: Mapped[str] = mapped_column(Text)
    reply_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[str | None] = mapped_column(String(1), nullable=True)  # "a" | "b"


class GenJob(Base):
    __tablename__ = "gen_jobs"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="idle")  # running | done | failed
    error: Mapped[str] = mapped_column(Text, default="")


# ---------------------------------------------------------------------------


def _sqlite_setup(engine) -> None:
    """SQLite: WAL (readers never block the writer), full fsync, and BEGIN IMMEDIATE for writes.

    Without BEGIN IMMEDIATE a transaction that reads then writes can fail at
    once with "database is locked" when another writer got in between; taking
    the write lock up front makes writers queue on ``busy_timeout`` instead.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below run
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise LabelError(400, f"password must be at least {MIN_PASSWORD} characters")


def _revoke(s: Session, uid: int, keep_sid: str | None = None) -> None:
    for row in s.scalars(select(AuthSession).where(AuthSession.user_id == uid, AuthSession.revoked.is_(False))):
        if row.id != keep_sid:
            row.revoked = True


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; they were stored in UTC."""
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_db_url(url: str, create: bool) -> None:
    """A clear ConfigError naming ``db`` for a URL that cannot work; never creates the file when ``create`` is off."""
    if "://" not in url:
        raise ConfigError(f"db={url!r} is not a database URL: use sqlite:///path/labels.db or "
                          f"postgresql+psycopg://user:pw@host/db")
    f = _sqlite_file(url)
    if f is None:
        return
    if not f.parent.is_dir():
        raise ConfigError(f"db={url}: folder {f.parent} does not exist")
    if f.is_dir():
        raise ConfigError(f"db={url}: {f} is a folder, not a database file")
    if not create and not f.is_file():
        raise ConfigError(f"db={url}: no such database file {f}")
    if f.is_file():  # an empty file is a new database; anything else must carry SQLite's header
        try:
            with open(f, "rb") as fh:
                head = fh.read(16)
        except OSError as e:
            raise ConfigError(f"db={url}: cannot read {f}: {e.strerror}") from None
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"db={url}: {f} is not an SQLite database file")


class Store:
    def __init__(self, url: str, create: bool = True, key_file: str = ""):
        check_db_url(url, create)
        self.url, self.key_file = url, key_file
        kw: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kw.update(pool_size=10, max_overflow=30, pool_pre_ping=True)
        try:
            self.engine = create_engine(url, **kw)
        except (ArgumentError, NoSuchModuleError) as e:
            raise ConfigError(f"db={url!r} is not a usable database URL: {e}") from None
        if url.startswith("sqlite"):
            _sqlite_setup(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(write=True), expire_on_commit=False)
        if create:
            try:
                Base.metadata.create_all(self.engine)
                self._upgrade()
            except OperationalError as e:
                raise ConfigError(f"db={url}: cannot open the database: {e.orig}") from None

    def _upgrade(self) -> None:
        """Bring a store made by an older version up to date: the ``disabled`` column, and no signing key left
        in ``settings`` (it used to live there in plain text; the key now comes from security.load_secret)."""
        if "disabled" not in {c["name"] for c in inspect(self.engine).get_columns("users")}:
            with self.write() as s:
                s.execute(text("ALTER TABLE users ADD COLUMN disabled BOOLEAN NOT NULL DEFAULT FALSE"))
        with self.write() as s:
            old = s.get(Setting, "secret_key")
            if old is not None:
                s.delete(old)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: commit on success, roll back on any error."""
        with self._write() as s:
            with s.begin():
                yield s

    # -- settings -----------------------------------------------------------

    def secret_key(self) -> str:
        """The cookie-signing key; kept outside the database (security.load_secret), stable across restarts."""
        return load_secret(self.url, self.key_file)

    # -- users ----------------------------------------------------------------

    def create_user(self, name: str, password: str, role: str = "labeler", held_out: bool = False) -> int:
        name = name.strip()
        if not name or len(name) > 64:
            raise LabelError(400, "user name must be 1-64 characters")
        if role not in ("admin", "labeler"):
            raise LabelError(400, f"role must be admin or labeler, got {role!r}")
        _check_password(password)
        try:
            with self.write() as s:
                u = User(name=name, pw_hash=hash_password(password), role=role, held_out=held_out)
                s.add(u)
                s.flush()
                return u.id
        except IntegrityError:
            raise LabelError(409, f"user {name!r} already exists") from None

    def authenticate(self, name: str, password: str) -> User | None:
        """The user, when the password matches and the account is not disabled."""
        with self.read() as s:
            u = s.scalar(select(User).where(User.name == name))
        if u is None:
            verify_password(password, None)  # same work either way: no user-name oracle by timing
            return None
        return u if verify_password(password, u.pw_hash) and not u.disabled else None

    def get_user(self, uid: int) -> User | None:
        if not 1 <= uid <= MAX_ID:
            return None
        with self.read() as s:
            return s.get(User, uid)

    def set_password(self, uid: int, password: str) -> None:
        """Set a new password and end every session of the account (a reset locks out whoever had it)."""
        _check_password(password)
        with self.write() as s:
            u = s.get(User, uid) if 1 <= uid <= MAX_ID else None
            if u is None:
                raise LabelError(404, f"no user {uid}")
            u.pw_hash = hash_password(password)
            _revoke(s, uid)

    def change_own_password(self, uid: int, old: str, new: str, keep_sid: str = "") -> None:
        """The user's own change: needs the current password; other sessions end, this one stays."""
        u = self.get_user(uid)
        if u is None or not verify_password(old, u.pw_hash):
            raise LabelError(403, "the current password is wrong")
        _check_password(new)
        with self.write() as s:
            s.get(User, uid).pw_hash = hash_password(new)
            _revoke(s, uid, keep_sid)

    def set_disabled(self, uid: int, disabled: bool) -> None:
        """Disable (or re-enable) an account; disabling ends its sessions at once."""
        with self.write() as s:
            u = s.get(User, uid) if 1 <= uid <= MAX_ID else None
            if u is None:
                raise LabelError(404, f"no user {uid}")
            u.disabled = disabled
            if disabled:
                _revoke(s, uid)

    # -- sessions ----------------------------------------------------------------

    def create_session(self, uid: int, seconds: float) -> str:
        sid = secrets.token_urlsafe(32)
        now = _now()
        with self.write() as s:
            for old in s.scalars(select(AuthSession).where(AuthSession.user_id == uid, AuthSession.expires_at < now)):
                s.delete(old)  # a login sweeps the account's expired rows: the table does not grow without end
            s.add(AuthSession(id=sid, user_id=uid, created_at=now, expires_at=now + timedelta(seconds=seconds)))
        return sid

    def session_user(self, sid: str) -> User | None:
        """The session's user while the session is live: not revoked, not expired, account not disabled."""
        with self.read() as s:
            row = s.get(AuthSession, sid)
            if row is None or row.revoked or _aware(row.expires_at) <= _now():
                return None
            u = s.get(User, row.user_id)
        return None if u is None or u.disabled else u

    def revoke_session(self, sid: str) -> None:
        with self.write() as s:
            row = s.get(AuthSession, sid)
            if row is not None:
                row.revoked = True

    def users(self) -> list[User]:
        with self.read() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    def count_admins(self) -> int:
        with self.read() as s:
            return s.scalar(select(func.count()).select_from(User).where(User.role == "admin"))

    # -- projects ---------------------------------------------------------------

    def create_project(self, name: str, kind: str, k: int = 4, model: str = "", hh_mode: str = "helpful",
                       overlap_fraction: float = 0.1, overlap_labelers: int = 2) -> int:
        name = name.strip()
        if not name or len(name) > 128:
            raise LabelError(400, "project name must be 1-128 characters")
        if kind not in TASK_KINDS:
            raise LabelError(400, f"kind must be one of {list(TASK_KINDS)}, got {kind!r}")
        if hh_mode not in HH_MODES:
            raise LabelError(400, f"hh_mode must be one of {list(HH_MODES)}, got {hh_mode!r}")
        if kind == "rank" and not 2 <= k <= 9:
            raise LabelError(400, f"a ranking needs K between 2 and 9 (InstructGPT uses 4..9), got {k}")
        if kind == "rate" and not 1 <= k <= 9:
            raise LabelError(400, f"K completions to rate must be 1..9, got {k}")
        if not 0 <= overlap_fraction <= 1:
            raise LabelError(400, f"overlap_fraction must be in [0, 1], got {overlap_fraction}")
        if overlap_labelers < 2:
            raise LabelError(400, f"overlap_labelers must be >= 2, got {overlap_labelers}")
        try:
            with self.write() as s:
                p = Project(name=name, kind=kind, k=k if kind in ("rank", "rate") else (2 if kind == "hh" else 0),
                            model=model, hh_mode=hh_mode, overlap_fraction=overlap_fraction,
                            overlap_labelers=overlap_labelers)
                s.add(p)
                s.flush()
                return p.id
        except IntegrityError:
            raise LabelError(409, f"project {name!r} already exists") from None

    def project(self, pid: int) -> Project:
        with self.read() as s:
            p = s.get(Project, pid) if 1 <= pid <= MAX_ID else None
        if p is None:
            raise LabelError(404, f"no project {pid}")
        return p

    def projects(self) -> list[Project]:
        with self.read() as s:
            return list(s.scalars(select(Project).order_by(Project.id)))

    def import_prompts(self, pid: int, splits: dict[str, list[PromptRecord]], report: dict) -> int:
        """Insert hygiene-cleaned prompts with their split, all or nothing; appends the report."""
        proj = self.project(pid)
        with self.write() as s:
            existing = set(s.scalars(select(Prompt.ext_id).where(Prompt.project_id == pid)))
            n = 0
            for split, recs in splits.items():
                for r in recs:
                    if r.id in existing:
                        raise LabelError(409, f"prompt id {r.id!r} is already in project {proj.name!r}; nothing imported")
                    existing.add(r.id)
                    s.add(Prompt(project_id=pid, ext_id=r.id, messages=json.dumps(r.messages), user_id=r.user_id,
                                 split=split))
                    n += 1
            p = s.get(Project, pid)
            reports = json.loads(p.hygiene_report or "[]")
            reports.append(report)
            p.hygiene_report = json.dumps(reports)
        return n

    def prompts(self, pid: int) -> list[Prompt]:
        with self.read() as s:
            return list(s.scalars(select(Prompt).where(Prompt.project_id == pid).order_by(Prompt.id)))

    def prompts_needing_completions(self, pid: int, k: int) -> list[Prompt]:
        with self.read() as s:
            have = dict(s.execute(
                select(Completion.prompt_id, func.count()).join(Prompt, Prompt.id == Completion.prompt_id)
                .where(Prompt.project_id == pid).group_by(Completion.prompt_id)).all())
            ps = list(s.scalars(select(Prompt).where(Prompt.project_id == pid).order_by(Prompt.id)))
        return [p for p in ps if have.get(p.id, 0) < k]

    def set_completions(self, prompt_id: int, texts: list[str], model: str) -> None:
        with self.write() as s:
            for c in s.scalars(select(Completion).where(Completion.prompt_id == prompt_id)):
                s.delete(c)
            s.flush()
            for i, t in enumerate(texts):
                s.add(Completion(prompt_id=prompt_id, idx=i, text=t, model=model))

    def completions(self, prompt_id: int) -> list[Completion]:
        with self.read() as s:
            return list(s.scalars(select(Completion).where(Completion.prompt_id == prompt_id).order_by(Completion.idx)))

    # -- generation progress --------------------------------------------------------

    def job_update(self, pid: int, **kw) -> None:
        with self.write() as s:
            j = s.get(GenJob, pid)
            if j is None:
                j = GenJob(project_id=pid)
                s.add(j)
            for k, v in kw.items():
                setattr(j, k, v)

    def job(self, pid: int) -> dict:
        with self.read() as s:
            j = s.get(GenJob, pid)
            if j is None:
                return {"status": "idle", "done": 0, "total": 0, "error": ""}
            return {"status": j.status, "done": j.done, "total": j.total, "error": j.error}

    # -- tasks and assignment ----------------------------------------------------------

    def make_tasks(self, pid: int) -> int:
        """One task per prompt (rate: one per completion) once its inputs exist; returns how many were added."""
        proj = self.project(pid)
        with self.write() as s:
            have = set(s.execute(select(Task.prompt_id, Task.slot).where(Task.project_id == pid)).all())
            ncomp = dict(s.execute(
                select(Completion.prompt_id, func.count()).join(Prompt, Prompt.id == Completion.prompt_id)
                .where(Prompt.project_id == pid).group_by(Completion.prompt_id)).all())
            added = 0
            for p in s.scalars(select(Prompt).where(Prompt.project_id == pid).order_by(Prompt.id)):
                if proj.kind in ("rank", "rate") and ncomp.get(p.id, 0) < proj.k:
                    continue  # completions not generated yet
                slots = range(proj.k) if proj.kind == "rate" else [0]
                for slot in slots:
                    if (p.id, slot) not in have:
                        s.add(Task(project_id=pid, prompt_id=p.id, slot=slot))
                        added += 1
        return added

    def assign(self, pid: int, seed: int = 0) -> dict:
        """Give every unassigned task to labelers: most to one, ``overlap_fraction`` of them to several.

        Labelers are picked least-loaded first (ties broken by a seeded shuffle),
        so work is spread evenly. Held-out labelers (InstructGPT's labelers
        who produced no training data) are assigned like the others; their labels
        are kept out of training exports and used to check generalisation.
        """
        proj = self.project(pid)
        rng = random.Random(seed)
        with self.write() as s:
            labelers = list(s.scalars(select(User).where(User.role == "labeler").order_by(User.id)))
            if not labelers:
                raise LabelError(409, "no labelers yet: create labeler accounts first")
            load = dict(s.execute(select(Assignment.labeler_id, func.count()).group_by(Assignment.labeler_id)).all())
            assigned = set(s.scalars(select(Assignment.task_id).join(Task, Task.id == Assignment.task_id)
                                     .where(Task.project_id == pid)))
            tasks = [t for t in s.scalars(select(Task).where(Task.project_id == pid).order_by(Task.id))
                     if t.id not in assigned]
            rng.shuffle(tasks)
            n_multi = round(proj.overlap_fraction * len(tasks))
            per_task = min(proj.overlap_labelers, len(labelers))
            made = 0
            for i, t in enumerate(tasks):
                want = per_task if i < n_multi else 1
                order = labelers[:]
                rng.shuffle(order)
                order.sort(key=lambda u: load.get(u.id, 0))
                for u in order[:want]:
                    s.add(Assignment(task_id=t.id, labeler_id=u.id))
                    load[u.id] = load.get(u.id, 0) + 1
                    made += 1
        return {"tasks": len(tasks), "multi_labeler_tasks": n_multi if per_task > 1 else 0, "assignments": made}

    def assignments_for(self, uid: int, status: str | None = None, limit: int | None = None) -> list[dict]:
        with self.read() as s:
            q = (select(Assignment, Task, Project, Prompt).join(Task, Task.id == Assignment.task_id)
                 .join(Project, Project.id == Task.project_id).join(Prompt, Prompt.id == Task.prompt_id)
                 .where(Assignment.labeler_id == uid).order_by(Assignment.id))
            if status:
                q = q.where(Assignment.status == status)
            if limit:
                q = q.limit(limit)
            return [{"id": a.id, "status": a.status, "project": pr.name, "kind": pr.kind, "prompt": p.ext_id,
                     "preview": json.loads(p.messages)[-1]["content"][:80]} for a, t, pr, p in s.execute(q).all()]

    def task_view(self, aid: int, uid: int) -> dict:
        """Everything a labeler's task page shows. Only the owner may see it (404 otherwise:
        a labeler cannot even learn that another's task exists). Other labelers' answers are never included."""
        with self.read() as s:
            a = s.get(Assignment, aid) if 1 <= aid <= MAX_ID else None
            if a is None or a.labeler_id != uid:
                raise LabelError(404, f"no task {aid} for you")
            t = s.get(Task, a.task_id)
            proj = s.get(Project, t.project_id)
            p = s.get(Prompt, t.prompt_id)
            comps = list(s.scalars(select(Completion).where(Completion.prompt_id == p.id).order_by(Completion.idx)))
            own = s.scalar(select(Label).where(Label.assignment_id == aid))
            turns = list(s.scalars(select(HHTurn).where(HHTurn.assignment_id == aid).order_by(HHTurn.turn)))
        view = {"id": a.id, "status": a.status, "kind": proj.kind, "project": proj.name, "hh_mode": proj.hh_mode,
                "k": proj.k, "messages": json.loads(p.messages), "slot": t.slot,
                "label": json.loads(own.payload) if own else None}
        if proj.kind == "rank":
            view["completions"] = [{"idx": c.idx, "text": c.text} for c in comps]
        elif proj.kind == "rate":
            view["completions"] = [{"idx": c.idx, "text": c.text} for c in comps if c.idx == t.slot]
        elif proj.kind == "hh":
            view["turns"] = [{"turn": h.turn, "context": json.loads(h.context), "a": h.reply_a, "b": h.reply_b,
                              "choice": h.choice} for h in turns]
            view["model"] = proj.model
        return view

    # -- submissions -----------------------------------------------------------------------

    def submit(self, aid: int, uid: int, payload: dict) -> None:
        """Store one validated answer. 404 if not the caller's, 409 if already submitted."""
        try:
            with self.write() as s:
                a = s.get(Assignment, aid) if 1 <= aid <= MAX_ID else None
                if a is None or a.labeler_id != uid:
                    raise LabelError(404, f"no task {aid} for you")
                if a.status == "submitted":
                    raise LabelError(409, f"task {aid} was already submitted; answers cannot be changed")
                s.add(Label(assignment_id=aid, payload=json.dumps(payload)))
                a.status = "submitted"
                a.submitted_at = _now()
        except IntegrityError:  # a concurrent duplicate lost the race on labels.assignment_id
            raise LabelError(409, f"task {aid} was already submitted; answers cannot be changed") from None

    def hh_add_turn(self, aid: int, uid: int, context: list[dict], a: str, b: str) -> None:
        try:
            with self.write() as s:
                asg = s.get(Assignment, aid) if 1 <= aid <= MAX_ID else None
                if asg is None or asg.labeler_id != uid:
                    raise LabelError(404, f"no task {aid} for you")
                if asg.status == "submitted":
                    raise LabelError(409, f"task {aid} was already submitted")
                turns = list(s.scalars(select(HHTurn).where(HHTurn.assignment_id == aid)))
                if any(h.choice is None for h in turns):
                    raise LabelError(409, "pick one of the two replies before writing the next message")
                s.add(HHTurn(assignment_id=aid, turn=len(turns), context=json.dumps(context), reply_a=a, reply_b=b))
        except IntegrityError:
            raise LabelError(409, "that turn was already added") from None

    def hh_choose(self, aid: int, uid: int, turn: int, choice: str) -> None:
        if choice not in ("a", "b"):
            raise LabelError(400, f"choice must be 'a' or 'b', got {choice!r}")
        with self.write() as s:
            asg = s.get(Assignment, aid) if 1 <= aid <= MAX_ID else None
            if asg is None or asg.labeler_id != uid:
                raise LabelError(404, f"no task {aid} for you")
            h = s.scalar(select(HHTurn).where(HHTurn.assignment_id == aid, HHTurn.turn == turn))
            if h is None:
                raise LabelError(400, f"no turn {turn} in this conversation")
            if h.choice is not None:
                raise LabelError(409, f"turn {turn} was already chosen")
            h.choice = choice

    # -- reading labels back (admins only: the app checks the role) ----------------------------

    def labeled(self, pid: int) -> list[dict]:
        """Every submitted answer of a project with its prompt, completions and labeler."""
        with self.read() as s:
            rows = s.execute(
                select(Label, Assignment, Task, Prompt, User).join(Assignment, Assignment.id == Label.assignment_id)
                .join(Task, Task.id == Assignment.task_id).join(Prompt, Prompt.id == Task.prompt_id)
                .join(User, User.id == Assignment.labeler_id).where(Task.project_id == pid).order_by(Label.id)).all()
            comps: dict[int, list[str]] = {}
            for c in s.scalars(select(Completion).join(Prompt, Prompt.id == Completion.prompt_id)
                               .where(Prompt.project_id == pid).order_by(Completion.prompt_id, Completion.idx)):
                comps.setdefault(c.prompt_id, []).append(c.text)
            aids = [a.id for _, a, _, _, _ in rows]
            turns: dict[int, list[HHTurn]] = {}
            if aids:
                for h in s.scalars(select(HHTurn).where(HHTurn.assignment_id.in_(aids)).order_by(HHTurn.turn)):
                    turns.setdefault(h.assignment_id, []).append(h)
        out = []
        for lab, a, t, p, u in rows:
            out.append({"task": t.id, "assignment": a.id, "prompt_ext_id": p.ext_id, "messages": json.loads(p.messages),
                        "user_id": p.user_id, "split": p.split, "slot": t.slot, "labeler": u.name,
                        "held_out": u.held_out, "payload": json.loads(lab.payload),
                        "completions": comps.get(p.id, []),
                        "turns": [{"context": json.loads(h.context), "a": h.reply_a, "b": h.reply_b, "choice": h.choice}
                                  for h in turns.get(a.id, [])]})
        return out

    def counts(self, pid: int) -> dict:
        with self.read() as s:
            n_prompts = s.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == pid))
            n_tasks = s.scalar(select(func.count()).select_from(Task).where(Task.project_id == pid))
            st = dict(s.execute(select(Assignment.status, func.count()).join(Task, Task.id == Assignment.task_id)
                                .where(Task.project_id == pid).group_by(Assignment.status)).all())
            n_comp = s.scalar(select(func.count()).select_from(Completion).join(Prompt, Prompt.id == Completion.prompt_id)
                              .where(Prompt.project_id == pid))
        return {"prompts": n_prompts, "completions": n_comp, "tasks": n_tasks,
                "pending": st.get("pending", 0), "submitted": st.get("submitted", 0)}

