"""The labeling web app through HTTP: roles, CSRF, bad input, import, generation, HH chats, exports."""

import io
import json
import re
import time

import pytest
from labeling_util import CSRF_RE, PW, login, make_project

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from instructrl.data import load_rankings  # noqa: E402
from instructrl.labeling.app import LabelConfig, create_app, ensure_admin, parse_order  # noqa: E402
from instructrl.labeling.store import LabelError, Store  # noqa: E402


@pytest.fixture
def env(tmp_path):
    cfg = LabelConfig(db=f"sqlite:///{tmp_path / 'l.db'}", admin_password=PW, max_text_chars=200)
    cfg.gen.max_new_tokens = 8
    cfg.gen.batch_size = 2
    store = Store(cfg.db)
    ensure_admin(store, cfg)
    app = create_app(cfg, store)
    info = make_project(store, n=6, k=4, labelers=2, overlap=1.0)

    def client():
        return TestClient(app, follow_redirects=False)

    yield {"cfg": cfg, "store": store, "client": client, **info}
    store.dispose()


def first_task(store, uid):
    return store.assignments_for(uid, status="pending")[0]["id"]


def test_parse_order():
    assert parse_order("2,0,1,3", 4) == [2, 0, 1, 3]
    for bad in ("0,1,2", "0,1,1,2", "0,1,2,4", "a,b,c,d", "", None):
        with pytest.raises(LabelError) as e:
            parse_order(bad, 4)
        assert e.value.status == 400 and "invalid ranking" in e.value.message


def test_login_required_and_bad_password(env):
    c = env["client"]()
    assert c.get("/").status_code == 303 and c.get("/").headers["location"] == "/login"
    r = c.post("/login", data={"name": "lab0", "password": "wrong password"})
    assert r.status_code == 401 and "wrong user name or password" in r.text
    r = c.post("/login", data={"name": "nobody", "password": PW})
    assert r.status_code == 401
    assert c.get("/tasks/1").status_code == 303  # still not logged in
    c.cookies.set("instructrl_session", "forged.cookie.value")
    assert c.get("/").status_code == 303


def test_labeler_sees_only_own_tasks_and_no_other_answers(env):
    store, labs = env["store"], env["labelers"]
    a, b = env["client"](), env["client"]()
    ta, tb = login(a, "lab0"), login(b, "lab1")
    aid_b = first_task(store, labs["lab1"])
    assert a.get(f"/tasks/{aid_b}").status_code == 404
    r = a.post(f"/tasks/{aid_b}/submit", data={"csrf_token": ta, "order": "0,1,2,3"})
    assert r.status_code == 404
    # b answers; a's pages are byte-for-byte what they were before, and list only a's tasks
    mine = {x["id"] for x in store.assignments_for(labs["lab0"])}
    before = {aid: a.get(f"/tasks/{aid}").text for aid in mine}
    r = b.post(f"/tasks/{aid_b}/submit", data={"csrf_token": tb, "order": "3,2,1,0", "all_bad": "on"})
    assert r.status_code == 303
    assert {aid: a.get(f"/tasks/{aid}").text for aid in mine} == before
    home = a.get("/").text
    listed = {int(x) for x in __import__("re").findall(r'href="/tasks/(\d+)"', home)}
    assert listed and listed <= mine and aid_b not in listed


def test_only_admins_export_or_administer(env):
    store, pid = env["store"], env["pid"]
    lab = env["client"]()
    tok = login(lab, "lab0")
    for url in (f"/admin/projects/{pid}/export/rankings.jsonl", f"/admin/projects/{pid}/agreement.json",
                f"/admin/projects/{pid}", f"/admin/projects/{pid}/progress"):
        assert lab.get(url).status_code == 403, url
    r = lab.post("/admin/projects", data={"csrf_token": tok, "name": "mine", "kind": "rank"})
    assert r.status_code == 403 and "only admins" in r.text
    r = lab.post("/admin/users", data={"csrf_token": tok, "name": "evil", "password": PW, "role": "admin"})
    assert r.status_code == 403
    assert all(u.name != "evil" for u in store.users())
    # the admin can: answer a few tasks, then export
    for name, uid in env["labelers"].items():
        for aid in [x["id"] for x in store.assignments_for(uid, status="pending")][:3]:
            store.submit(aid, uid, {"order": [0, 1, 2, 3], "all_bad": False})
    adm = env["client"]()
    login(adm, "admin")
    total = 0
    for split in ("train", "val", "test"):
        r = adm.get(f"/admin/projects/{pid}/export/rankings.jsonl", params={"split": split})
        assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
        rows = [json.loads(x) for x in r.text.splitlines()]
        total += len(load_rankings(rows))
    assert total == 6
    ag = adm.get(f"/admin/projects/{pid}/agreement.json").json()
    assert ag["n_pairs"] > 0
    assert "Agreement" in adm.get(f"/admin/projects/{pid}").text


