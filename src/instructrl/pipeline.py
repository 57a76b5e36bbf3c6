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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from instructrl.config import ConfigError, check, get_key, load_config, param, replace_keys
from instructrl.engines import EngineSettings, resolve_engine
from instructrl.evaluation.evaluate import EvalConfig
from instructrl.io import OutputError, RunDir, atomic_write_text, read_jsonl, write_jsonl
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.train.dpo import DPOConfig
from instructrl.train.ppo import PPOConfig
from instructrl.train.rm import RMConfig
from instructrl.train.sft import SFTConfig

STAGES = ("prompts", "demos", "sft", "rank", "rm", "ppo", "eval")
VARIANTS = ("dpo", "ppo", "ppo_ptx")
PPO_VARIANTS = ("ppo", "ppo_ptx")

# Presets: dotted overrides of the pipeline's own keys, applied under the file's and the user's.
# "default" is the dataclass defaults.
PRESETS: dict[str, list[str]] = {
    "default": [],
    # a few minutes on 2 cores: enough to watch every stage run, too small for the acceptance statistics
    "quick": [
        "data.n_sft_prompts=48", "data.n_drafts=1", "data.n_rm_prompts=24", "data.n_ppo_prompts=32",
        "data.n_eval_prompts=32", "data.k_max=4", "data.draft_tokens=48", "data.max_new_tokens=48",
        "sft.train.epochs=2", "sft.train.trainable_layers=12", "rm.train.trainable_layers=8", "ppo.steps=4",
        "ppo.rollout.batch_size=16", "variants=[ppo_ptx]", "ppo.train.trainable_layers=8", "eval.best_of_n=2",
        "eval.max_new_tokens=48",
    ],
    # for tests: tiny model, seconds
    "tiny": [
        "data.n_sft_prompts=12", "data.n_rm_prompts=8", "data.n_ppo_prompts=8", "data.n_eval_prompts=6",
        "data.k_max=4", "data.draft_tokens=12", "data.max_new_tokens=12", "data.answer_words=-1",
        "sft.train.epochs=2", "sft.train.batch_size=4", "sft.train.micro_batch_size=4", "rm.train.batch_size=4",
        "ppo.steps=2", "ppo.rollout.batch_size=4", "ppo.rollout.samples_per_prompt=2", "ppo.train.minibatch_size=4",
        "eval.best_of_n=2", "eval.max_new_tokens=12", "eval.bootstrap=100", "sft.train.trainable_layers=-1",
        "rm.train.trainable_layers=-1", "ppo.train.trainable_layers=-1",
    ],
}


@dataclass
class PipelineData:
    seed: int = param(0, "seed for tasks, users, labelers and sampling; stage seeds derive from it", min=0, max=2**32 - 1)
    n_users: int = param(400, "simulated users the prompts come from (Zipf-distributed activity)", min=1)
    heldout_user_fraction: float = param(0.2, "share of users whose prompts are used only for evaluation", min=0, max=1,
                                          min_exclusive=True, max_exclusive=True)
    n_sft_prompts: int = param(128, "prompts with demonstrations (SFT data)", min=2)
    n_rm_prompts: int = param(96, "prompts ranked per round (RM data)", min=2)
    n_ppo_prompts: int = param(128, "prompts for PPO (no labels needed)", min=2)
    n_eval_prompts: int = param(96, "held-out users' prompts for evaluation", min=2)
    k_min: int = param(4, "fewest responses per ranking (paper: 4)", min=2)
    k_max: int = param(6, "most responses per ranking (paper: 9; 6 keeps the default run short)", min=2)
    overlap_fraction: float = param(0.25, "share of rankings also given to a second labeler, for agreement", min=0, max=1)
    draft_tokens: int = param(64, "base-model draft length for demonstrations (and the ptx corpus)", min=1)
    n_drafts: int = param(2, "base-model drafts per SFT prompt; the labeler repairs each and keeps its favourite", min=1)
    max_new_tokens: int = param(64, "response length limit when sampling for rankings and in PPO's rollouts", min=1)
    answer_words: int = param(0, "response budget in words: tasks are drawn so that a compliant answer fits it and "
                                 "labelers write demonstrations to it (a demonstration longer than max_new_tokens "
                                 "teaches the policy to be cut off); 0 = derived, 0.6 words per token of max_new_tokens "
                                 "(docs/pipeline.md); -1 = no budget", min=-1)

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


