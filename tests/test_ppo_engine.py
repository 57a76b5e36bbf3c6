"""PPO rollouts through a generation engine (engine.name): vLLM sampling, weight sync, TIS, resume.

The TIS math and the config checks run everywhere. The vLLM tests need ``vllm`` importable (its own
venv, docs/vllm.md) and skip without it, as in tests/test_engines.py; on the tiny model the engine
starts in seconds and is kept for the whole module (one engine per process).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.core import rl_math
from instructrl.core.losses import aggregate_token_loss, ppo_policy_loss
from instructrl.train.ppo import PPOConfig, train_ppo

from test_ppo import PROMPTS, good_fraction_reward, write_prompts  # the same prompts and scripted reward

DROP = ("time_generate", "time_score", "time_train", "time_sync", "tokens_per_s")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama whose head size (64) vLLM's CPU attention supports (the shared fixture's is 8)."""
    from instructrl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("ppo-eng") / "policy", hidden=128, layers=2, heads=2, seed=0)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("ppo-eng-data") / "prompts.jsonl")


def cfg_for(policy, prompts, out, *extra):
    return load_config(PPOConfig, None, [
        f"policy={policy}", f"prompts={prompts}", f"output_dir={out}", "rollout.batch_size=8",
        "rollout.max_new_tokens=12", "train.minibatch_size=4", "train.micro_batch_size=4", "train.lr=1e-2",
        "train.value_lr=3e-3", "train.warmup_steps=0", "train.precision=fp32", "seed=3", *extra])


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def without_times(rows):
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows]


# ---------------------------------------------------------------------------
# Everywhere: the TIS math, the config
# ---------------------------------------------------------------------------


def test_truncated_importance_weights_by_hand():
    """w = min(π_old/π_engine, C), 0 on padding; truncated flags only real tokens above the cap."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.9, 0.4]]))
    eng = torch.log(torch.tensor([[0.25, 0.4, 0.3], [0.01, 0.9, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, truncated = rl_math.truncated_importance_weights(old, eng, mask, cap=1.5)
    # ratios: 2, 0.5, 1 / 10, 1, (4: padding)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0], [1.5, 1.0, 0.0]]), atol=1e-6)
    assert truncated.tolist() == [[True, False, False], [True, False, False]]
    with pytest.raises(ValueError, match="cap"):
        rl_math.truncated_importance_weights(old, eng, mask, cap=0.0)


def test_tis_weights_on_the_advantages_weigh_each_tokens_clipped_loss():
    """ppo_policy_loss(A·w) = aggregate(w_t · max(−A ρ, −A clip ρ)) — what ppo_update relies on."""
    g = torch.Generator().manual_seed(0)
    lp, old = torch.randn(3, 5, generator=g) * 0.3, torch.randn(3, 5, generator=g) * 0.3
    adv, w = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g) * 2
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    ratio = torch.exp(lp - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    for agg in ("token-mean", "seq-mean-token-mean"):
        got, st = ppo_policy_loss(lp, old, adv * w, mask, 0.2, aggregation=agg)
        want = aggregate_token_loss(per_token * w, mask, agg)
        assert torch.allclose(got, want, atol=1e-6), agg
        _, st1 = ppo_policy_loss(lp, old, adv, mask, 0.2, aggregation=agg)
        assert st["clipfrac"] == st1["clipfrac"]  # the weights do not change which branch is active


def test_engine_settings_and_tis_cap_checks(tiny_dir, prompts_file, tmp_path, monkeypatch):
    import instructrl.engines as engines

    assert cfg_for(tiny_dir, prompts_file, tmp_path / "a").engine.name == "auto"  # PPO's default
    with pytest.raises(ConfigError, match="tis_cap"):
        cfg_for(tiny_dir, prompts_file, tmp_path / "a", "train.tis_cap=0.5")
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    settings, why = engines.resolve_engine(engines.EngineSettings(name="auto"))
    assert settings.name == "hf" and "not installed" in why


def test_vllm_without_vllm_is_a_config_error_before_training(tiny_dir, prompts_file, tmp_path, monkeypatch):
    """engine.name=vllm where vllm cannot be imported: refused when the config loads, naming the key."""
    import instructrl.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"engine\.name=vllm.*docs/vllm.md"):
        cfg_for(tiny_dir, prompts_file, tmp_path / "run", "engine.name=vllm")
    assert not (tmp_path / "run").exists()  # nothing started


def test_auto_without_vllm_is_the_built_in_sampler_bitwise(tiny_dir, prompts_file, tmp_path, monkeypatch):
    """engine.name=auto where vllm is absent gives exactly engine.name=hf's run, and says so in the log."""
    import instructrl.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    train_ppo(cfg_for(tiny_dir, prompts_file, tmp_path / "auto", "steps=2"), reward_fn=good_fraction_reward)
    train_ppo(cfg_for(tiny_dir, prompts_file, tmp_path / "hf", "steps=2", "engine.name=hf"),
              reward_fn=good_fraction_reward)
    assert without_times(metrics(tmp_path / "auto")) == without_times(metrics(tmp_path / "hf"))
    assert "engine_logprob_gap" not in metrics(tmp_path / "hf")[0]
    assert "engine: hf (engine.name=auto and vllm is not installed" in (tmp_path / "auto" / "log.txt").read_text()


