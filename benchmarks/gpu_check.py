"""A GPU check: every stage on one CUDA device, every forward's tensors there, then one timed PPO step.

    python benchmarks/gpu_check.py                  # on a CUDA machine (about 2-4 minutes)
    python benchmarks/gpu_check.py --device cpu     # the same checks on the CPU (tests run this)

Needs only what a bare CUDA PyTorch image has (torch, transformers, accelerate, peft; no datasets,
gguf, vllm, matplotlib or network) and no model weights: the stages run on a tiny random model, and
the timing uses a random init of SmolLM2-135M's configuration.

1. tiny SFT, RM, PPO (GAE), PPO (RLOO + LoRA, reference = the adapter switched off), DPO and eval,
   each on ``--device``; a global forward hook fails the check if any module's parameters or
   tensor inputs are on another device type.
2. one PPO step (RLOO, 64 episodes x 64 new tokens, bf16 on CUDA) at SmolLM2-135M size, with and
   without LoRA: seconds per step (the second step; the first warms up) and peak GPU memory.

Prints one JSON object and writes it to ``--out``/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _stub_matplotlib_if_missing() -> bool:
    """The plots are not what this checks: without matplotlib, plotting calls become no-ops."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return False
    from instructrl import plots

    for name in dir(plots):
        if name.startswith("plot_"):
            setattr(plots, name, lambda *a, **k: None)
    return True


class DeviceGuard:
    """A global forward pre-hook: every module's parameters and tensor arguments on ``device_type``."""

    def __init__(self, device_type: str):
        self.device_type, self.calls, self.bad = device_type, 0, []

    def __call__(self, module, args, kwargs=None):
        self.calls += 1
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        tensors += list(module.parameters(recurse=False))
        for t in tensors:
            if t.device.type != self.device_type and len(self.bad) < 5:
                self.bad.append(f"{type(module).__name__}: a {tuple(t.shape)} tensor on {t.device}")

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def write_data(d: Path) -> dict[str, Path]:
    from instructrl.tasks import generate_tasks, save_tasks

    words = ["sea", "rain", "cats", "tea", "maps", "bread", "stars", "snow"]
    demos = [{"prompt": f"write one line about {w}", "response": f"the {w} is quiet tonight."} for w in words]
    ranks = [{"prompt": f"write one line about {w}", "responses": [f"the {w} is quiet tonight.", f"{w}.", "no"],
              "ranking": [0, 1, 2]} for w in words]
    files = {"demos": d / "demos.jsonl", "ranks": d / "ranks.jsonl", "prompts": d / "prompts.jsonl",
             "ptx": d / "ptx.jsonl", "tasks": d / "tasks.jsonl"}
    files["demos"].write_text("".join(json.dumps(r) + "\n" for r in demos))
    files["ranks"].write_text("".join(json.dumps(r) + "\n" for r in ranks))
    files["prompts"].write_text("".join(json.dumps({"id": i, "prompt": r["prompt"]}) + "\n" for i, r in enumerate(demos)))
    files["ptx"].write_text("".join(json.dumps({"text": f"a plain sentence about {w}."}) + "\n" for w in words))
    save_tasks(files["tasks"], generate_tasks(8, seed=0))
    return files