def test_csrf_required(env):
    store = env["store"]
    c = env["client"]()
    tok = login(c, "lab0")
    aid = first_task(store, env["labelers"]["lab0"])
    r = c.post(f"/tasks/{aid}/submit", data={"order": "0,1,2,3"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(f"/tasks/{aid}/submit", data={"order": "0,1,2,3", "csrf_token": "0" * 64})
    assert r.status_code == 403
    other = env["client"]()
    other_tok = login(other, "lab1")  # a token from another session does not work either
    assert c.post(f"/tasks/{aid}/submit", data={"order": "0,1,2,3", "csrf_token": other_tok}).status_code == 403
    assert store.task_view(aid, env["labelers"]["lab0"])["status"] == "pending"
    r = c.post(f"/tasks/{aid}/submit", data={"order": "0,1,2,3"}, headers={"X-CSRF-Token": tok})
    assert r.status_code == 303


def test_bad_input_gets_clear_4xx(env):
    store, cfg = env["store"], env["cfg"]
    c = env["client"]()
    tok = login(c, "lab0")
    aid = first_task(store, env["labelers"]["lab0"])
    r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "order": "0,1,1,3"})
    assert r.status_code == 400 and "invalid ranking" in r.text and "permutation" in r.text
    r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "order": "0,1,2,3"},
               headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json() == {"ok": True, "assignment": aid}
    r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "order": "3,2,1,0"})
    assert r.status_code == 409 and "already submitted" in r.text
    assert store.labeled(env["pid"])[0]["payload"]["order"] == [0, 1, 2, 3]  # unchanged
    # oversized demonstration, empty demonstration
    adm = env["client"]()
    atok = login(adm, "admin")
    r = adm.post("/admin/projects", data={"csrf_token": atok, "name": "demo", "kind": "demonstration"})
    pid = int(r.headers["location"].rsplit("/", 1)[1])
    good = b'{"id": "d1", "prompt": "explain tides", "user_id": "x"}\n'
    r = adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": atok},
                 files={"file": ("demo.jsonl", io.BytesIO(good))})
    assert r.status_code == 200, r.text
    adm.post(f"/admin/projects/{pid}/assign", data={"csrf_token": atok})
    owner = [u for u in store.users() if store.assignments_for(u.id, status="pending")
             and any(a["project"] == "demo" for a in store.assignments_for(u.id, status="pending"))][0]
    d_aid = [a["id"] for a in store.assignments_for(owner.id, status="pending") if a["project"] == "demo"][0]
    oc = env["client"]()
    otok = login(oc, owner.name)
    r = oc.post(f"/tasks/{d_aid}/submit", data={"csrf_token": otok, "response": "x" * (cfg.max_text_chars + 1)})
    assert r.status_code == 413 and "limit is 200" in r.text
    r = oc.post(f"/tasks/{d_aid}/submit", data={"csrf_token": otok, "response": "   "})
    assert r.status_code == 400 and "empty" in r.text
    # malformed import line: named, nothing imported
    bad = good.replace(b"d1", b"d2") + b'{"id": "d3", "prompt": "ok"}\n{"id": "d4", "prompt": \n'
    r = adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": atok},
                 files={"file": ("bad.jsonl", io.BytesIO(bad))})
    assert r.status_code == 400 and "bad.jsonl:3" in r.text and "not valid JSON" in r.text
    bad2 = b'{"id": "d5", "prompt": ""}\n'
    r = adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": atok},
                 files={"file": ("bad2.jsonl", io.BytesIO(bad2))})
    assert r.status_code == 400 and "bad2.jsonl:1: field &#39;prompt&#39;: is empty" in r.text
    assert [p.ext_id for p in store.prompts(pid)] == ["d1"]
    # rating out of range / unknown flag
    rp = store.create_project("rate", "rate", k=1)
    from instructrl.hygiene import HygieneConfig, clean_prompts
    from labeling_util import prompts

    splits, rep = clean_prompts(prompts(1), HygieneConfig())
    store.import_prompts(rp, splits, rep.__dict__)
    store.set_completions(store.prompts(rp)[0].id, ["an answer"], "fake")
    store.make_tasks(rp)
    store.assign(rp)
    ruser = [u for u in store.users() if any(a["project"] == "rate" for a in store.assignments_for(u.id))][0]
    r_aid = [a["id"] for a in store.assignments_for(ruser.id) if a["project"] == "rate"][0]
    rc = env["client"]()
    rtok = login(rc, ruser.name)
    assert rc.post(f"/tasks/{r_aid}/submit", data={"csrf_token": rtok, "rating": "8"}).status_code == 400
    r = rc.post(f"/tasks/{r_aid}/submit", data={"csrf_token": rtok, "rating": "3", "flag_is_rude": "on"})
    assert r.status_code == 400 and "unknown flags" in r.text
    r = rc.post(f"/tasks/{r_aid}/submit", data={"csrf_token": rtok, "rating": "3", "flag_harmful_advice": "on"})
    assert r.status_code == 303
    got = [x for x in store.labeled(rp)][0]["payload"]
    assert got["rating"] == 3 and got["flags"]["harmful_advice"] and not got["flags"]["hallucination"]


