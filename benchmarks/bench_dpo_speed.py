"""Listwise DPO (K sequence passes per ranking) vs the ranking expanded into independent pairs (2·C(K,2) passes).

DPO on a K-ranking can be trained two ways: the Plackett-Luce (listwise) loss, or pairwise DPO on
its C(K,2) comparisons. ``instructrl dpo`` scores each of the K responses once either way
(``train.loss=dpo`` forms the pairs from the K log-probs); a trainer that takes pairs as rows (TRL's
DPOTrainer on a ranking flattened to pairs) runs 2·C(K,2) sequence passes, K-1 times as many. This
times one optimizer step (forward + backward + AdamW, policy only: the reference log-probs are
cached once per dataset in both) per ranking at K=4 and K=9, and prints the ratio.

    python benchmarks/bench_dpo_speed.py                    # tiny random model, seconds
    python benchmarks/bench_dpo_speed.py --model default    # SmolLM2-135M (heavy: minutes)

Both modes pack sequences into forward passes of ``--micro`` sequences; the first step of each
mode is a warm-up and the median of ``--steps`` is reported.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from instructrl.formatting import encode_prompt, encode_response, truncate
from instructrl.models import build_tiny_model, load_causal_lm, load_tokenizer, make_adamw
from instructrl.runtime import make_runtime
from instructrl.train.dpo import DPOItem, batch_loss, collate, logps, pack

WORDS = ("the a garden river quiet bright answer kindly useful tea leaves sea poem morning light careful simple "
         "reason example clear short story water mountain friend help question explain slowly because").split()


def synthetic(tok, n: int, k: int, length: int, seed: int) -> list[DPOItem]:
    """``n`` rankings of ``k`` distinct responses, each prompt + response about ``length`` tokens, best first."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = encode_prompt(tok, [{"role": "user", "content": "Please " + " ".join(rng.choices(WORDS, k=8)) + "?"}])
        ex, seen = [], set()
        while len(ex) < k:
            words = []
            while len(p) + len(encode_response(tok, " ".join(words))) < length:
                words.append(rng.choice(WORDS))
            if " ".join(words) not in seen:
                seen.add(" ".join(words))
                ex.append(truncate(p, encode_response(tok, " ".join(words)), length + 8, 4))
        out.append(DPOItem(f"r{i}", ex, list(range(k)), [0.0] * k))
    return out


def expand_pairs(items: list[DPOItem]) -> list[DPOItem]:
    """Each untied comparison as its own 2-sequence item: what a pairs-as-rows trainer runs."""
    return [DPOItem(f"{it.id}.{w}.{l}", [it.examples[w], it.examples[l]], [0, 1], [0.0, 0.0])
            for it in items for w, l in itertools.combinations(range(it.k), 2)]


def step_seconds(model, opt, items: list[DPOItem], loss: str, micro: int, pad_id: int, rt) -> float:
    t = time.perf_counter()
    for g in pack(items, micro):
        b = collate(g, pad_id)
        lo, _ = batch_loss(logps(model, b, rt), b, loss, 0.1, len(items))
        lo.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (a random 2-layer model), 'default' or a folder")
    ap.add_argument("--ks", default="4,9", help="ranking sizes to time")
    ap.add_argument("--per-step", type=int, default=4, help="rankings per optimizer step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--length", type=int, default=100, help="tokens per sequence")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    a = ap.parse_args()

    model_dir = a.model
    if a.model == "tiny":
        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    rt = make_runtime(a.device, a.precision)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).to(rt.device).train()
    model.config.use_cache = False
    opt = make_adamw(list(model.parameters()), 1e-6)
    print(f"model {a.model}, {rt.device}, {rt.precision}, {a.per_step} rankings/step, ~{a.length} tokens/sequence")
    print(f"{'K':>3} {'listwise passes':>16} {'pairwise passes':>16} {'listwise s/ranking':>19} "
          f"{'pairwise s/ranking':>19} {'ratio':>6}")
    for k in [int(x) for x in a.ks.split(",")]:
        items = synthetic(tok, a.per_step, k, a.length, seed=k)
        pairs = expand_pairs(items)
        times = {"listwise": [], "dpo": []}
        for i in range(a.steps + 1):  # modes alternate step by step; step 0 is a warm-up
            for mode, batch in (("listwise", items), ("dpo", pairs)):
                dt = step_seconds(model, opt, batch, mode, a.micro, tok.pad_token_id, rt)
                if i:
                    times[mode].append(dt / a.per_step)
        lw, pw = statistics.median(times["listwise"]), statistics.median(times["dpo"])
        print(f"{k:>3} {k:>16} {2 * k * (k - 1) // 2:>16} {lw:>19.4f} {pw:>19.4f} {pw / lw:>5.2f}x")


if __name__ == "__main__":
    main()
