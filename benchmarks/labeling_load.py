"""Labeling app under load: N concurrent labelers against `instructrl label serve` on 127.0.0.1.

    .venv/bin/python benchmarks/labeling_load.py [--labelers 20] [--seconds 20] [--db sqlite|URL]

Prints submissions per second, submit latency percentiles, and checks that the stored labels equal the
acknowledged ones (no loss, no duplicates). Each simulated labeler does what the browser does: GET /next,
GET the task page, POST the ranking. Client and server share this machine's cores.
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labelers", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tasks-each", type=int, default=400)
    ap.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL SQLAlchemy URL (its tables are reset)")
    args = ap.parse_args()

    import httpx
    from labeling_util import CSRF_RE, PW
    from test_labeling_load import free_port, start_server, stop

    from instructrl.data import PromptRecord
    from instructrl.labeling.security import hash_password
    from instructrl.labeling.store import Base, Completion, Store, User

    tmp = tempfile.mkdtemp(prefix="instructrl-load-")
    db = f"sqlite:///{tmp}/load.db" if args.db == "sqlite" else args.db
    store = Store(db, create=args.db == "sqlite")  # a server database: its tables are reset below
    Base.metadata.drop_all(store.engine)
    Base.metadata.create_all(store.engine)
    pid = store.create_project("load", "rank", k=4, overlap_fraction=0.0)
    n = args.labelers * args.tasks_each
    store.import_prompts(pid, {"train": [PromptRecord(f"p{i}", [{"role": "user", "content": f"prompt {i}"}], f"u{i}")
                                         for i in range(n)]}, {})
    with store.write() as s:
        for p in store.prompts(pid):
            s.add_all(Completion(prompt_id=p.id, idx=j, text=f"answer {j} to {p.ext_id}") for j in range(4))
        h = hash_password(PW)
        s.add_all(User(name=f"lab{i}", pw_hash=h, role="labeler") for i in range(args.labelers))
    store.make_tasks(pid)
    store.assign(pid)
    port = free_port()
    proc = start_server(db, port)
    stop_at = threading.Event()
    acked: list[int] = []
    lat: list[float] = []
    lock = threading.Lock()

    def labeler(name: str) -> None:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, follow_redirects=False)
        c.post("/login", data={"name": name, "password": PW})
        tok = CSRF_RE.search(c.get("/").text).group(1)
        while not stop_at.is_set():
            loc = c.get("/next").headers["location"]
            if not loc.startswith("/tasks/"):
                return
            c.get(loc)
            aid = int(loc.rsplit("/", 1)[1])
            t0 = time.perf_counter()
            r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "order": "2,0,3,1"})
            dt = time.perf_counter() - t0
            assert r.status_code == 303, r.text
            with lock:
                acked.append(aid)
                lat.append(dt)

    try:
        threads = [threading.Thread(target=labeler, args=(f"lab{i}",), daemon=True) for i in range(args.labelers)]
        t0 = time.time()
        [t.start() for t in threads]
        time.sleep(args.seconds)
        stop_at.set()
        [t.join(120) for t in threads]
        elapsed = time.time() - t0
    finally:
        stop(proc)
    stored = [r["assignment"] for r in store.labeled(pid)]
    lat.sort()
    pct = {p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 for p in (50, 95, 99)}
    print(f"store: {db.split('://')[0]}; {args.labelers} labelers for {elapsed:.1f} s")
    print(f"submissions acknowledged: {len(acked)} ({len(acked) / elapsed:.1f}/s; each also did GET /next + GET task)")
    print(f"submit latency ms: p50 {pct[50]:.1f}  p95 {pct[95]:.1f}  p99 {pct[99]:.1f}")
    ok = sorted(stored) == sorted(acked) and len(stored) == len(set(stored))
    print(f"stored == acknowledged, no duplicates: {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