def test_import_reports_hygiene(env):
    adm = env["client"]()
    tok = login(adm, "admin")
    r = adm.post("/admin/projects", data={"csrf_token": tok, "name": "hyg", "kind": "demonstration"})
    pid = int(r.headers["location"].rsplit("/", 1)[1])
    lines = [{"id": f"q{i}", "prompt": f"Tell me a story about dragons number {i}", "user_id": "u1"} for i in range(3)]
    lines += [{"id": "q9", "prompt": "Email me at jane@example.org about it", "user_id": "u2"}]
    lines += [{"id": "q10", "prompt": "Tell me a story about dragons number 0", "user_id": "u3"}]  # duplicate
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    r = adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": tok}, files={"file": ("p.jsonl", io.BytesIO(data))})
    assert r.status_code == 200
    assert "email 1" in r.text and "1 duplicates removed" in r.text and "Imported 4 prompts" in r.text
    stored = {p.ext_id: json.loads(p.messages)[0]["content"] for p in env["store"].prompts(pid)}
    assert stored["q9"] == "Email me at [EMAIL] about it" and "q10" not in stored
    assert "email 1" in adm.get(f"/admin/projects/{pid}").text


def test_generation_with_progress(env, tiny_model_dir):
    store = env["store"]
    adm = env["client"]()
    tok = login(adm, "admin")
    r = adm.post("/admin/projects", data={"csrf_token": tok, "name": "gen", "kind": "rank", "k": "3",
                                          "model": str(tiny_model_dir)})
    pid = int(r.headers["location"].rsplit("/", 1)[1])
    data = "".join(json.dumps({"id": f"g{i}", "prompt": f"write a poem about the sea {i}", "user_id": f"u{i}"}) + "\n"
                   for i in range(5)).encode()
    assert adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": tok},
                    files={"file": ("g.jsonl", io.BytesIO(data))}).status_code == 200
    assert adm.post(f"/admin/projects/{pid}/generate", data={"csrf_token": tok}).status_code == 303
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        j = adm.get(f"/admin/projects/{pid}/progress").json()
        seen.append(j["done"])
        if j["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert j["status"] == "done" and j["done"] == j["total"] == 5, j
    assert seen == sorted(seen)
    for p in store.prompts(pid):
        texts = [c.text for c in store.completions(p.id)]
        assert len(texts) == 3 and len(set(texts)) == 3 and all(t.strip() for t in texts)
    assert store.counts(pid)["tasks"] == 5
    assert adm.post(f"/admin/projects/{pid}/assign", data={"csrf_token": tok}).status_code == 303
    assert store.counts(pid)["pending"] >= 5


@pytest.mark.parametrize("mode", ["helpful", "red_team"])
def test_hh_chat_turns_and_pairwise_export(env, tiny_model_dir, mode, tmp_path):
    store = env["store"]
    adm = env["client"]()
    tok = login(adm, "admin")
    r = adm.post("/admin/projects", data={"csrf_token": tok, "name": f"hh-{mode}", "kind": "hh", "hh_mode": mode,
                                          "model": str(tiny_model_dir), "overlap_fraction": "0"})
    pid = int(r.headers["location"].rsplit("/", 1)[1])
    data = json.dumps({"id": "h1", "prompt": "hello there", "user_id": "u1"}).encode() + b"\n"
    adm.post(f"/admin/projects/{pid}/import", data={"csrf_token": tok}, files={"file": ("h.jsonl", io.BytesIO(data))})
    adm.post(f"/admin/projects/{pid}/assign", data={"csrf_token": tok})
    owner = [u for u in store.users() if any(a["project"] == f"hh-{mode}" for a in store.assignments_for(u.id))][0]
    aid = [a["id"] for a in store.assignments_for(owner.id) if a["project"] == f"hh-{mode}"][0]
    c = env["client"]()
    t = login(c, owner.name)
    assert c.post(f"/tasks/{aid}/hh/finish", data={"csrf_token": t}).status_code == 400  # nothing picked yet
    assert c.post(f"/tasks/{aid}/hh/say", data={"csrf_token": t}).status_code == 303
    page = c.get(f"/tasks/{aid}").text
    assert "Pick A" in page and "Pick B" in page
    r = c.post(f"/tasks/{aid}/hh/say", data={"csrf_token": t, "message": "more"})
    assert r.status_code == 409 and "pick one" in r.text  # must choose first
    assert c.post(f"/tasks/{aid}/hh/choose", data={"csrf_token": t, "turn": "0", "choice": "a"}).status_code == 303
    assert c.post(f"/tasks/{aid}/hh/choose", data={"csrf_token": t, "turn": "0", "choice": "b"}).status_code == 409
    assert c.post(f"/tasks/{aid}/hh/say", data={"csrf_token": t, "message": "tell me more"}).status_code == 303
    assert c.post(f"/tasks/{aid}/hh/choose", data={"csrf_token": t, "turn": "1", "choice": "b"}).status_code == 303
    assert c.post(f"/tasks/{aid}/hh/finish", data={"csrf_token": t}).status_code == 303
    turns = store.task_view(aid, owner.id)["turns"]
    # the pick continues the dialogue: turn 1's context = turn 0 context + picked reply + new message
    assert turns[1]["context"] == turns[0]["context"] + [
        {"role": "assistant", "content": turns[0]["a"]}, {"role": "user", "content": "tell me more"}]
    from instructrl.labeling.export import export_project

    export_project(store, pid, tmp_path / "hh", labelers="all")
    pairs = [r for f in (tmp_path / "hh").glob("*/pairwise.jsonl") for r in load_rankings(f)]
    assert len(pairs) == 2
    picked = [turns[0]["a"], turns[1]["b"]]
    for pair, pick in zip(pairs, picked):
        assert pair.responses[0 if mode == "helpful" else 1] == pick  # red team: the picked (harmful) one loses


def test_login_page_and_csrf_token_in_forms(env):
    c = env["client"]()
    assert "Log in" in c.get("/login").text
    login(c, "lab0")
    page = c.get(f"/tasks/{first_task(env['store'], env['labelers']['lab0'])}").text
    assert CSRF_RE.search(page) and 'id="ranking"' in page
    r = c.get("/")
    assert r.headers["x-frame-options"] == "DENY" and "default-src 'self'" in r.headers["content-security-policy"]


# ---------------------------------------------------------------------------
# Hardening (issue 22): sessions, signing key, 4xx instead of 500s, limits before authentication
# ---------------------------------------------------------------------------

COOKIE = "instructrl_session"


def lab_state(env):
    return env["client"]().app.state.lab


def test_logout_ends_the_session_for_the_old_cookie(env):
    c = env["client"]()
    tok = login(c, "lab0")
    old = c.cookies.get(COOKIE)
    assert c.post("/logout", data={"csrf_token": tok}).status_code == 303
    c.cookies.set(COOKIE, old)  # a copy of the cookie taken before logout
    assert c.get("/").status_code == 303 and c.get("/").headers["location"] == "/login"
    aid = first_task(env["store"], env["labelers"]["lab0"])
    r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "order": "0,1,2,3"})
    assert r.status_code == 401
    assert env["store"].task_view(aid, env["labelers"]["lab0"])["status"] == "pending"


