"""Prompt hygiene (InstructGPT §3.2): PII patterns, prefix dedupe, per-user cap, split by user, data prepare."""

import json

import pytest

from instructrl.config import ConfigError, load_config
from instructrl.data import PromptRecord, load_prompts
from instructrl.hygiene import (HygieneConfig, PrepareConfig, cap_per_user, clean_prompts, dedupe_by_prefix, luhn_ok,
                                redact_pii, split_by_user)


def rec(i, text, user=None):
    return PromptRecord(str(i), [{"role": "user", "content": text}], user)


@pytest.mark.parametrize("text,kind", [
    ("write to jane.doe+news@mail.example.co.uk today", "email"),
    ("call (555) 123-4567 now", "phone"),
    ("call 555.123.4567", "phone"),
    ("call +1 555 123 4567", "phone"),
    ("ring +44 20 7946 0958", "phone"),
    ("my card is 4111 1111 1111 1111", "card"),
    ("card 5500-0000-0000-0004 thanks", "card"),
    ("card 378282246310005", "card"),  # amex, 15 digits
    ("I live at 221B Baker Street in London", "address"),
    ("send it to 1600 Pennsylvania Ave please", "address"),
])
def test_pii_patterns_match(text, kind):
    out, counts = redact_pii(text)
    assert counts[kind] == 1, (out, counts)
    assert sum(counts.values()) == 1, counts
    assert f"[{kind.upper()}]" in out


@pytest.mark.parametrize("text", [
    "I have 3 cats on the way home",  # lowercase words: not an address
    "order 1234567890123 shipped",  # 13 digits failing Luhn: not a card
    "between 2019-2020 we grew 15%",
    "the answer is 42, see section 3.2",
    "email me? no thanks @home",
])
def test_pii_patterns_leave_ordinary_text(text):
    out, counts = redact_pii(text)
    assert out == text and sum(counts.values()) == 0, counts


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_dedupe_by_long_common_prefix():
    long = "Write a detailed essay about the history of the Roman empire, covering its rise and its fall"
    ps = [rec(0, long + " in 500 words"), rec(1, long.upper() + "  in  ten pages"), rec(2, "short one"),
          rec(3, "Short   ONE"), rec(4, "short one!"), rec(5, long[:50] + " but different")]
    kept, removed = dedupe_by_prefix(ps, 60)
    # 0/1 share the first 60 normalised chars; 2/3 identical after normalising; 4 differs; 5 shares only 50
    assert [p.id for p in kept] == ["0", "2", "4", "5"] and removed == 2
    kept, removed = dedupe_by_prefix(ps, 40)
    assert [p.id for p in kept] == ["0", "2", "4"] and removed == 3
    assert dedupe_by_prefix(ps, 0) == (ps, 0)


def test_cap_per_user():
    ps = [rec(i, f"p{i}", "heavy" if i < 250 else f"u{i}") for i in range(260)] + [rec(999, "anon")]
    kept, removed, capped = cap_per_user(ps, 200)
    assert removed == 50 and capped == 1 and len(kept) == 211
    assert sum(1 for p in kept if p.user_id == "heavy") == 200
    assert [p.id for p in kept if p.user_id == "heavy"] == [str(i) for i in range(200)]  # the first ones


def test_split_by_user_never_spans_and_hits_fractions():
    ps = [rec(i, f"p{i}", f"u{i % 97}") for i in range(2000)] + [rec(5000 + i, f"a{i}") for i in range(40)]
    splits = split_by_user(ps, ["train", "val", "test"], [0.8, 0.1, 0.1], seed=3)
    owners = {}
    for name, rows in splits.items():
        for p in rows:
            owners.setdefault(p.user_id or p.id, set()).add(name)
    assert all(len(v) == 1 for v in owners.values())
    n = len(ps)
    assert sum(len(v) for v in splits.values()) == n
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(len(splits[name]) / n - frac) < 0.02, (name, len(splits[name]))
    assert split_by_user(ps, ["train", "val", "test"], [0.8, 0.1, 0.1], seed=3) == splits  # deterministic


def test_clean_prompts_redact_and_remove_count():
    ps = [rec(0, "mail a@b.com or b@c.org", "u1"), rec(1, "fine prompt", "u2"), rec(2, "fine prompt", "u3"),
          rec(3, "call (555) 123-4567", "u4")]
    splits, rep = clean_prompts(ps, HygieneConfig(split_fractions=[1.0, 0.0, 0.0]))
    assert rep.pii_counts == {"email": 2, "card": 0, "phone": 1, "address": 0} and rep.pii_prompts == 2
    assert rep.duplicates_removed == 1 and rep.kept == 3
    assert [p.messages[0]["content"] for p in splits["train"]][0] == "mail [EMAIL] or [EMAIL]"
    splits, rep = clean_prompts(ps, HygieneConfig(pii="remove", split_fractions=[1.0, 0.0, 0.0]))
    assert rep.pii_removed == 2 and [p.id for p in splits["train"]] == ["1"]
    assert "2 duplicates" not in rep.summary() and "1 duplicates removed" in rep.summary()


def test_config_validation():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(PrepareConfig, None, ["input=a", "out=b", "hygiene.split_fractions=[0.5,0.1,0.1]"])
    with pytest.raises(ConfigError, match="unknown kinds"):
        load_config(PrepareConfig, None, ["input=a", "out=b", "hygiene.pii_kinds=[ssn]"])
    with pytest.raises(ConfigError, match="input is required"):
        load_config(PrepareConfig, None, [])


def test_data_prepare_cli(tmp_path):
    from instructrl.cli import main

    rows = [{"id": f"p{i}", "prompt": f"question {i}: how do tides work near island {i}?", "user_id": f"u{i % 10}"}
            for i in range(60)]
    rows.append({"id": "dup", "prompt": rows[0]["prompt"], "user_id": "u99"})
    rows.append({"id": "pii", "prompt": "my email is x@y.com", "user_id": "u3"})
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", f"input={src}", f"out={out}"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["input"] == 62 and rep["duplicates_removed"] == 1 and rep["pii_counts"]["email"] == 1
    users = {}
    total = 0
    for split in ("train", "val", "test"):
        got = load_prompts(out / f"{split}.jsonl")
        total += len(got)
        for p in got:
            users.setdefault(p.user_id, set()).add(split)
    assert total == rep["kept"] == 61 and all(len(v) == 1 for v in users.values())
    # a malformed input line is named and nothing is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "ok"}\n{"id": "b"}\n')
    assert main(["data", "prepare", f"input={bad}", f"out={tmp_path / 'none'}"]) == 2
    assert not (tmp_path / "none").exists()
