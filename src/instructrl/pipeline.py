"""The whole InstructGPT pipeline on the embedded default, with simulated labelers.

``instructrl pipeline`` runs, into one run folder:

1. prompts   constraint-following tasks (tasks/), split by user: labelers' users
             give the SFT / RM / PPO prompts, held-out users the evaluation prompts
2. demos     the base model drafts answers; simulated labelers repair them into
             demonstrations that satisfy every constraint (best of the drafts);
             the unrepaired drafts are the plain-text corpus for PPO-ptx
3. sft       supervised fine-tuning on the demonstrations (instructrl.train.sft)
then, for each round r = 1..rounds (Bai et al. 2022's iterated "online" training):
4. rank      the current policy samples K = k_min..k_max responses per RM prompt;
             simulated labelers rank them (some prompts go to two labelers, to
             measure agreement)
5. rm        a reward model is trained from the SFT model on ALL rankings so far,
             then bias-normalised on the demonstrations (instructrl.train.rm)
6. ppo       each variant (PPO, PPO-ptx) continues from its policy of the previous
             round (round 1: SFT) against this round's RM; reference = SFT
7. eval      base / SFT / PPO / PPO-ptx / best-of-N on held-out users' prompts,
             judged by held-out labelers and by the RM (instructrl.evaluation.evaluate)

The simulated labelers are a stand-in for a human team (docs/simulated-labelers.md):
every number the report prints about "labelers" is about these simulations.

Every stage writes its own sub-folder and is recorded in ``state.json`` when it
finishes; ``--resume`` skips finished stages (and PPO resumes mid-run from its
checkpoints), ``only=sft`` (or any stage name) re-runs one stage on its own.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

from instructrl.config import ConfigError, check, load_config, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.io import RunDir, atomic_write_text, read_jsonl, write_jsonl

STAGES = ("prompts", "demos", "sft", "rank", "rm", "ppo", "eval")

# Presets: dotted overrides applied before the user's own. "default" is the dataclass defaults.
PRESETS: dict[str, list[str]] = {
    "default": [],
    # ~5 minutes on 2 cores: enough to watch every stage run, too small for the acceptance statistics.
    "quick": [
        "data.n_sft_prompts=48", "data.n_drafts=1", "data.n_rm_prompts=24", "data.n_ppo_prompts=32",
        "data.n_eval_prompts=32", "data.k_max=4", "data.draft_tokens=48", "data.max_new_tokens=48",
        "sft.epochs=2", "sft.trainable_layers=12", "rm.trainable_layers=8", "ppo.steps=4", "ppo.batch_size=16",
        "ppo.variants=[ppo_ptx]", "ppo.trainable_layers=8", "eval.best_of_n=2", "eval.max_new_tokens=48",
    ],
    # for tests: tiny model, seconds
    "tiny": [
        "data.n_sft_prompts=12", "data.n_rm_prompts=8", "data.n_ppo_prompts=8", "data.n_eval_prompts=6",
        "data.k_max=4", "data.draft_tokens=12", "data.max_new_tokens=12", "data.answer_words=-1", "sft.epochs=2",
        "sft.batch_size=4",
        "rm.batch_size=4", "ppo.steps=2", "ppo.batch_size=4", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4", "eval.best_of_n=2",
        "eval.max_new_tokens=12", "eval.bootstrap=100", "sft.trainable_layers=-1", "rm.trainable_layers=-1",
        "ppo.trainable_layers=-1",
    ],
}


@dataclass
class PipelineData:
    seed: int = param(0, "seed for tasks, users, labelers and sampling")
    n_users: int = param(400, "simulated users the prompts come from (Zipf-distributed activity)")
    heldout_user_fraction: float = param(0.2, "share of users whose prompts are used only for evaluation")
    n_sft_prompts: int = param(128, "prompts with demonstrations (SFT data)")
    n_rm_prompts: int = param(96, "prompts ranked per round (RM data)")
    n_ppo_prompts: int = param(128, "prompts for PPO (no labels needed)")
    n_eval_prompts: int = param(96, "held-out users' prompts for evaluation")
    k_min: int = param(4, "fewest responses per ranking (paper: 4)")
    k_max: int = param(6, "most responses per ranking (paper: 9; 6 keeps the default run short)")
    overlap_fraction: float = param(0.25, "share of rankings also given to a second labeler, for agreement")
    draft_tokens: int = param(64, "base-model draft length for demonstrations (and the ptx corpus)")
    n_drafts: int = param(2, "base-model drafts per SFT prompt; the labeler repairs each and keeps its favourite")
    max_new_tokens: int = param(64, "response length limit when sampling for rankings")
    answer_words: int = param(0, "response budget in words: tasks are drawn so that a compliant answer fits it and "
                                 "labelers write demonstrations to it (a demonstration longer than max_new_tokens "
                                 "teaches the policy to be cut off); 0 = derived, 0.6 x max_new_tokens "
                                 "(SmolLM2 spends ~1.3 tokens a word, more in lists and JSON); -1 = no budget")

    def validate(self):
        if self.answer_words == 0:
            self.answer_words = max(8, int(0.6 * self.max_new_tokens))
        check(self.answer_words >= 8 or self.answer_words == -1,
              "data.answer_words must be >= 8, 0 (derived from max_new_tokens) or -1 (no budget)")
        check(2 <= self.k_min <= self.k_max, "data.k_min must be >= 2 and <= data.k_max")
        check(self.n_drafts >= 1, "data.n_drafts must be >= 1")
        check(0 < self.heldout_user_fraction < 1, "data.heldout_user_fraction must be in (0, 1)")
        check(min(self.n_sft_prompts, self.n_rm_prompts, self.n_ppo_prompts, self.n_eval_prompts) >= 2,
              "data.n_*_prompts must each be >= 2")

    @property
    def word_budget(self) -> int | None:
        """``answer_words`` as the ``max_words`` of generate_tasks/repair: None = no budget."""
        return self.answer_words if self.answer_words > 0 else None


@dataclass
class PipelineSFT:
    epochs: int = param(2, "SFT epochs (paper: 16 on far more data; 2 suffices for the constraint tasks)")
    lr: float = param(3e-4, "SFT peak learning rate. Measured on the default data (seed 0): 1e-4 -> val loss 2.97, "
                            "SFT gold score 0.52; 3e-4 -> 2.89 and 0.64; 3e-4 over 4 epochs overfits (val loss up after "
                            "epoch 1)")
    batch_size: int = param(8, "sequences per optimizer step")
    trainable_layers: int = param(12, "train only the top N of SmolLM2's 30 blocks (backward stops there); -1 = all")
    extra: list[str] = param(factory=list, help="more `instructrl sft` overrides, e.g. [train.residual_dropout=0.1]")


@dataclass
class PipelineRM:
    lr: float = param(1e-4, "RM learning rate")
    batch_size: int = param(8, "rankings per optimizer step")
    epochs: int = param(1, "passes over the rankings (paper: 1). On the default data 1 epoch at lr 1e-4 reached the "
                           "gold agreement of 2 epochs at 5e-5 in half the time; more rankings did not raise it "
                           "either (benchmarks/bench_rm_scaling.py, README)")
    trainable_layers: int = param(8, "train only the top N blocks (+ head); -1 = all")
    extra: list[str] = param(factory=list, help="more `instructrl rm` overrides")


@dataclass
class PipelinePPO:
    variants: list[str] = param(factory=lambda: ["ppo", "ppo_ptx"],
                                help="which policies to train: ppo (γ = 0) and/or ppo_ptx (γ = ptx_coef)")
    steps: int = param(8, "PPO steps per round")
    batch_size: int = param(32, "responses per PPO step (batch_size / samples_per_prompt prompts)")
    minibatch_size: int = param(8, "episodes per optimizer step")
    lr: float = param(3e-5, "policy learning rate")
    epochs: int = param(1, "PPO epochs per rollout batch")
    warmup_steps: int = param(2, "LR warm-up steps (InstructGPT: 10 of thousands; a short run cannot spend half its steps warming up)")
    advantage: Literal["gae", "rloo"] = param(
        "rloo", "rloo = critic-free leave-one-out baseline over samples_per_prompt answers per prompt (docs/ppo.md); "
                "gae = the paper's value model + GAE. With the gold scorer as reward (bench_ppo_ceiling, 8 steps) gae "
                "lost to SFT (0.396, 0.469; fewer constraints met than SFT) and rloo did not (0.583, 0.542): "
                "the RM-initialised critic never reaches a positive explained variance in so few steps")
    samples_per_prompt: int = param(4, "responses per prompt in a PPO step (batch_size counts responses); rloo needs >= 2")
    kl_coef: float = param(0.02, "β (InstructGPT: 0.02)")
    ptx_coef: float = param(1.0, "γ for the ppo_ptx variant (see docs/ppo.md for the scale)")
    trainable_layers: int = param(8, "train only the top N blocks of policy and value model; -1 = all")
    extra: list[str] = param(factory=list, help="more `instructrl ppo` overrides")

    def validate(self):
        check(bool(self.variants) and set(self.variants) <= {"ppo", "ppo_ptx"},
              "ppo.variants must be a non-empty subset of [ppo, ppo_ptx]")


@dataclass
class PipelineEval:
    best_of_n: int = param(2, "N for best-of-N sampling from SFT against the RM; 0 = skip")
    max_new_tokens: int = param(64, "response length limit")
    bootstrap: int = param(500, "bootstrap resamples for Elo confidence intervals")
    extra: list[str] = param(factory=list, help="more `instructrl eval` overrides")


@dataclass
class PipelineConfig:
    model: str = param("default", "the pretrained model: 'default' (embedded SmolLM2-135M-Instruct) or a folder")
    output_dir: str = param("runs/pipeline", "run folder for every stage")
    device: str = device_field()
    preset: str = param("default", "default (17-20 min on a 2-core AMX CPU, 22 min on a 2-core AMD EPYC; README), "
                                   "quick (~4 min), tiny (tests); applied first")
    rounds: int = param(1, "iterated online rounds: rank -> RM -> PPO repeated on the current policy")
    only: str = param("", "re-run just this stage (and, for rank/rm/ppo, of round `round`)")
    round: int = param(0, "with only=rank|rm|ppo: which round; 0 = the last")
    resume: bool = param(False, "skip stages already finished in output_dir (PPO resumes from its checkpoints)")
    keep_checkpoints: bool = param(False, "keep the SFT and PPO stages' training checkpoints once the stage has "
                                          "saved its model (4 of the default run's 7 GB); they are only needed to "
                                          "resume a stage that was interrupted")
    precision: Precision = precision_field()
    data: PipelineData = param(PipelineData(), "prompts, users, rankings")
    sft: PipelineSFT = param(PipelineSFT(), "stage 3")
    rm: PipelineRM = param(PipelineRM(), "stage 5")
    ppo: PipelinePPO = param(PipelinePPO(), "stage 6")
    eval: PipelineEval = param(PipelineEval(), "stage 7")

    def validate(self):
        check(self.preset in PRESETS, f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        check(self.rounds >= 1, "rounds must be >= 1")
        check(self.only in ("",) + STAGES, f"only must be one of {list(STAGES)}, got {self.only!r}")


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """Apply the preset named in the overrides (or file), then the user's overrides on top (as the CLI does)."""
    cfg = load_config(PipelineConfig, path, overrides)
    return load_config(PipelineConfig, path, PRESETS[cfg.preset] + list(overrides))


