"""SFT step cost, full fine-tuning vs LoRA, on a random init of SmolLM2-135M's architecture.

    nice python benchmarks/bench_lora.py [--rank 16] [--batch 2] [--seq 128] [--steps 3] [--modes full,lora]

No download: the model is ``LlamaConfig`` with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, vocab 49152, tied embeddings) and random weights, so the timings are those of
the real model while the loss values mean nothing. Each mode runs in its own process (peak RSS is its
own) and takes the SFT loop's pieces: ``instructrl.lora.apply_lora`` (all seven projections of every
block, as ``train.lora.rank=R``), ``models.make_adamw`` over the trainable parameters, ``sft_loss`` on
response tokens, fp32. A step is forward + backward + optimizer; the first is a warm-up and excluded.
Modes: ``full``; ``lora`` (dropout 0.1, the default); ``lora-nodrop`` (dropout 0: on a CPU the dropout
masks, one per adapted projection, are a visible share of the forward pass).
Wall time (phases) and the process's CPU time per step: on a shared machine the second is the steadier
figure. Prints a table; docs/lora.md holds the figures measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def worker(mode: str, rank: int, batch: int, seq: int, steps: int, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructrl.core.losses import sft_loss
    from instructrl.lora import LoraSettings, apply_lora
    from instructrl.models import make_adamw

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.config.use_cache = False
    if mode.startswith("lora"):
        apply_lora(model, LoraSettings(rank=rank, alpha=float(rank), dropout=0.0 if mode == "lora-nodrop" else 0.1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adamw(params, 1e-4)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, seq // 4:] = 1  # the response: the last three quarters, as in a demonstration
    phases = {"forward": [], "backward": [], "optimizer": [], "step": [], "step_cpu": []}
    for _ in range(steps + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss, _ = sft_loss(logits, ids, loss_mask)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3, c3 = time.perf_counter(), time.process_time()
        for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0),
                     ("step_cpu", c3 - c0)):
            phases[k].append(v)
    out.write_text(json.dumps({
        "mode": mode, "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
        **{k: statistics.median(v[1:]) for k, v in phases.items()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "threads": torch.get_num_threads(),
    }))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
                extra = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
                return f"{line.split(':', 1)[1].strip()} ({', '.join(extra) or 'no avx512/amx'})"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--modes", default="full,lora", help="full, lora, lora-nodrop (comma-separated)")
    ap.add_argument("--worker", choices=["full", "lora", "lora-nodrop"])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.rank, a.batch, a.seq, a.steps, Path(a.out))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    results = {}
    modes = a.modes.split(",")
    load = os.getloadavg()[0]
    for mode in modes:
        out = tmp / f"{mode}.json"
        subprocess.run([sys.executable, __file__, "--worker", mode, "--rank", str(a.rank), "--batch", str(a.batch),
                        "--seq", str(a.seq), "--steps", str(a.steps), "--out", str(out)], check=True, env={**os.environ})
        results[mode] = json.loads(out.read_text())
    print(f"\nSFT step on SmolLM2-135M's shape (random init), {a.batch} x {a.seq} tokens, fp32, "
          f"{results[modes[0]]['threads']} threads, {cpu_name()}; median of {a.steps} steps after a warm-up; "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'mode':<16}{'trainable':>14}{'step s':>9}{'forward':>9}{'backward':>10}{'optimizer':>11}{'CPU s':>8}"
          f"{'peak RSS GiB':>14}")
    for mode, r in results.items():
        name = {"full": "full", "lora": f"lora r={a.rank}", "lora-nodrop": f"lora r={a.rank} p=0"}[mode]
        print(f"{name:<16}{r['trainable']:>14,}{r['step']:>9.2f}{r['forward']:>9.2f}{r['backward']:>10.2f}"
              f"{r['optimizer']:>11.3f}{r['step_cpu']:>8.2f}{r['peak_rss_gib']:>14.2f}")
    if "full" in results:
        f = results["full"]
        for mode in (m for m in modes if m != "full"):
            r = results[mode]
            print(f"{mode}: trains {r['trainable'] / r['total']:.2%} of {r['total']:,} parameters; step time "
                  f"{r['step'] / f['step']:.2f}x (CPU time {r['step_cpu'] / f['step_cpu']:.2f}x), peak RSS {r['peak_rss_gib'] / f['peak_rss_gib']:.2f}x of full")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "lora.json").write_text(json.dumps(
        {"cpu": cpu_name(), "batch": a.batch, "seq": a.seq, "rank": a.rank, "load_before": load,
         "results": results}, indent=2))


if __name__ == "__main__":
    main()