def test_expired_session_is_refused(env):
    st = lab_state(env)
    sid = env["store"].create_session(env["labelers"]["lab0"], seconds=-1)
    c = env["client"]()
    c.cookies.set(COOKIE, st.sessions.cookie(sid))
    assert c.get("/").status_code == 303
    live = env["store"].create_session(env["labelers"]["lab0"], seconds=60)
    c.cookies.set(COOKIE, st.sessions.cookie(live))
    assert c.get("/").status_code == 200


def test_forged_cookies_are_rejected(env):
    from itsdangerous import URLSafeTimedSerializer

    store, st = env["store"], lab_state(env)
    c = env["client"]()
    login(c, "lab0")
    sid = st.sessions.read(c.cookies.get(COOKIE))
    assert sid and c.get("/").status_code == 200
    wrong_key = URLSafeTimedSerializer("not the server's key " * 3, salt="instructrl-session")
    right_key = URLSafeTimedSerializer(store.secret_key(), salt="instructrl-session")
    other = env["client"]()
    login(other, "lab1")
    other_sid = st.sessions.read(other.cookies.get(COOKIE))
    other.post("/logout", data={"csrf_token": st.sessions.csrf(other_sid)})  # lab1's session is now revoked
    forged = {
        "live session id signed with a wrong key": wrong_key.dumps(sid),
        "revoked session id, correctly signed": right_key.dumps(other_sid),
        "made-up session id, correctly signed": right_key.dumps("x" * 43),
        "old-style uid payload, correctly signed": right_key.dumps({"uid": env["labelers"]["lab1"], "sid": sid}),
    }
    for what, cookie in forged.items():
        f = env["client"]()
        f.cookies.set(COOKIE, cookie)
        assert f.get("/").status_code == 303, what
        assert f.post("/logout", data={"csrf_token": st.sessions.csrf(sid)}).status_code == 401, what


