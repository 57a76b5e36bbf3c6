"""Reward model: scoring rule, HF interoperability, bias normalization, training end to end, eval, bad input."""

import json
import random
from pathlib import Path

import pytest
import torch

from instructrl.cli import main
from instructrl.data import Demonstration, Ranking
from instructrl.formatting import build_example, pad
from instructrl.core.losses import kwise_ranking_loss
from instructrl.reward_model import RewardScorer, get_bias, init_reward_model, load_reward_model, save_reward_model, score, set_bias, token_values
from instructrl.rm_metrics import comparison_metrics, comparison_table, calibration_bins
from instructrl.train.rm import RankingTruncation, collate_rankings, normalize_bias, pack_rankings, tokenize_rankings
from instructrl.core.tensors import last_token_index

MSG = [{"role": "user", "content": "write a short poem about the sea"}]


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    torch.manual_seed(0)
    return init_reward_model(tiny_model_dir).eval()


def _batch(tok, pad_id, responses, side="right", max_length=64):
    seqs = [build_example(tok, MSG, r, max_length).input_ids for r in responses]
    return pad(seqs, pad_id, side)


def test_init_has_scalar_head_and_distinct_pad(rm, tiny_tokenizer):
    assert rm.config.num_labels == 1 and rm.score.out_features == 1
    assert rm.config.pad_token_id is not None and rm.config.pad_token_id != tiny_tokenizer.eos_token_id
    assert get_bias(rm) == 0.0


def test_last_token_index_left_and_right():
    mask_r = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    mask_l = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(mask_r).tolist() == [2, 3, 0]
    assert last_token_index(mask_l).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


def test_score_reads_last_real_token_any_padding(rm, tiny_tokenizer):
    pad_id = rm.config.pad_token_id
    responses = ["the quick fox", "a", "hello world! please reply in json"]
    with torch.no_grad():
        ids_r, m_r = _batch(tiny_tokenizer, pad_id, responses, "right")
        ids_l, m_l = _batch(tiny_tokenizer, pad_id, responses, "left")
        s_r, s_l = score(rm, ids_r, m_r), score(rm, ids_l, m_l)
        alone = torch.cat([score(rm, *_batch(tiny_tokenizer, pad_id, [r])) for r in responses])
        # pad == eos must not confuse it: fill padding with EOS, same score
        ids_e = ids_r.masked_fill(m_r == 0, tiny_tokenizer.eos_token_id)
        s_e = score(rm, ids_e, m_r)
        v = token_values(rm, ids_r, m_r)
    assert s_r.shape == (3,)
    torch.testing.assert_close(s_r, s_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_r, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_r, s_e, atol=1e-5, rtol=1e-5)
    assert v.shape == ids_r.shape
    torch.testing.assert_close(v[torch.arange(3), last_token_index(m_r)], s_r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s_r[0], s_r[1])  # different responses, different scores


