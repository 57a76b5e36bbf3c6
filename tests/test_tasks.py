"""Constraint family: checkers, gold score, repair, generator, storage."""

import json
import random

import pytest

from instructrl.data import load_prompts
from instructrl.io import DataError
from instructrl.tasks import (
    demonstration_text, generate_tasks, gold_score, load_tasks, repair, sample_responses, satisfied, satisfies_all,
    save_tasks, split_by_user,
)
from instructrl.tasks.constraints import CHECKS, check, quality
from instructrl.tasks.text import count_sentences, count_words, split_sentences

PASS_FAIL = [
    ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"type": "min_words", "n": 3}, "one two three", "one two"),
    ({"type": "max_sentences", "n": 2}, "Dr. Smith came. He left.", "One here. Two here. Three here."),
    ({"type": "include_words", "words": ["soil", "Rain"]}, "Rain helps SOIL.", "Rain helps soils."),
    ({"type": "forbid_words", "words": ["very"]}, "Everything is fine.", "It is Very fine."),
    ({"type": "lowercase"}, "all lower, 123.", "Not lower."),
    ({"type": "uppercase"}, "ALL CAPS 1.", "ALL CAPs."),
    ({"type": "bullets", "n": 2}, "Intro\n- a\n* b", "- a\n- b\n- c"),
    ({"type": "numbered", "n": 2}, "List:\n1. a\n2. b", "1. a\n3. b"),
    ({"type": "json", "keys": ["a", "b"]}, '```json\n{"a": "x", "b": "y"}\n```', '{"a": "x"}'),
    ({"type": "end_with", "phrase": "Hope this helps."}, 'Fine. HOPE THIS HELPS."', "Hope this helps. Bye."),
    ({"type": "paragraphs", "n": 2}, "a b\n\n\nc d", "a b\nc d"),
    ({"type": "start_with", "word": "Sure"}, '"Sure thing."', "Yes sure."),
    ({"type": "include_number"}, "Step 1.", "Step one."),
    ({"type": "no_comma"}, "No commas here.", "Well, no."),
    ({"type": "quotation"}, '"quoted"', 'quoted"'),
]


def test_every_type_has_a_pass_and_a_fail_case():
    assert {c["type"] for c, _, _ in PASS_FAIL} == set(CHECKS)
    for c, good, bad in PASS_FAIL:
        assert check(c, good), (c, good)
        assert not check(c, bad), (c, bad)


def test_text_helpers():
    assert count_words("don't stop 3.5") == 5  # IFEval's \w+ convention
    assert split_sentences("Dr. Who came. It rained! Did it? yes") == ["Dr. Who came.", "It rained!", "Did it?", "yes"]
    assert count_sentences("The value is 3.5 today. J. R. R. Tolkien wrote it.") == 2


def test_gold_score_fraction_and_quality():
    cons = [{"type": "include_words", "words": ["soil"]}, {"type": "max_words", "n": 50}]
    good = "Compost feeds the soil with nutrients. Turn the pile every week so it breathes."
    assert satisfied(cons, good) == [True, True]
    assert gold_score(cons, good, ["compost"]) == pytest.approx(0.8 + 0.2 * quality(good, ["compost"]))
    assert quality(good, ["compost"]) == pytest.approx(1.0)
    half = "Compost is nice. " * 1 + "Turn it weekly and keep it moist always."
    assert gold_score(cons, half, ["compost"]) == pytest.approx(0.8 * 0.5 + 0.2 * quality(half, ["compost"]))
    # empty and degenerate answers lose even though they "satisfy" some constraints
    assert gold_score([{"type": "forbid_words", "words": ["x"]}], "") == 0.0
    loop = "soil soil soil. " * 8
    assert satisfies_all(cons, loop)
    assert gold_score(cons, loop, ["compost"]) < gold_score(cons, good, ["compost"]) - 0.1
    assert gold_score(cons, "soil", ["compost"]) < gold_score(cons, good, ["compost"])