# ---------------------------------------------------------------------------
# Run-folder state: which stages are done
# ---------------------------------------------------------------------------


class State:
    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def finished(self, key: str) -> bool:
        return key in self.done

    def mark(self, key: str, **info) -> None:
        self.done[key] = info
        atomic_write_text(self.path, json.dumps(self.done, indent=2))


def _texts_jsonl(path: Path, texts: list[str]) -> None:
    write_jsonl(path, ({"text": t} for t in texts if t.strip()))


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage; returns the evaluation results."""
    import torch

    from instructrl.data import demonstration_row, ranking_row
    from instructrl.generation import generate_texts
    from instructrl.models import load_causal_lm, load_tokenizer, resolve_model
    from instructrl.tasks import generate_tasks, load_tasks, save_tasks, split_by_user
    from instructrl.tasks.labelers import LabelerPool

    out = Path(cfg.output_dir)
    if out.exists() and (out / "state.json").exists() and not (cfg.resume or cfg.only):
        raise SystemExit(f"instructrl: {out} already holds a pipeline run; add --resume to continue it, "
                         f"only=STAGE to re-run one stage, or choose another output_dir=")
    cfg.precision = make_runtime(cfg.device, cfg.precision).precision  # once, for every stage; saved resolved
    run = RunDir(out)
    run.save_config(cfg)
    state = State(out / "state.json")
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    base = resolve_model(cfg.model)
    pool = LabelerPool.default(seed=cfg.data.seed)
    d = cfg.data
    prec = cfg.precision

    def want(key: str, stage: str, rnd: int | None = None) -> bool:
        if cfg.only:
            last = cfg.round or cfg.rounds
            return stage == cfg.only and (rnd is None or rnd == last)
        return not state.finished(key)

    def drop_checkpoints(stage_dir: Path) -> None:
        # Only after the stage is marked finished: until then they are what --resume continues from.
        if not cfg.keep_checkpoints and (stage_dir / "checkpoints").is_dir():
            shutil.rmtree(stage_dir / "checkpoints")

    def timed(key: str):
        class T:
            def __enter__(s):
                s.t = time.perf_counter()
                print(f"\n=== [{key}] ===")

            def __exit__(s, et, ev, tb):
                if et is None:
                    timings[key] = round(time.perf_counter() - s.t, 1)
                    atomic_write_text(out / "timings.json", json.dumps(timings, indent=2))
                    print(f"=== [{key}] done in {timings[key]:.0f} s ===")
        return T()

    # 1. prompts -------------------------------------------------------------
    if want("prompts", "prompts"):
        with timed("prompts"):
            total = d.n_sft_prompts + d.n_rm_prompts * cfg.rounds + d.n_ppo_prompts
            # Enough tasks that the held-out users alone supply the evaluation prompts.
            n = int((total + d.n_eval_prompts) / (1 - d.heldout_user_fraction) * 1.3) + 50
            tasks = generate_tasks(n, seed=d.seed, n_users=d.n_users, max_words=d.word_budget)
            train, heldout = split_by_user(tasks, heldout_frac=d.heldout_user_fraction, seed=d.seed)
            if len(train) < total or len(heldout) < d.n_eval_prompts:
                raise RuntimeError(f"user split gave {len(train)} train / {len(heldout)} held-out prompts; "
                                   f"need {total} / {d.n_eval_prompts}: raise data.n_users")
            rng = random.Random(d.seed)
            rng.shuffle(train)
            a, b = d.n_sft_prompts, d.n_sft_prompts + d.n_rm_prompts * cfg.rounds
            save_tasks(data_dir / "sft_tasks.jsonl", train[:a])
            save_tasks(data_dir / "rm_tasks.jsonl", train[a:b])
            save_tasks(data_dir / "ppo_tasks.jsonl", train[b:b + d.n_ppo_prompts])
            save_tasks(data_dir / "eval_tasks.jsonl", heldout[: d.n_eval_prompts])
            # Training users' prompts no stage uses: adding rounds to this run later (`rounds=N --resume`)
            # takes the extra rounds' RM prompts from here, leaving every other split as it was.
            save_tasks(data_dir / "rm_tasks_reserve.jsonl", train[b + d.n_ppo_prompts:])
            users = {"train": len({t.user_id for t in train}), "heldout": len({t.user_id for t in heldout})}
            state.mark("prompts", users=users)
            run.info(f"prompts: users {users}")
    sft_tasks = load_tasks(data_dir / "sft_tasks.jsonl")
    rm_tasks = load_tasks(data_dir / "rm_tasks.jsonl")
    if (data_dir / "rm_tasks_reserve.jsonl").exists():
        rm_tasks += load_tasks(data_dir / "rm_tasks_reserve.jsonl")
    ppo_tasks = load_tasks(data_dir / "ppo_tasks.jsonl")

    # 2. demonstrations (and the plain-text corpus for PPO-ptx) -----------------
    if want("demos", "demos"):
        with timed("demos"):
            tok, lm = load_tokenizer(base), load_causal_lm(base)
            # n_drafts base-model drafts per prompt: the labeler keeps its favourite after repair.
            drafts = generate_texts(lm, tok, [t.to_prompt_record().messages for t in sft_tasks], d.draft_tokens,
                                    seed=d.seed, n_per_prompt=d.n_drafts, precision=prec, desc="base drafts")
            rng = random.Random(d.seed + 1)
            demos = [pool.write_demonstration(t, ds, rng, max_words=d.word_budget) for t, ds in zip(sft_tasks, drafts)]
            write_jsonl(data_dir / "demonstrations.jsonl", (demonstration_row(x) for x in demos))
            # No pretraining corpus ships here: the base model's own unrepaired drafts stand in for
            # "pretraining distribution" text (PPO-ptx keeps their likelihood; the alignment tax is measured
            # on a held-out part). Documented in docs/pipeline.md.
            flat = [x for ds in drafts for x in ds]
            cut = max(1, len(flat) // 5)
            _texts_jsonl(data_dir / "pretrain_heldout.jsonl", flat[:cut])
            _texts_jsonl(data_dir / "pretrain.jsonl", flat[cut:])
            del lm
            state.mark("demos", n=len(demos))

    # 3. SFT -------------------------------------------------------------------
    from instructrl.train.sft import SFTConfig, train_sft

    sft_dir = out / "sft" / "model"
    if want("sft", "sft"):
        with timed("sft"):
            sft_cfg = load_config(SFTConfig, None, [
                f"model={base}", f"output_dir={out / 'sft'}", f"data.train={data_dir / 'demonstrations.jsonl'}",
                f"train.epochs={cfg.sft.epochs}", f"train.lr={cfg.sft.lr}", f"train.batch_size={cfg.sft.batch_size}",
                f"train.micro_batch_size={cfg.sft.batch_size}", f"train.precision={prec}", f"train.seed={d.seed}",
                f"train.trainable_layers={cfg.sft.trainable_layers}",
                *cfg.sft.extra,
            ])
            train_sft(sft_cfg)
            state.mark("sft", model=str(sft_dir))
            drop_checkpoints(out / "sft")

    # 4-6. rounds: rank -> RM -> PPO ------------------------------------------
    from instructrl.train.ppo import PPOConfig, train_ppo
    from instructrl.train.rm import train_rm

    policies = {v: sft_dir for v in cfg.ppo.variants}
    if len(rm_tasks) < cfg.rounds * d.n_rm_prompts:  # checked before any round runs, not at the one that lacks them
        raise ConfigError(
            f"rounds={cfg.rounds} needs {cfg.rounds * d.n_rm_prompts} RM prompts ({d.n_rm_prompts} a round), but "
            f"{data_dir} holds {len(rm_tasks)} (the prompts stage drew them for fewer rounds): start a new run "
            f"folder with rounds={cfg.rounds}, or lower data.n_rm_prompts")
    rounds_summary = []
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        # The policy that is sampled for new comparisons: the main variant's current policy.
        current = policies[cfg.ppo.variants[-1]]
        tasks_r = rm_tasks[(r - 1) * d.n_rm_prompts: r * d.n_rm_prompts]
        if want(f"rank-{r}", "rank", r):
            with timed(f"rank-{r}"):
                tok, lm = load_tokenizer(current), load_causal_lm(current)
                rng = random.Random(d.seed * 1000 + r)
                ks = [rng.randint(d.k_min, d.k_max) for _ in tasks_r]
                ranked, sets, rankings = sample_and_rank(
                    lm, tok, tasks_r, ks, pool, rng, d.max_new_tokens, seed=d.seed + r, precision=prec,
                    desc=f"round {r}: K samples", log=lambda m: run.info(f"round {r}: {m}"))
                n_overlap = max(2, round(d.overlap_fraction * len(rankings)))
                agreement = pool.measure_agreement(ranked[:n_overlap], sets[:n_overlap], rng)
                write_jsonl(rdir / "rankings.jsonl", (ranking_row(x) for x in rankings))
                del lm
                state.mark(f"rank-{r}", n=len(rankings), skipped=len(tasks_r) - len(rankings),
                           agreement={"rate": agreement.rate, "lo": agreement.lo, "hi": agreement.hi,
                                      "n_pairs": agreement.n_pairs})
        all_rankings = data_dir / "rankings_all.jsonl"
        rows = [row for q in range(1, r + 1) for _, row in read_jsonl(out / f"round-{q}" / "rankings.jsonl")]
        write_jsonl(all_rankings, rows)

        rm_dir = rdir / "rm" / "model"
        if want(f"rm-{r}", "rm", r):
            with timed(f"rm-{r}"):
                train_rm(rm_stage_config(cfg, sft_dir, rdir / "rm", all_rankings,
                                         data_dir / "demonstrations.jsonl", seed=d.seed + r))
                state.mark(f"rm-{r}", model=str(rm_dir))

        for v in cfg.ppo.variants:
            key = f"{v}-{r}"
            pdir = rdir / v
            if want(key, "ppo", r):
                with timed(key):
                    ppo_cfg = load_config(PPOConfig, None, [
                        f"policy={policies[v]}", f"reference={sft_dir}", f"reward_model={rm_dir}",
                        f"prompts={data_dir / 'ppo_tasks.jsonl'}", f"out={pdir}", f"steps={cfg.ppo.steps}",
                        f"seed={d.seed + r}", f"rollout.batch_size={cfg.ppo.batch_size}",
                        f"rollout.max_new_tokens={d.max_new_tokens}", f"train.minibatch_size={cfg.ppo.minibatch_size}",
                        f"train.lr={cfg.ppo.lr}", f"kl.coef={cfg.ppo.kl_coef}", f"train.precision={prec}",
                        f"train.trainable_layers={cfg.ppo.trainable_layers}", f"train.epochs={cfg.ppo.epochs}",
                        f"train.warmup_steps={cfg.ppo.warmup_steps}", f"train.advantage={cfg.ppo.advantage}",
                        f"rollout.samples_per_prompt={cfg.ppo.samples_per_prompt}",
                        *([f"ptx_data={data_dir / 'pretrain.jsonl'}", f"train.ptx_coef={cfg.ppo.ptx_coef}"]
                          if v == "ppo_ptx" else []),
                        *(["resume=true"] if (pdir / "checkpoints").exists() else []),
                        *cfg.ppo.extra,
                    ])
                    final = train_ppo(ppo_cfg)
                    state.mark(key, model=str(_policy_dir(final)))
                    drop_checkpoints(pdir)
            policies[v] = Path(state.done[key]["model"]) if key in state.done else _policy_dir(pdir)
        rounds_summary.append(_round_summary(out, r, cfg))
        torch.manual_seed(0)

    # 7. evaluation --------------------------------------------------------------
    from instructrl.evaluation.evaluate import EvalConfig, run_eval

    results = {}
    # an evaluation of fewer rounds than this run now has (rounds added with --resume) is redone
    stale = not cfg.only and state.finished("eval") and state.done["eval"].get("rounds", 1) != cfg.rounds
    if want("eval", "eval") or stale:
        with timed("eval"):
            last = out / f"round-{cfg.rounds}"
            pol = {"base": base, "sft": str(sft_dir), **{v: str(p) for v, p in policies.items()}}
            ev_over = [f"policies={json.dumps(pol)}", "baseline=sft", f"reference={sft_dir}",
                       f"tasks={data_dir / 'eval_tasks.jsonl'}", f"reward_model={last / 'rm' / 'model'}",
                       f"best_of_n={cfg.eval.best_of_n}", f"max_new_tokens={cfg.eval.max_new_tokens}",
                       f"bootstrap={cfg.eval.bootstrap}", f"output_dir={out / 'eval'}", f"precision={prec}",
                       f"labeler_seed={d.seed}",
                       f"ppo_runs={json.dumps({v: str(last / v) for v in cfg.ppo.variants})}",
                       f"pretrain_eval={data_dir / 'pretrain_heldout.jsonl'}", *cfg.eval.extra]
            ev_cfg = load_config(EvalConfig, None, ev_over)
            results = run_eval(ev_cfg, extra_sections=_report_sections(out, cfg, state, timings, rounds_summary))
            state.mark("eval", report=str(out / "eval" / "report.html"), rounds=cfg.rounds)
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"total: {sum(timings.values()) / 60:.1f} min; report: {out / 'eval' / 'report.html'}")
    return results


def sample_and_rank(lm, tok, tasks: list, ks: list[int], pool, rng: random.Random, max_new_tokens: int,
                    seed: int, precision: str, desc: str, log=print) -> tuple[list, list[list[str]], list]:
    """Stage 4: K_i sampled answers to task i from ``lm``, ranked by a training labeler.

    Returns (ranked tasks, their answer sets, rankings), aligned. A task whose answers give fewer
    than 2 distinct non-empty responses has no ranking: it is left out and said through ``log``.
    """
    from instructrl.generation import generate_texts

    # Exactly K_i samples for prompt i: the prompt is repeated K_i times, one sample each.
    flat = generate_texts(lm, tok, [t.to_prompt_record().messages for t, k in zip(tasks, ks) for _ in range(k)],
                          max_new_tokens, seed=seed, precision=precision, desc=desc)
    ranked, sets, rankings, pos = [], [], [], 0
    for t, k in zip(tasks, ks):
        answers = [x[0] for x in flat[pos:pos + k]]
        pos += k
        try:
            rankings.append(pool.rank(t, answers, rng))
        except ValueError as e:  # counted, not hidden
            log(f"prompt {t.id} gave no ranking: {e}")
            continue
        ranked.append(t)
        sets.append(answers)
    return ranked, sets, rankings


def rm_stage_config(cfg: PipelineConfig, sft_dir: Path, output_dir: Path, rankings: Path, demonstrations: Path,
                    seed: int):
    """The RMConfig of stage 5: the reward model starts from the SFT model (InstructGPT §3.5)."""
    from instructrl.train.rm import RMConfig

    return load_config(RMConfig, None, [
        f"model={sft_dir}", f"output_dir={output_dir}", f"data.train={rankings}",
        f"data.demonstrations={demonstrations}", f"train.lr={cfg.rm.lr}",
        f"train.batch_size={cfg.rm.batch_size}", f"train.epochs={cfg.rm.epochs}",
        f"train.trainable_layers={cfg.rm.trainable_layers}", f"train.precision={cfg.precision}",
        f"train.seed={seed}", *cfg.rm.extra,
    ])


def _policy_dir(ppo_out: Path) -> Path:
    """The trained policy folder inside a PPO run folder."""
    ppo_out = Path(ppo_out)
    return ppo_out / "policy" if (ppo_out / "policy").exists() else ppo_out


def _round_summary(out: Path, r: int, cfg: PipelineConfig) -> dict:
    """Per-round figures from the stage folders: agreement, RM accuracy, PPO score and KL."""
    state = json.loads((out / "state.json").read_text())
    s: dict = {"round": r, "rankings": state.get(f"rank-{r}", {}).get("n"),
               "agreement": state.get(f"rank-{r}", {}).get("agreement")}
    ev = out / f"round-{r}" / "rm" / "eval.json"
    if ev.exists():
        m = json.loads(ev.read_text())
        s["rm_accuracy"] = m.get("overall", m).get("accuracy") if isinstance(m, dict) else None
    for v in cfg.ppo.variants:
        mp = out / f"round-{r}" / v / "metrics.jsonl"
        if mp.exists():
            rows = [json.loads(x) for x in mp.read_text().splitlines() if x.strip()]
            rows = [x for x in rows if "score" in x or "rm_score" in x]
            if rows:
                first, last = rows[0], rows[-1]
                key = "score" if "score" in last else "rm_score"
                s[v] = {"first_score": first.get(key), "last_score": last.get(key), "last_kl": last.get("kl")}
    return s


def _report_sections(out: Path, cfg: PipelineConfig, state: State, timings: dict, rounds: list[dict]) -> list:
    """Extra report sections: how the run was made, stage timings, each round."""
    return [
        ("Run", {"command": f"instructrl pipeline --preset {cfg.preset}" + (f" rounds={cfg.rounds}" if cfg.rounds > 1 else ""),
                 "seed": cfg.data.seed, "model": cfg.model, "output_dir": str(out)}),
        ("Stage timings (s)", dict(timings)),
        ("Rounds", rounds),
    ]


def pipeline_command(cfg: PipelineConfig) -> None:
    run_pipeline(cfg)
