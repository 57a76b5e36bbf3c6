"""Labeling store: accounts, assignment, submissions, exports, agreement -- on SQLite and PostgreSQL."""

import json
import threading

import pytest
from labeling_util import BACKENDS, PW, make_project, store_for

from instructrl.data import load_demonstrations, load_rankings, load_ratings
from instructrl.labeling.export import agreement, build_records, export_project
from instructrl.labeling.store import LabelError


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = store_for(request.param, tmp_path)
    yield s
    s.dispose()


def test_accounts_and_passwords(store):
    uid = store.create_user("alice", PW, "labeler")
    assert store.authenticate("alice", PW).id == uid
    assert store.authenticate("alice", PW + "x") is None
    assert store.authenticate("nobody", PW) is None
    assert "scrypt$" in store.get_user(uid).pw_hash and PW not in store.get_user(uid).pw_hash
    with pytest.raises(LabelError) as e:
        store.create_user("alice", PW)
    assert e.value.status == 409
    with pytest.raises(LabelError, match="at least 8"):
        store.create_user("bob", "short")
    with pytest.raises(LabelError, match="role"):
        store.create_user("bob", PW, role="root")
    assert store.secret_key() == store.secret_key()  # stable across calls (and restarts)


def test_assignment_overlap_and_balance(store):
    info = make_project(store, n=20, labelers=3, overlap=0.5)
    labeled_by: dict[int, int] = {}
    load = {}
    for name, uid in info["labelers"].items():
        mine = store.assignments_for(uid)
        load[name] = len(mine)
        for a in mine:
            view = store.task_view(a["id"], uid)
            labeled_by[view["messages"][0]["content"]] = labeled_by.get(view["messages"][0]["content"], 0) + 1
    assert len(labeled_by) == 20  # every task assigned
    assert sum(1 for v in labeled_by.values() if v == 2) == 10  # 50% go to two labelers
    assert sum(load.values()) == 30
    assert max(load.values()) - min(load.values()) <= 1  # least-loaded first
    again = store.assign(info["pid"])
    assert again["assignments"] == 0  # idempotent


def test_submit_once_only_own_task(store):
    info = make_project(store, n=4, labelers=2, overlap=1.0)
    a_uid, b_uid = info["labelers"]["lab0"], info["labelers"]["lab1"]
    aid = store.assignments_for(a_uid)[0]["id"]
    with pytest.raises(LabelError) as e:
        store.task_view(aid, b_uid)  # someone else's task: invisible
    assert e.value.status == 404
    with pytest.raises(LabelError) as e:
        store.submit(aid, b_uid, {"order": [0, 1, 2, 3], "all_bad": False})
    assert e.value.status == 404
    store.submit(aid, a_uid, {"order": [3, 2, 1, 0], "all_bad": False})
    with pytest.raises(LabelError) as e:
        store.submit(aid, a_uid, {"order": [0, 1, 2, 3], "all_bad": False})
    assert e.value.status == 409
    # b shares the task (overlap 1.0) but its view never carries a's answer
    b_same = [a for a in store.assignments_for(b_uid) if store.task_view(a["id"], b_uid)["messages"]
              == store.task_view(aid, a_uid)["messages"]][0]
    assert store.task_view(b_same["id"], b_uid)["label"] is None
    labeled = store.labeled(info["pid"])
    assert [r["payload"]["order"] for r in labeled] == [[3, 2, 1, 0]]


def test_concurrent_double_submit_stores_one(store):
    info = make_project(store, n=2, labelers=1, overlap=0.0)
    uid = info["labelers"]["lab0"]
    aid = store.assignments_for(uid)[0]["id"]
    results = []

    def go(i):
        try:
            store.submit(aid, uid, {"order": [i % 4, (i + 1) % 4, (i + 2) % 4, (i + 3) % 4], "all_bad": False})
            results.append("ok")
        except LabelError as e:
            results.append(e.status)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results.count("ok") == 1 and results.count(409) == 7
    assert len(store.labeled(info["pid"])) == 1


