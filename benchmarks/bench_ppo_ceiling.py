"""The ceiling of the pipeline's PPO stage: PPO rewarded by the GOLD scorer itself instead of the RM.

    flock /tmp/instructrl-heavy.lock python benchmarks/bench_ppo_ceiling.py --run RUN [--scale 5] [PPO overrides...]
    ... bench_ppo_ceiling.py --run RUN --reward rm --variant ppo_ptx [PPO overrides...]   # the same harness, RM reward

RUN (default runs/pipeline) is a finished `instructrl pipeline` run folder. This trains one PPO policy
exactly as the run's stage 6 did (``pipeline.ppo_stage_config``: same SFT start and reference, prompts,
every ppo.* setting, precision; the value model starts from the run's round-1 RM), except that the
reward of a response is ``scale × gold_score`` - what the simulated labelers reward, without their
noise and without any reward model in between. Extra arguments are `instructrl ppo` overrides
(e.g. ``steps=32 train.lam=1.0``). It then evaluates SFT against that policy on the run's held-out
prompts, judged by the held-out labelers (`instructrl eval`, no best-of-N).

If this policy does not beat SFT, no reward model can make the same PPO budget beat it: the limit is
PPO's budget (steps, episodes, the value model), not the RM. Results: docs/pipeline.md.
Writes RUN/ppo-ceiling-<overrides>/ (the PPO run) and RUN/ppo-ceiling-<overrides>-eval/ (the report).
``--reward rm`` trains against the run's RM instead (what stage 6 does), ``--variant ppo_ptx`` with the
pretraining term: the same harness for trying stage-6 settings without re-running the pipeline
(folders RUN/ppo-rm-<variant>-<overrides>[-eval]). ``--no-eval`` stops after training: full vs LoRA
PPO at stage-6 settings is ``--reward rm --variant ppo_ptx --no-eval steps=3 [train.lora.rank=16 ...]`` under
``/usr/bin/time -v`` (docs/lora.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/pipeline", help="a finished `instructrl pipeline` run folder")
    ap.add_argument("--scale", type=float, default=5.0,
                    help="reward = scale x gold score (gold is in [0, 1]; 5 puts one constraint of five at 0.8, "
                         "about the spread of the RM's scores)")
    ap.add_argument("--reward", choices=("gold", "rm"), default="gold",
                    help="gold: scale x gold score (the ceiling); rm: the run's round-1 RM, as stage 6")
    ap.add_argument("--variant", choices=("ppo", "ppo_ptx"), default="ppo", help="stage 6's variant to train")
    ap.add_argument("--no-eval", action="store_true",
                    help="train only (time and memory of stage-6 settings: metrics.jsonl has each phase's seconds)")
    ap.add_argument("overrides", nargs="*", help="`instructrl ppo` overrides applied last, e.g. steps=32")
    args = ap.parse_args()

    run = Path(args.run)
    if not (run / "round-1" / "rm" / "model").exists():  # `make bench` runs every script without arguments
        print(f"skipped: {run} holds no finished pipeline run (run `instructrl pipeline output_dir={run}` first)")
        return

    import torch

    from instructrl.config import replace_keys, with_overrides
    from instructrl.evaluation.evaluate import run_eval
    from instructrl.formatting import encode_prompt
    from instructrl.generation import decode_responses
    from instructrl.models import load_tokenizer
    from instructrl.pipeline import eval_stage_config, load_pipeline_config, ppo_stage_config
    from instructrl.train.ppo import train_ppo
    from instructrl.tasks import load_tasks
    from instructrl.tasks.constraints import gold_score

    cfg = load_pipeline_config(str(run / "config.yaml"), [])
    sft = run / "sft" / "model"
    tok = load_tokenizer(sft)
    prefix = "ppo-ceiling" if args.reward == "gold" else f"ppo-rm-{args.variant}"
    if args.reward == "gold" and args.variant != "ppo":
        prefix += f"-{args.variant}"
    name = prefix + "".join("-" + o.replace("=", "").replace(".", "_") for o in args.overrides)
    out = run / name
    # stage 6 of round 1 exactly as the pipeline ran it (from SFT), in its own folder
    ppo_cfg = with_overrides(replace_keys(ppo_stage_config(cfg, args.variant, 1, sft), {"output_dir": str(out)}),
                             list(args.overrides))

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
        train_ppo(ppo_cfg, reward_fn=gold_reward if args.reward == "gold" else None)
    if args.no_eval:
        return
    ev = replace_keys(eval_stage_config(cfg, str(sft), {}), {
        "policies": {"sft": str(sft), name: str(out / "policy")}, "reward_model": str(run / "round-1" / "rm" / "model"),
        "best_of_n": 0, "bootstrap": 200, "output_dir": str(run / (name + "-eval")), "ppo_runs": {name: str(out)}})
    run_eval(ev)


if __name__ == "__main__":
    main()
