"""Pairwise DPO on real human preferences: Anthropic HH-RLHF (harmless-base), held-out accuracy beside our RM's.

Trains ``train_dpo`` (train.loss=dpo) on a training part of
``../shared/data/hh-rlhf/harmless-base-test-a.jsonl.gz`` and reports, on the held-out part, the
share of pairs whose implicit reward β log π_θ/π_ref is higher for the chosen reply (0.5 = chance;
the untrained policy equals its reference, so every margin starts at 0) with a 95% CI.
With ``--rm`` the same run also trains our K-wise reward model (``train_rm``, top ``--rm-layers``
blocks) on the same training rows and scores the same held-out pairs, so both accuracies, their
Wilson 95% CIs and the paired difference (bootstrap over pairs) come from one run.
Each transcript is parsed by ``instructrl.data.load_rankings`` (prompt = the dialogue up to the
last Assistant turn); rows with an empty reply are skipped and counted (data.errors=skip).
A score tie (margin exactly 0) counts half, as in the RM metrics.

The default model (the embedded SmolLM2-135M-Instruct) is heavy on a CPU; for a quick check of the
script use a tiny model and a few rows:

    python benchmarks/bench_dpo_hh.py --model PATH_TO_TINY --limit 40 --test 10 --rm
    flock /tmp/instructrl-heavy.lock .venv/bin/python benchmarks/bench_dpo_hh.py --rm --train 160 --test 300 \
        --max-length 128 --lr 1e-5 --batch-size 8        # the run in docs/dpo.md: about 15 min on 2 cores

In a git worktree outside the main checkout, pass ``--data`` (the default path is relative to the
checkout: ``../shared/data``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HH))
    ap.add_argument("--model", default="default", help="the SFT policy (and reference; the RM starts from it too)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N rows after shuffling (0 = all)")
    ap.add_argument("--test", type=int, default=400, help="held-out rows (pairs)")
    ap.add_argument("--train", type=int, default=0, help="training rows (0 = all the rest)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rm", action="store_true", help="also train our reward model on the same rows and compare")
    ap.add_argument("--rm-layers", type=int, default=4, help="RM: top transformer blocks trained (-1 = all)")
    ap.add_argument("--rm-lr", type=float, default=1e-4, help="RM learning rate (bench_rm_hh's)")
    ap.add_argument("--out", default="", help="folder for the run folders (default: a temporary folder)")
    return ap.parse_args()


def split_rows(args) -> tuple[list[str], list[str]]:
    """(held-out rows, training rows) after a seeded shuffle."""
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(lines)
    if args.limit:
        lines = lines[: args.limit]
    if len(lines) <= args.test:
        sys.exit(f"bench_dpo_hh: {len(lines)} rows leave none for training after --test {args.test}")
    test, train = lines[: args.test], lines[args.test:]
    return test, train[: args.train] if args.train else train


def dpo_margins(args, work: Path, out: Path, rankings, rt) -> tuple[list[float], dict]:
    """Train DPO on work/train.jsonl; β-scaled implicit-reward margins (chosen - rejected) of ``rankings``."""
    from instructrl.config import load_config
    from instructrl.formatting import TruncationStats
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.train.dpo import DPOConfig, score_items, tokenize, train_dpo

    cfg = load_config(DPOConfig, None, [
        f"model={args.model}", f"output_dir={out}", f"data.train={work / 'train.jsonl'}", "data.errors=skip",
        f"data.max_length={args.max_length}", f"train.micro_batch_size={args.micro}",
        f"train.precision={args.precision}", "train.loss=dpo", f"train.beta={args.beta}", f"train.lr={args.lr}",
        f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
    ])
    t0 = time.perf_counter()
    final = train_dpo(cfg)
    train_min = (time.perf_counter() - t0) / 60
    tok = load_tokenizer(str(final))
    items = tokenize(tok, rankings, cfg.data, TruncationStats())
    t0 = time.perf_counter()
    pol = score_items(load_causal_lm(str(final)).to(rt.device).eval(), items, tok.pad_token_id, args.micro, rt)
    ref = score_items(load_causal_lm(args.model).to(rt.device).eval(), items, tok.pad_token_id, args.micro, rt)
    margins = [args.beta * ((p[it.ranks.index(0)] - r[it.ranks.index(0)]) - (p[it.ranks.index(1)] - r[it.ranks.index(1)]))
               for it, p, r in zip(items, pol, ref)]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    info = {"train_min": train_min, "eval_min": (time.perf_counter() - t0) / 60, "steps": len(metrics),
            "last": f"loss {last['loss']:.4f}, margin {last['reward_margin']:.4f}, accuracy {last['accuracy']:.3f}",
            "precision": cfg.train.precision}
    return margins, info


def rm_margins(args, work: Path, out: Path, rankings, rt) -> tuple[list[float], dict]:
    """Train our K-wise RM on work/train.jsonl (no validation split); score margins (chosen - rejected) of ``rankings``."""
    from instructrl.config import load_config
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import RewardScorer, load_reward_model
    from instructrl.train.rm import RankingTruncation, RMConfig, score_rankings, tokenize_rankings, train_rm

    cfg = load_config(RMConfig, None, [
        f"model={args.model}", f"output_dir={out}", f"data.train={work / 'train.jsonl'}", "data.val_fraction=0",
        "data.errors=skip", f"data.max_length={args.max_length}", f"train.lr={args.rm_lr}",
        f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.micro}", f"train.epochs={args.epochs}",
        f"train.trainable_layers={args.rm_layers}", f"train.precision={args.precision}", "train.warmup_ratio=0.05",
        f"train.seed={args.seed}",
    ])
    t0 = time.perf_counter()
    train_rm(cfg)
    train_min = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    model = load_reward_model(out / "model").to(rt.device)
    items = tokenize_rankings(load_tokenizer(str(out / "model")), rankings, args.max_length, 16, RankingTruncation())
    scores = score_rankings(RewardScorer(model), items, model.config.pad_token_id, args.micro, rt.autocast, rt.device)
    margins = [s[it.ranks.index(0)] - s[it.ranks.index(1)] for it, s in zip(items, scores)]
    return margins, {"train_min": train_min, "eval_min": (time.perf_counter() - t0) / 60}


def correct(margins: list[float]) -> list[float]:
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]


def accuracy_line(name: str, margins: list[float]) -> str:
    from instructrl.core.stats import proportion_ci

    c = correct(margins)
    lo, hi = proportion_ci(sum(c), len(c))
    return f"{name}: held-out accuracy {sum(c) / len(c):.3f} (95% CI {lo:.3f}-{hi:.3f}) over {len(c)} pairs"


def paired_difference(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of correct(a) - correct(b) over the same pairs, with a percentile bootstrap 95% CI (pairs resampled)."""
    import numpy as np

    d = np.asarray(correct(a)) - np.asarray(correct(b))
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boot = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def main() -> None:
    args = parse_args()
    if not Path(args.data).exists():
        print(f"bench_dpo_hh: {args.data} not found (see ../shared/data/README.md); skipped")
        return
    from instructrl.data import load_rankings
    from instructrl.runtime import make_runtime

    test, train = split_rows(args)
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-hh-"))  # the data never goes into the repo
    (work / "train.jsonl").write_text("".join(train))
    (work / "test.jsonl").write_text("".join(test))
    out = Path(args.out) if args.out else work
    skipped: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below instead
        held_out = load_rankings(str(work / "test.jsonl"), errors="skip", skipped=skipped)
        n_train = len(load_rankings(str(work / "train.jsonl"), errors="skip"))
    print(f"HH harmless-base: {n_train} training pairs, {len(held_out)} held-out pairs "
          f"({len(train) - n_train} + {len(skipped)} invalid rows skipped; "
          f"seed {args.seed}); model {args.model}, max_length {args.max_length}, epochs {args.epochs}, "
          f"batch {args.batch_size} pairs")
    rt = make_runtime("auto", args.precision)
    t0 = time.perf_counter()
    dpo, di = dpo_margins(args, work, out / "dpo", held_out, rt)
    print(f"\nDPO (full fine-tune, β {args.beta}, lr {args.lr}, {di['precision']}): {di['steps']} steps, "
          f"last step {di['last']}; {di['train_min']:.1f} min training, {di['eval_min']:.1f} min held-out scoring")
    print(accuracy_line("DPO implicit reward", dpo) + f"; mean margin {sum(dpo) / len(dpo):.4f}")
    if args.rm:
        rm, ri = rm_margins(args, work, out / "rm", held_out, rt)
        print(f"RM (K-wise loss, top {args.rm_layers} blocks + head, lr {args.rm_lr}): "
              f"{ri['train_min']:.1f} min training, {ri['eval_min']:.1f} min held-out scoring")
        print(accuracy_line("reward model", rm))
        d, lo, hi = paired_difference(dpo, rm, seed=args.seed)
        print(f"DPO - RM accuracy on the same pairs: {d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, paired bootstrap)")
    print(f"time: {(time.perf_counter() - t0) / 60:.1f} min total; run folders under {out}")


if __name__ == "__main__":
    main()
