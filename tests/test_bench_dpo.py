"""The non-TRL logic of benchmarks/bench_dpo_trl.py and bench_dpo_hh.py: rankings expanded to TRL's pairs,
the TRL batch split, the synthetic rankings, the accuracy helpers; one tiny TRL run where trl is installed."""

import importlib.util
import json
from pathlib import Path

import pytest

from instructrl.data import load_rankings
from instructrl.formatting import encode_prompt, encode_response
from instructrl.models import build_tiny_model, load_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


trl_bench = _load("bench_dpo_trl")
hh_bench = _load("bench_dpo_hh")


def _ranking(**extra):
    row = {"id": "r", "prompt": "Name a colour.", "responses": ["Red.", "Blue.", "Green.", "Grey."], **extra}
    return load_rankings([row])[0]


def test_a_4_ranking_gives_its_6_pairs_with_the_better_response_chosen():
    r = _ranking(ranking=[2, 0, 3, 1])  # Green > Red > Grey > Blue
    rows = trl_bench.pair_rows(r, "PROMPT")
    order = ["Green.", "Red.", "Grey.", "Blue."]
    assert len(rows) == 6
    assert {(x["chosen"], x["rejected"]) for x in rows} == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}
    assert all(x["prompt"] == "PROMPT" for x in rows)


def test_tied_responses_give_no_pair():
    r = _ranking(ties=[[1, 2]])  # Red > Blue = Green > Grey
    pairs = {(x["chosen"], x["rejected"]) for x in trl_bench.pair_rows(r, "p")}
    assert len(pairs) == 5
    assert ("Blue.", "Green.") not in pairs and ("Green.", "Blue.") not in pairs
    assert ("Red.", "Grey.") in pairs and ("Green.", "Grey.") in pairs


def test_pairs_per_forward_divides_the_step_and_fits_the_micro_batch():
    assert trl_bench.pairs_per_forward(6, 16) == 6     # K=4, 1 ranking: one pass of 12 sequences
    assert trl_bench.pairs_per_forward(12, 16) == 6    # K=4, 2 rankings: 2 passes of 12
    assert trl_bench.pairs_per_forward(72, 16) == 8    # K=9, 2 rankings: 9 passes of 16
    assert trl_bench.pairs_per_forward(13, 16) == 1    # a prime above the cap: one pair a pass
    for pairs in range(1, 40):
        b = trl_bench.pairs_per_forward(pairs, 16)
        assert pairs % b == 0 and 2 * b <= 16


def test_synthetic_rankings_have_k_distinct_responses_of_the_asked_length(tmp_path):
    tok = load_tokenizer(str(build_tiny_model(tmp_path / "tiny")))
    rows = trl_bench.synthetic_rankings(tok, n=3, k=5, length=100, seed=0)
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rankings = load_rankings(str(path))
    assert len(rankings) == 3
    for r in rankings:
        assert r.k == 5 and len(set(r.responses)) == 5 and r.ranks == [0, 1, 2, 3, 4]
        p = len(encode_prompt(tok, r.messages))
        lengths = [p + len(encode_response(tok, y)) for y in r.responses]
        longest_word = max(len(encode_response(tok, " " + w, add_eos=False)) for w in trl_bench.WORDS)
        assert all(100 <= n <= 100 + longest_word for n in lengths), lengths  # the length, at most one word over


def test_hh_accuracy_helpers():
    assert hh_bench.correct([0.3, 0.0, -1.0]) == [1.0, 0.5, 0.0]  # a score tie counts half
    assert hh_bench.paired_difference([1.0] * 20, [-1.0] * 20) == (1.0, 1.0, 1.0)
    d, lo, hi = hh_bench.paired_difference([1.0, -1.0] * 50, [-1.0, 1.0] * 50)
    assert d == 0.0 and lo < 0 < hi
    line = hh_bench.accuracy_line("x", [1.0, 1.0, -1.0, 0.0])
    assert "accuracy 0.625" in line and "over 4 pairs" in line


def test_trl_run_times_every_step_after_the_first_and_sees_our_sequence_lengths(tmp_path):
    pytest.importorskip("trl", reason="trl is the `bench` extra; bench_dpo_trl's TRL side is not tested without it")
    model = str(build_tiny_model(tmp_path / "tiny"))
    tok = load_tokenizer(model)
    rankings = load_rankings(trl_bench.synthetic_rankings(tok, n=3, k=3, length=80, seed=1))
    rows = [p for r in rankings for p in trl_bench.pair_rows(r, tok.decode(encode_prompt(tok, r.messages)))]
    ours = [len(encode_prompt(tok, r.messages)) + len(encode_response(tok, y)) for r in rankings for w, l in r.pairs()
            for y in (r.responses[w], r.responses[l])]
    times, tokens = trl_bench.run_trl(model, rows, pairs_per_step=3, micro=6, max_length=128, bf16=False,
                                      out=tmp_path / "trl")
    assert len(times) == 2 and all(t > 0 for t in times)  # 3 steps of 3 pairs; the first is the warm-up
    assert tokens == pytest.approx(sum(ours) / len(ours), abs=1.0)
