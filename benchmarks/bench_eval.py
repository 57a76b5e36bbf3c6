"""`instructrl eval` cost on the embedded default model (SmolLM2-135M), per phase.

    flock /tmp/instructrl-heavy.lock python benchmarks/bench_eval.py [--prompts 16] [--tokens 64] [--best-of 2]

Two policies (the default model as "base" and as "sft", so the KL of the reference
against itself must print 0) plus best-of-N, a reward model made from the default
model with a fresh scalar head (its scores are meaningless; this measures time, not
quality), 16 generated held-out constraint tasks, 8 pretraining texts. Prints the
eval's own phase timings, generated tokens/s and the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--best-of", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()

    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import EvalConfig, run_eval
    from instructrl.io import write_jsonl
    from instructrl.models import load_tokenizer
    from instructrl.models import drop_stale_quantization
    from instructrl.reward_model import init_reward_model, save_reward_model
    from instructrl.tasks import generate_tasks, save_tasks

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_reward_model(drop_stale_quantization(init_reward_model(None)), load_tokenizer(None), d / "rm")
        save_tasks(d / "tasks.jsonl", generate_tasks(args.prompts, seed=11))
        write_jsonl(d / "pre.jsonl", [{"text": "The history of the printing press begins in the fifteenth century. "
                                               "It changed how ideas spread across Europe and beyond. " * 4}] * 8)
        cfg = load_config(EvalConfig, None, [
            "policies.base=default", "policies.sft=default", f"tasks={d / 'tasks.jsonl'}", f"reward_model={d / 'rm'}",
            f"best_of_n={args.best_of}", f"n_prompts={args.prompts}", f"max_new_tokens={args.tokens}",
            f"pretrain_eval={d / 'pre.jsonl'}", f"output_dir={d / 'out'}", f"precision={args.precision}"])
        t0 = time.perf_counter()
        res = run_eval(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (d / "out" / "responses.jsonl").read_text().splitlines()]
    n_tok = sum(r["tokens"] + int(r["ended"]) for r in rows if not r["policy"].startswith("best-of"))
    t = res["timings"]
    print(f"\nprompts {args.prompts}, max_new_tokens {args.tokens}, best-of-{args.best_of}, {args.precision}")
    print("phase timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"sampling + KL of 2 policies: {n_tok} tokens in {t['sample_policies']:.1f} s "
          f"= {n_tok / t['sample_policies']:.1f} tokens/s")
    print(f"KL of the reference against itself: {res['policies']['sft']['kl']['mean']}")
    print(f"wall {wall:.1f} s")


if __name__ == "__main__":
    main()