def test_admin_disables_accounts_and_resets_passwords(env):
    store, uid = env["store"], env["labelers"]["lab0"]
    lab = env["client"]()
    login(lab, "lab0")
    adm = env["client"]()
    atok = login(adm, "admin")
    assert 'action="/admin/users/%d/disable"' % uid in adm.get("/").text
    assert adm.post(f"/admin/users/{uid}/disable", data={"csrf_token": atok, "disabled": "on"}).status_code == 303
    assert lab.get("/").status_code == 303  # its session stopped working at once
    assert lab.post("/login", data={"name": "lab0", "password": PW}).status_code == 401
    assert adm.post(f"/admin/users/{uid}/disable", data={"csrf_token": atok}).status_code == 303  # enable again
    login(lab, "lab0")
    admin_id = [u.id for u in store.users() if u.name == "admin"][0]
    r = adm.post(f"/admin/users/{admin_id}/disable", data={"csrf_token": atok, "disabled": "on"})
    assert r.status_code == 409 and "your own account" in r.text
    r = adm.post(f"/admin/users/{uid}/password", data={"csrf_token": atok, "password": "short"})
    assert r.status_code == 400 and "at least 8" in r.text
    r = adm.post(f"/admin/users/{uid}/password", data={"csrf_token": atok, "password": "a new secret pw"})
    assert r.status_code == 303
    assert lab.get("/").status_code == 303  # a reset ends the account's sessions
    assert lab.post("/login", data={"name": "lab0", "password": PW}).status_code == 401
    login(lab, "lab0", "a new secret pw")
    ltok = login(env["client"](), "lab1")
    r = env["client"]().post(f"/admin/users/{uid}/disable", data={"csrf_token": ltok, "disabled": "on"})
    assert r.status_code == 401  # a fresh client has no session
    labc = env["client"]()
    ltok = login(labc, "lab1")
    assert labc.post(f"/admin/users/{uid}/disable", data={"csrf_token": ltok, "disabled": "on"}).status_code == 403