def tiny_stages(root: Path, device: str) -> dict:
    """Every stage on the tiny model; returns which ran, with the guard's verdict."""
    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import EvalConfig, run_eval
    from instructrl.models import build_tiny_model
    from instructrl.train.dpo import DPOConfig, train_dpo
    from instructrl.train.ppo import PPOConfig, train_ppo
    from instructrl.train.rm import RMConfig, train_rm
    from instructrl.train.sft import SFTConfig, train_sft

    f = write_data(root)
    base = build_tiny_model(root / "base")
    dev = [f"device={device}", "overwrite=true"]
    guard_type = torch.device(device).type
    results = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        with DeviceGuard(guard_type) as g:
            fn()
        results[name] = {"seconds": round(time.perf_counter() - t0, 2), "forwards": g.calls, "off_device": g.bad}
        print(f"[gpu_check] {name}: {results[name]}", file=sys.stderr)

    stage("sft", lambda: train_sft(load_config(SFTConfig, None, [
        f"model={base}", f"data.train={f['demos']}", f"output_dir={root / 'sft'}", "train.epochs=1",
        "train.batch_size=4", "train.micro_batch_size=4", *dev])))
    sft = root / "sft" / "model"
    stage("rm", lambda: train_rm(load_config(RMConfig, None, [
        f"model={sft}", f"data.train={f['ranks']}", f"data.demonstrations={f['demos']}", f"output_dir={root / 'rm'}",
        "train.batch_size=4", "train.micro_batch_size=4", *dev])))
    rm = root / "rm" / "model"
    ppo = [f"policy={sft}", f"reward_model={rm}", f"prompts={f['prompts']}", "steps=2", "rollout.batch_size=8",
           "rollout.max_new_tokens=8", "train.minibatch_size=4", *dev]
    stage("ppo_gae", lambda: train_ppo(load_config(PPOConfig, None, [
        *ppo, f"ptx_data={f['ptx']}", f"output_dir={root / 'ppo_gae'}"])))
    stage("ppo_rloo_lora", lambda: train_ppo(load_config(PPOConfig, None, [
        *ppo, f"output_dir={root / 'ppo_lora'}", "train.advantage=rloo", "rollout.samples_per_prompt=2",
        "train.lora.rank=4", "train.lr=1e-4"])))
    stage("dpo", lambda: train_dpo(load_config(DPOConfig, None, [
        f"model={sft}", f"data.train={f['ranks']}", f"output_dir={root / 'dpo'}", "train.batch_size=4", *dev])))
    policies = {"sft": str(sft), "ppo": str(root / "ppo_gae" / "policy"), "lora": str(root / "ppo_lora" / "policy")}
    stage("eval", lambda: run_eval(load_config(EvalConfig, None, [
        f"policies={json.dumps(policies)}", "baseline=sft", f"tasks={f['tasks']}", f"reward_model={rm}",
        f"output_dir={root / 'eval'}", "max_new_tokens=8", "bootstrap=100", "n_prompts=0", f"device={device}"])))
    return results


def random_smollm2(root: Path) -> tuple[Path, Path]:
    """(policy, reward model) folders with SmolLM2-135M's architecture and random weights (no download; the
    weights would not fit the GPU machine's copy limit), built once under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructrl.models import build_tiny_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model

    model_dir, rm_dir = root / "smollm2-135m-random", root / "rm-135m"
    if not (rm_dir / "config.json").exists():
        tok = build_tiny_tokenizer()
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                          rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        save_reward_model(init_reward_model(str(model_dir)), tok, rm_dir)
    return model_dir, rm_dir


def timed_ppo_step(root: Path, device: str, lora: bool) -> dict:
    """Two RLOO steps at SmolLM2-135M size (random weights); the second one timed."""
    from instructrl.config import load_config
    from instructrl.train.ppo import PPOConfig, train_ppo

    model_dir, rm_dir = random_smollm2(root)
    prompts = root / "prompts.jsonl"
    name = "ppo-135m" + ("-lora" if lora else "")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = root / name
    train_ppo(load_config(PPOConfig, None, [
        f"policy={model_dir}", f"reward_model={rm_dir}", f"prompts={prompts}", f"output_dir={out}",
        "steps=2", "rollout.batch_size=64", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=64",
        "train.advantage=rloo", "train.minibatch_size=16", "train.micro_batch_size=16", "train.score_batch_size=64",
        f"device={device}", *(["train.lora.rank=16", "train.lr=1e-4"] if lora else []), "overwrite=true"]))
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    res = {k: round(row[k], 3) for k in ("time_generate", "time_score", "time_train", "tokens_per_s")}
    res["step_seconds"] = round(row["time_generate"] + row["time_score"] + row["time_train"], 3)
    if torch.cuda.is_available():
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--no-timing", action="store_true", help="only the tiny stages (the CPU test)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "matplotlib_stubbed": _stub_matplotlib_if_missing()}
    report["stages"] = tiny_stages(root, args.device)
    if not args.no_timing:
        report["ppo_step_135m"] = timed_ppo_step(root, args.device, lora=False)
        report["ppo_step_135m_lora"] = timed_ppo_step(root, args.device, lora=True)
    report["ok"] = all(not s["off_device"] for s in report["stages"].values())
    text = json.dumps(report, indent=2)
    (root / "gpu_check.json").write_text(text + "\n")
    print(text)
    if not report["ok"]:
        raise SystemExit("gpu_check: some forward ran with tensors off the device (see off_device)")


if __name__ == "__main__":
    main()