def test_save_load_and_plain_automodel(rm, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    set_bias(rm, 0.75)
    try:
        save_reward_model(rm, tiny_tokenizer, tmp_path / "rm")
    finally:
        set_bias(rm, 0.0)
    ids, mask = _batch(tiny_tokenizer, rm.config.pad_token_id, ["the quick fox", "a"])
    ours = load_reward_model(tmp_path / "rm").eval()
    assert get_bias(ours) == 0.75
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        s = score(ours, ids, mask)
        raw = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        # The saved tokenizer pads with the RM's pad token: the plain HF path end to end.
        hf_tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
        enc = pad([build_example(hf_tok, MSG, r, 64).input_ids for r in ["the quick fox", "a"]],
                  hf_tok.pad_token_id, "right")
        raw_tok = hf(input_ids=enc[0], attention_mask=enc[1]).logits[:, 0]
    # Documented relation: plain HF returns the raw score; + config.reward_bias = our score.
    torch.testing.assert_close(raw + hf.config.reward_bias, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(raw_tok, raw, atol=1e-5, rtol=1e-5)
    assert hf_tok.pad_token_id == hf.config.pad_token_id
    assert (raw[0] > raw[1]) == (s[0] > s[1])


def test_load_rejects_non_rm(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from instructrl.models import ModelLoadError

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).save_pretrained(tmp_path / "c3")
    with pytest.raises(ModelLoadError, match="num_labels=3"):
        load_reward_model(tmp_path / "c3")


def test_bias_normalization_mean_zero_and_shift_invariance(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(1)
    model = init_reward_model(tiny_model_dir).eval()
    demos = [Demonstration(f"d{i}", MSG, r) for i, r in enumerate(["the sea", "a poem", "hello world", "fox"])]
    rankings = [Ranking("r", MSG, ["the quick fox", "lazy dog", "hello"], [0, 1, 2]),
                Ranking("p", MSG, ["json please", "three words"], [0, 1])]
    items = tokenize_rankings(tiny_tokenizer, rankings, 64, 16, RankingTruncation())
    b = collate_rankings(items, model.config.pad_token_id)
    with torch.no_grad():
        before = score(model, b.input_ids, b.attention_mask)
        loss0, st0 = kwise_ranking_loss(before, b.group, b.ranks)
        info = normalize_bias(model, tiny_tokenizer, demos, 64)
        after = score(model, b.input_ids, b.attention_mask)
        loss1, st1 = kwise_ranking_loss(after, b.group, b.ranks)
        demo_ids, demo_mask = pad([build_example(tiny_tokenizer, d.messages, d.response, 64).input_ids for d in demos],
                                  model.config.pad_token_id)
        demo_scores = score(model, demo_ids, demo_mask)
    assert abs(info["mean_before"]) > 1e-4  # the test is not vacuous
    assert demo_scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert info["bias"] == pytest.approx(-info["mean_before"], abs=1e-6)
    # every comparison and the loss unchanged
    torch.testing.assert_close(after - before, torch.full_like(before, info["bias"]), atol=1e-5, rtol=0)
    assert loss1.item() == pytest.approx(loss0.item(), abs=1e-6)
    assert st1["correct"] == st0["correct"]


def test_pack_keeps_rankings_whole():
    from instructrl.train.rm import TokenizedRanking

    items = [TokenizedRanking(str(i), [[1]] * k, list(range(k))) for i, k in enumerate([3, 4, 9, 2, 2])]
    packs = pack_rankings(items, 8)
    assert [[it.k for it in p] for p in packs] == [[3, 4], [9], [2, 2]]
    b = collate_rankings(packs[0], 0)
    assert b.group.tolist() == [0] * 3 + [1] * 4 and b.ranks.tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_truncation_counted_and_collapsed_pairs(tiny_tokenizer):
    long = "the quick brown fox jumps over the lazy dog " * 10
    r = Ranking("x", MSG, [long + "A", long + "B"], [0, 1])
    st = RankingTruncation()
    items = tokenize_rankings(tiny_tokenizer, [r], 40, 16, st)
    assert all(len(s) <= 40 for s in items[0].seqs)
    assert st.responses_cut == 2 and st.tokens_dropped > 0
    assert st.collapsed_pairs == 1 and "became identical" in st.summary()


def test_metrics_and_calibration_hand_worked():
    from instructrl.train.rm import TokenizedRanking

    items = [TokenizedRanking("a", [[1], [2], [3]], [0, 1, 2]), TokenizedRanking("b", [[1], [2]], [0, 1]),
             TokenizedRanking("c", [[1], [2]], [0, 1])]
    scores = [[2.0, 1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    rows = comparison_table(items, scores)
    m = comparison_metrics(rows, n_boot=200)
    # 5 comparisons: 3 right (K=3), 1 wrong, 1 score tie (half)
    assert m["overall"]["comparisons"] == 5 and m["overall"]["accuracy"] == pytest.approx(3.5 / 5)
    assert m["by_k"]["3"]["accuracy"] == 1.0 and m["by_k"]["2"]["accuracy"] == pytest.approx(0.25)
    import math

    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert m["overall"]["log_loss"] == pytest.approx((2 * sp(-1) + sp(-2) + sp(1) + math.log(2)) / 5)
    lo, hi = m["overall"]["accuracy_ci95"]
    assert 0 <= lo <= m["overall"]["accuracy"] <= hi <= 1
    cal = calibration_bins([r["margin"] for r in rows], n_bins=4)
    assert sum(cal["count"]) == 10 and 0 <= cal["ece"] <= 1


# ---------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------

WORDS = ["dog", "fox", "sea", "poem", "world", "json"]  # quality order: later is better
FILL = "the quick brown lazy over write short about answer three numbered list please reply hello".split()


def _synthetic(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        qs = rng.sample(range(len(WORDS)), k)
        resp = [" ".join(rng.choices(FILL, k=rng.randint(1, 4)) + [WORDS[q]] + rng.choices(FILL, k=rng.randint(0, 3)))
                for q in qs]
        rows.append({"id": f"s{seed}-{i}", "prompt": rng.choice(["write a poem", "answer in three words"]),
                     "responses": resp, "ranking": sorted(range(k), key=lambda j: -qs[j])})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_end_to_end_learns_synthetic_preference(tiny_model_dir, tmp_path):
    train = _write(tmp_path / "train.jsonl", _synthetic(400, 0))
    val = _write(tmp_path / "val.jsonl", _synthetic(100, 1))
    demos = _write(tmp_path / "demos.jsonl", [{"prompt": "write a poem", "response": f"the {w}"} for w in WORDS])
    out = tmp_path / "run"
    rc = main(["rm", f"model={tiny_model_dir}", f"output_dir={out}", f"data.train={train}", f"data.val={val}",
               f"data.demonstrations={demos}", "train.lr=3e-3", "train.batch_size=8", "train.precision=fp32",
               "data.max_length=64", "train.warmup_ratio=0.05"])
    assert rc == 0
    for f in ("config.yaml", "metrics.jsonl", "log.txt", "eval.json", "calibration.png", "summary.json", "model/config.json"):
        assert (out / f).exists(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["overall"]["accuracy"] > 0.75 and ev["overall"]["accuracy_ci95"][0] > 0.6  # chance is 0.5
    assert set(ev["by_k"]) == {"2", "3", "4"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 50 and steps[-1]["lr"] < steps[len(steps) // 2]["lr"]  # one epoch, cosine decay
    assert steps[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=0.05)
    assert "truncation (train)" in (out / "log.txt").read_text()
    # normalization: mean demo score 0 with the saved model
    from instructrl.data import load_demonstrations
    from instructrl.models import load_tokenizer

    model = load_reward_model(out / "model").eval()
    tok = load_tokenizer(str(out / "model"))
    ds = load_demonstrations(demos)
    ids, mask = pad([build_example(tok, d.messages, d.response, 64).input_ids for d in ds], model.config.pad_token_id)
    with torch.no_grad():
        assert score(model, ids, mask).mean().item() == pytest.approx(0.0, abs=1e-4)
    # rm eval on the same held-out file reproduces the training-time evaluation
    rc = main(["rm", "eval", f"model={out / 'model'}", f"data={val}", f"output_dir={tmp_path / 'ev'}",
               "precision=fp32", "max_length=64", "bootstrap=200"])
    assert rc == 0
    ev2 = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev2["overall"]["accuracy"] == pytest.approx(ev["overall"]["accuracy"], abs=1e-9)
    assert (tmp_path / "ev" / "calibration.png").stat().st_size > 1000


BAD = [
    ({"prompt": "p", "responses": ["only one"]}, "responses", "K >= 2"),
    ({"prompt": "p", "responses": ["a", "b", "a"]}, "responses[2]", "duplicate"),
    ({"prompt": "p", "responses": ["a", "  "]}, "responses[1]", "empty"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 2]}, "ranking", "permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}, "ranking", "permutation"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
]


@pytest.mark.parametrize("row,field,words", BAD)
def test_bad_input_clear_error_through_cli(tiny_model_dir, tmp_path, capsys, row, field, words):
    good = {"prompt": "p", "responses": ["x", "y"]}
    f = _write(tmp_path / "bad.jsonl", [good, good | {"id": "2"}, row])
    out = tmp_path / "run"
    rc = main(["rm", f"model={tiny_model_dir}", f"output_dir={out}", f"data.train={f}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"bad.jsonl:3: field '{field}'" in err and words in err
    assert "Traceback" not in err
    assert not (out / "model").exists()  # nothing half-written


def test_skip_mode_counts_bad_rows(tiny_model_dir, tmp_path, capsys):
    rows = _synthetic(20, 3) + [{"prompt": "p", "responses": ["only"]}]
    f = _write(tmp_path / "mixed.jsonl", rows)
    rc = main(["rm", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={f}",
               "data.errors=skip", "train.batch_size=8", "train.precision=fp32", "data.max_length=64"])
    assert rc == 0
    assert "skipped 1 invalid rows" in capsys.readouterr().out
    assert "skipped 1 invalid rows" in (tmp_path / "run" / "log.txt").read_text()


def test_overlong_is_truncated_and_counted(tiny_model_dir, tmp_path, capsys):
    long = "the quick brown fox jumps over the lazy dog " * 20
    rows = [{"prompt": long, "responses": [long + " a", "b"]}] * 4
    f = _write(tmp_path / "long.jsonl", rows)
    rc = main(["rm", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={f}",
               "data.val_fraction=0", "train.precision=fp32", "data.max_length=48"])
    assert rc == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "truncation (train, max_length=48)" in capsys.readouterr().out
    assert "8 examples: 8 prompts cut from the left, 4 responses cut from the right" in log


def test_config_errors(tmp_path, capsys):
    assert main(["rm"]) == 2
    assert "data.train" in capsys.readouterr().err
    assert main(["rm", "data.train=x.jsonl", "train.trainable_layers=-3"]) == 2
    assert "trainable_layers" in capsys.readouterr().err
    assert main(["rm", "eval", "model=m"]) == 2
    assert "data" in capsys.readouterr().err


def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    """Full fine-tuning, checkpoints every 2 steps: killed in step 4 of 5, ``--resume`` continues from
    step-2 (weights, optimizer, schedule, RNG, data position) and saves the same model, bit for bit."""
    from safetensors.torch import load_file

    import instructrl.train.rm as rm_mod

    train = _write(tmp_path / "train.jsonl", _synthetic(40, 0))
    args = [f"model={tiny_model_dir}", f"data.train={train}", "data.val_fraction=0", "train.lr=3e-3",
            "train.batch_size=8", "train.precision=fp32", "data.max_length=64", "train.save_every=2"]
    assert main(["rm", *args, f"output_dir={tmp_path / 'a'}"]) == 0
    real, calls = rm_mod.optimizer_step, []

    def interrupt_at_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rm_mod, "optimizer_step", interrupt_at_4)
    assert main(["rm", *args, f"output_dir={tmp_path / 'b'}"]) == 130  # "interrupted"
    monkeypatch.setattr(rm_mod, "optimizer_step", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000002"]
    assert main(["rm", *args, f"output_dir={tmp_path / 'b'}", "--resume"]) == 0
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [r.get("loss") for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert rows("a") == rows("b") and len([x for x in rows("a") if x is not None]) == 5
