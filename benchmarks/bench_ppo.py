"""PPO step time: instructrl vs TRL 1.12.0's PPO trainer, same model, prompts and settings.

    flock /tmp/instructrl-heavy.lock .venv/bin/python benchmarks/bench_ppo.py [--steps 2] [--repeat 2] [--only ours-bf16,trl-bf16]

Settings (both sides): default model (SmolLM2-135M-Instruct) as policy and reference; a reward model
built from it (`reward.init_reward_model`, head untrained: timing only) which also initialises the
value model; 16 HH-RLHF prompts per step (cut from the left to 128 tokens); 64 new tokens at T = 1,
stop at EOS; one PPO epoch, one minibatch of 16 in micro-batches of 4; k1 KL, β = 0.02.
Each configuration runs in its own process (peak RSS is per process). Every step covers different
prompts; both sides see the same 16·steps prompts overall, so the mean over all steps is comparable.

Each round runs every configuration once, in order; ``--repeat`` rounds alternate ours and theirs, so
that the speed drift of a shared VM (±30% between runs minutes apart, measured) hits both sides; the
table shows the median over rounds.

TRL differences, stated: TRL takes the old log-probs from the generation logits; so do we here
(`rollout.old_logprobs=sampling`; our default under bf16 recomputes them with one more policy forward
so that the ratio is exactly 1 at the first update); TRL runs one optimizer over
policy + value (loss = pg + 0.1·vf), we run two; TRL's `bf16=True` is ignored by its PPO trainer,
so "trl-bf16" sets ACCELERATE_MIXED_PRECISION=bf16, which autocasts only its training forward
(generation, reference, value and reward forwards stay fp32), while our bf16 autocasts every forward;
TRL's reward model reads a cut-off response's last token, ours reads an EOS appended to it
(`rollout.rm_eos`, one more column in the RM forward for those rows only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-a.jsonl.gz"
WORK = Path(os.environ.get("INSTRUCTRL_BENCH_DIR", "/tmp/instructrl-bench-ppo"))
BATCH, NEW_TOKENS, MICRO, MAX_PROMPT = 16, 64, 4, 128
CONFIGS = ["ours-fp32", "ours-bf16", "trl-fp32", "trl-bf16"]


def prepare(steps: int) -> tuple[Path, Path]:
    """Prompts JSONL (first 16·steps HH prompts) and a reward-model folder, built once."""
    from instructrl.data import load_rankings, prompt_row, PromptRecord
    from instructrl.io import write_jsonl
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model

    WORK.mkdir(parents=True, exist_ok=True)
    prompts = WORK / f"prompts-{steps}.jsonl"
    if not prompts.exists():
        if not HH.exists():
            sys.exit(f"benchmark data not found: {HH}")
        rankings = load_rankings(HH, errors="skip")[: BATCH * steps]
        write_jsonl(prompts, (prompt_row(PromptRecord(r.id, r.messages)) for r in rankings))
    rm = WORK / "rm"
    if not (rm / "config.json").exists():
        from instructrl.models import drop_stale_quantization

        save_reward_model(drop_stale_quantization(init_reward_model(None)), load_tokenizer(None), rm)
    return prompts, rm


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(precision: str, steps: int, prompts: Path, rm: Path) -> dict:
    import shutil

    from instructrl.config import load_config
    from instructrl.io import RunDir
    from instructrl.train.ppo import PPOConfig, train_ppo

    out = WORK / f"ours-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(PPOConfig, None, [
        f"prompts={prompts}", f"reward_model={rm}", f"output_dir={out}", f"steps={steps}",
        f"rollout.batch_size={BATCH}", f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.max_prompt_tokens={MAX_PROMPT}",
        f"train.minibatch_size={BATCH}", f"train.micro_batch_size={MICRO}", "train.epochs=1",
        f"train.precision={precision}", "kl.coef=0.02", f"run.checkpoint_every={steps + 1}",
        "rollout.old_logprobs=sampling",  # as TRL: π_old from the generation logits
    ])
    t = time.perf_counter()
    train_ppo(cfg)
    wall = time.perf_counter() - t
    rows = RunDir(out).read_metrics()
    gen = sum(r["time_generate"] for r in rows)
    score = sum(r["time_score"] for r in rows)
    train = sum(r["time_train"] for r in rows)
    toks = sum(r["response_length"] * BATCH for r in rows)
    n = len(rows)
    return {"step_s": (gen + score + train) / n, "generate_s": gen / n, "score_s": score / n, "train_s": train / n,
            "response_tokens_per_s": toks / (gen + score + train), "response_length": toks / (n * BATCH),
            "score": rows[-1]["score"], "kl": rows[-1]["kl"], "wall_s": wall, "peak_rss_mb": peak_rss_mb()}


def run_trl(precision: str, steps: int, prompts: Path, rm: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl.experimental.ppo.ppo_trainer as pt
    from instructrl.data import load_prompts
    from instructrl.formatting import encode_prompt
    from instructrl.models import resolve_model
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    # TRL finds padding by comparing with pad_token_id, so pad must differ from EOS (SmolLM2 pads with EOS).
    tok.pad_token = "<|endoftext|>"
    ids = [encode_prompt(tok, p.messages)[-MAX_PROMPT:] for p in load_prompts(prompts)]
    ds = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rmodel = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32)
    for m in (rmodel, value):
        m.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(
        output_dir=str(WORK / f"trl-{precision}"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=BATCH * steps, response_length=NEW_TOKENS, temperature=1.0, kl_coef=0.02,
        kl_estimator="k1", stop_token="eos", local_rollout_forward_batch_size=BATCH, num_sample_generations=0,
        learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        bf16=False, seed=0,
    )
    timers = {"generate": 0.0, "score": 0.0}

    def timed(fn, key, only_no_grad=False):
        def wrapper(*a, **k):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
        return wrapper

    pt.batch_generation = timed(pt.batch_generation, "generate")
    pt.forward = timed(pt.forward, "score", only_no_grad=True)  # the reference forward (training forwards have grad)
    pt.get_reward = timed(pt.get_reward, "score", only_no_grad=True)  # value + reward forwards
    marks, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rmodel,
                         train_dataset=ds, value_model=value, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    total = marks[-1] - t0
    hist = [h for h in trainer.state.log_history if "objective/scores" in h]
    n = len(marks)
    gen, score = timers["generate"] / n, timers["score"] / n
    return {"step_s": total / n, "generate_s": gen, "score_s": score, "train_s": total / n - gen - score,
            "score": hist[-1]["objective/scores"] if hist else float("nan"),
            "kl": hist[-1]["objective/kl"] if hist else float("nan"), "wall_s": total, "peak_rss_mb": peak_rss_mb()}


def worker(name: str, steps: int) -> None:
    prompts, rm = prepare(steps)
    side, precision = name.split("-")
    if side == "trl" and precision == "bf16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    res = (run_ours if side == "ours" else run_trl)(precision, steps, prompts, rm)
    print("RESULT " + json.dumps({"config": name, **res}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="rounds over the configurations; medians reported")
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps)
        return
    prepare(a.steps)
    runs: dict[str, list[dict]] = {}
    for rnd in range(a.repeat):
        for name in a.only.split(","):
            print(f"--- round {rnd + 1}/{a.repeat}: {name} ({a.steps} steps) ...", flush=True)
            p = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(a.steps)],
                               capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"{name} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
                continue
            runs.setdefault(name, []).append(json.loads(line[-1][7:]))
            print(json.dumps(runs[name][-1]), flush=True)
    keys = ("step_s", "generate_s", "score_s", "train_s", "response_tokens_per_s", "peak_rss_mb")
    results = {name: {k: statistics.median(r.get(k, float("nan")) for r in rs) for k in keys}
               for name, rs in runs.items()}
    hdr = f"{'config':<10} {'step s':>7} {'gen s':>7} {'score s':>8} {'train s':>8} {'resp tok/s':>10} {'peak RSS MB':>11}  step s per round"
    print(f"\nmedian over {a.repeat} round(s) of {a.steps} steps\n" + hdr)
    for name, r in results.items():
        per_round = " ".join(f"{x['step_s']:.1f}" for x in runs[name])
        print(f"{name:<10} {r['step_s']:7.2f} {r['generate_s']:7.2f} {r['score_s']:8.2f} {r['train_s']:8.2f} "
              f"{r['response_tokens_per_s']:10.1f} {r['peak_rss_mb']:11.0f}  {per_round}")
    for prec in ("fp32", "bf16"):
        o, t = results.get(f"ours-{prec}"), results.get(f"trl-{prec}")
        if o and t:
            pairs = [f"{x['step_s'] / y['step_s']:.2f}" for x, y in zip(runs[f"ours-{prec}"], runs[f"trl-{prec}"])]
            print(f"ours/theirs {prec}: step {o['step_s'] / t['step_s']:.2f}x  (generation "
                  f"{o['generate_s'] / t['generate_s']:.2f}x, scoring {o['score_s'] / t['score_s']:.2f}x, "
                  f"training {o['train_s'] / t['train_s']:.2f}x; per round {' '.join(pairs)})  target <= 0.67x")


if __name__ == "__main__":
    main()
