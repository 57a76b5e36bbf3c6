"""LoRA (instructrl.lora, train.lora.* of SFT and the RM) on the tiny model: bad targets, what trains,
the adapter switched off, the merged folder, learning, exact resume, the RM head."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructrl.config import ConfigError, load_config
from instructrl.lora import (LoraSettings, adapter_disabled, apply_lora, is_lora, load_adapter, merged_copy,
                             save_adapter)
from instructrl.train.rm import RMConfig, train_rm
from instructrl.train.sft import SFTConfig, train_sft

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
LORA = ["train.lora.rank=8", "train.lora.alpha=16", "train.lora.dropout=0.1", "train.precision=fp32"]


def _sft_cfg(model, out, *extra):
    return load_config(SFTConfig, None, [
        f"model={model}", f"output_dir={out}", f"data.train={EXAMPLES / 'demonstrations.jsonl'}", "train.epochs=2",
        "train.batch_size=4", "train.micro_batch_size=2", "train.lr=5e-2", "train.warmup_ratio=0", *LORA, *extra])


def _rankings(path: Path, n: int = 48) -> Path:
    # the response naming a higher-numbered word is better: learnable from the last tokens alone
    words = ["apple", "river", "stone", "cloud", "lamp", "tiger"]
    rng = random.Random(0)
    rows = []
    for i in range(n):
        qs = rng.sample(range(len(words)), 3)
        rows.append({"id": f"r{i}", "prompt": "name a thing", "responses": [f"the {words[q]}" for q in qs],
                     "ranking": sorted(range(3), key=lambda j: -qs[j])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rm_cfg(model, data, out, *extra):
    return load_config(RMConfig, None, [
        f"model={model}", f"output_dir={out}", f"data.train={data}", "data.val_fraction=0", "data.max_length=64",
        "train.batch_size=8", "train.micro_batch_size=12", "train.lr=1e-2", *LORA, *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _ids(n=3, t=12, seed=0):
    return torch.randint(5, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_adapter(model, seed=0):
    """Give every lora_B random values (they start at 0, where the adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _interrupt_at(monkeypatch, module, call: int):
    """Make ``module.optimizer_step`` raise at its ``call``-th call: a run killed mid-step."""
    real, calls = module.optimizer_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, "optimizer_step", step)
    return real


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_target_modules_matching_nothing_is_a_config_error_before_training(tiny_model_dir, tmp_path):
    cfg = _sft_cfg(tiny_model_dir, tmp_path / "run", "train.lora.target_modules=[q_proj, c_attn]")
    with pytest.raises(ConfigError, match=r"'c_attn' matches no linear module of LlamaForCausalLM; its linear "
                                          r"modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        train_sft(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    rm = _rm_cfg(tiny_model_dir, _rankings(tmp_path / "r.jsonl"), tmp_path / "rm", "train.lora.target_modules=[score]")
    with pytest.raises(ConfigError, match="'score' is the model's output head"):
        train_rm(rm)
    with pytest.raises(ConfigError, match="trainable_layers=0 with train.lora.rank > 0"):
        _sft_cfg(tiny_model_dir, tmp_path / "x", "train.trainable_layers=0")
    with pytest.raises(ConfigError, match="listed twice"):
        _sft_cfg(tiny_model_dir, tmp_path / "x", "train.lora.target_modules=[q_proj, q_proj]")
    with pytest.raises(ConfigError, match="train.lora.rank"):
        _sft_cfg(tiny_model_dir, tmp_path / "x", "train.lora.rank=-1")


# ---------------------------------------------------------------------------
# The adapter itself
# ---------------------------------------------------------------------------


def test_adapter_disabled_gives_the_base_models_logits_exactly(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), LoraSettings(rank=4))
    ids = torch.randint(5, 300, (3, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0 at the start: the base model
        _random_adapter(model)
        adapted = model(ids).logits
        assert (adapted - base(ids).logits).abs().max() > 1e-2
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        with adapter_disabled(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        assert torch.equal(model(ids).logits, adapted)  # switched back on
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_top_layers_and_trainable_parameters(tiny_model_dir):
    from instructrl.reward_model import init_reward_model

    rm = apply_lora(init_reward_model(tiny_model_dir), LoraSettings(rank=4, target_modules=["q_proj", "v_proj"]),
                    top_layers=1)
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert names[-1] == "score.weight"
    lora = names[:-1]
    assert len(lora) == 4 and all(n.startswith("model.layers.1.") and ".lora_" in n for n in lora), lora


def test_save_load_adapter_round_trip_and_peft_reads_it(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), LoraSettings(rank=4))
    _random_adapter(model)
    ids = _ids()
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tmp_path / "adapter")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tmp_path / "adapter")
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(again(ids).logits, want)
        torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=0, atol=1e-6)
    other = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(rank=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="does not fit"):
        load_adapter(other, tmp_path / "adapter")


