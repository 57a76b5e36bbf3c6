"""Shared helpers for the labeling tests (not a test module)."""

from __future__ import annotations

import os
import re

import pytest

from instructrl.data import PromptRecord
from instructrl.hygiene import HygieneConfig, clean_prompts

PW = "correct horse battery"
PG_URL = os.environ.get("INSTRUCTRL_TEST_PG_URL")

# the store tests run on SQLite always and on PostgreSQL when CI provides a server
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def store_for(backend: str, tmp_path):
    from instructrl.labeling.store import Base, Store

    if backend == "sqlite":
        return Store(f"sqlite:///{tmp_path / 'labels.db'}")
    if not PG_URL:
        pytest.skip("INSTRUCTRL_TEST_PG_URL not set (run .ci/postgres.sh)")
    s = Store(PG_URL, create=False)
    Base.metadata.drop_all(s.engine)  # a clean schema per test
    Base.metadata.create_all(s.engine)
    return s


def prompts(n: int, users: int = 5) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", [{"role": "user", "content": f"prompt number {i}: write about topic {i * 7 % 13}"}],
                         f"u{i % users}") for i in range(n)]


def make_project(store, kind: str = "rank", n: int = 12, k: int = 4, labelers: int = 3, overlap: float = 0.5,
                 held_out: tuple[int, ...] = (), name: str = "proj") -> dict:
    """A project with prompts, fake distinct completions, tasks and assignments."""
    pid = store.create_project(name, kind, k=k, overlap_fraction=overlap, overlap_labelers=2)
    splits, rep = clean_prompts(prompts(n), HygieneConfig())
    store.import_prompts(pid, splits, rep.__dict__)
    if kind in ("rank", "rate"):
        for p in store.prompts(pid):
            store.set_completions(p.id, [f"completion {j} for {p.ext_id}" for j in range(k)], "fake")
    store.make_tasks(pid)
    uids = {}
    for i in range(labelers):
        name_i = f"lab{i}"
        uids[name_i] = store.create_user(name_i, PW, "labeler", held_out=i in held_out)
    store.assign(pid)
    return {"pid": pid, "labelers": uids}


CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def login(client, name: str, password: str = PW) -> str:
    """Log in with an httpx/TestClient client; returns the session's CSRF token."""
    r = client.post("/login", data={"name": name, "password": password}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/")
    m = CSRF_RE.search(page.text)
    assert m, page.text[:500]
    return m.group(1)
