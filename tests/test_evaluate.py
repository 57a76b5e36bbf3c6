"""Evaluation: metric functions with hand-worked values, the full `run_eval` on tiny models, the report, IFEval."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.evaluation.evaluate import EvalConfig, run_eval
from instructrl.evaluation.ifeval import IFEvalConfig, run_ifeval
from instructrl.evaluation.metrics import (
    best_of_n_kl, best_of_n_pick, gold_gain, labeler_outcome, loglik_bootstrap, mean_ci, outcomes_win_rate,
    reward_vs_sqrt_kl, rm_gold_agreement, score_outcomes, sequence_kl,
)
from instructrl.evaluation.report import ReportSection, write_report
from instructrl.evaluation.sampling import text_logliks

IFEVAL_SAMPLE = Path(__file__).parent / "data" / "ifeval_sample.jsonl"


# ---------------------------------------------------------------------------
# Metric functions
# ---------------------------------------------------------------------------


def test_mean_ci_hand_worked():
    # mean 2, sample std 1, half width 1.959964 / sqrt(3)
    d = mean_ci([1.0, 2.0, 3.0])
    half = 1.959963984540054 / math.sqrt(3)
    assert d["mean"] == 2.0 and d["n"] == 3
    assert d["lo"] == pytest.approx(2 - half) and d["hi"] == pytest.approx(2 + half)
    assert mean_ci([5.0]) == {"mean": 5.0, "lo": 5.0, "hi": 5.0, "n": 1}
    assert math.isnan(mean_ci([])["mean"])


def test_sequence_kl_hand_worked():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.1], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: (0.5) + (-1.0) = -0.5 (third token is padding); row 1: 0.5 - 0.25 - 9 = -8.75
    assert sequence_kl(lp, ref, mask).tolist() == pytest.approx([-0.5, -8.75])
    assert sequence_kl(lp, lp, mask).tolist() == [0.0, 0.0]


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_best_of_n_pick():
    assert best_of_n_pick([0.1, 0.9, 0.5, 0.5, -1.0, 2.0], 2) == [1, 2, 5]  # a tie keeps the first
    assert best_of_n_pick([3.0, 1.0, 2.0], 3) == [0]
    with pytest.raises(ValueError):
        best_of_n_pick([1.0, 2.0, 3.0], 2)


def test_gold_gain_is_a_paired_difference():
    g = gold_gain([0.8, 0.6, 1.0], [0.6, 0.6, 0.6])
    # differences 0.2, 0, 0.4: mean 0.2, s = 0.2, half-width 1.96 * 0.2 / sqrt(3)
    half = 1.959964 * 0.2 / math.sqrt(3)
    assert g["mean"] == pytest.approx(0.2) and g["n"] == 3
    assert (g["lo"], g["hi"]) == (pytest.approx(0.2 - half, abs=1e-6), pytest.approx(0.2 + half, abs=1e-6))
    # pairing: a constant per-prompt gain has no spread, however much the prompts differ
    c = gold_gain([0.3, 0.9, 0.5, 0.7], [0.2, 0.8, 0.4, 0.6])
    assert c["lo"] == pytest.approx(0.1) and c["hi"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        gold_gain([0.1], [0.1, 0.2])


def test_score_outcomes_and_win_rate():
    out = score_outcomes([1.0, 2.0, 2.0, 0.3], [0.0, 2.0, 3.0, 0.1], ["a", "b", "c", "same"], ["x", "y", "z", "same"])
    assert out == [1.0, 0.5, 0.0, 0.5]  # last: identical texts tie whatever the scores
    w = outcomes_win_rate(out)
    assert (w["wins"], w["ties"], w["n"]) == (1, 2, 4)
    assert w["rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert w["lo"] < 0.5 < w["hi"]
    assert outcomes_win_rate([0.5] * 6)["rate"] == 0.5
    with pytest.raises(ValueError):
        outcomes_win_rate([0.3])


def test_reward_vs_sqrt_kl_fit():
    rows = [{"step": i + 1, "kl": k, "score": s} for i, (k, s) in enumerate([(0, 1), (1, 3), (4, 5), (9, 7)])]
    c = reward_vs_sqrt_kl(rows)
    assert [p[0] for p in c["points"]] == [0, 1, 2, 3]
    assert c["fit"]["slope"] == pytest.approx(2.0) and c["fit"]["intercept"] == pytest.approx(1.0)
    assert c["fit"]["r2"] == pytest.approx(1.0)
    # a negative k1 estimate is clipped to 0 before the root; non-finite rows are dropped
    c = reward_vs_sqrt_kl([{"kl": -0.1, "score": 0.0}, {"kl": 1.0, "score": 1.0}, {"kl": float("nan"), "score": 2}])
    assert [p[0] for p in c["points"]] == [0.0, 1.0]
    assert reward_vs_sqrt_kl([{"kl": 1.0, "score": 1.0}])["fit"] is None


def test_loglik_bootstrap_means_and_paired_delta():
    sums = {"sft": [-10.0, -20.0], "ppo": [-12.0, -26.0]}
    counts = {"sft": [5, 10], "ppo": [5, 10]}
    out = loglik_bootstrap(sums, counts, "sft", n_boot=500, seed=1)
    assert out["sft"]["mean"] == pytest.approx(-30 / 15)
    assert out["ppo"]["mean"] == pytest.approx(-38 / 15)
    assert out["ppo"]["delta"]["mean"] == pytest.approx(-8 / 15)
    # every resample makes ppo worse (it is worse on each text): the paired interval is below 0
    assert out["ppo"]["delta"]["hi"] < 0
    assert out["sft"]["delta"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_text_logliks_match_a_plain_loop(tiny_model_dir, tiny_tokenizer):
    from instructrl.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir)).eval()
    texts = ["the quick brown fox", "hello world! write a short poem about the sea.", "a"]
    sums, counts = text_logliks(model, tiny_tokenizer, texts, max_tokens=8, micro_batch_size=2)
    for t, s, c in zip(texts, sums, counts):
        ids = tiny_tokenizer(t, add_special_tokens=False)["input_ids"][:8]
        if len(ids) < 2:
            assert (s, c) == (0.0, 0)
            continue
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert c == len(ids) - 1
        assert s == pytest.approx(want, abs=1e-4)


def test_rm_scores_append_eos_to_cut_off_answers_only(tiny_model_dir, tiny_tokenizer):
    """rm_eos (the default, as PPO's rollout.rm_eos): a cut-off answer is scored with EOS appended."""
    from instructrl.evaluation.sampling import rm_scores
    from instructrl.reward_model import init_reward_model

    rm = init_reward_model(str(tiny_model_dir)).eval()
    msgs = [[{"role": "user", "content": "hello"}]] * 2
    texts, ended = ["the quick brown fox", "the quick brown fox"], [True, False]
    with_eos = rm_scores(rm, tiny_tokenizer, msgs, texts, ended, 64)
    as_is = rm_scores(rm, tiny_tokenizer, msgs, texts, ended, 64, rm_eos=False)
    assert with_eos[0] == pytest.approx(with_eos[1], abs=1e-5)  # cut off or not: the same finished answer
    assert as_is[0] == pytest.approx(with_eos[0], abs=1e-5)  # an answer that ended is scored as before
    assert abs(as_is[1] - as_is[0]) > 1e-4  # without the EOS the RM reads another position


def test_labeler_outcome_is_symmetric_and_seeded():
    from instructrl.tasks import generate_tasks, sample_responses
    from instructrl.tasks.labelers import LabelerPool

    pool = LabelerPool.default()
    rng = random.Random(0)
    for t in generate_tasks(10, seed=5):
        x, y = sample_responses(t, 2, rng)
        o = labeler_outcome(pool, t, "ppo", "sft", x, y, seed=3)
        assert o in (0.0, 1.0)
        assert labeler_outcome(pool, t, "sft", "ppo", y, x, seed=3) == 1.0 - o
        assert labeler_outcome(pool, t, "ppo", "sft", x, y, seed=3) == o
        assert labeler_outcome(pool, t, "ppo", "sft", x, x, seed=3) == 0.5


def test_missing_inputs_fail_before_sampling(eval_inputs, tmp_path):
    cfg = _cfg(eval_inputs, tmp_path / "x", [f"policies.ppo={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="policies.ppo"):
        run_eval(cfg)
    from instructrl.io import DataError

    cfg = _cfg(eval_inputs, tmp_path / "x", [f"ppo_runs.ppo={tmp_path}"])
    with pytest.raises(DataError, match="metrics.jsonl"):
        run_eval(cfg)
    assert not (tmp_path / "x").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="baseline"):
        load_config(EvalConfig, None, ["policies.ppo=x", "tasks=t", "reward_model=r"])
    with pytest.raises(ConfigError, match="greedy"):
        load_config(EvalConfig, None, ["policies.sft=x", "tasks=t", "reward_model=r", "best_of_n=4", "greedy=true"])
    with pytest.raises(ConfigError, match="tasks"):
        load_config(EvalConfig, None, ["policies.sft=x", "reward_model=r"])
    cfg = load_config(EvalConfig, Path(__file__).parents[1] / "configs" / "eval.yaml")
    assert cfg.baseline == "sft" and cfg.temperature == 1.0


# ---------------------------------------------------------------------------
# The whole evaluation on tiny models
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_model_dir):
    from instructrl.io import write_jsonl
    from instructrl.models import build_tiny_model, load_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model
    from instructrl.tasks import generate_tasks, save_tasks

    d = tmp_path_factory.mktemp("eval")
    other = build_tiny_model(d / "other", seed=1)  # same tokenizer, different weights
    rm = init_reward_model(tiny_model_dir)
    save_reward_model(rm, load_tokenizer(str(tiny_model_dir)), d / "rm")
    save_tasks(d / "tasks.jsonl", generate_tasks(9, seed=7))
    write_jsonl(d / "pretrain.jsonl", [{"text": "the quick brown fox jumps over the lazy dog."},
                                       {"text": "write a short poem about the sea. hello world!"},
                                       {"text": "answer in three words. use a numbered list."}])
    (d / "ppo").mkdir()
    write_jsonl(d / "ppo" / "metrics.jsonl", [{"step": i, "score": 0.1 * i, "kl": 0.05 * i * i} for i in range(1, 6)])
    return {"dir": d, "sft": str(tiny_model_dir), "ppo": str(other), "rm": str(d / "rm"), "tasks": str(d / "tasks.jsonl"),
            "pretrain": str(d / "pretrain.jsonl"), "ppo_run": str(d / "ppo")}


def _cfg(inp, out, extra=()):
    return load_config(EvalConfig, None, [
        f"policies.sft={inp['sft']}", f"policies.ppo={inp['ppo']}", f"tasks={inp['tasks']}",
        f"reward_model={inp['rm']}", "best_of_n=2", "n_prompts=6", "max_new_tokens=8", "batch_size=4",
        "bootstrap=200", f"ppo_runs.ppo={inp['ppo_run']}", f"pretrain_eval={inp['pretrain']}", f"output_dir={out}",
        *extra])


def test_run_eval_end_to_end(eval_inputs, tmp_path):
    out = tmp_path / "eval"
    res = run_eval(_cfg(eval_inputs, out))
    names = ["sft", "ppo", "best-of-2"]
    assert list(res["policies"]) == names
    sft, ppo, bon = (res["policies"][n] for n in names)

    # the baseline against itself: every comparison a tie, by labelers and by RM
    for k in ("win_rate_labelers", "win_rate_rm"):
        assert (sft[k]["rate"], sft[k]["ties"], sft[k]["n"]) == (0.5, 6, 6)
    # KL of the reference against itself is exactly 0; best-of-N has the closed form
    assert sft["kl"]["mean"] == 0.0 and sft["kl"]["hi"] == 0.0
    assert bon["kl"]["mean"] == pytest.approx(math.log(2) - 0.5)
    assert ppo["kl"]["n"] == 6 and math.isfinite(ppo["kl"]["mean"])
    for p in res["policies"].values():
        for k in ("win_rate_labelers", "win_rate_rm", "gold_satisfaction"):
            assert 0 <= p[k]["lo"] <= p[k]["rate"] <= p[k]["hi"] <= 1
        assert 0 < p["length_tokens"]["mean"] <= 8
        assert p["elo"]["lo"] <= p["elo"]["rating"] <= p["elo"]["hi"]
    assert res["elo"]["sft"]["rating"] == pytest.approx(1000.0)
    # gold gain: the paired per-prompt difference to the baseline, exactly 0 for the baseline itself
    assert sft["gold_gain"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 6}
    assert ppo["gold_gain"]["mean"] == pytest.approx(ppo["gold_score"]["mean"] - sft["gold_score"]["mean"])
    # the pairwise matrix is consistent with the win rates against the baseline
    assert res["pairwise_labelers"]["ppo"]["sft"] == pytest.approx(ppo["win_rate_labelers"]["rate"])
    assert res["pairwise_labelers"]["ppo"]["sft"] + res["pairwise_labelers"]["sft"]["ppo"] == pytest.approx(1.0)

    rows = [json.loads(l) for l in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 3 and {r["policy"] for r in rows} == set(names)

    curve = res["reward_vs_sqrt_kl"]["ppo"]
    assert curve["fit"]["slope"] == pytest.approx(0.1 / math.sqrt(0.05)) and curve["fit"]["r2"] == pytest.approx(1.0)
    tax = res["alignment_tax"]["policies"]
    assert set(tax) == {"sft", "ppo"} and tax["sft"]["delta"]["mean"] == 0.0 and tax["ppo"]["mean"] < 0

    rep = json.loads((out / "report.json").read_text())
    assert rep["policies"]["sft"]["kl"]["mean"] == 0.0 and rep["n_prompts"] == 6
    g = rep["rm_gold_agreement"]
    assert g["n"] == 0 or 0.0 <= g["rate"] <= 1.0
    html = (out / "report.html").read_text()
    for title in ("How to read this", "Summary", "Gold constraint satisfaction", "Elo", "Reward vs √KL",
                  "Alignment tax", "Example answers", "over-optimisation"):
        assert title in html, title
    assert html.count("data:image/png;base64,") == 5
    for png in ("win_rates.png", "elo.png", "gold_satisfaction.png", "reward_vs_sqrt_kl.png", "alignment_tax.png"):
        assert (out / png).stat().st_size > 1000
    assert not list(out.glob(".*tmp"))


def test_rm_gold_agreement_hand_worked():
    """Two prompts, three policies. Prompt 0: gold a=0.9, b=0.5, c=0.85 (a-c gap 0.05 < 0.15: skipped);
    RM orders a>b (hit) and b<c? RM b=0.2, c=0.1 -> b>c but gold c>b: miss. Prompt 1: a and b give the same text
    (skipped), a-c: gold 0.2 vs 0.8, RM tie -> half; b-c: same as a-c -> half. 1 + 0 + 0.5 + 0.5 = 2 of 4."""
    rm = {"a": [1.0, 0.3], "b": [0.2, 0.3], "c": [0.1, 0.3]}
    gold = {"a": [0.9, 0.2], "b": [0.5, 0.2], "c": [0.85, 0.8]}
    texts = {"a": ["x", "same"], "b": ["y", "same"], "c": ["z", "w"]}
    g = rm_gold_agreement(rm, gold, texts)
    assert g["n"] == 4 and g["rate"] == pytest.approx(0.5) and g["lo"] < 0.5 < g["hi"]
    assert rm_gold_agreement(rm, gold, texts, min_gap=0.01)["n"] == 5  # a-c on prompt 0 now counts (a hit)
    assert rm_gold_agreement(rm, gold, texts, min_gap=0.01)["rate"] == pytest.approx(3 / 5)
    assert rm_gold_agreement({"a": [1.0]}, {"a": [0.5]}, {"a": ["x"]})["n"] == 0


def test_run_eval_is_seeded_and_order_free(eval_inputs, tmp_path, monkeypatch, capsys):
    """Same config, policies listed in another order: the same answers and judgments. The second run
    asks for engine.name=auto where vllm is absent: that is the built-in sampler, said and saved."""
    import instructrl.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    a = run_eval(_cfg(eval_inputs, tmp_path / "a", ["best_of_n=0", "pretrain_eval=", "n_prompts=4"]))
    cfg = _cfg(eval_inputs, tmp_path / "b", ["best_of_n=0", "pretrain_eval=", "n_prompts=4", "engine.name=auto"])
    cfg.policies = {"ppo": cfg.policies["ppo"], "sft": cfg.policies["sft"]}
    capsys.readouterr()
    b = run_eval(cfg)
    assert cfg.engine.name == "hf" and "[eval] engine: hf (engine.name=auto and vllm is not installed" in capsys.readouterr().out
    for n in ("sft", "ppo"):
        for k in ("win_rate_labelers", "win_rate_rm", "gold_satisfaction", "kl", "rm_score"):
            assert a["policies"][n][k] == b["policies"][n][k]
    assert a["alignment_tax"] is None and "No held-out pretraining text" in (tmp_path / "a" / "report.html").read_text()


def test_write_report_with_extra_sections(eval_inputs, tmp_path):
    res = run_eval(_cfg(eval_inputs, tmp_path / "e", ["labeler_seed=3", "best_of_n=0", "pretrain_eval=", "n_prompts=3",
                                                      "max_new_tokens=4"]))
    img = tmp_path / "e" / "win_rates.png"
    paths = write_report(res, tmp_path / "r", extra_sections=[
        ReportSection("Rounds", "one row per round", ["round", "win rate"], [[1, 0.55], [2, 0.61]], [str(img)],
                      data={"rounds": [1, 2]}),
        {"title": "Stage timings", "columns": ["stage", "s"], "rows": [["sft", 12.5]]},
        ("Run", {"command": "instructrl pipeline --preset quick", "seed": 0}),
        ("Per round", [{"round": 1, "ppo": {"last_score": 0.25, "last_kl": 1.5}}, {"round": 2, "agreement": 0.71}]),
    ])
    html = paths["html"].read_text()
    assert "Rounds" in html and "one row per round" in html and "0.610" in html and "Stage timings" in html
    assert "instructrl pipeline --preset quick" in html
    assert "<th>ppo.last_score</th>" in html and "<th>agreement</th>" in html and "0.710" in html
    assert html.count("data:image/png;base64,") == 5  # win rates, gold, Elo, reward vs √KL + the section's image
    rep = json.loads(paths["json"].read_text())
    assert [s["title"] for s in rep["sections"]] == ["Rounds", "Stage timings", "Run", "Per round"]
    assert rep["sections"][3]["data"][0]["ppo"]["last_kl"] == 1.5
    assert rep["sections"][0]["data"] == {"rounds": [1, 2]}
    with pytest.raises(ValueError, match="unknown keys"):
        write_report(res, tmp_path / "r", extra_sections=[{"title": "x", "tabel": []}])
    with pytest.raises(ValueError, match="payload"):
        write_report(res, tmp_path / "r", extra_sections=[("x", 3)])


# ---------------------------------------------------------------------------
# instructrl eval ifeval
# ---------------------------------------------------------------------------


def test_ifeval_plumbing_with_tiny_model(tiny_model_dir, tmp_path):
    out = run_ifeval(load_config(IFEvalConfig, None, [f"data={IFEVAL_SAMPLE}", f"model={tiny_model_dir}",
                                                      "max_new_tokens=6", f"output_dir={tmp_path}"]))
    assert out["n_prompts"] == 8
    for k in ("prompt_level_strict_accuracy", "instruction_level_strict_accuracy", "prompt_level_loose_accuracy",
              "instruction_level_loose_accuracy"):
        assert 0.0 <= out[k] <= 1.0
    saved = json.loads((tmp_path / "ifeval.json").read_text())
    assert saved["n_instructions"] == out["n_instructions"] > 8
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 8 and set(json.loads(lines[0])) == {"key", "prompt", "response"}


def test_ifeval_gives_credit_to_passing_answers(tiny_model_dir, tmp_path, monkeypatch):
    import instructrl.evaluation.ifeval as ev

    good = {
        1003: "My answer is yes.",
        1004: "* apples\n* pears\n* plums\nIs there anything else I can help with?",
    }
    seen = {}

    def fake(model, tok, messages_list, **kw):
        seen["kw"] = kw
        prompts = [m[0]["content"] for m in messages_list]
        rows = {r["prompt"]: r["key"] for r in map(json.loads, IFEVAL_SAMPLE.read_text().splitlines())}
        return [good.get(rows[p], "") for p in prompts]

    monkeypatch.setattr(ev, "generate_responses", fake)
    out = run_ifeval(load_config(IFEvalConfig, None, [f"data={IFEVAL_SAMPLE}", f"model={tiny_model_dir}",
                                                      f"output_dir={tmp_path}"]))
    assert seen["kw"]["greedy"] is True
    by_key = {r["key"]: r for r in out["results"]}
    assert by_key[1003]["strict"] == [True]
    assert by_key[1004]["strict"] == [True, True]
    assert out["prompt_level_strict_accuracy"] == pytest.approx(2 / 8)
    assert out["instruction_level_strict_accuracy"] == pytest.approx(3 / out["n_instructions"])


# ---------------------------------------------------------------------------
# The phases of run_eval, one at a time
# ---------------------------------------------------------------------------


def test_load_prompts_is_a_seeded_subset_in_file_order(eval_inputs, tmp_path):
    from instructrl.evaluation.evaluate import load_prompts
    from instructrl.tasks import load_tasks

    every = [t.id for t in load_tasks(eval_inputs["tasks"])]
    p = load_prompts(_cfg(eval_inputs, tmp_path, ["n_prompts=4"]))
    ids = [t.id for t in p.tasks]
    assert len(ids) == 4 and ids == [i for i in every if i in ids]  # file order kept
    assert ids == [t.id for t in load_prompts(_cfg(eval_inputs, tmp_path, ["n_prompts=4"])).tasks]
    assert ids != [t.id for t in load_prompts(_cfg(eval_inputs, tmp_path, ["n_prompts=4", "seed=1"])).tasks]
    assert p.messages == [[{"role": "user", "content": t.prompt}] for t in p.tasks]
    assert len(load_prompts(_cfg(eval_inputs, tmp_path, ["n_prompts=0"])).tasks) == len(every)


@pytest.fixture(scope="module")
def phase_state(eval_inputs, tmp_path_factory):
    """Phases 1-5 run by hand on 4 prompts: the inputs of the later phases."""
    from instructrl.evaluation.evaluate import (Scores, gold_scores, load_prompts, sample_best_of_n, sample_policies,
                                                _frozen)
    from instructrl.evaluation.sampling import CPU_FP32, rm_scores
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.reward_model import load_reward_model
    from instructrl.tasks.labelers import LabelerPool

    cfg = _cfg(eval_inputs, tmp_path_factory.mktemp("phases"), ["n_prompts=4", "pretrain_eval="])
    rt = CPU_FP32
    p = load_prompts(cfg)
    ref, ref_tok = _frozen(load_causal_lm(cfg.reference_path), rt), load_tokenizer(cfg.reference_path)
    ans = sample_policies(cfg, p.messages, ref, ref_tok, rt)
    rm, rm_tok = _frozen(load_reward_model(cfg.reward_model), rt), load_tokenizer(cfg.reward_model)
    sample_best_of_n(cfg, p.messages, ref, ref_tok, rm, rm_tok, rt, ans)
    rm_sc = {n: rm_scores(rm, rm_tok, p.messages, s.texts, s.ended, cfg.max_prompt_tokens, rt=rt)
             for n, s in ans.samples.items()}
    pool = LabelerPool.default(cfg.labelers.n_train, cfg.labelers.n_heldout, cfg.labeler_seed)
    return {"cfg": cfg, "prompts": p, "ans": ans, "scores": Scores(rm_sc, *gold_scores(p.tasks, ans)), "pool": pool,
            "ref": ref, "ref_tok": ref_tok, "rm": rm, "rm_tok": rm_tok}


def test_sample_policies_and_best_of_n(phase_state):
    from instructrl.evaluation.sampling import encode_prompts, generate, rm_scores

    s, cfg, ans = phase_state, phase_state["cfg"], phase_state["ans"]
    assert ans.names == ["sft", "ppo", "best-of-2"] and ans.best_of_n == "best-of-2"
    assert ans.samples["sft"].kl == [0.0] * 4  # the reference against itself
    assert all(len(x.texts) == len(x.tokens) == len(x.ended) == 4 for x in ans.samples.values())
    assert ans.sources["ppo"] == cfg.policies["ppo"] and "RM's favourite" in ans.sources["best-of-2"]
    assert ans.samples["best-of-2"].kl == [pytest.approx(math.log(2) - 0.5)] * 4
    # best-of-2 kept, per prompt, the higher-scored of the reference's two samples (same seed, same draws)
    from instructrl.evaluation.metrics import seed_for

    rep = [m for m in s["prompts"].messages for _ in range(2)]
    both = generate(s["ref"], s["ref_tok"], encode_prompts(s["ref_tok"], rep, cfg.max_prompt_tokens),
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=seed_for(cfg.seed, "best-of-2"))
    sc = rm_scores(s["rm"], s["rm_tok"], rep, both.texts, both.ended, cfg.max_prompt_tokens)
    for p in range(4):
        j = 2 * p + int(sc[2 * p + 1] > sc[2 * p])
        assert ans.samples["best-of-2"].texts[p] == both.texts[j]


def test_judge_pairs_and_policy_summaries(phase_state):
    from instructrl.evaluation.evaluate import elo_ratings, judge_pairs, policy_summaries

    s, cfg = phase_state, phase_state["cfg"]
    tasks = s["prompts"].tasks
    j = judge_pairs(cfg, tasks, s["pool"], s["ans"])
    assert len(j.comparisons) == 3 * 4  # 3 pairs of policies x 4 prompts
    for a in j.pairwise:
        for b, r in j.pairwise[a].items():
            assert r + j.pairwise[b][a] == pytest.approx(1.0)
    per = policy_summaries(cfg, tasks, s["pool"], s["ans"], s["scores"])
    assert per["sft"]["win_rate_labelers"]["ties"] == 4 and per["sft"]["gold_gain"]["mean"] == 0.0
    assert per["ppo"]["win_rate_labelers"]["rate"] == pytest.approx(j.pairwise["ppo"]["sft"])
    assert per["ppo"]["rm_score"]["mean"] == pytest.approx(sum(s["scores"].rm["ppo"]) / 4)
    assert per["best-of-2"]["note"].startswith("KL is the closed form")
    elo = elo_ratings(cfg, s["ans"].names, j)
    assert set(elo) == set(s["ans"].names) and elo["sft"]["rating"] == pytest.approx(1000.0)
    assert elo_ratings(cfg, ["sft"], j) is None


def test_alignment_tax_examples_and_responses(phase_state, eval_inputs, tmp_path):
    from instructrl.evaluation.evaluate import alignment_tax, example_answers, write_responses
    from instructrl.evaluation.sampling import CPU_FP32

    s, cfg = phase_state, phase_state["cfg"]
    assert alignment_tax(cfg, "best-of-2", CPU_FP32) is None  # pretrain_eval= : skipped
    tax = alignment_tax(_cfg(eval_inputs, tmp_path), "best-of-2", CPU_FP32)
    assert set(tax["policies"]) == {"sft", "ppo"} and tax["n_texts"] == 3 and "best-of-2" in tax["note"]
    ex = example_answers(cfg, s["prompts"].tasks, s["ans"], s["scores"])
    assert len(ex) == cfg.examples and set(ex[0]["answers"]) == set(s["ans"].names)
    assert ex[1]["answers"]["ppo"]["rm"] == s["scores"].rm["ppo"][1]
    write_responses(tmp_path / "r.jsonl", s["prompts"].tasks, s["ans"], s["scores"])
    rows = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["policy"] == "sft" and rows[0]["kl"] == 0.0
    assert rows[4]["response"] == s["ans"].samples["ppo"].texts[0]


def test_samples_pick():
    from instructrl.evaluation.sampling import Samples

    s = Samples(["a", "b", "c"], [1, 2, 3], [True, False, True], [0.1, 0.2, 0.3])
    assert s.pick([2, 0], [9.0, 9.0]) == Samples(["c", "a"], [3, 1], [True, True], [9.0, 9.0])