# The stage configs with the pipeline's defaults (docs/pipeline.md says why each differs from the
# command's own default). Keys the pipeline derives (paths, seeds, device, precision) are in `*_stage_config`.

def _sft_defaults() -> SFTConfig:
    return replace_keys(SFTConfig(), {"train.epochs": 2, "train.lr": 3e-4, "train.batch_size": 8,
                                      "train.micro_batch_size": 8, "train.trainable_layers": 12})


def _rm_defaults() -> RMConfig:
    return replace_keys(RMConfig(), {"train.lr": 1e-4, "train.batch_size": 8, "train.epochs": 1,
                                     "train.trainable_layers": 8})


def _ppo_defaults() -> PPOConfig:
    return replace_keys(PPOConfig(), {
        "steps": 8, "rollout.batch_size": 32, "rollout.samples_per_prompt": 4, "train.minibatch_size": 8,
        "train.lr": 3e-5, "train.epochs": 1, "train.warmup_steps": 2, "train.advantage": "rloo",
        "kl.coef": 0.02, "train.ptx_coef": 1.0, "train.trainable_layers": 8})


def _dpo_defaults() -> DPOConfig:
    # 96 rankings a round make 12 steps of 8; not tuned (docs/dpo.md)
    return replace_keys(DPOConfig(), {"train.loss": "listwise", "train.lr": 1e-5, "train.batch_size": 8,
                                      "train.micro_batch_size": 16, "train.epochs": 2})


def _eval_defaults() -> EvalConfig:
    # engine auto: `make demo` runs in the vLLM venv when `make install` could build it (docs/vllm.md)
    return replace_keys(EvalConfig(), {"best_of_n": 2, "max_new_tokens": 64, "bootstrap": 500, "engine.name": "auto"})


