"""Does more ranking data make the pipeline's reward model agree better with the gold scorer?

    flock /tmp/instructrl-heavy.lock python benchmarks/bench_rm_scaling.py [--run RUN] [--sizes 96,192,384] [--k9 96]

RUN (default runs/pipeline) is a finished `instructrl pipeline` run folder (its SFT model, its round-1
rankings, its evaluation answers). The benchmark:

1. draws fresh prompts from the same training users' task family (none of the
   run's SFT / RM / PPO / eval prompts), samples K = k_min..k_max answers from
   the run's SFT model and has the run's simulated labelers rank them, so that
   the run's own rankings plus these give nested sets of each size in --sizes;
   with --k9 N it also draws N more prompts ranked at K = 9;
2. trains one reward model per set exactly as the pipeline's rm stage does
   (same settings from RUN/config.yaml, bias normalised on the run's demonstrations);
3. scores every answer in RUN/eval/responses.jsonl (base, SFT, PPO, PPO-ptx,
   best-of-N on held-out users' prompts) and prints how often each RM orders two
   answers to one prompt as the gold scorer does (`evaluate.rm_gold_agreement`),
   over all pairs, without the base model's answers, and on SFT-vs-PPO pairs:
   the pairs PPO's gradient is about.

Result on the default run (docs/pipeline.md): the agreement does not rise with
4x the rankings, so the RM, not the amount of data, limits what PPO can gain.
Writes RUN/rm-scaling/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pipeline", help="a finished `instructrl pipeline` run folder")
    ap.add_argument("--sizes", default="96,192,384", help="nested numbers of rankings (the first = the run's own)")
    ap.add_argument("--k9", type=int, default=96, help="also train on this many prompts ranked at K = 9 (0: skip)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()

    import torch

    from instructrl.data import ranking_row
    from instructrl.evaluation.metrics import rm_gold_agreement
    from instructrl.evaluation.sampling import rm_scores
    from instructrl.runtime import make_runtime
    from instructrl.io import atomic_write_text, read_jsonl, write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.pipeline import load_pipeline_config, rm_stage_config, sample_and_rank
    from instructrl.reward_model import load_reward_model
    from instructrl.train.rm import train_rm
    from instructrl.tasks import generate_tasks, load_tasks
    from instructrl.tasks.generator import split_by_user
    from instructrl.tasks.labelers import LabelerPool

    run = Path(args.run)
    if not (run / "eval" / "responses.jsonl").exists():  # `make bench` runs every script without arguments
        print(f"skipped: {run} holds no finished pipeline run (run `instructrl pipeline output_dir={run}` first)")
        return
    cfg = load_pipeline_config(str(run / "config.yaml"), [])
    d, prec = cfg.data, cfg.precision
    out = run / "rm-scaling"
    out.mkdir(exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    own = [row for _, row in read_jsonl(run / "round-1" / "rankings.jsonl")]
    if sizes[0] != len(own):
        raise SystemExit(f"--sizes must start with the run's own number of rankings ({len(own)})")

    # 1. fresh prompts from the training users, ranked by the run's labelers --------------------
    used = {t.id for f in ("sft", "rm", "ppo", "eval") for t in load_tasks(run / "data" / f"{f}_tasks.jsonl")}
    train_tasks, _ = split_by_user(generate_tasks(4000, seed=d.seed, n_users=d.n_users, max_words=d.word_budget),
                                   heldout_frac=d.heldout_user_fraction, seed=d.seed)
    fresh = [t for t in train_tasks if t.id not in used]
    random.Random(args.seed).shuffle(fresh)
    n_extra = sizes[-1] - len(own)
    if len(fresh) < n_extra + args.k9:
        raise SystemExit(f"only {len(fresh)} fresh prompts for {n_extra + args.k9}")
    sft = run / "sft" / "model"
    tok, lm = load_tokenizer(sft), load_causal_lm(sft)
    pool = LabelerPool.default(seed=d.seed)

    def ranked(tasks, kmin, kmax, seed, name):
        path = out / f"{name}.jsonl"
        if path.exists():  # re-runs reuse the sampled rankings
            return [row for _, row in read_jsonl(path)]
        rng = random.Random(seed)
        ks = [rng.randint(kmin, kmax) for _ in tasks]
        _, _, rankings = sample_and_rank(lm, tok, tasks, ks, pool, rng, d.max_new_tokens, seed=seed, precision=prec,
                                         desc=f"{name}: K samples")
        rows = [ranking_row(x) for x in rankings]
        write_jsonl(path, rows)
        return rows

    extra = ranked(fresh[:n_extra], d.k_min, d.k_max, args.seed, "extra") if n_extra > 0 else []
    sets = {f"{n} rankings, K {d.k_min}-{d.k_max}": (own + extra)[:n] for n in sizes}
    if args.k9:
        sets[f"{args.k9} rankings, K 9"] = ranked(fresh[n_extra:n_extra + args.k9], 9, 9, args.seed + 1, "k9")
    del lm

    # 2-3. one RM per set, trained as the pipeline's rm stage, scored on the eval answers ----------
    answers = [row for _, row in read_jsonl(run / "eval" / "responses.jsonl")]
    tasks = {t.id: t for t in load_tasks(run / "data" / "eval_tasks.jsonl")}
    results = []
    for name, rows in sets.items():
        folder = out / name.replace(" ", "_").replace(",", "")
        write_jsonl(folder / "rankings.jsonl", rows)
        t0 = time.perf_counter()
        train_rm(rm_stage_config(cfg, sft, folder, folder / "rankings.jsonl", run / "data" / "demonstrations.jsonl",
                                 seed=d.seed + 1))  # round 1's RM seed
        seconds = time.perf_counter() - t0
        rm = load_reward_model(folder / "model").eval().requires_grad_(False)
        scores = rm_scores(rm, tok, [[{"role": "user", "content": tasks[a["id"]].prompt}] for a in answers],
                           [a["response"] for a in answers], [a["ended"] for a in answers], 256, 16,
                           make_runtime("cpu", prec))
        by = defaultdict(dict)  # policy -> prompt id -> (rm, gold, text)
        for a, s in zip(answers, scores):
            by[a["policy"]][a["id"]] = (s, a["gold_score"], a["response"])
        ids = sorted(by["sft"])

        def agreement(policies):
            cols = {p: [by[p][i] for i in ids] for p in policies if p in by}
            return rm_gold_agreement(*({p: [c[j] for c in v] for p, v in cols.items()} for j in range(3)))

        everyone = list(by)
        res = {"set": name, "rankings": len(rows), "rm_train_s": round(seconds, 1),
               "val_accuracy": json.loads((folder / "eval.json").read_text())["overall"]["accuracy"],
               "all": agreement(everyone), "without_base": agreement([p for p in everyone if p != "base"]),
               "sft_vs_ppo": agreement(["sft", "ppo"])}
        results.append(res)
        print(f"{name}: RM-gold agreement all {res['all']['rate']:.3f} (n {res['all']['n']}), without base "
              f"{res['without_base']['rate']:.3f}, SFT vs PPO {res['sft_vs_ppo']['rate']:.3f} "
              f"(n {res['sft_vs_ppo']['n']}); val accuracy {res['val_accuracy']:.3f}; trained in {seconds:.0f} s",
              flush=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    print(f"\n{'set':<28}{'all':>8}{'w/o base':>10}{'SFT-PPO':>9}{'val acc':>9}")
    for r in results:
        print(f"{r['set']:<28}{r['all']['rate']:>8.3f}{r['without_base']['rate']:>10.3f}"
              f"{r['sft_vs_ppo']['rate']:>9.3f}{r['val_accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
