"""PPO with LoRA: adapters train, the reference is the policy with its adapter off, checkpoints hold
adapters and resume exactly, the final policy is a plain merged Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.train.ppo import PPOConfig, train_ppo

from test_ppo import good_fraction_reward, write_prompts  # the scripted reward the full fine-tuning tests learn

PROMPTS = ["write a haiku about the sea", "list three colors", "say hello", "explain rain",
           "name a fruit", "count to five", "describe a cat", "what is two plus two"]


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


def cfg(model, prompts, out, *extra):
    return load_config(PPOConfig, None, [
        f"policy={model}", f"prompts={prompts}", f"output_dir={out}", "rollout.batch_size=16",
        "rollout.max_new_tokens=16", "train.minibatch_size=8", "train.micro_batch_size=8", "train.lr=3e-2",
        "train.value_lr=3e-3", "train.warmup_steps=0", "train.precision=fp32", "train.lora.rank=8",
        "train.lora.dropout=0", *extra])


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lora_ppo_learns_and_writes_a_merged_policy(prompts_file, tmp_path):
    """An adapter moves the logits through the hidden states only (the tied head is not adapted), so the
    tiny model is initialised with peaked next-token distributions (init_std=0.3) it can move."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from instructrl.models import build_tiny_model

    tiny_model_dir = build_tiny_model(tmp_path / "peaked", init_std=0.3)
    out = tmp_path / "lora"
    train_ppo(cfg(tiny_model_dir, prompts_file, out, "steps=25", "kl.coef=0.02", "train.advantage=rloo",
                  "rollout.samples_per_prompt=4"), reward_fn=good_fraction_reward)
    rows = metrics(out)
    first, last = (sum(r["score"] for r in rs) / 5 for rs in (rows[:5], rows[-5:]))
    assert last > first + 2.0, (first, last)
    assert (out / "policy_adapter" / "adapter_model.safetensors").exists()
    merged = load_file(out / "policy" / "model.safetensors")
    assert not any("lora" in k for k in merged)  # a plain folder
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = [k for k in base if not torch.equal(base[k], merged[k])]
    # adapters sit on the attention and MLP projections only: embeddings and norms never move
    assert moved and all(k.endswith("proj.weight") for k in moved), moved
    AutoModelForCausalLM.from_pretrained(out / "policy")  # loads without PEFT's help


def test_adapter_off_is_the_reference_policy(tiny_model_dir, tiny_tokenizer):
    """reference_logits with no reference model = the policy's base, bitwise, after the adapter moved."""
    from instructrl.lora import LoraSettings, apply_lora
    from instructrl.models import load_causal_lm
    from instructrl.scoring import response_logits
    from instructrl.train.ppo_phases import Models, reference_logits

    policy = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(rank=4, dropout=0.0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    base = load_causal_lm(str(tiny_model_dir)).eval()
    policy.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        ref = reference_logits(Models(tiny_tokenizer, policy, None, None, None), ids, am, 3, 1.0, None)
        want = response_logits(base, ids, am, 3, 1.0)
        adapted = response_logits(policy, ids, am, 3, 1.0)
    assert torch.equal(ref, want)
    assert not torch.allclose(adapted, want)  # the adapter is on again afterwards
    assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_lora_resume_equals_an_uninterrupted_run(tiny_model_dir, prompts_file, tmp_path, advantage):
    from safetensors.torch import load_file

    args = (f"train.advantage={advantage}", "rollout.samples_per_prompt=2", "rollout.batch_size=8",
            "train.minibatch_size=4", "run.checkpoint_every=2")
    train_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "full", "steps=4", *args), reward_fn=good_fraction_reward)
    part = tmp_path / "part"
    train_ppo(cfg(tiny_model_dir, prompts_file, part, "steps=2", *args), reward_fn=good_fraction_reward)
    ck = part / "checkpoints" / "step-000002"
    assert (ck / "policy" / "adapter_model.safetensors").exists()
    assert not (ck / "policy" / "model.safetensors").exists()  # adapters only, no base weights
    assert (ck / "value").exists() == (advantage == "gae")
    train_ppo(cfg(tiny_model_dir, prompts_file, part, "steps=4", "resume=true", *args),
              reward_fn=good_fraction_reward)
    for sub in ("policy", "value") if advantage == "gae" else ("policy",):
        a = load_file(tmp_path / "full" / sub / "model.safetensors")
        b = load_file(part / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert [r["score"] for r in metrics(tmp_path / "full")] == [r["score"] for r in metrics(part)]


def test_lora_targets_that_match_nothing_are_refused_before_training(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="target_modules"):
        train_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "bad", "steps=1", "train.lora.target_modules=[qkv]"),
                  reward_fn=good_fraction_reward)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
