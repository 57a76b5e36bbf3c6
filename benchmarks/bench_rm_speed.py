"""K-wise reward-model training vs the same rankings expanded into independent pairs.

InstructGPT §3.5: scoring the K responses of a ranking once each (K sequence
passes) and putting all C(K,2) comparisons into one loss term is K-1 times
cheaper than treating each comparison as its own pair of sequences
(C(K,2) * 2 = K(K-1) sequence passes) - what TRL's RewardTrainer does with
ranking data. Same synthetic rankings, same model (the embedded
SmolLM2-135M-Instruct), bf16 autocast, ~100-token sequences, every weight trained.

    flock /tmp/instructrl-heavy.lock .venv/bin/python benchmarks/bench_rm_speed.py [--steps 2] [--per-step 4] [--no-trl]

Prints sequence passes and wall time per ranking and the ratio. Both modes
take the same ``--per-step`` rankings per optimizer step, as training does
(`instructrl rm` steps on a batch of rankings; InstructGPT used 64), and pack
their sequences into forward passes of the same size (``--micro``); the
modes alternate step by step, the first step of each is a warm-up, and the
median step is reported. ``--per-step 1`` gives the per-ranking worst case,
where the fixed cost of every optimizer step (gradient clipping and AdamW over
all 135M weights, ~0.2 s) is paid by a single ranking. With ``trl``
importable it also times TRL's RewardTrainer on the expanded pairs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time

import torch

from instructrl.formatting import encode_prompt, encode_response, truncate
from instructrl.core.losses import kwise_ranking_loss
from instructrl.models import load_tokenizer, make_adamw
from instructrl.reward_model import RewardScorer, init_reward_model
from instructrl.train.rm import TokenizedRanking, collate_rankings, pack_rankings

WORDS = ("the a garden river quiet bright answer kindly useful tea leaves sea poem morning light careful simple "
         "reason example clear short story water mountain friend help question explain slowly because").split()


def synthetic_rankings(tok, n: int, k: int, seed: int, length: int = 100) -> list[tuple[list[dict], list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [{"role": "user", "content": "Please " + " ".join(rng.choices(WORDS, k=12)) + "?"}]
        p_len = len(encode_prompt(tok, prompt))
        resps = []
        while len(resps) < k:
            words = []
            while len(encode_response(tok, " ".join(words))) < length - p_len:
                words.append(rng.choice(WORDS))
            r = " ".join(words)
            if r not in resps:
                resps.append(r)
        out.append((prompt, resps))
    return out


def tokenize(tok, rankings, max_length: int) -> list[TokenizedRanking]:
    items = []
    for i, (prompt, resps) in enumerate(rankings):
        p = encode_prompt(tok, prompt)
        seqs = [truncate(p, encode_response(tok, r), max_length).input_ids for r in resps]
        items.append(TokenizedRanking(str(i), seqs, list(range(len(resps)))))
    return items


def expand_pairs(item: TokenizedRanking) -> list[TokenizedRanking]:
    """Each untied comparison as its own K = 2 ranking: 2 sequence passes per comparison."""
    return [TokenizedRanking(f"{item.id}:{w}>{l}", [item.seqs[w], item.seqs[l]], [0, 1])
            for w, l in itertools.combinations(range(item.k), 2)]


def train_step(model, opt, pad_id: int, items: list[TokenizedRanking], n_rankings: int, micro: int) -> tuple[float, int]:
    """One optimizer step on ``items`` (whole rankings packed into micro-batches); returns (seconds, sequence passes)."""
    scorer = RewardScorer(model).train()
    t0 = time.perf_counter()
    passes = 0
    for group in pack_rankings(items, micro):
        b = collate_rankings(group, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = scorer(b.input_ids, b.attention_mask)
        loss, _ = kwise_ranking_loss(s, b.group, b.ranks, num_rankings=n_rankings)
        loss.backward()
        passes += b.input_ids.shape[0]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, passes


def time_trl(model_factory, tok, rankings, k: int, pairs_per_step: int) -> tuple[float, int, str]:
    """TRL RewardTrainer on the expanded pairs; returns (seconds per ranking, pairs, trl version)."""
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rows = []
    for prompt, resps in rankings:
        for w, l in itertools.combinations(range(k), 2):  # responses are best-first
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": resps[w]}],
                         "rejected": [{"role": "assistant", "content": resps[l]}]})
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = RewardConfig(output_dir=out, per_device_train_batch_size=pairs_per_step, num_train_epochs=1,
                           learning_rate=1e-6, bf16=True, use_cpu=True, gradient_checkpointing=False,
                           save_strategy="no", report_to="none", logging_steps=10_000, disable_tqdm=True,
                           max_length=1024, dataloader_num_workers=0)
        trainer = RewardTrainer(model=model_factory(), args=cfg, train_dataset=Dataset.from_list(rows),
                                processing_class=tok, callbacks=[StepTimer()])
        trainer.train()
    # Per ranking = steady-state time over the comparisons it covered, scaled to C(K,2) comparisons.
    steady = times[1:]
    covered = len(rows) - pairs_per_step  # the first (warm-up) step took a full batch
    return sum(steady) / covered * math.comb(k, 2), len(rows), trl.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 9])
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per K and mode (plus 1 warm-up); median reported")
    ap.add_argument("--per-step", type=int, default=4, help="rankings per optimizer step (both modes)")
    ap.add_argument("--length", type=int, default=100, help="approximate tokens per sequence")
    ap.add_argument("--micro", type=int, default=18, help="sequences per forward pass (both modes)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's RewardTrainer even if installed")
    args = ap.parse_args()
    tok = load_tokenizer(None)
    model = init_reward_model(None)
    model.config.use_cache = False
    pad_id = model.config.pad_token_id
    print(f"model: default (SmolLM2-135M-Instruct) bf16 autocast, {torch.get_num_threads()} threads, "
          f"~{args.length}-token sequences, {args.per_step} rankings per optimizer step, {args.micro} sequences "
          f"per forward pass, {args.steps} timed steps per K and mode\n")
    results = []
    for k in args.ks:
        n = args.per_step
        raw = synthetic_rankings(tok, (args.steps + 1) * n, k, seed=k, length=args.length)
        items = tokenize(tok, raw, 4 * args.length)
        mean_len = statistics.mean(len(s) for it in items for s in it.seqs)
        # Interleaved (K-wise, pairs, K-wise, pairs, ...) so that load from other processes hits both alike;
        # the first pair of steps is a warm-up. Times are per ranking: step time / rankings per step.
        opt = make_adamw(list(model.parameters()), 1e-6)
        kw, pw = [], []
        for i in range(0, len(items), n):
            group = items[i: i + n]
            t, p = train_step(model, opt, pad_id, group, n, args.micro)
            kw.append((t / n, p / n))
            pairs = [pair for it in group for pair in expand_pairs(it)]
            t, p = train_step(model, opt, pad_id, pairs, n * math.comb(k, 2), args.micro)
            pw.append((t / n, p / n))
        kw, pw = kw[1:], pw[1:]
        t_k, p_k = statistics.median(t for t, _ in kw), round(kw[0][1])
        t_p, p_p = statistics.median(t for t, _ in pw), round(pw[0][1])
        row = {"k": k, "mean_tokens": mean_len, "kwise_passes": p_k, "kwise_s": t_k, "pairs_passes": p_p,
               "pairs_s": t_p, "ratio": t_p / t_k}
        print(f"K={k}: mean {mean_len:.0f} tokens/sequence")
        print(f"  K-wise (ours)        : {p_k:3d} sequence passes, {t_k:6.2f} s per ranking")
        print(f"  expanded pairs (ours): {p_p:3d} sequence passes, {t_p:6.2f} s per ranking")
        print(f"  speed-up             : {t_p / t_k:.2f}x  (theory K-1 = {k - 1}x)")
        results.append(row)
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("\nTRL not installed: RewardTrainer not timed (pip install trl to compare)")
        else:
            print()
            for row in results:
                k = row["k"]
                raw = synthetic_rankings(tok, (args.steps + 1) * args.per_step, k, seed=k, length=args.length)
                trl_tok = load_tokenizer(None)
                trl_tok.pad_token = trl_tok.convert_ids_to_tokens(pad_id)  # HF pools at the rightmost non-pad token
                t_trl, n_pairs, ver = time_trl(lambda: init_reward_model(None), trl_tok, raw, k, args.micro // 2)
                row["trl_s"] = t_trl
                print(f"K={k}: TRL {ver} RewardTrainer on {n_pairs} expanded pairs: {t_trl:6.2f} s per ranking; "
                      f"ours K-wise {row['kwise_s']:.2f} s -> ours/TRL time = {row['kwise_s'] / t_trl:.3f} "
                      f"({t_trl / row['kwise_s']:.2f}x faster)")
    print("\nsummary:", results)


if __name__ == "__main__":
    main()