def test_user_changes_own_password(env):
    a, b = env["client"](), env["client"]()
    tok = login(a, "lab0")
    login(b, "lab0")
    assert "Change your password" in a.get("/account/password").text
    r = a.post("/account/password", data={"csrf_token": tok, "password": "wrong", "new_password": "another pw 1",
                                          "repeat_password": "another pw 1"})
    assert r.status_code == 403 and "current password is wrong" in r.text
    r = a.post("/account/password", data={"csrf_token": tok, "password": PW, "new_password": "another pw 1",
                                          "repeat_password": "another pw 2"})
    assert r.status_code == 400 and "differ" in r.text
    r = a.post("/account/password", data={"csrf_token": tok, "password": PW, "new_password": "another pw 1",
                                          "repeat_password": "another pw 1"})
    assert r.status_code == 200 and "Password changed" in r.text
    assert a.get("/").status_code == 200  # this session stays
    assert b.get("/").status_code == 303  # the other one ended
    assert env["client"]().post("/login", data={"name": "lab0", "password": PW}).status_code == 401
    login(env["client"](), "lab0", "another pw 1")


def test_signing_key_outside_the_db_and_across_restarts(env, tmp_path, monkeypatch):
    import sqlite3
    import stat

    from instructrl.config import ConfigError

    monkeypatch.delenv("INSTRUCTRL_LABEL_SECRET", raising=False)
    store, cfg = env["store"], env["cfg"]
    key = store.secret_key()
    key_file = tmp_path / "l.db.key"
    assert key_file.read_text().strip() == key and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    c = env["client"]()
    login(c, "lab0")
    dump = "\n".join(sqlite3.connect(tmp_path / "l.db").iterdump())
    assert "correct horse" not in dump and key not in dump  # neither the key nor a password in the DB
    # a restart: a new store and app read the same key file, and the old cookie still works
    store2 = Store(cfg.db)
    assert store2.secret_key() == key
    c2 = TestClient(create_app(cfg, store2), follow_redirects=False)
    c2.cookies.set(COOKIE, c.cookies.get(COOKIE))
    assert c2.get("/").status_code == 200
    # a copy of the DB with another key file cannot use (or mint) sessions
    other = TestClient(create_app(cfg, Store(cfg.db, key_file=str(tmp_path / "other.key"))), follow_redirects=False)
    other.cookies.set(COOKIE, c.cookies.get(COOKIE))
    assert other.get("/").status_code == 303
    store2.dispose()
    monkeypatch.setenv("INSTRUCTRL_LABEL_SECRET", "s" * 40)
    assert Store(cfg.db).secret_key() == "s" * 40
    monkeypatch.delenv("INSTRUCTRL_LABEL_SECRET")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="key_file .* readable by other users"):
        Store(cfg.db).secret_key()


def test_non_ascii_csrf_token_and_huge_ids_are_4xx(env):
    c = env["client"]()
    login(c, "lab0")
    aid = first_task(env["store"], env["labelers"]["lab0"])
    r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": "é" * 64, "order": "0,1,2,3"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = c.post(f"/tasks/{aid}/submit", data={"order": "0,1,2,3"}, headers={"X-CSRF-Token": "%C3%A9" * 10})
    assert r.status_code == 403
    big = "99999999999999999999999"
    assert c.get(f"/tasks/{big}").status_code == 404
    assert c.get(f"/tasks/{2**63}").status_code == 404
    assert c.post(f"/tasks/{big}/submit", data={"csrf_token": "x", "order": "0"}).status_code == 404
    adm = env["client"]()
    login(adm, "admin")
    for url in (f"/admin/projects/{big}", f"/admin/projects/{big}/progress", f"/admin/projects/{big}/agreement.json",
                f"/admin/projects/{big}/export/rankings.jsonl"):
        assert adm.get(url).status_code == 404, url