@dataclass
class PipelineConfig:
    PRESETS: ClassVar[dict[str, list[str]]] = PRESETS

    model: str = param("default", "the pretrained model: 'default' (embedded SmolLM2-135M-Instruct) or a folder")
    output_dir: str = param("runs/pipeline", "run folder for every stage")
    device: str = device_field()
    preset: str = param("default", "default, quick (a few minutes), tiny (tests): overrides of the keys below, "
                                   "applied under yours (docs/pipeline.md has their timings)")
    rounds: int = param(1, "iterated online rounds: rank -> RM -> PPO repeated on the current policy", min=1)
    only: str = param("", "re-run just this stage (and, for rank/rm/ppo, of round `round`)")
    round: int = param(0, "with only=rank|rm|ppo: which round; 0 = the last", min=0)
    resume: bool = param(False, "skip stages already finished in output_dir (PPO resumes from its checkpoints)")
    keep_checkpoints: bool = param(False, "keep the SFT and PPO stages' training checkpoints once the stage has "
                                          "saved its model; they are only needed to resume an interrupted stage")
    precision: Precision = precision_field()
    processes: int = param(1, "processes for each training stage (sft, rm, ppo, dpo): N > 1 runs the stage as "
                              "`torchrun --nproc_per_node N -m instructrl <stage>` on its config, written to "
                              "output_dir/stage-configs/; sampling, labeling and eval stay in this process",
                           min=1, max=1024)
    variants: list[str] = param(factory=lambda: list(PPO_VARIANTS),
                                help="which policies stage 6 trains: ppo (γ = 0), ppo_ptx (γ = ppo.train.ptx_coef), "
                                     "dpo (offline, from SFT on every ranking so far); the last one is sampled for "
                                     "the next round's rankings")
    data: PipelineData = param(PipelineData(), "prompts, users, rankings")
    sft: SFTConfig = param(factory=_sft_defaults, help="stage 3, `instructrl sft`; the pipeline sets its paths, seed, "
                                                      "device, precision and engine")
    rm: RMConfig = param(factory=_rm_defaults, help="stage 5, `instructrl rm`, from the SFT model; the pipeline sets "
                                                   "its paths, seed, device and precision")
    ppo: PPOConfig = param(factory=_ppo_defaults, help="stage 6, `instructrl ppo`, one run per variant and round; the "
                                                      "pipeline sets its models, data, paths, seed, device, precision, "
                                                      "rollout.max_new_tokens (= data.max_new_tokens) and engine")
    dpo: DPOConfig = param(factory=_dpo_defaults, help="stage 6 for variant dpo, `instructrl dpo`, from SFT (or its "
                                                      "previous round) on every ranking so far; the pipeline sets its "
                                                      "models, data, paths, seed, device and precision")
    eval: EvalConfig = param(factory=_eval_defaults, help="stage 7, `instructrl eval`; the pipeline sets its "
                                                         "policies, tasks, models, paths, seeds, device and precision")
    engine: EngineSettings = param(EngineSettings(name="auto"),
                                   "the sampler of the demonstrations' drafts, the rankings' K samples, SFT's "
                                   "rm_score selection and PPO's rollouts (stage 7 has eval.engine): auto = vLLM "
                                   "where it is importable, else the built-in hf sampler (docs/vllm.md)")

    def fill(self):
        """Set the keys the pipeline derives in every stage config (round 1's values), before they validate."""
        base = self.model
        stages = {"sft": (sft_stage_config(self, base), _sft_defaults()),
                  "rm": (rm_stage_config(self, *_round1_rm_paths(self)), _rm_defaults()),
                  "ppo": (ppo_stage_config(self, "ppo_ptx", 1, base), _ppo_defaults()),
                  "dpo": (dpo_stage_config(self, 1, base), _dpo_defaults()),
                  "eval": (eval_stage_config(self, base, {v: base for v in self.variants}), _eval_defaults())}
        for name, (derived, defaults) in stages.items():
            for key in DERIVED[name]:
                mine, default = get_key(getattr(self, name), key), get_key(defaults, key)
                if mine != default and mine != get_key(derived, key):
                    raise ConfigError(f"{name}.{key} is set by the pipeline ({get_key(derived, key)!r} here); "
                                      f"set {DERIVED_FROM.get(name + '.' + key, 'the pipeline key it comes from')} "
                                      f"instead")
            setattr(self, name, derived)

    def validate(self):
        check(self.preset in PRESETS, f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        check(self.rounds >= 1, "rounds must be >= 1")
        check(self.only in ("",) + STAGES, f"only must be one of {list(STAGES)}, got {self.only!r}")
        check(bool(self.variants) and set(self.variants) <= set(VARIANTS),
              f"variants must be a non-empty subset of {list(VARIANTS)}")
        n = self.processes  # checked here so that a bad split stops the run before its first stage
        for key, size in (("sft.train.batch_size", self.sft.train.batch_size),
                          ("rm.train.batch_size", self.rm.train.batch_size),
                          ("dpo.train.batch_size", self.dpo.train.batch_size)):
            check(size % n == 0, f"{key}={size} must be divisible by processes={n}")
        B, k = self.ppo.rollout.batch_size, self.ppo.rollout.samples_per_prompt
        check(B % n == 0 and (B // n) % k == 0,
              f"ppo.rollout.batch_size={B} must split over processes={n} into whole groups of "
              f"ppo.rollout.samples_per_prompt={k}")


def load_pipeline_config(path: str | None, overrides: list[str]) -> PipelineConfig:
    """The preset named in the overrides (or file) goes under the file and the overrides, in one parse."""
    return load_config(PipelineConfig, path, overrides)


# ---------------------------------------------------------------------------
# Stage configs: every value the pipeline derives, in one place
# ---------------------------------------------------------------------------

# Per stage, the dotted keys `*_stage_config` sets; setting one yourself is an error (it would be ignored).
DERIVED = {
    "sft": ("model", "output_dir", "device", "overwrite", "data.train", "train.precision", "train.seed", "engine"),
    "rm": ("model", "output_dir", "device", "overwrite", "data.train", "data.demonstrations", "train.precision", "train.seed"),
    "ppo": ("policy", "reference", "reward_model", "prompts", "ptx_data", "output_dir", "out", "overwrite", "seed", "device",
            "rollout.max_new_tokens", "train.precision", "engine"),
    "dpo": ("model", "reference", "output_dir", "device", "overwrite", "data.train", "train.precision", "train.seed"),
    "eval": ("policies", "baseline", "reference", "tasks", "reward_model", "output_dir", "device", "precision",
             "labeler_seed", "ppo_runs", "pretrain_eval"),
}
DERIVED_FROM = {"sft.model": "model", "rm.model": "model", "ppo.policy": "model", "sft.device": "device",
                "ppo.rollout.max_new_tokens": "data.max_new_tokens", "sft.train.seed": "data.seed",
                "sft.output_dir": "output_dir", "eval.output_dir": "output_dir", "ppo.output_dir": "output_dir",
                "ppo.out": "output_dir", "ppo.engine": "engine", "sft.engine": "engine",
                "sft.train.precision": "precision", "rm.train.precision": "precision",
                "ppo.train.precision": "precision", "eval.precision": "precision"}
PipelineConfig.DERIVED_FROM = DERIVED_FROM  # config.qualify_keys: a stage's error names the key the user sets


def _paths(cfg: PipelineConfig) -> tuple[Path, Path]:
    out = Path(cfg.output_dir)
    return out, out / "data"


def sft_stage_config(cfg: PipelineConfig, base: str) -> SFTConfig:
    """Stage 3: SFT from the base model on the labelers' demonstrations."""
    out, data_dir = _paths(cfg)
    # the pipeline's state.json says which stages finished: a stage it runs again starts over in its folder
    return replace_keys(cfg.sft, {"model": base, "output_dir": str(out / "sft"), "device": cfg.device, "overwrite": True,
                                  "data.train": str(data_dir / "demonstrations.jsonl"),
                                  "train.precision": cfg.precision, "train.seed": cfg.data.seed,
                                  "engine": cfg.engine})  # its rm_score selection samples with the pipeline's engine


def _round1_rm_paths(cfg: PipelineConfig) -> tuple:
    out, data_dir = _paths(cfg)
    return (out / "sft" / "model", out / "round-1" / "rm", data_dir / "rankings_all.jsonl",
            data_dir / "demonstrations.jsonl", cfg.data.seed + 1)


def rm_stage_config(cfg: PipelineConfig, sft_dir: Path, output_dir: Path, rankings: Path, demonstrations: Path,
                    seed: int) -> RMConfig:
    """Stage 5: the reward model starts from the SFT model (InstructGPT §3.5)."""
    return replace_keys(cfg.rm, {"model": str(sft_dir), "output_dir": str(output_dir), "device": cfg.device,
                                 "overwrite": True,
                                 "data.train": str(rankings), "data.demonstrations": str(demonstrations),
                                 "train.precision": cfg.precision, "train.seed": seed})


def ppo_stage_config(cfg: PipelineConfig, variant: str, r: int, policy: str | Path, resume: bool = False) -> PPOConfig:
    """Stage 6 of round ``r``: ``variant`` continues from ``policy`` against this round's RM; reference = SFT."""
    out, data_dir = _paths(cfg)
    pdir = out / f"round-{r}" / variant
    return replace_keys(cfg.ppo, {
        "policy": str(policy), "reference": str(out / "sft" / "model"),
        "reward_model": str(out / f"round-{r}" / "rm" / "model"), "prompts": str(data_dir / "ppo_tasks.jsonl"),
        "ptx_data": str(data_dir / "pretrain.jsonl") if variant == "ppo_ptx" else "", "output_dir": str(pdir), "out": "",
        "seed": cfg.data.seed + r, "device": cfg.device, "resume": resume, "overwrite": not resume,
        "rollout.max_new_tokens": cfg.data.max_new_tokens, "train.precision": cfg.precision,
        "engine": cfg.engine})  # one sampler for drafts, K samples and rollouts (each process: one vLLM engine)


def dpo_stage_config(cfg: PipelineConfig, r: int, policy: str | Path, resume: bool = False) -> DPOConfig:
    """Stage 6, variant dpo, of round ``r``: from ``policy`` (SFT in round 1) on every ranking so far; reference = SFT."""
    out, data_dir = _paths(cfg)
    return replace_keys(cfg.dpo, {
        "model": str(policy), "reference": str(out / "sft" / "model"), "output_dir": str(out / f"round-{r}" / "dpo"),
        "device": cfg.device, "resume": resume, "overwrite": not resume,
        "data.train": str(data_dir / "rankings_all.jsonl"),
        "train.precision": cfg.precision, "train.seed": cfg.data.seed + r})


def eval_stage_config(cfg: PipelineConfig, base: str, trained: dict[str, Any]) -> EvalConfig:
    """Stage 7: base, SFT and every trained variant (``trained``: variant -> policy folder) on held-out users."""
    out, data_dir = _paths(cfg)
    last = out / f"round-{cfg.rounds}"
    sft_dir = str(out / "sft" / "model")
    return replace_keys(cfg.eval, {
        "policies": {"base": base, "sft": sft_dir, **{v: str(p) for v, p in trained.items()}}, "baseline": "sft",
        "reference": sft_dir, "tasks": str(data_dir / "eval_tasks.jsonl"),
        "reward_model": str(last / "rm" / "model"), "output_dir": str(out / "eval"), "device": cfg.device,
        "precision": cfg.precision, "labeler_seed": cfg.data.seed,
        "ppo_runs": {v: str(last / v) for v in trained if v in PPO_VARIANTS}, "pretrain_eval": str(data_dir / "pretrain_heldout.jsonl")})


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


@dataclass
class PipelineRun:
    """What every stage of one run reads: the config, its folders, state, timings and labeler pool."""

    cfg: PipelineConfig
    out: Path
    data_dir: Path
    run: RunDir
    state: State
    timings: dict[str, float]
    pool: Any
    base: str

    def want(self, key: str, stage: str, rnd: int | None = None) -> bool:
        """Run this stage now? (not finished yet, or named by ``only=``)."""
        if self.cfg.only:
            last = self.cfg.round or self.cfg.rounds
            return stage == self.cfg.only and (rnd is None or rnd == last)
        return not self.state.finished(key)

    @contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        print(f"\n=== [{key}] ===")
        yield
        self.timings[key] = round(time.perf_counter() - t, 1)
        atomic_write_text(self.out / "timings.json", json.dumps(self.timings, indent=2))
        print(f"=== [{key}] done in {self.timings[key]:.0f} s ===")

    def train(self, command: str, fn, stage_cfg) -> Path:
        """Run a training stage here, or in ``processes`` processes; returns the stage's trained output."""
        n = self.cfg.processes
        if n == 1:
            return fn(stage_cfg)
        from instructrl.train.processes import launch

        if str(stage_cfg.device).startswith("cuda"):  # torchrun gives each process its own cuda:rank
            stage_cfg = replace_keys(stage_cfg, {"device": "auto"})
        stage_dir = Path(stage_cfg.output_dir)
        name = "-".join(stage_dir.parts[-2:]) if stage_dir.parent != self.out else stage_dir.name
        launch(command, stage_cfg, n, self.out / "stage-configs" / f"{name}.yaml")
        return Path(stage_cfg.output_dir) if command == "ppo" else Path(stage_cfg.output_dir) / "model"

    def drop_checkpoints(self, stage_dir: Path) -> None:
        # Only after the stage is marked finished: until then they are what --resume continues from.
        if not self.cfg.keep_checkpoints and (stage_dir / "checkpoints").is_dir():
            shutil.rmtree(stage_dir / "checkpoints")


def _texts_jsonl(path: Path, texts: list[str]) -> None:
    write_jsonl(path, ({"text": t} for t in texts if t.strip()))


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) every stage; returns the evaluation results."""
    import torch

    from instructrl.models import resolve_model
    from instructrl.tasks import load_tasks
    from instructrl.tasks.labelers import LabelerPool

    out = Path(cfg.output_dir)
    if out.exists() and (out / "state.json").exists() and not (cfg.resume or cfg.only):
        raise OutputError(out, "already holds a pipeline run; add --resume to continue it, "
                               "only=STAGE to re-run one stage, or choose another output_dir=")
    cfg.precision = make_runtime(cfg.device, cfg.precision).precision  # once, for every stage; saved resolved
    cfg.engine, engine_why = resolve_engine(cfg.engine)  # auto -> what it means in this venv, saved resolved
    cfg.eval.engine, eval_engine_why = resolve_engine(cfg.eval.engine)
    cfg.fill()  # the stage configs carry the resolved precision and engine too
    run = RunDir(out)
    run.save_config(cfg)
    run.info(f"sampling (drafts, K samples, SFT rm_score selection, PPO rollouts) {engine_why}; "
             f"evaluation {eval_engine_why}")
    (out / "data").mkdir(parents=True, exist_ok=True)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    p = PipelineRun(cfg, out, out / "data", run, State(out / "state.json"), timings,
                    LabelerPool.default(seed=cfg.data.seed), resolve_model(cfg.model))

    if p.want("prompts", "prompts"):
        with p.timed("prompts"):
            make_prompts(p)
    sft_tasks = load_tasks(p.data_dir / "sft_tasks.jsonl")
    rm_tasks = load_tasks(p.data_dir / "rm_tasks.jsonl")
    if (p.data_dir / "rm_tasks_reserve.jsonl").exists():
        rm_tasks += load_tasks(p.data_dir / "rm_tasks_reserve.jsonl")
    if p.want("demos", "demos"):
        with p.timed("demos"):
            make_demonstrations(p, sft_tasks)
    sft_dir = out / "sft" / "model"
    if p.want("sft", "sft"):
        with p.timed("sft"):
            from instructrl.train.sft import train_sft

            p.train("sft", train_sft, sft_stage_config(cfg, p.base))
            p.state.mark("sft", model=str(sft_dir))
            p.drop_checkpoints(out / "sft")

    policies = {v: sft_dir for v in cfg.variants}
    n_rm = cfg.data.n_rm_prompts
    if len(rm_tasks) < cfg.rounds * n_rm:  # checked before any round runs, not at the one that lacks them
        raise ConfigError(
            f"rounds={cfg.rounds} needs {cfg.rounds * n_rm} RM prompts ({n_rm} a round), but {p.data_dir} holds "
            f"{len(rm_tasks)} (the prompts stage drew them for fewer rounds): start a new run folder with "
            f"rounds={cfg.rounds}, or lower data.n_rm_prompts")
    rounds_summary = []
    for r in range(1, cfg.rounds + 1):
        run_round(p, r, rm_tasks[(r - 1) * n_rm: r * n_rm], policies)
        rounds_summary.append(_round_summary(out, r, cfg))
        torch.manual_seed(0)

    results = {}
    # an evaluation of fewer rounds than this run now has (rounds added with --resume) is redone
    stale = not cfg.only and p.state.finished("eval") and p.state.done["eval"].get("rounds", 1) != cfg.rounds
    if p.want("eval", "eval") or stale:
        with p.timed("eval"):
            from instructrl.evaluation.evaluate import run_eval

            results = run_eval(eval_stage_config(cfg, p.base, policies),
                               extra_sections=_report_sections(out, cfg, p.state, timings, rounds_summary))
            p.state.mark("eval", report=str(out / "eval" / "report.html"), rounds=cfg.rounds)
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"total: {sum(timings.values()) / 60:.1f} min; report: {out / 'eval' / 'report.html'}")
    return results


def make_prompts(p: PipelineRun) -> None:
    """Stage 1: constraint tasks from simulated users, split by user into SFT / RM / PPO / evaluation prompts."""
    from instructrl.tasks import generate_tasks, save_tasks, split_by_user

    d, rounds = p.cfg.data, p.cfg.rounds
    total = d.n_sft_prompts + d.n_rm_prompts * rounds + d.n_ppo_prompts
    # Enough tasks that the held-out users alone supply the evaluation prompts.
    n = int((total + d.n_eval_prompts) / (1 - d.heldout_user_fraction) * 1.3) + 50
    tasks = generate_tasks(n, seed=d.seed, n_users=d.n_users, max_words=d.word_budget)
    train, heldout = split_by_user(tasks, heldout_frac=d.heldout_user_fraction, seed=d.seed)
    if len(train) < total or len(heldout) < d.n_eval_prompts:
        raise ConfigError(f"data.n_users: the user split gave {len(train)} train / {len(heldout)} held-out prompts; "
                          f"need {total} / {d.n_eval_prompts}: raise data.n_users")
    random.Random(d.seed).shuffle(train)
    a, b = d.n_sft_prompts, d.n_sft_prompts + d.n_rm_prompts * rounds
    save_tasks(p.data_dir / "sft_tasks.jsonl", train[:a])
    save_tasks(p.data_dir / "rm_tasks.jsonl", train[a:b])
    save_tasks(p.data_dir / "ppo_tasks.jsonl", train[b:b + d.n_ppo_prompts])
    save_tasks(p.data_dir / "eval_tasks.jsonl", heldout[: d.n_eval_prompts])
    # Training users' prompts no stage uses: adding rounds to this run later (`rounds=N --resume`)
    # takes the extra rounds' RM prompts from here, leaving every other split as it was.
    save_tasks(p.data_dir / "rm_tasks_reserve.jsonl", train[b + d.n_ppo_prompts:])
    users = {"train": len({t.user_id for t in train}), "heldout": len({t.user_id for t in heldout})}
    p.state.mark("prompts", users=users)
    p.run.info(f"prompts: users {users}")


def make_demonstrations(p: PipelineRun, sft_tasks: list) -> None:
    """Stage 2: base-model drafts, repaired by labelers into demonstrations; the drafts are the ptx corpus."""
    from instructrl.data import demonstration_row
    from instructrl.generation import generate_texts
    from instructrl.models import load_causal_lm, load_tokenizer

    d = p.cfg.data
    tok, lm = load_tokenizer(p.base), load_causal_lm(p.base)
    # n_drafts base-model drafts per prompt: the labeler keeps its favourite after repair.
    drafts = generate_texts(lm, tok, [t.to_prompt_record().messages for t in sft_tasks], d.draft_tokens,
                            seed=d.seed, n_per_prompt=d.n_drafts, precision=p.cfg.precision, desc="base drafts",
                            engine=p.cfg.engine)
    rng = random.Random(d.seed + 1)
    demos = [p.pool.write_demonstration(t, ds, rng, max_words=d.word_budget) for t, ds in zip(sft_tasks, drafts)]
    write_jsonl(p.data_dir / "demonstrations.jsonl", (demonstration_row(x) for x in demos))
    # No pretraining corpus ships here: the base model's own unrepaired drafts stand in for
    # "pretraining distribution" text (PPO-ptx keeps their likelihood; the alignment tax is measured
    # on a held-out part). Documented in docs/pipeline.md.
    flat = [x for ds in drafts for x in ds]
    cut = max(1, len(flat) // 5)
    _texts_jsonl(p.data_dir / "pretrain_heldout.jsonl", flat[:cut])
    _texts_jsonl(p.data_dir / "pretrain.jsonl", flat[cut:])
    p.state.mark("demos", n=len(demos))


def run_round(p: PipelineRun, r: int, tasks_r: list, policies: dict[str, Path]) -> None:
    """Stages 4-6 of round ``r``: rank samples of the current policy, train the RM on every ranking so far,
    continue each PPO variant against it. ``policies`` (variant -> folder) is updated in place."""
    from instructrl.data import ranking_row
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.train.dpo import train_dpo
    from instructrl.train.ppo import train_ppo
    from instructrl.train.rm import train_rm

    cfg, d, out, rdir = p.cfg, p.cfg.data, p.out, p.out / f"round-{r}"
    if p.want(f"rank-{r}", "rank", r):
        with p.timed(f"rank-{r}"):
            current = policies[cfg.variants[-1]]  # the policy sampled for new comparisons: the main variant's
            tok, lm = load_tokenizer(current), load_causal_lm(current)
            rng = random.Random(d.seed * 1000 + r)
            ks = [rng.randint(d.k_min, d.k_max) for _ in tasks_r]
            ranked, sets, rankings = sample_and_rank(
                lm, tok, tasks_r, ks, p.pool, rng, d.max_new_tokens, seed=d.seed + r, precision=cfg.precision,
                desc=f"round {r}: K samples", log=lambda m: p.run.info(f"round {r}: {m}"), engine=cfg.engine)
            n_overlap = max(2, round(d.overlap_fraction * len(rankings)))
            agreement = p.pool.measure_agreement(ranked[:n_overlap], sets[:n_overlap], rng)
            write_jsonl(rdir / "rankings.jsonl", (ranking_row(x) for x in rankings))
            p.state.mark(f"rank-{r}", n=len(rankings), skipped=len(tasks_r) - len(rankings),
                         agreement={"rate": agreement.rate, "lo": agreement.lo, "hi": agreement.hi,
                                    "n_pairs": agreement.n_pairs})
    all_rankings = p.data_dir / "rankings_all.jsonl"  # every round's so far: the RM's and DPO's data
    if p.want(f"rm-{r}", "rm", r) or any(p.want(f"{v}-{r}", "ppo", r) for v in cfg.variants):
        write_jsonl(all_rankings, [row for q in range(1, r + 1)
                                   for _, row in read_jsonl(out / f"round-{q}" / "rankings.jsonl")])

    if p.want(f"rm-{r}", "rm", r):
        with p.timed(f"rm-{r}"):
            p.train("rm", train_rm, rm_stage_config(cfg, out / "sft" / "model", rdir / "rm", all_rankings,
                                                    p.data_dir / "demonstrations.jsonl", seed=d.seed + r))
            p.state.mark(f"rm-{r}", model=str(rdir / "rm" / "model"))

    for v in cfg.variants:
        key = f"{v}-{r}"
        if p.want(key, "ppo", r):
            with p.timed(key):
                resume = (rdir / v / "checkpoints").exists()
                if v == "dpo":
                    final = p.train("dpo", train_dpo,
                                    dpo_stage_config(cfg, r, policies[v], resume=resume and _has_step(rdir / v)))
                else:
                    final = _policy_dir(p.train("ppo", train_ppo, ppo_stage_config(cfg, v, r, policies[v], resume=resume)))
                p.state.mark(key, model=str(final))
                p.drop_checkpoints(rdir / v)
        policies[v] = Path(p.state.done[key]["model"]) if key in p.state.done else _policy_dir(rdir / v)


def sample_and_rank(lm, tok, tasks: list, ks: list[int], pool, rng: random.Random, max_new_tokens: int,
                    seed: int, precision: str, desc: str, log=print,
                    engine: EngineSettings | None = None) -> tuple[list, list[list[str]], list]:
    """Stage 4: K_i sampled answers to task i from ``lm``, ranked by a training labeler.

    Returns (ranked tasks, their answer sets, rankings), aligned. A task whose answers give fewer
    than 2 distinct non-empty responses has no ranking: it is left out and said through ``log``.
    """
    from instructrl.generation import generate_texts

    # Exactly K_i samples for prompt i: the prompt is repeated K_i times, one sample each.
    flat = generate_texts(lm, tok, [t.to_prompt_record().messages for t, k in zip(tasks, ks) for _ in range(k)],
                          max_new_tokens, seed=seed, precision=precision, desc=desc, engine=engine)
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


def _has_step(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step-*/state.pt"))


def _policy_dir(ppo_out: Path) -> Path:
    """The trained policy folder inside a PPO or DPO run folder."""
    ppo_out = Path(ppo_out)
    for sub in ("policy", "model"):  # PPO writes policy/, DPO model/
        if (ppo_out / sub).exists():
            return ppo_out / sub
    return ppo_out


def _round_summary(out: Path, r: int, cfg: PipelineConfig) -> dict:
    """Per-round figures from the stage folders: agreement, RM accuracy, PPO score and KL."""
    state = json.loads((out / "state.json").read_text())
    s: dict = {"round": r, "rankings": state.get(f"rank-{r}", {}).get("n"),
               "agreement": state.get(f"rank-{r}", {}).get("agreement")}
    ev = out / f"round-{r}" / "rm" / "eval.json"
    if ev.exists():
        m = json.loads(ev.read_text())
        s["rm_accuracy"] = m.get("overall", m).get("accuracy") if isinstance(m, dict) else None
    for v in cfg.variants:
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