def test_import_is_all_or_nothing(store):
    from instructrl.data import PromptRecord

    info = make_project(store, n=3, labelers=1)
    before = len(store.prompts(info["pid"]))
    dup = {"train": [PromptRecord("new1", [{"role": "user", "content": "x"}]),
                     PromptRecord("p0", [{"role": "user", "content": "y"}])]}
    with pytest.raises(LabelError) as e:
        store.import_prompts(info["pid"], dup, {})
    assert e.value.status == 409 and "p0" in e.value.message
    assert len(store.prompts(info["pid"])) == before


def test_agreement_hand_worked(store):
    info = make_project(store, n=1, k=3, labelers=2, overlap=1.0)
    (a, ua), (b, ub) = info["labelers"].items()
    store.submit(store.assignments_for(ua)[0]["id"], ua, {"order": [0, 1, 2], "all_bad": False})
    store.submit(store.assignments_for(ub)[0]["id"], ub, {"order": [0, 2, 1], "all_bad": False})
    ag = agreement(store.labeled(info["pid"]))
    # comparisons (0,1) agree, (0,2) agree, (1,2) disagree -> 2 of 3
    assert ag["n_pairs"] == 3 and ag["rate"] == pytest.approx(2 / 3)
    assert ag["per_labeler"][a]["rate"] == pytest.approx(2 / 3)
    assert 0 < ag["lo"] < 2 / 3 < ag["hi"] < 1
    assert ag["groups"]["train"]["n_pairs"] == 3 and ag["groups"]["held_out"]["rate"] is None


def test_exports_round_trip_and_respect_splits_and_held_out(store, tmp_path):
    info = make_project(store, n=30, k=4, labelers=3, overlap=0.3, held_out=(2,), name="r")
    for name, uid in info["labelers"].items():
        for a in store.assignments_for(uid):
            store.submit(a["id"], uid, {"order": [1, 0, 3, 2], "all_bad": name == "lab1"})
    rate = make_project_rate(store)
    demo_pid = store.create_project("d", "demonstration")
    from instructrl.hygiene import HygieneConfig, clean_prompts
    from labeling_util import prompts

    splits, rep = clean_prompts(prompts(5), HygieneConfig())
    store.import_prompts(demo_pid, splits, rep.__dict__)
    store.make_tasks(demo_pid)
    store.assign(demo_pid)
    for uid in info["labelers"].values():
        for a in store.assignments_for(uid, status="pending"):
            store.submit(a["id"], uid, {"response": "a careful answer"})

    counts = export_project(store, info["pid"], tmp_path / "out")
    files = {f: n for f, n in counts.items()}
    rows = [r for f in files for r in load_rankings(tmp_path / "out" / f)]
    labeled = store.labeled(info["pid"])
    train_labels = [r for r in labeled if not r["held_out"]]
    assert len(rows) == len(train_labels) > 0
    assert all(r.labeler_id != "lab2" for r in rows)  # held-out labeler excluded by default
    first = rows[0]
    assert first.responses[0].startswith("completion 1") and first.responses[1].startswith("completion 0")
    # no user id appears in two splits
    users = {}
    for f in files:
        for r in load_rankings(tmp_path / "out" / f):
            users.setdefault(r.user_id, set()).add(f.split("/")[0])
    assert all(len(v) == 1 for v in users.values())
    ag = json.loads((tmp_path / "out" / "agreement.json").read_text())
    assert ag["n_pairs"] > 0 and ag["rate"] == 1.0  # everyone gave the same order
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["all_bad_rankings"] > 0
    held = build_records(labeled, labelers="held_out")["rankings"]
    assert sum(len(v) for v in held.values()) == sum(1 for r in labeled if r["held_out"]) > 0

    export_project(store, rate, tmp_path / "rate")
    rated = [r for f in (tmp_path / "rate").glob("*/ratings.jsonl") for r in load_ratings(f)]
    assert rated and all(r.rating == 5 and r.flags["hallucination"] for r in rated)
    export_project(store, demo_pid, tmp_path / "demo")
    demos = [d for f in (tmp_path / "demo").glob("*/demonstrations.jsonl") for d in load_demonstrations(f)]
    not_held = [r for r in store.labeled(demo_pid) if not r["held_out"]]
    assert len(demos) == len(not_held) >= 1 and demos[0].response == "a careful answer"
    assert all(d.labeler_id != "lab2" for d in demos)


