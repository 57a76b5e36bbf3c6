"""Which reward-model training makes the pipeline's RM agree best with the gold scorer?

    flock /tmp/instructrl-heavy.lock python benchmarks/bench_rm_scaling.py [--run RUN] [--sizes 96,192,384]
        [--k9 96] [--sft-pairs 64] [--variant 'NAME=rm overrides' ...]

RUN (default runs/pipeline) is an `instructrl pipeline` run folder that has finished at least its
round-1 rm stage (its SFT model, its round-1 rankings, its demonstrations). The benchmark:

1. draws fresh prompts from the same training users' task family (none of the
   run's SFT / RM / PPO / eval prompts), samples K = k_min..k_max answers from
   the run's SFT model and has the run's simulated labelers rank them, so that
   the run's own rankings plus these give nested sets of each size in --sizes;
   with --k9 N it also draws N more prompts ranked at K = 9;
2. with --sft-pairs N, samples 6 answers from the SFT model to each of N more fresh
   prompts and scores them with the gold scorer: the test set. Pairs of SFT answers
   to one prompt are what PPO's first steps compare (issue 20 asks 0.75 on them);
3. trains one reward model per set and per --variant (rm overrides on top of the
   pipeline's rm stage settings from RUN/config.yaml; none = those settings), bias
   normalised on the run's demonstrations;
4. prints how often each RM orders two answers to one prompt as the gold scorer does
   (`evaluate.rm_gold_agreement`, gold gap >= 0.15): on the SFT pairs, and when the run
   has finished its eval stage, over RUN/eval/responses.jsonl (all pairs, without
   base, SFT vs PPO).

Results: docs/pipeline.md, "Does more ranking data help the reward model?".
Writes RUN/rm-scaling/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path


def labeler_gold_agreement(labelers, tasks, rows, min_gap: float = 0.15) -> float:
    """Expected share of test pairs (gold gap >= min_gap, as ``rm_gold_agreement``) that one labeler orders
    as the gold scorer does, averaged over ``labelers``: exact for their noise, P(u_i + e_i > u_j + e_j)
    with u = the labeler's mean utility (gold + length bias): Φ(d / (σ√2)) for Gaussian noise, a
    logistic with scale σ√6/π for Gumbel (the difference of two Gumbels)."""
    import itertools
    import math

    def p_right(lab, d):
        if lab.noise == 0:
            return float(d > 0) + 0.5 * (d == 0)
        if lab.noise_kind == "gaussian":
            return 0.5 * (1 + math.erf(d / (lab.noise * 2)))  # Φ(d / (σ√2)) = (1 + erf(d / 2σ)) / 2
        return 1 / (1 + math.exp(-d * math.pi / (lab.noise * math.sqrt(6))))

    shares = []
    for task, row in zip(tasks, rows):
        g = row["gold"]
        for lab in labelers:
            u = [lab.mean_utility(task, x) for x in row["responses"]]
            shares += [p_right(lab, (u[i] - u[j]) if g[i] > g[j] else (u[j] - u[i]))
                       for i, j in itertools.combinations(range(len(g)), 2) if abs(g[i] - g[j]) >= min_gap]
    return sum(shares) / max(1, len(shares))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pipeline", help="a pipeline run folder past its round-1 rm stage")
    ap.add_argument("--sizes", default="96,192,384", help="nested numbers of rankings (the first = the run's own)")
    ap.add_argument("--k9", type=int, default=96, help="also train on this many prompts ranked at K = 9 (0: skip)")
    ap.add_argument("--sft-pairs", type=int, default=64,
                    help="fresh prompts with 6 SFT answers each, gold-scored, as the test set (0: skip)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="an RM training variant: a name, '=', then space-separated rm overrides, e.g. "
                         "'lr3e-5=train.lr=3e-5 train.epochs=2'; repeatable; none = the pipeline's rm settings")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()

    from instructrl.config import with_overrides
    from instructrl.data import ranking_row
    from instructrl.evaluation.metrics import rm_gold_agreement
    from instructrl.evaluation.sampling import rm_scores
    from instructrl.generation import generate_texts
    from instructrl.runtime import make_runtime
    from instructrl.io import atomic_write_text, read_jsonl, write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.pipeline import load_pipeline_config, rm_stage_config, sample_and_rank
    from instructrl.reward_model import load_reward_model
    from instructrl.train.rm import train_rm
    from instructrl.tasks import generate_tasks, gold_score, load_tasks
    from instructrl.tasks.generator import split_by_user
    from instructrl.tasks.labelers import LabelerPool

    run = Path(args.run)
    if not (run / "round-1" / "rm" / "model").exists():  # `make bench` runs every script without arguments
        print(f"skipped: {run} holds no pipeline run past its rm stage (run `instructrl pipeline output_dir={run}`)")
        return
    cfg = load_pipeline_config(str(run / "config.yaml"), [])
    d, prec = cfg.data, cfg.precision
    out = run / "rm-scaling"
    out.mkdir(exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",")]
    variants = [v.partition("=")[::2] for v in args.variant] or [("pipeline", "")]
    own = [row for _, row in read_jsonl(run / "round-1" / "rankings.jsonl")]
    if sizes[0] != len(own):
        raise SystemExit(f"--sizes must start with the run's own number of rankings ({len(own)})")

    # 1-2. fresh prompts from the training users: ranked by the run's labelers, or the test set ---
    used = {t.id for f in ("sft", "rm", "ppo", "eval") for t in load_tasks(run / "data" / f"{f}_tasks.jsonl")}
    train_tasks, _ = split_by_user(generate_tasks(4000, seed=d.seed, n_users=d.n_users, max_words=d.word_budget),
                                   heldout_frac=d.heldout_user_fraction, seed=d.seed)
    fresh = [t for t in train_tasks if t.id not in used]
    random.Random(args.seed).shuffle(fresh)
    n_extra = sizes[-1] - len(own)
    if len(fresh) < n_extra + args.k9 + args.sft_pairs:
        raise SystemExit(f"only {len(fresh)} fresh prompts for {n_extra + args.k9 + args.sft_pairs}")
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
    test_tasks = fresh[len(fresh) - args.sft_pairs:] if args.sft_pairs else []
    test_path = out / "sft-pairs.jsonl"
    if test_tasks and not test_path.exists():
        texts = generate_texts(lm, tok, [t.to_prompt_record().messages for t in test_tasks], d.max_new_tokens,
                               seed=args.seed + 2, n_per_prompt=6, precision=prec, desc="test set: 6 SFT answers")
        write_jsonl(test_path, [{"id": t.id, "responses": xs, "gold": [gold_score(t.constraints, x, t.topic_words)
                                                                       for x in xs]}
                                for t, xs in zip(test_tasks, texts)])
    test = [row for _, row in read_jsonl(test_path)] if test_tasks else []
    if test:  # the ceiling the labels allow: how often one training labeler orders a test pair as gold does
        by_id = {t.id: t for t in test_tasks}
        print(f"training labelers order the test pairs as the gold scorer does: "
              f"{labeler_gold_agreement(pool.train, [by_id[r['id']] for r in test], test):.3f} (mean over labelers)",
              flush=True)
    lm = None  # free the sampler before the RMs train

    # 3-4. one RM per set and variant, scored on the test set and the eval answers ------------------
    eval_path = run / "eval" / "responses.jsonl"
    answers = [row for _, row in read_jsonl(eval_path)] if eval_path.exists() else []
    tasks = {t.id: t for t in load_tasks(run / "data" / "eval_tasks.jsonl")}
    tasks.update({t.id: t for t in test_tasks})
    results = []
    for vname, overrides in variants:
        for name, rows in sets.items():
            folder = out / f"{vname}_{name}".replace(" ", "_").replace(",", "")
            write_jsonl(folder / "rankings.jsonl", rows)
            rm_cfg = rm_stage_config(cfg, sft, folder, folder / "rankings.jsonl", run / "data" / "demonstrations.jsonl",
                                     seed=d.seed + 1)  # round 1's RM seed
            t0 = time.perf_counter()
            train_rm(with_overrides(rm_cfg, overrides.split()))
            seconds = time.perf_counter() - t0
            rm = load_reward_model(folder / "model").eval().requires_grad_(False)

            def score(ids, texts):
                return rm_scores(rm, tok, [[{"role": "user", "content": tasks[i].prompt}] for i in ids], texts,
                                 [True] * len(texts), 256, 16, make_runtime("cpu", prec))

            res = {"variant": vname, "overrides": overrides, "set": name, "rankings": len(rows),
                   "rm_train_s": round(seconds, 1),
                   "val_accuracy": json.loads((folder / "eval.json").read_text())["overall"]["accuracy"]}
            if test:  # columns = the 6 answers, rows = prompts
                flat = score([r["id"] for r in test for _ in r["responses"]], [x for r in test for x in r["responses"]])
                cols = range(6)
                res["sft_pairs"] = rm_gold_agreement({c: flat[c::6] for c in cols},
                                                     {c: [r["gold"][c] for r in test] for c in cols},
                                                     {c: [r["responses"][c] for r in test] for c in cols})
            if answers:
                flat = score([a["id"] for a in answers], [a["response"] for a in answers])
                by = defaultdict(dict)  # policy -> prompt id -> (rm, gold, text)
                for a, s in zip(answers, flat):
                    by[a["policy"]][a["id"]] = (s, a["gold_score"], a["response"])
                ids = sorted(by["sft"])

                def agreement(policies):
                    cols = {p: [by[p][i] for i in ids] for p in policies if p in by}
                    return rm_gold_agreement(*({p: [c[j] for c in v] for p, v in cols.items()} for j in range(3)))

                res |= {"all": agreement(list(by)), "without_base": agreement([p for p in by if p != "base"]),
                        "sft_vs_ppo": agreement(["sft", "ppo"])}
            results.append(res)
            print(f"{vname} / {name}: " + ", ".join(f"{k} {res[k]['rate']:.3f} (n {res[k]['n']})" for k in
                                                   ("sft_pairs", "all", "without_base", "sft_vs_ppo") if k in res)
                  + f"; val accuracy {res['val_accuracy']:.3f}; trained in {seconds:.0f} s", flush=True)
            atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    cols = [k for k in ("sft_pairs", "all", "without_base", "sft_vs_ppo") if k in results[0]]
    print(f"\n{'variant':<14}{'set':<24}" + "".join(f"{c:>14}" for c in cols) + f"{'val acc':>9}")
    for r in results:
        print(f"{r['variant']:<14}{r['set']:<24}" + "".join(f"{r[c]['rate']:>14.3f}" for c in cols)
              + f"{r['val_accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