def test_pipeline_passes_its_engine_to_the_ppo_stage():
    from instructrl.pipeline import load_pipeline_config, ppo_stage_config

    cfg = load_pipeline_config(None, ["preset=tiny", "engine.name=hf"])
    assert ppo_stage_config(cfg, "ppo", 1, "x").engine.name == "hf"
    with pytest.raises(ConfigError, match="ppo.engine.*set engine instead"):
        load_pipeline_config(None, ["preset=tiny", "ppo.engine.enforce_eager=false"])


# ---------------------------------------------------------------------------
# vLLM (skipped where it is not installed)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_ok():
    pytest.importorskip("vllm")
    from instructrl.engines import close_engine

    yield
    close_engine()


def _greedy(policy_dir_or_model, tok, ids, engine=None):
    from instructrl.engines import HFEngine, SamplingSettings

    s = SamplingSettings(8, temperature=0)
    if engine is not None:
        return engine.generate(ids, s).response
    return HFEngine(policy_dir_or_model, tok.eos_token_id, tok.pad_token_id).generate(ids, s).response


def test_vllm_ppo_runs_and_logs_a_small_engine_gap(vllm_ok, tiny_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    train_ppo(cfg_for(tiny_dir, prompts_file, out, "steps=2", "engine.name=vllm", "train.tis_cap=2"),
              reward_fn=good_fraction_reward)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["engine_logprob_gap"]) and 0 <= r["engine_logprob_gap"] < 1e-3, r
        assert 0 <= r["tis_truncated"] <= 1 and r["time_sync"] > 0
        assert math.isfinite(r["pg_loss"]) and math.isfinite(r["score"])
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: policy == reference
    assert "engine: vllm (set)" in (out / "log.txt").read_text()


def test_vllm_engine_holds_the_updated_policy(vllm_ok, tiny_dir, prompts_file, tmp_path):
    """After a PPO update and the sync, the engine's greedy answers are the trained HF model's (and no
    longer the initial model's: the weights reached the engine)."""
    import instructrl.engines as engines
    from instructrl.models import load_causal_lm, load_tokenizer

    out = tmp_path / "run"
    train_ppo(cfg_for(tiny_dir, prompts_file, out, "steps=1", "engine.name=vllm", "train.lr=0.05"),
              reward_fn=good_fraction_reward)
    tok = load_tokenizer(str(tiny_dir))
    ids = [tok(t)["input_ids"] for t in PROMPTS]
    trained = load_causal_lm(str(out / "policy"))
    want = _greedy(trained, tok, ids)
    assert torch.equal(_greedy(None, tok, ids, engine=engines._VLLM), want)
    assert not torch.equal(_greedy(load_causal_lm(str(tiny_dir)), tok, ids), want)


def test_vllm_lora_policy_is_pushed_merged(vllm_ok, tiny_dir, prompts_file, tmp_path):
    """train.lora: the engine gets W + α/r·BA (the saved merged policy's greedy answers)."""
    import instructrl.engines as engines
    from instructrl.models import load_causal_lm, load_tokenizer

    out = tmp_path / "lora"
    train_ppo(cfg_for(tiny_dir, prompts_file, out, "steps=1", "engine.name=vllm", "train.lr=0.05",
                      "train.lora.rank=4"), reward_fn=good_fraction_reward)
    tok = load_tokenizer(str(tiny_dir))
    ids = [tok(t)["input_ids"] for t in PROMPTS]
    assert torch.equal(_greedy(None, tok, ids, engine=engines._VLLM),
                       _greedy(load_causal_lm(str(out / "policy")), tok, ids))


def test_vllm_same_seed_same_responses(vllm_ok, tiny_dir, prompts_file, tmp_path):
    seen = {}

    def recording(name):
        def reward(q, r, m):
            seen.setdefault(name, []).append(r.clone())
            return good_fraction_reward(q, r, m)
        return reward

    for name in ("a", "b"):
        train_ppo(cfg_for(tiny_dir, prompts_file, tmp_path / name, "steps=2", "engine.name=vllm"),
                  reward_fn=recording(name))
    assert len(seen["a"]) == 2 and all(torch.equal(x, y) for x, y in zip(seen["a"], seen["b"]))
    assert not torch.equal(seen["a"][0], seen["a"][1])  # each step samples afresh
    assert without_times(metrics(tmp_path / "a")) == without_times(metrics(tmp_path / "b"))
    train_ppo(cfg_for(tiny_dir, prompts_file, tmp_path / "c", "steps=1", "engine.name=vllm", "seed=4"),
              reward_fn=recording("c"))
    assert not torch.equal(seen["c"][0], seen["a"][0])


def test_vllm_stop_and_resume_equals_an_uninterrupted_run(vllm_ok, tiny_dir, prompts_file, tmp_path):
    """Stop after step 1, resume to step 3: the same metrics and weights as one run of 3 steps. The
    uninterrupted run goes between the two halves, so the engine holds other weights when the resume
    starts: the resumed run must push its restored policy before its first rollout."""
    from safetensors.torch import load_file

    args = ("engine.name=vllm", "train.tis_cap=2", "run.checkpoint_every=1")
    part = tmp_path / "part"
    train_ppo(cfg_for(tiny_dir, prompts_file, part, "steps=1", *args), reward_fn=good_fraction_reward)
    train_ppo(cfg_for(tiny_dir, prompts_file, tmp_path / "full", "steps=3", *args), reward_fn=good_fraction_reward)
    train_ppo(cfg_for(tiny_dir, prompts_file, part, "steps=3", "resume=true", *args), reward_fn=good_fraction_reward)
    assert without_times(metrics(tmp_path / "full")) == without_times(metrics(part))
    a = load_file(tmp_path / "full" / "policy" / "model.safetensors")
    b = load_file(part / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
