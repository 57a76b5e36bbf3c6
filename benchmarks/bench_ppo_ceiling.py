"""The ceiling of the pipeline's PPO stage: PPO rewarded by the GOLD scorer itself instead of the RM.

    flock /tmp/instructrl-heavy.lock python benchmarks/bench_ppo_ceiling.py --run RUN [--scale 5] [PPO overrides...]

RUN (default runs/pipeline) is a finished `instructrl pipeline` run folder. This trains one PPO policy
exactly as the run's stage 6 did (same SFT start and reference, prompts, steps, batch, learning rate,
β, trainable layers, precision; the value model starts from the run's round-1 RM), except that the
reward of a response is ``scale × gold_score`` - what the simulated labelers reward, without their
noise and without any reward model in between. Extra arguments are `instructrl ppo` overrides
(e.g. ``steps=32 train.lam=1.0``). It then evaluates SFT against that policy on the run's held-out
prompts, judged by the held-out labelers (`instructrl eval`, no best-of-N).

If this policy does not beat SFT, no reward model can make the same PPO budget beat it: the limit is
PPO's budget (steps, episodes, the value model), not the RM. Results: docs/pipeline.md.
Writes RUN/ppo-ceiling-<overrides>/ (the PPO run) and RUN/ppo-ceiling-<overrides>-eval/ (the report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pipeline", help="a finished `instructrl pipeline` run folder")
    ap.add_argument("--scale", type=float, default=5.0,
                    help="reward = scale x gold score (gold is in [0, 1]; 5 puts one constraint of five at 0.8, "
                         "about the spread of the RM's scores)")
    ap.add_argument("overrides", nargs="*", help="`instructrl ppo` overrides applied last, e.g. steps=32")
    args = ap.parse_args()

    run = Path(args.run)
    if not (run / "round-1" / "rm" / "model").exists():  # `make bench` runs every script without arguments
        print(f"skipped: {run} holds no finished pipeline run (run `instructrl pipeline output_dir={run}` first)")
        return

    import torch

    from instructrl.config import load_config
    from instructrl.evaluation.evaluate import EvalConfig, run_eval
    from instructrl.formatting import encode_prompt
    from instructrl.generation import decode_responses
    from instructrl.models import load_tokenizer
    from instructrl.pipeline import load_pipeline_config
    from instructrl.train.ppo import PPOConfig, train_ppo
    from instructrl.tasks import load_tasks
    from instructrl.tasks.constraints import gold_score

    cfg = load_pipeline_config(str(run / "config.yaml"), [])
    d, c = cfg.data, cfg.ppo
    sft = run / "sft" / "model"
    tok = load_tokenizer(sft)
    name = "ppo-ceiling" + "".join("-" + o.replace("=", "").replace(".", "_") for o in args.overrides)
    out = run / name
    ppo_cfg = load_config(PPOConfig, None, [
        f"policy={sft}", f"reference={sft}", f"reward_model={run / 'round-1' / 'rm' / 'model'}",
        f"prompts={run / 'data' / 'ppo_tasks.jsonl'}", f"out={out}", f"steps={c.steps}",
        f"seed={d.seed + 1}", f"rollout.batch_size={c.batch_size}", f"rollout.max_new_tokens={d.max_new_tokens}",
        f"train.minibatch_size={c.minibatch_size}", f"train.lr={c.lr}", f"kl.coef={c.kl_coef}",
        f"train.precision={cfg.precision}", f"train.trainable_layers={c.trainable_layers}",
        f"train.epochs={c.epochs}", f"train.warmup_steps={c.warmup_steps}",
        f"train.advantage={c.advantage}", f"rollout.samples_per_prompt={c.samples_per_prompt}",
        *c.extra, *args.overrides])

    # The rollout hands the reward function token ids: the prompt's ids identify its task.
    tasks = load_tasks(run / "data" / "ppo_tasks.jsonl")
    by_prompt = {tuple(encode_prompt(tok, t.to_prompt_record().messages)[-ppo_cfg.rollout.max_prompt_tokens:]): t
                 for t in tasks}

    def gold_reward(query: torch.Tensor, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = []
        for q, text in zip(query.tolist(), decode_responses(tok, response, mask)):
            start = next(i for i, x in enumerate(q) if x != tok.pad_token_id)  # left padding
            t = by_prompt[tuple(q[start:])]
            scores.append(args.scale * gold_score(t.constraints, text, t.topic_words))
        return torch.tensor(scores)

    if not (out / "policy").exists():
        train_ppo(ppo_cfg, reward_fn=gold_reward)
    policies = {"sft": str(sft), name: str(out / "policy")}
    ev = load_config(EvalConfig, None, [
        f"policies={json.dumps(policies)}", "baseline=sft", f"reference={sft}",
        f"tasks={run / 'data' / 'eval_tasks.jsonl'}", f"reward_model={run / 'round-1' / 'rm' / 'model'}",
        "best_of_n=0", f"max_new_tokens={cfg.eval.max_new_tokens}", "bootstrap=200",
        f"output_dir={run / (name + '-eval')}", f"precision={cfg.precision}", f"labeler_seed={d.seed}",
        f"ppo_runs={json.dumps({name: str(out)})}"])
    run_eval(ev)


if __name__ == "__main__":
    main()
