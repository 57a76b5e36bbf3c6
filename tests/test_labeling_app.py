"""The labeling web app through HTTP: roles, CSRF, bad input, import, generation, HH chats, exports."""

import io
import json
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
