"""SFT speed on the embedded default model (SmolLM2-135M): fp32 vs bf16 autocast.

    python benchmarks/bench_sft.py [--steps 4] [--seq 256] [--batch 8]

Each precision runs in its own process (so peak RSS is its own) for a few
optimizer steps of `batch` sequences of `seq` tokens, through the real
`instructrl sft` loop. Prints tokens/s (first step excluded as warm-up), peak
memory, and achieved FLOP/s as a fraction of a 2048^3 matmul measured in the
same run at the same precision. Training FLOPs ~ 6 * params * tokens
(forward 2, backward 4; attention's extra ~ 12 * layers * seq * hidden per token added).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def matmul_flops(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def worker(precision: str, steps: int, seq: int, batch: int, out: Path) -> None:
    import torch

    from instructrl.config import load_config
    from instructrl.models import load_causal_lm, load_tokenizer, resolve_model
    from instructrl.train.sft import SFTConfig, train_sft

    model = resolve_model("default")
    tok = load_tokenizer(model)
    # Demonstrations whose prompt + response tokenize to exactly `seq` tokens.
    words = "the river bends past old stone mills where herons wait in the reeds".split()
    demos = []
    for i in range(batch * steps + 1):  # +1 for the validation split
        resp = " ".join(words[(i + j) % len(words)] for j in range(seq * 2))
        ids = tok(resp, add_special_tokens=False)["input_ids"]
        prompt = f"Describe scene number {i}."
        p_len = len(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
        demos.append({"prompt": prompt, "response": tok.decode(ids[: seq - p_len - 1])})
    data = out.parent / f"demos-{precision}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in demos))
    cfg = load_config(SFTConfig, None, [
        f"model={model}", f"output_dir={out.parent / ('run-' + precision)}", f"data.train={data}",
        f"data.val_fraction={1 / len(demos)}", f"data.max_length={seq}", "train.epochs=1",
        f"train.batch_size={batch}", f"train.micro_batch_size={batch}", f"train.precision={precision}",
        "train.residual_dropout=0.2",
    ])
    train_sft(cfg)
    rows = [json.loads(x) for x in (out.parent / f"run-{precision}" / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # drop warm-up step
    n_params = sum(p.numel() for p in load_causal_lm(model).parameters())
    c = load_causal_lm(model).config
    flops_per_token = 6 * n_params + 12 * c.num_hidden_layers * seq * c.hidden_size
    tokens_per_s = sum(tps) / len(tps)
    mm = matmul_flops(precision)
    out.write_text(json.dumps({
        "precision": precision, "tokens_per_s": tokens_per_s, "step_s": batch * seq / tokens_per_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "achieved_gflops": tokens_per_s * flops_per_token / 1e9, "matmul_gflops": mm / 1e9,
        "fraction_of_matmul": tokens_per_s * flops_per_token / mm, "threads": torch.get_num_threads(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker", choices=["fp32", "bf16"])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.seq, a.batch, Path(a.out))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    results = {}
    for prec in ("fp32", "bf16"):
        out = tmp / f"{prec}.json"
        subprocess.run([sys.executable, __file__, "--worker", prec, "--steps", str(a.steps), "--seq", str(a.seq),
                        "--batch", str(a.batch), "--out", str(out)], check=True, env={**os.environ})
        results[prec] = json.loads(out.read_text())
    print(f"\nSFT on SmolLM2-135M, {a.batch} x {a.seq} tokens per step, {a.steps} steps (first excluded)")
    print(f"{'precision':<10}{'step s':>8}{'tokens/s':>10}{'peak GiB':>10}{'GFLOP/s':>9}{'matmul':>9}{'fraction':>10}")
    for p, r in results.items():
        print(f"{p:<10}{r['step_s']:>8.2f}{r['tokens_per_s']:>10.0f}{r['peak_rss_gib']:>10.2f}"
              f"{r['achieved_gflops']:>9.0f}{r['matmul_gflops']:>9.0f}{r['fraction_of_matmul']:>10.1%}")
    print(f"bf16 speed-up over fp32: {results['bf16']['tokens_per_s'] / results['fp32']['tokens_per_s']:.2f}x")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "sft.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
