"""Pairwise DPO on real human preferences: Anthropic HH-RLHF (harmless-base), held-out implicit-reward accuracy.

Trains ``train_dpo`` (train.loss=dpo) on a training part of
``../shared/data/hh-rlhf/harmless-base-test-a.jsonl.gz`` and reports, on the held-out part, the
share of pairs whose implicit reward β log π_θ/π_ref is higher for the chosen reply (0.5 = chance;
the untrained policy equals its reference, so every margin starts at 0) with a 95% CI.
Each transcript is parsed by ``instructrl.data.load_rankings`` (prompt = the dialogue up to the
last Assistant turn); rows with an empty reply are skipped and counted (data.errors=skip).

The default model (the embedded SmolLM2-135M-Instruct) is heavy on a CPU; for a quick check of the
script use a tiny model and a few rows:

    python benchmarks/bench_dpo_hh.py --model PATH_TO_TINY --limit 40 --test 10
    flock /tmp/instructrl-heavy.lock .venv/bin/python benchmarks/bench_dpo_hh.py [--test 400] [--out runs/bench-dpo-hh]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--model", default="default", help="the SFT policy (and reference)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N rows after shuffling (0 = all)")
    ap.add_argument("--test", type=int, default=400, help="held-out pairs")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="run folder (default: a temporary folder)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"bench_dpo_hh: {args.data} not found (see ../shared/data/README.md); skipped")
        return

    import torch

    from instructrl.config import load_config
    from instructrl.core.stats import proportion_ci
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.runtime import make_runtime
    from instructrl.train.dpo import DPOConfig, load_items, score_items, train_dpo

    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(lines)
    if args.limit:
        lines = lines[: args.limit]
    if len(lines) <= args.test:
        sys.exit(f"bench_dpo_hh: {len(lines)} rows leave none for training after --test {args.test}")
    test, train = lines[: args.test], lines[args.test:]
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-hh-"))  # the data never goes into the repo
    (work / "train.jsonl").write_text("".join(train))
    (work / "test.jsonl").write_text("".join(test))
    out = args.out or str(work / "run")
    common = [f"model={args.model}", "data.errors=skip", f"data.max_length={args.max_length}",
              f"train.micro_batch_size={args.micro}", f"train.precision={args.precision}"]
    cfg = load_config(DPOConfig, None, [
        *common, f"output_dir={out}", f"data.train={work / 'train.jsonl'}", "train.loss=dpo",
        f"train.beta={args.beta}", f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}", f"train.seed={args.seed}",
    ])
    print(f"HH harmless-base: {len(train)} training rows, {len(test)} held-out rows (seed {args.seed}); "
          f"model {args.model}, max_length {args.max_length}, β {args.beta}, lr {args.lr}, batch {args.batch_size}")
    t0 = time.perf_counter()
    final = train_dpo(cfg)
    total = time.perf_counter() - t0

    # held out: implicit reward of chosen vs rejected, trained policy against the reference
    rt = make_runtime("auto", cfg.train.precision)
    test_cfg = load_config(DPOConfig, None, [*common, f"data.train={work / 'test.jsonl'}"])
    tok = load_tokenizer(str(final))
    items = load_items(test_cfg, tok, print)
    pol = score_items(load_causal_lm(str(final)).to(rt.device).eval(), items, tok.pad_token_id, args.micro, rt)
    ref = score_items(load_causal_lm(args.model).to(rt.device).eval(), items, tok.pad_token_id, args.micro, rt)
    margins = [args.beta * ((p[it.ranks.index(0)] - r[it.ranks.index(0)]) - (p[it.ranks.index(1)] - r[it.ranks.index(1)]))
               for it, p, r in zip(items, pol, ref)]
    correct = torch.tensor([float(m > 0) for m in margins])
    lo, hi = proportion_ci(correct.sum().item(), len(items))
    metrics = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r.get("seconds", 0) for r in metrics)
    print(f"\nheld-out implicit-reward accuracy {correct.mean().item():.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
          f"{len(items)} pairs; mean margin {sum(margins) / len(margins):.4f}")
    print(f"last training step: loss {metrics[-1]['loss']:.4f}, margin {metrics[-1]['reward_margin']:.4f}, "
          f"accuracy {metrics[-1]['accuracy']:.3f}")
    print(f"time: {total / 60:.1f} min total ({train_s / 60:.1f} min in optimizer steps); run folder {out}")


if __name__ == "__main__":
    main()