# ---------------------------------------------------------------------------
# SFT with LoRA
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted LoRA SFT run, with the in-memory weights captured at each checkpoint."""
    import instructrl.train.sft as sft

    out = tmp_path_factory.mktemp("sft") / "run"
    captured = []
    real = sft.save_checkpoint

    def capture(accelerator, model, *a, **k):
        captured.append({n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()})
        return real(accelerator, model, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "save_checkpoint", capture)
        final = train_sft(_sft_cfg(tiny_model_dir, out))
    return {"out": out, "final": Path(final), "weights": captured}


def test_sft_with_lora_trains_only_the_adapters_and_learns(sft_run, tiny_model_dir):
    base = load_file(tiny_model_dir / "model.safetensors")
    after = sft_run["weights"][-1]  # the policy in memory after the last step
    for name, value in after.items():
        if ".lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        plain = plain if plain in base else "model.embed_tokens.weight"  # lm_head is tied to the embeddings
        assert torch.equal(value, base[plain]), name  # frozen, bit for bit
    moved = [n for n, v in after.items() if ".lora_B." in n and v.abs().max() > 0]
    assert len(moved) == 7 * 2  # every projection of both blocks learned something
    sel = json.loads((sft_run["out"] / "selection.json").read_text())
    losses = [h["val_loss"] for h in sel["history"]]
    rows = [r["loss"] for r in _rows(sft_run["out"]) if "loss" in r]
    assert losses[-1] < losses[0] and rows[-1] < rows[0] - 0.05, (losses, rows)
    log = (sft_run["out"] / "log.txt").read_text()
    assert "LoRA rank 8" in log and " of " in log


def test_sft_merged_folder_is_plain_hf_and_matches_the_adapter_model(sft_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    final, run = sft_run["final"], sft_run["out"]
    assert not (final / "adapter_config.json").exists() and (run / "adapter" / "adapter_config.json").exists()
    assert load_file(final / "model.safetensors").keys() == load_file(tiny_model_dir / "model.safetensors").keys()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter").eval()
    assert not is_lora(merged) and is_lora(adapted)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged_copy(adapted)(ids).logits, adapted(ids).logits, rtol=0, atol=1e-5)
    # Loading the folder never imports PEFT: a "peft" package that fails on import shadows the real one.
    shadow = final.parent.parent / "no-peft"
    (shadow / "peft").mkdir(parents=True, exist_ok=True)
    (shadow / "peft" / "__init__.py").write_text("raise ImportError('peft is not installed here')\n")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(final)!r}).eval(); "
            "print(m(torch.tensor([[5, 6, 7]])).logits.shape); assert 'peft' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_sft_with_lora_resumes_exactly_after_a_kill(sft_run, tiny_model_dir, tmp_path, monkeypatch):
    import instructrl.train.sft as sft

    out = tmp_path / "run"
    real = _interrupt_at(monkeypatch, sft, 5)  # killed in epoch 2 (3 steps an epoch): resume from epoch-1
    with pytest.raises(KeyboardInterrupt):
        train_sft(_sft_cfg(tiny_model_dir, out))
    monkeypatch.setattr(sft, "optimizer_step", real)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-1"] and not (out / "model").exists()
    assert sorted(os.listdir(out / "checkpoints" / "epoch-1" / "adapter"))[-2:] == ["adapter_config.json",
                                                                                    "adapter_model.safetensors"]
    final = train_sft(_sft_cfg(tiny_model_dir, out, "resume=true"))
    for sub in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(sft_run["out"] / sub), load_file(out / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    ra, rb = _rows(sft_run["out"]), _rows(out)
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in ra] == \
           [(r["step"], r.get("loss"), r.get("val_loss")) for r in rb]
    assert Path(final) == out / "model"


def test_sft_with_lora_selects_by_rm_score_from_adapter_checkpoints(tiny_model_dir, tmp_path):
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model

    rm_dir = save_reward_model(init_reward_model(tiny_model_dir), load_tokenizer(tiny_model_dir), tmp_path / "rm")
    train_sft(_sft_cfg(tiny_model_dir, tmp_path / "run", "select.metric=rm_score", f"select.reward_model={rm_dir}",
                       "select.num_prompts=2", "select.max_new_tokens=4"))
    from transformers import AutoModelForCausalLM

    from instructrl.train.sft import load_checkpoint_lm

    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert len(sel["history"]) == 2 and all(isinstance(h["rm_score"], float) for h in sel["history"])
    best = Path(sel["best"]["checkpoint"])
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (best, tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # adapter/ is the selected epoch's
    with torch.no_grad():  # model/ is that epoch merged (base + its adapter)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")(_ids()).logits,
                                   load_checkpoint_lm(best, str(tiny_model_dir))(_ids()).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Reward model with LoRA
# ---------------------------------------------------------------------------


def test_rm_with_lora_learns_trains_its_head_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    import instructrl.train.rm as rm_mod
    from instructrl.reward_model import load_reward_model

    data = _rankings(tmp_path / "r.jsonl")
    heads = []
    real_load = rm_mod.load_trainable_rm

    def load(cfg, ckpt):
        m = real_load(cfg, ckpt)
        heads.append(m.score.weight.detach().clone())
        return m

    monkeypatch.setattr(rm_mod, "load_trainable_rm", load)
    extra = ("train.epochs=3", "train.save_every=2")  # 6 steps an epoch, a checkpoint every 2
    whole = Path(train_rm(_rm_cfg(tiny_model_dir, data, tmp_path / "a", *extra)))
    rows = [r for r in _rows(tmp_path / "a") if "loss" in r]
    assert len(rows) == 18 and sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3]) - 0.3, rows
    assert rows[-1]["accuracy"] > 0.7  # chance is 0.5
    trained = load_reward_model(whole)
    assert (trained.score.weight - heads[0]).abs().max() > 1e-3  # the head trained
    base = load_file(tiny_model_dir / "model.safetensors")
    mine = load_file(whole / "model.safetensors")
    assert torch.equal(mine["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # trunk: adapters only
    assert not torch.equal(mine["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    adapter = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(adapter["base_model.model.score.weight"], trained.score.weight)

    real = _interrupt_at(monkeypatch, rm_mod, 10)  # killed in step 10: resume from step-8, mid-epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_rm(_rm_cfg(tiny_model_dir, data, tmp_path / "b", *extra))
    monkeypatch.setattr(rm_mod, "optimizer_step", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())[-1] == "step-000008"
    resumed = Path(train_rm(_rm_cfg(tiny_model_dir, data, tmp_path / "b", *extra, "resume=true")))
    for sub in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(tmp_path / "a" / sub), load_file(tmp_path / "b" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    assert [r.get("loss") for r in _rows(tmp_path / "a")] == [r.get("loss") for r in _rows(tmp_path / "b")]
    assert resumed == tmp_path / "b" / "model"
