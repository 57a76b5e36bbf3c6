"""Load and crash safety: 20 concurrent labelers against a real uvicorn server on 127.0.0.1.

* a bounded burst: every acknowledged (303) submission is stored exactly once, nothing unacknowledged is stored;
* kill -9 mid-load, restart on the same store: every acknowledged submission is still there, and
  sessions signed before the crash still work.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from labeling_util import CSRF_RE, PW

httpx = pytest.importorskip("httpx")

from instructrl.labeling.store import Completion, Store  # noqa: E402

N_LABELERS = 20
TASKS_EACH = 40
K = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "INSTRUCTRL_ADMIN_PASSWORD": PW}
    proc = subprocess.Popen([sys.executable, "-m", "instructrl", "label", "serve", f"db={db}", f"port={port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def loaded_store(tmp_path):
    """A rank project with TASKS_EACH tasks for each of N_LABELERS labelers (no overlap)."""
    from instructrl.data import PromptRecord
    from instructrl.labeling.security import hash_password
    from instructrl.labeling.store import User

    db = f"sqlite:///{tmp_path / 'load.db'}"
    store = Store(db)
    pid = store.create_project("load", "rank", k=K, overlap_fraction=0.0)
    n = N_LABELERS * TASKS_EACH
    recs = [PromptRecord(f"p{i}", [{"role": "user", "content": f"prompt {i}"}], f"u{i}") for i in range(n)]
    store.import_prompts(pid, {"train": recs}, {})
    with store.write() as s:
        for p in store.prompts(pid):
            s.add_all(Completion(prompt_id=p.id, idx=j, text=f"answer {j} to {p.ext_id}", model="fake") for j in range(K))
        h = hash_password(PW)  # one hash for all: scrypt x 20 adds nothing to what is tested here
        s.add_all(User(name=f"lab{i}", pw_hash=h, role="labeler") for i in range(N_LABELERS))
    store.make_tasks(pid)
    store.assign(pid)
    return db, store, pid


class Labeler(threading.Thread):
    """Logs in, then GET /next -> task page -> POST a ranking, until told to stop or out of tasks.

    Every fifth task is a double click: two submits of the same task released together by a barrier.
    A failed check inside the thread is recorded in ``failures`` (the test fails on it; an exception
    in a thread would only be a warning).
    """

    def __init__(self, base: str, name: str, stop_at: threading.Event):
        super().__init__(daemon=True)
        self.base, self.name, self.stop_at = base, name, stop_at
        self.acked: list[int] = []
        self.refused_dupes = 0
        self.errors = 0
        self.failures: list[str] = []
        self.client = httpx.Client(base_url=base, timeout=30, follow_redirects=False)

    def login(self):
        r = self.client.post("/login", data={"name": self.name, "password": PW})
        assert r.status_code == 303, r.text
        self.csrf = CSRF_RE.search(self.client.get("/").text).group(1)

    def submit(self, aid: int) -> httpx.Response:
        return self.client.post(f"/tasks/{aid}/submit", data={"csrf_token": self.csrf, "order": "3,1,0,2"})

    def double_click(self, aid: int) -> list[int]:
        """Two truly simultaneous submits of one task; the status codes (an exception as -1)."""
        barrier = threading.Barrier(2, timeout=30)
        codes: list[int] = []

        def click():
            try:
                barrier.wait()
                codes.append(self.submit(aid).status_code)
            except (httpx.HTTPError, OSError, threading.BrokenBarrierError):
                codes.append(-1)

        twins = [threading.Thread(target=click) for _ in range(2)]
        [t.start() for t in twins]
        [t.join(60) for t in twins]
        return codes

    def run(self):
        try:
            self.login()
            while not self.stop_at.is_set():
                loc = self.client.get("/next").headers["location"]
                if not loc.startswith("/tasks/"):
                    return  # no tasks left
                aid = int(loc.rsplit("/", 1)[1])
                assert self.client.get(loc).status_code == 200
                if (len(self.acked) + 1) % 5 == 0:  # a double click: one is stored, the other refused
                    codes = self.double_click(aid)
                    if -1 in codes:
                        self.errors += 1
                        return
                    assert sorted(codes) == [303, 409], f"{self.name}: double submit of {aid} got {codes}"
                    self.acked.append(aid)
                    self.refused_dupes += 1
                    continue
                r = self.submit(aid)
                assert r.status_code == 303, f"{self.name}: submit {aid} got {r.status_code}: {r.text[:300]}"
                self.acked.append(aid)
        except (httpx.HTTPError, OSError):
            self.errors += 1  # the server died under us (the crash test); unacknowledged work may be lost
        except Exception as e:  # noqa: BLE001 -- every other failure fails the test, in the main thread
            self.failures.append(f"{self.name}: {type(e).__name__}: {e}")


def thread_failures(workers: list[Labeler]) -> list[str]:
    return [f for w in workers for f in w.failures]


def stored(store: Store, pid: int) -> list[tuple[int, list[int]]]:
    return [(r["assignment"], r["payload"]["order"]) for r in store.labeled(pid)]


def test_20_concurrent_labelers_no_lost_or_duplicated_labels(loaded_store):
    db, store, pid = loaded_store
    port = free_port()
    proc = start_server(db, port)
    try:
        stop_at = threading.Event()
        workers = [Labeler(f"http://127.0.0.1:{port}", f"lab{i}", stop_at) for i in range(N_LABELERS)]
        t0 = time.time()
        [w.start() for w in workers]
        time.sleep(float(os.environ.get("INSTRUCTRL_LOAD_SECONDS", "6")))
        stop_at.set()
        [w.join(60) for w in workers]
        elapsed = time.time() - t0
    finally:
        stop(proc)
    acked = [a for w in workers for a in w.acked]
    assert thread_failures(workers) == []
    assert all(w.errors == 0 for w in workers)
    rows = stored(store, pid)
    ids = [a for a, _ in rows]
    assert len(ids) == len(set(ids))  # no duplicates
    assert sorted(ids) == sorted(acked)  # nothing lost, nothing unacknowledged
    assert all(order == [3, 1, 0, 2] for _, order in rows)  # the refused double clicks changed nothing
    assert len(acked) >= N_LABELERS  # every labeler got work done
    assert sum(w.refused_dupes for w in workers) > 0
    print(f"\n[load] {len(acked)} submissions by {N_LABELERS} labelers in {elapsed:.1f} s "
          f"= {len(acked) / elapsed:.0f}/s ({sum(w.refused_dupes for w in workers)} double submits refused)")


def test_kill_9_mid_load_keeps_every_acknowledged_label(loaded_store):
    db, store, pid = loaded_store
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(db, port)
    stop_at = threading.Event()
    workers = [Labeler(base, f"lab{i}", stop_at) for i in range(N_LABELERS)]
    try:
        [w.start() for w in workers]
        deadline = time.time() + 30
        while sum(len(w.acked) for w in workers) < 60 and time.time() < deadline:
            time.sleep(0.05)  # let the load build up, then kill in the middle of it
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown hooks, no flush
        proc.wait()
        [w.join(60) for w in workers]
    finally:
        stop(proc)
    acked = {a for w in workers for a in w.acked}
    assert thread_failures(workers) == []
    assert acked, "no submission was acknowledged before the kill"
    proc = start_server(db, port)
    try:
        rows = stored(Store(db), pid)
        ids = [a for a, _ in rows]
        assert len(ids) == len(set(ids))
        assert acked <= set(ids), f"lost {len(acked - set(ids))} acknowledged labels"
        assert len(set(ids) - acked) <= N_LABELERS  # at most the requests in flight at the kill
        # the app works after restart and sessions signed before the crash are still valid
        w = workers[0]
        w.client = httpx.Client(base_url=base, timeout=30, follow_redirects=False, cookies=w.client.cookies)
        loc = w.client.get("/next").headers["location"]
        assert loc.startswith("/tasks/")
        aid = int(loc.rsplit("/", 1)[1])
        assert w.client.post(f"/tasks/{aid}/submit", data={"csrf_token": w.csrf, "order": "0,1,2,3"}).status_code == 303
    finally:
        stop(proc)
    print(f"\n[kill -9] {len(acked)} acknowledged before the kill, all present after restart; "
          f"{len(set(ids) - acked)} stored but unacknowledged (in flight)")
