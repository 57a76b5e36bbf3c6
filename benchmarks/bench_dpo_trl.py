"""Time per ranking: our ``train_dpo`` (listwise and pairwise) vs TRL's ``DPOTrainer`` on the rankings expanded to pairs.

The same synthetic K-rankings are trained three ways, each in its own trainer loop, from the same model
at the same precision:

* ``listwise``  ``train_dpo`` with train.loss=listwise: K sequence passes per ranking
* ``dpo``       ``train_dpo`` with train.loss=dpo: the C(K,2) pairs formed from the same K log-probs
* ``trl``       TRL ``DPOTrainer`` (trl 1.12, the ``bench`` extra) on the C(K,2) pairs as rows, each pair
                a chosen and a rejected pass: 2·C(K,2) = K(K-1) sequence passes per ranking

Both sides cache the reference: ``train_dpo`` scores it once before training (``reference_logps.pt``),
TRL with ``precompute_ref_log_probs=True``; neither precompute is timed. A step is one optimizer step
over ``--per-step`` rankings (TRL: their pairs, ``per_device_train_batch_size`` pairs per forward pass
(2x as many sequences) with gradient accumulation up to the step). Timed: the wall time of each
optimizer step inside each trainer's own loop (ours: ``metrics.jsonl`` ``seconds``, data collation
included; TRL: between consecutive ``on_step_end`` callbacks, batch fetching and collation included).
The first step of every run is a warm-up and is dropped. Runs alternate mode by mode, round by round
(the order reversed every other round), in one process, so drift on a shared machine hits all alike.
Reported: median seconds per ranking and the ratios trl/listwise and trl/dpo.

Both sides see the same tokens as far as text allows: ours encodes prompt (chat template) + response +
EOS; TRL gets the decoded prompt text and the response text (it appends the EOS text and tokenizes
prompt + response together). The mean tokens per sequence of both are printed. No sequence is
truncated (max_length is above the longest).

Needs trl; install it into a separate venv (docs/dpo.md):

    /work/trlvenv/bin/python benchmarks/bench_dpo_trl.py                      # tiny random model, seconds
    flock /tmp/instructrl-heavy.lock env OMP_NUM_THREADS=2 /work/trlvenv/bin/python \\
        benchmarks/bench_dpo_trl.py --model default --length 64 --steps 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("the a garden river quiet bright answer kindly useful tea leaves sea poem morning light careful simple "
         "reason example clear short story water mountain friend help question explain slowly because").split()
MODES = ("trl", "listwise", "dpo")


def synthetic_rankings(tok, n: int, k: int, length: int, seed: int) -> list[dict]:
    """``n`` ranking rows (docs/data-formats.md) of ``k`` distinct responses, prompt + response about
    ``length`` tokens (our encoding), best first (file order, no ties)."""
    from instructrl.formatting import encode_prompt, encode_response

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = "Please " + " ".join(rng.choices(WORDS, k=8)) + "?"
        p = len(encode_prompt(tok, [{"role": "user", "content": prompt}]))
        responses: list[str] = []
        while len(responses) < k:
            words = [rng.choice(WORDS)]
            while p + len(encode_response(tok, " ".join(words))) < length:
                words.append(rng.choice(WORDS))
            if " ".join(words) not in responses:
                responses.append(" ".join(words))
        rows.append({"id": f"r{i}", "prompt": prompt, "responses": responses})
    return rows


def pair_rows(ranking, prompt_text: str) -> list[dict]:
    """A loaded ``Ranking`` as TRL's preference rows: one per untied pair, the better response as chosen."""
    return [{"prompt": prompt_text, "chosen": ranking.responses[w], "rejected": ranking.responses[l]}
            for w, l in ranking.pairs()]