@pytest.mark.parametrize("name", ["Übersetzung 日本語", 'say "hi"\r\nSet-Cookie: x=1', "plain"])
def test_export_filenames_any_project_name(env, name):
    from urllib.parse import unquote

    pid = env["store"].create_project(name, "rank", k=2)
    adm = env["client"]()
    login(adm, "admin")
    r = adm.get(f"/admin/projects/{pid}/export/rankings.jsonl")
    assert r.status_code == 200
    cd = r.headers["content-disposition"]
    assert cd.isascii() and "\r" not in cd and "\n" not in cd and "set-cookie" not in r.headers
    fallback = re.search(r'filename="([^"]*)"', cd).group(1)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", fallback) and fallback.endswith("-train-rankings.jsonl")
    exact = unquote(re.search(r"filename\*=UTF-8''(\S+)", cd).group(1))
    assert exact == f"{name}-train-rankings.jsonl".replace(" ", "_")


def test_unauthenticated_post_is_refused_before_its_body_is_read(env):
    """Raw ASGI: a 200 MB upload without a session gets 401 and not one body chunk is read."""
    import asyncio

    app = env["client"]().app
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    def scope(path, headers):
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "app": app,
                "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80)}

    async def call(path, headers):
        sent = []

        async def send(m):
            sent.append(m)

        await app(scope(path, headers), receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    ctype = (b"content-type", b"multipart/form-data; boundary=xyz")
    status, headers = asyncio.run(call(f"/admin/projects/{env['pid']}/import",
                                       [ctype, (b"content-length", str(200 * 2**20).encode())]))
    assert status == 401 and pulled == [] and headers[b"x-frame-options"] == b"DENY"
    status, _ = asyncio.run(call("/login", [ctype, (b"content-length", str(200 * 2**20).encode())]))
    assert status == 413 and pulled == []  # the login form itself is capped
    form = (b"content-type", b"application/x-www-form-urlencoded")
    status, _ = asyncio.run(call("/login", [form]))  # no length declared: counted while streaming
    assert status == 413 and 0 < len(pulled) <= 3


def test_oversized_bodies_get_413(env, tmp_path):
    cfg = LabelConfig(db=env["cfg"].db, admin_password=PW, max_upload_mb=0.01, max_request_mb=0.02)
    c = TestClient(create_app(cfg, env["store"]), follow_redirects=False)
    tok = login(c, "admin")
    big = b'{"id": "a", "prompt": "' + b"x" * 40000 + b'"}\n'
    r = c.post(f"/admin/projects/{env['pid']}/import", data={"csrf_token": tok}, files={"file": ("p.jsonl", big)})
    assert r.status_code == 413 and "larger than" in r.text
    assert env["store"].counts(env["pid"])["prompts"] == 6


def test_failed_logins_are_throttled_and_logged(env, caplog):
    c = env["client"]()
    with caplog.at_level("WARNING", logger="instructrl.labeling.audit"):
        for _ in range(5):
            assert c.post("/login", data={"name": "lab0", "password": "wrong pw"}).status_code == 401
        r = c.post("/login", data={"name": "lab0", "password": PW})  # right password, but too late
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "too many failed logins" in r.text
    fails = [m for m in caplog.messages if m.startswith("failed login")]
    assert len(fails) == 5 and "user='lab0'" in fails[0] and "addr=testclient" in fails[0]
    # the address is throttled too: another account from the same client is refused
    assert c.post("/login", data={"name": "lab1", "password": PW}).status_code == 429


def test_login_throttle_window():
    from instructrl.labeling.security import LoginThrottle

    now = [1000.0]
    t = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert t.retry_after("u", "1.2.3.4") == 0
        t.failed("u", "1.2.3.4")
    assert 0 < t.retry_after("u", "9.9.9.9") <= 61  # the account is throttled from anywhere
    assert 0 < t.retry_after("v", "1.2.3.4") <= 61  # and the address for any account
    assert t.retry_after("v", "9.9.9.9") == 0
    now[0] += 61
    assert t.retry_after("u", "1.2.3.4") == 0
    assert t.fails == {}  # nothing kept once the window has passed


def test_html_escaping_and_non_ascii_answers(env):
    store = env["store"]
    pid = store.create_project("<b>bold</b> project", "demonstration")
    from instructrl.data import PromptRecord

    store.import_prompts(pid, {"train": [PromptRecord("x1", [{"role": "user", "content": "<script>alert(1)</script>"}],
                                                      "u1")]}, {})
    store.make_tasks(pid)
    store.assign(pid)
    owner = [u for u in store.users() if any(a["project"].startswith("<b>") for a in store.assignments_for(u.id))][0]
    aid = [a["id"] for a in store.assignments_for(owner.id) if a["project"].startswith("<b>")][0]
    c = env["client"]()
    tok = login(c, owner.name)
    page = c.get(f"/tasks/{aid}").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in c.get("/").text
    adm = env["client"]()
    login(adm, "admin")
    assert "<b>bold</b>" not in adm.get("/").text and "&lt;b&gt;bold&lt;/b&gt;" in adm.get("/").text
    for blank in ("\u200b\u200c\u200d", " \ufeff \u2060 \n"):
        r = c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "response": blank})
        assert r.status_code == 400 and "empty" in r.text
    text = "Ebbe und Flut: 月の引力 ✓ 🎉"
    assert c.post(f"/tasks/{aid}/submit", data={"csrf_token": tok, "response": text}).status_code == 303
    assert store.labeled(pid)[0]["payload"]["response"] == text
    assert text in c.get(f"/tasks/{aid}").text