def make_project_rate(store) -> int:
    from instructrl.data import RATING_FLAGS
    from instructrl.hygiene import HygieneConfig, clean_prompts
    from labeling_util import prompts

    pid = store.create_project("rate", "rate", k=2)
    splits, rep = clean_prompts(prompts(3), HygieneConfig())
    store.import_prompts(pid, splits, rep.__dict__)
    for p in store.prompts(pid):
        store.set_completions(p.id, ["first answer", "second answer"], "fake")
    assert store.make_tasks(pid) == 6  # one task per completion
    store.assign(pid)
    flags = {f: f == "hallucination" for f in RATING_FLAGS}
    for u in store.users():
        for a in store.assignments_for(u.id, status="pending"):
            if store.task_view(a["id"], u.id)["kind"] == "rate":
                store.submit(a["id"], u.id, {"rating": 5, "flags": flags})
    return pid


def test_project_validation(store):
    for kw, msg in [({"kind": "essay"}, "kind"), ({"kind": "rank", "k": 1}, "K between"),
                    ({"kind": "rank", "overlap_fraction": 1.5}, "overlap_fraction")]:
        with pytest.raises(LabelError, match=msg):
            store.create_project("x", **kw)


def test_sessions_revocation_expiry_and_disabled_accounts(store):
    uid = store.create_user("carol", PW)
    sid = store.create_session(uid, 60)
    assert store.session_user(sid).id == uid
    expired = store.create_session(uid, -1)
    assert store.session_user(expired) is None  # expired
    other = store.create_session(uid, 60)
    store.revoke_session(sid)
    assert store.session_user(sid) is None and store.session_user(other).id == uid
    store.set_disabled(uid, True)
    assert store.session_user(other) is None and store.authenticate("carol", PW) is None
    store.set_disabled(uid, False)
    assert store.session_user(other) is None  # disabling ended it for good
    assert store.authenticate("carol", PW).id == uid
    keep, drop = store.create_session(uid, 60), store.create_session(uid, 60)
    with pytest.raises(LabelError) as e:
        store.change_own_password(uid, "not it", "a new password")
    assert e.value.status == 403
    store.change_own_password(uid, PW, "a new password", keep_sid=keep)
    assert store.session_user(keep).id == uid and store.session_user(drop) is None
    from instructrl.labeling.store import AuthSession

    with store.read() as s:
        assert s.get(AuthSession, expired) is None  # swept by the later logins
    store.set_password(uid, "third password")
    assert store.session_user(keep) is None and store.authenticate("carol", "third password").id == uid
    with pytest.raises(LabelError, match="at least 8"):
        store.set_password(uid, "short")
    with pytest.raises(LabelError) as e:
        store.set_disabled(10**30, True)
    assert e.value.status == 404


def test_old_store_is_upgraded(tmp_path):
    import sqlite3

    from instructrl.labeling.store import Store

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)  # the users/settings tables as the previous version made them
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(64) UNIQUE, pw_hash VARCHAR(256), "
                "role VARCHAR(16), held_out BOOLEAN, created_at DATETIME)")
    con.execute("CREATE TABLE settings (key VARCHAR(64) PRIMARY KEY, value TEXT)")
    con.execute("INSERT INTO settings VALUES ('secret_key', 'an old plain-text key')")
    con.commit()
    con.close()
    s = Store(f"sqlite:///{db}")
    uid = s.create_user("dave", PW)
    assert s.get_user(uid).disabled is False
    s.dispose()
    assert "an old plain-text key" not in "\n".join(sqlite3.connect(db).iterdump())
