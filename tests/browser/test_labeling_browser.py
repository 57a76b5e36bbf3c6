"""The labeling app in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

A labeler logs in, ranks K = 4 replies with the keyboard and by dragging, submits; an admin imports a
prompt file and exports rankings. Set INSTRUCTRL_UPDATE_DOCS=1 to refresh docs/labeling-ranking.png.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[2] / "docs"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

PROMPT = "Explain why the Moon has phases, for a curious 8-year-old, in three or four sentences."
# Illustrative replies for the screenshot (hand-written, not model output).
REPLIES = [
    "The Moon doesn't make its own light. The Sun always lights up half of it. As the Moon travels around "
    "Earth each month, we see different amounts of that sunny half, so it looks like it grows and shrinks.",
    "Phases happen because Earth's shadow covers part of the Moon.",
    "The Moon has phases. They are called new moon, crescent, quarter, gibbous and full moon.",
    "Imagine holding a ball near a lamp and walking around it: sometimes you see the bright side, sometimes "
    "the dark side, and sometimes a bit of both. The Moon does the same dance around us, lit by the Sun.",
]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (run .ci/browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path):
    from labeling_util import PW
    from test_labeling_load import free_port, start_server, stop

    from instructrl.data import PromptRecord
    from instructrl.labeling.store import Store

    db = f"sqlite:///{tmp_path / 'b.db'}"
    store = Store(db)
    pid = store.create_project("moon-phases", "rank", k=4, overlap_fraction=0.0)
    store.import_prompts(pid, {"train": [PromptRecord("moon", [{"role": "user", "content": PROMPT}], "u1")]}, {})
    store.set_completions(store.prompts(pid)[0].id, REPLIES, "illustrative")
    store.make_tasks(pid)
    uid = store.create_user("maria", PW, "labeler")
    store.assign(pid)
    port = free_port()
    proc = start_server(db, port)  # creates the admin account from $INSTRUCTRL_ADMIN_PASSWORD
    yield {"base": f"http://127.0.0.1:{port}", "store": store, "pid": pid, "uid": uid, "pw": PW}
    stop(proc)


def login(page, base, name, pw):
    page.goto(f"{base}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", pw)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def test_labeler_ranks_with_keyboard_and_drag_then_submits(browser, server, tmp_path):
    base, store = server["base"], server["store"]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    login(page, base, "maria", server["pw"])
    page.click("#start")
    page.wait_for_selector("#ranking li.card")
    cards = page.locator("#ranking li.card")
    assert cards.count() == 4
    before = page.input_value("#order").split(",")
    # keyboard: focus the first card and move it down one place
    cards.nth(0).focus()
    page.keyboard.press("ArrowDown")
    after_key = page.input_value("#order").split(",")
    assert after_key == [before[1], before[0]] + before[2:]
    assert page.evaluate("document.activeElement.dataset.idx") == before[0]  # focus follows the card
    # drag: the last card to the top
    cards.nth(3).drag_to(cards.nth(0), target_position={"x": 20, "y": 5})
    after_drag = page.input_value("#order").split(",")
    assert after_drag[0] == after_key[3] and sorted(after_drag) == ["0", "1", "2", "3"]
    assert page.locator("#ranking li.card .pos").nth(0).inner_text() == "1."
    shot = tmp_path / "labeling-ranking.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("INSTRUCTRL_UPDATE_DOCS") == "1":
        shutil.copy(shot, DOCS / "labeling-ranking.png")
    page.check("#all_bad")
    page.click("#submit-ranking")
    page.wait_for_url(f"{base}/")
    assert "0 waiting, 1 done" in page.inner_text("main")
    got = store.labeled(server["pid"])
    assert len(got) == 1 and got[0]["payload"] == {"order": [int(x) for x in after_drag], "all_bad": True}


def test_admin_imports_and_exports(browser, server, tmp_path):
    import json

    from instructrl.data import load_rankings

    base, store, pid = server["base"], server["store"], server["pid"]
    store.submit(store.assignments_for(server["uid"])[0]["id"], server["uid"], {"order": [3, 0, 2, 1], "all_bad": False})
    page = browser.new_page()
    login(page, base, "admin", server["pw"])
    page.click("text=moon-phases")
    f = tmp_path / "more.jsonl"
    f.write_text("".join(json.dumps({"id": f"n{i}", "prompt": f"Name a planet, take {i}. Mail a@b.org",
                                     "user_id": f"u{i}"}) + "\n" for i in range(3)))
    page.set_input_files("#import input[type=file]", str(f))
    page.click("#import button")
    assert "Imported 3 prompts" in page.inner_text("h1")
    assert "email 3" in page.inner_text("#hygiene-summary")
    page.goto(f"{base}/admin/projects/{pid}")
    with page.expect_download() as dl:
        page.click("text=train/rankings.jsonl")
    path = tmp_path / "rankings.jsonl"
    dl.value.save_as(str(path))
    rows = load_rankings(path)
    assert len(rows) == 1 and rows[0].responses == [REPLIES[3], REPLIES[0], REPLIES[2], REPLIES[1]]
    assert rows[0].labeler_id == "maria"