def test_generator_is_seeded_and_varied():
    a, b = generate_tasks(300, seed=3), generate_tasks(300, seed=3)
    assert [t.to_row() for t in a] == [t.to_row() for t in b]
    assert [t.to_row() for t in generate_tasks(20, seed=4)] != [t.to_row() for t in a[:20]]
    types = {c["type"] for t in a for c in t.constraints}
    assert types == set(CHECKS)
    assert len({t.topic for t in a}) >= 30
    users = [t.user_id for t in a]
    assert len(set(users)) >= 100  # several hundred users in the pool, Zipf-like counts
    counts = sorted((users.count(u) for u in set(users)), reverse=True)
    assert counts[0] >= 5 * counts[len(counts) // 2]
    assert len({t.id for t in a}) == 300
    for t in a:
        assert 2 <= len(t.constraints) <= 4 and len({c["type"] for c in t.constraints}) == len(t.constraints)


def test_every_demonstration_passes_the_gold_scorer():
    """Repair makes thousands of seeded drafts pass every constraint."""
    tasks = generate_tasks(700, seed=11)
    rng = random.Random(0)
    n = 0
    for t in tasks:
        drafts = ["", "Sure, here you go: it is very, very good!!", *sample_responses(t, 2, rng)]
        drafts.append("- item one here\n- item two here\n\n```json\n{\"x\": \"some words in json\"}\n```")
        for d in drafts:
            out = demonstration_text(t, d)
            assert satisfies_all(t.constraints, out), (t.constraints, d, out)
            assert gold_score(t.constraints, out, t.topic_words) >= 0.85
            n += 1
    assert n >= 3000


def test_repair_keeps_content_and_fixes_layout():
    cons = [{"type": "bullets", "n": 3}, {"type": "forbid_words", "words": ["very"]}, {"type": "lowercase"}]
    text = "Compost needs air. It is very easy to start. Keep it moist. Add browns and greens."
    out = repair(cons, text, "composting")
    assert satisfies_all(cons, out)
    assert "compost needs air." in out and "very" not in out
    js = repair([{"type": "json", "keys": ["summary", "tips"]}], text)
    obj = json.loads(js)
    assert set(obj) == {"summary", "tips"} and "Compost needs air." in obj["summary"]


def test_word_budget_keeps_tasks_and_demonstrations_inside_the_response_limit():
    """A budget of 38 words (~64 tokens): every budgeted task has a compliant answer inside it, and a
    long draft is repaired into a demonstration that fits while still passing every constraint."""
    budget = 38
    free = generate_tasks(300, seed=0)
    assert sum(count_words(repair(t.constraints, "", t.topic)) > budget for t in free) > 10  # the problem
    tasks = generate_tasks(300, seed=0, max_words=budget)
    long_draft = " ".join(f"Sentence number {i} talks about the topic at some length." for i in range(12))
    for t in tasks:
        assert all(c["n"] <= 0.75 * budget for c in t.constraints if c["type"] == "min_words")
        for draft in ("", long_draft):
            out = repair(t.constraints, draft, t.topic, max_words=budget)
            assert satisfies_all(t.constraints, out), (t.constraints, out)
            assert count_words(out) <= budget, (t.constraints, out)
    # a min_words constraint outranks the soft budget
    out = repair([{"type": "min_words", "n": 30}], long_draft, "tea", max_words=10)
    assert 30 <= count_words(out)
    with pytest.raises(ValueError, match="budget"):
        generate_tasks(3, seed=0, min_constraints=4, max_constraints=4, max_words=3)


def test_sample_responses_are_distinct_and_uneven():
    t = generate_tasks(50, seed=2)
    rng = random.Random(1)
    scores = []
    for task in t:
        rs = sample_responses(task, 6, rng)
        assert len(rs) == len(set(rs)) == 6
        scores += [gold_score(task.constraints, r, task.topic_words) for r in rs]
    assert min(scores) < 0.4 and max(scores) > 0.95


def test_save_load_roundtrip_and_errors(tmp_path):
    tasks = generate_tasks(25, seed=1)
    p = tmp_path / "tasks.jsonl"
    assert save_tasks(p, tasks) == 25
    back = load_tasks(p)
    assert [t.to_row() for t in back] == [t.to_row() for t in tasks]
    # the same file is a valid prompts file for the rest of the pipeline
    prompts = load_prompts(p)
    assert prompts[0].messages == tasks[0].to_prompt_record().messages and prompts[0].user_id == tasks[0].user_id
    rows = [t.to_row() for t in tasks[:3]]
    rows[1]["constraints"][0] = {"type": "max_words", "n": "ten"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'constraints\[0\]'"):
        load_tasks(bad)
    rows[1]["constraints"][0] = {"type": "shout"}
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="unknown constraint type"):
        load_tasks(bad)


def test_split_by_user_has_no_overlap():
    tasks = generate_tasks(400, seed=9)
    train, held = split_by_user(tasks, 0.2, seed=0)
    assert len(train) + len(held) == 400 and held and train
    assert not ({t.user_id for t in train} & {t.user_id for t in held})