def pairs_per_forward(pairs_per_step: int, micro: int) -> int:
    """The largest divisor of ``pairs_per_step`` that keeps a TRL forward pass (2 sequences a pair) <= ``micro``."""
    return max(d for d in range(1, max(1, micro // 2) + 1) if pairs_per_step % d == 0)


def run_ours(model: str, data: Path, loss: str, per_step: int, micro: int, max_length: int, precision: str,
             out: Path) -> list[float]:
    """One ``train_dpo`` run; seconds of each optimizer step after the first."""
    from instructrl.config import load_config
    from instructrl.train.dpo import DPOConfig, train_dpo

    cfg = load_config(DPOConfig, None, [
        f"model={model}", f"output_dir={out}", f"data.train={data}", f"data.max_length={max_length}",
        "data.min_prompt_tokens=4", f"train.loss={loss}", f"train.batch_size={per_step}",
        f"train.micro_batch_size={micro}", f"train.precision={precision}", "device=cpu", "train.lr=1e-6",
    ])
    train_dpo(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # checkpoints with optimizer state: GBs per run at the default model's size
    return [r["seconds"] for r in rows[1:]]


def run_trl(model: str, rows: list[dict], pairs_per_step: int, micro: int, max_length: int, bf16: bool,
            out: Path) -> tuple[list[float], float]:
    """One TRL ``DPOTrainer`` run; (seconds of each optimizer step after the first, mean tokens per sequence)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    b = pairs_per_forward(pairs_per_step, micro)
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=b, gradient_accumulation_steps=pairs_per_step // b,
        max_length=max_length, precompute_ref_log_probs=True, precompute_ref_batch_size=b, beta=0.1,
        learning_rate=1e-6, lr_scheduler_type="constant", num_train_epochs=1, bf16=bf16, fp16=False, use_cpu=True,
        gradient_checkpointing=False, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # bf16 (if asked) by autocast, as ours
    timer = StepTimer()
    trainer = DPOTrainer(model=lm, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                         callbacks=[timer])
    ds = trainer.train_dataset
    prompts = list(ds["prompt_ids"])
    tokens = statistics.mean([len(p) + len(y) for col in ("chosen_ids", "rejected_ids")
                              for p, y in zip(prompts, list(ds[col]))])
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return [b - a for a, b in zip(timer.ends, timer.ends[1:])], tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (a random 2-layer model), 'default' or a folder")
    ap.add_argument("--ks", default="4,9", help="ranking sizes to time")
    ap.add_argument("--per-step", type=int, default=2, help="rankings per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("--micro", type=int, default=16, help="sequences per forward pass (both sides)")
    ap.add_argument("--length", type=int, default=100, help="tokens per sequence (prompt + response + EOS)")
    ap.add_argument("--precision", default="auto", help="auto = bf16 where this CPU has AMX or AVX512-BF16, else fp32")
    a = ap.parse_args()

    import torch

    from instructrl.data import load_rankings
    from instructrl.formatting import encode_prompt
    from instructrl.models import build_tiny_model, load_tokenizer, resolve_model
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-trl-"))
    model = str(build_tiny_model(work / "tiny")) if a.model == "tiny" else resolve_model(a.model)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    precision = a.precision
    if precision == "auto":  # the flags, not a timing probe: both sides must run the same precision
        precision = "bf16" if "amx_tile" in flags or "avx512_bf16" in flags else "fp32"
    tok = load_tokenizer(model)
    cpu = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    print(f"model {a.model}, CPU {cpu} ({torch.get_num_threads()} threads; amx: {'amx_tile' in flags}, "
          f"avx512_bf16: {'avx512_bf16' in flags}), {precision}, {a.per_step} rankings/step, ~{a.length} "
          f"tokens/sequence, {a.steps} timed steps x {a.rounds} rounds per mode")
    print(f"{'K':>3} {'ours tok/seq':>12} {'trl tok/seq':>11} {'listwise s/rk':>13} {'dpo s/rk':>9} "
          f"{'trl s/rk':>9} {'trl/listwise':>12} {'trl/dpo':>8}")
    for k in [int(x) for x in a.ks.split(",")]:
        n = a.per_step * (a.steps + 1)
        data = work / f"rankings-k{k}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rankings(tok, n, k, a.length, seed=k)))
        rankings = load_rankings(str(data))
        ours_tokens = statistics.mean(len(encode_prompt(tok, r.messages)) + len(tok(y, add_special_tokens=False)
                                      ["input_ids"]) + 1 for r in rankings for y in r.responses)
        rows = [p for r in rankings for p in pair_rows(r, tok.decode(encode_prompt(tok, r.messages)))]
        max_length = a.length + 32
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for rnd in range(a.rounds):
            for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                out = work / f"k{k}-{mode}-{rnd}"
                if mode == "trl":
                    dts, trl_tokens = run_trl(model, rows, a.per_step * k * (k - 1) // 2, a.micro, max_length,
                                              precision == "bf16", out)
                else:
                    dts = run_ours(model, data, mode, a.per_step, a.micro, max_length, precision, out)
                times[mode] += [dt / a.per_step for dt in dts]
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"{k:>3} {ours_tokens:>12.1f} {trl_tokens:>11.1f} {med['listwise']:>13.4f} {med['dpo']:>9.4f} "
              f"{med['trl']:>9.4f} {med['trl'] / med['listwise']:>11.2f}x {med['trl'] / med['dpo']:>7.2f}x")
        print(f"    per-step seconds/ranking: " + "; ".join(f"{m} " + " ".join(f"{x:.3f}" for x in v)
                                                             for m, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
