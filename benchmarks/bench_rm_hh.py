"""Reward model on real human preferences: Anthropic HH-RLHF (harmless-base), held-out accuracy.

Trains ``instructrl rm`` from the embedded default model (SmolLM2-135M-Instruct)
on a training part of ``../shared/data/hh-rlhf/harmless-base-test-a.jsonl.gz``
and reports accuracy on the held-out part, with a 95% CI (Bai et al. 2022 report
about 0.6 for their smallest preference models, trained on far more data).
Each transcript is parsed into prompt = the dialogue up to the last Assistant
turn and response = that turn (``instructrl.data.parse_hh_transcript``); rows
with an empty reply are skipped and counted (data.errors=skip).

Budget choices for 2 CPU cores (each measured, see docs/reward-model.md):
bf16 autocast; ``max_length`` tokens with the prompt cut from the left (the last
turns are what the reply answers); only the top ``--layers`` blocks (+ final
norm + head) trained, so the backward pass is short; a higher learning rate
than the paper's full fine-tune to match.

    flock /tmp/instructrl-heavy.lock .venv/bin/python benchmarks/bench_rm_hh.py [--test 400] [--out runs/bench-rm-hh]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--test", type=int, default=400, help="held-out pairs")
    ap.add_argument("--train", type=int, default=0, help="training pairs (0 = all the rest)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4, help="top transformer blocks trained (-1 = all)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="run folder (default: a temporary folder)")
    args = ap.parse_args()

    from instructrl.train.rm import RMConfig, train_rm
    from instructrl.config import load_config

    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(lines)
    test, train = lines[: args.test], lines[args.test:]
    if args.train:
        train = train[: args.train]
    work = Path(tempfile.mkdtemp(prefix="bench-rm-hh-"))  # the data never goes into the repo
    (work / "train.jsonl").write_text("".join(train))
    (work / "test.jsonl").write_text("".join(test))
    out = args.out or str(work / "run")
    cfg = load_config(RMConfig, None, [
        "model=default", f"output_dir={out}", f"data.train={work / 'train.jsonl'}", f"data.val={work / 'test.jsonl'}",
        "data.errors=skip", f"data.max_length={args.max_length}", f"train.lr={args.lr}",
        f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.micro}", f"train.epochs={args.epochs}",
        f"train.trainable_layers={args.layers}", "train.precision=bf16", "train.warmup_ratio=0.05",
        f"train.seed={args.seed}",
    ])
    print(f"HH harmless-base: {len(train)} training rows, {len(test)} held-out rows (seed {args.seed}); "
          f"max_length {args.max_length}, top {args.layers} layers, lr {args.lr}, batch {args.batch_size}")
    t0 = time.perf_counter()
    train_rm(cfg)
    total = time.perf_counter() - t0
    m = json.loads((Path(out) / "eval.json").read_text())["overall"]
    metrics = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r.get("seconds", 0) for r in metrics)
    print(f"\nheld-out accuracy {m['accuracy']:.3f} (95% CI {m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f}) "
          f"over {m['comparisons']} pairs; log loss {m['log_loss']:.3f}")
    print(f"time: {total / 60:.1f} min total ({train_s / 60:.1f} min in optimizer steps); run folder {out}")
    print(open(Path(out) / "log.txt").read())


if __name__ == "__main__":
    main()