def test_clear_errors_for_admin_password_and_db(tmp_path):
    from instructrl.config import ConfigError
    from instructrl.labeling.app import LabelExportConfig, export_command

    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ConfigError, match="admin_password .* at least 8 characters, got 7"):
        ensure_admin(store, LabelConfig(db=store.url, admin_password="7 chars"))
    assert store.count_admins() == 0
    with pytest.raises(ConfigError, match="db='labels.db' is not a database URL"):
        Store("labels.db")
    with pytest.raises(ConfigError, match="db=.*folder .*nowhere does not exist"):
        Store(f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}")
    with pytest.raises(ConfigError, match="db='nosuchdialect://x/y' is not a usable database URL"):
        Store("nosuchdialect://x/y")
    missing = tmp_path / "missing.db"
    with pytest.raises(ConfigError, match="db=.*no such database file"):
        export_command(LabelExportConfig(db=f"sqlite:///{missing}", project="p", out=str(tmp_path / "out")))
    assert not missing.exists()


def test_duplicate_replies_normalised_and_blank_demonstrations():
    from instructrl.labeling.forms import parse_submission
    from instructrl.labeling.generate import distinct_replies

    draws = iter([[["a", "a ", "A", "  a\n"]], [["b", "B  ", "a", "c"]]])
    got = distinct_replies(lambda todo: next(draws), n=1, k=3, max_redraws=3)
    assert got == [["a", "b", "c"]]
    assert distinct_replies(lambda todo: [["x", "X", " x "]], n=1, k=2, max_redraws=2) == [None]
    for blank in ("\u200b", "\ufeff\u2060", " \u200c\u200d\t"):
        with pytest.raises(LabelError, match="empty"):
            parse_submission("demonstration", {"response": blank}, 0, 100)
    assert parse_submission("demonstration", {"response": " \u200bhi "}, 0, 100) == {"response": "\u200bhi"}


def test_generation_job_reads_done_only_after_the_tasks_exist(tmp_path):
    from types import SimpleNamespace

    from instructrl.labeling.generate import GenConfig, generate_for_project
    from labeling_util import prompts

    store = Store(f"sqlite:///{tmp_path / 'g.db'}")
    pid = store.create_project("g", "rank", k=2)
    store.import_prompts(pid, {"train": prompts(3)}, {})
    fake = SimpleNamespace(cfg=GenConfig(batch_size=2), name="fake",
                           distinct=lambda ps, k: [[f"one {i}", f"two {i}"] for i in range(len(ps))])
    seen = []
    generate_for_project(store, pid, fake, 2, before_done=lambda: seen.append((store.job(pid)["status"],
                                                                                 store.make_tasks(pid))))
    assert seen == [("running", 3)] and store.job(pid)["status"] == "done"
