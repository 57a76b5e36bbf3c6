"""PPO and PPO-ptx against a reward model (InstructGPT §3.5, equation 2).

    objective(φ) = E_{(x,y)~π_φ}[ r_θ(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ] + γ E_{x~D_pretrain}[ log π_φ(x) ]

``train_ppo`` is the whole algorithm, top to bottom, one phase per line (each phase is a function
in :mod:`instructrl.train.ppo_phases`, with a typed record in and out):

    1 rollout   sample responses (KV cache, left padding, stop at EOS)        generate_trajectory -> Generation
    2 score     policy and reference log-probs, values, reward-model score   score_trajectory -> Scored
    3 reward    −β·KL at every token + the RM score at the last token         compute_advantages -> Rollout
    4 advantage GAE (γ, λ) or RLOO, then whitening over the global batch        (same call)
    5 optimise  PPO epochs over minibatches: clipped policy loss (+ γ·ptx),   ppo_update -> UpdateStats
                clipped value loss
    6 log       metrics.jsonl, progress bar, checkpoint every N steps         metrics_row, save_checkpoint

Under torchrun / accelerate launch each process samples its share of the batch; one process and N
processes take the same steps (see ppo_phases).

The value model is a separate network initialised from the reward model
(§3.5: "the value function is initialized from the RM"). The frozen
reference is the initial (SFT) policy. Checkpoints hold every piece of state
needed to continue bit for bit (weights, both optimizers and schedulers, the KL
controller, every RNG stream, the positions in the prompt and pretraining
streams); ``--resume`` continues from the latest one. See docs/ppo.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from instructrl.config import ConfigError, check, overwrite_field, param
from instructrl.engines import EngineSettings
from instructrl.lora import LoraSettings
from instructrl.models import frozen_linears_cast
from instructrl.runtime import Precision, device_field, make_runtime, precision_field, set_threads
from instructrl.tracking import TrackerKind, tracker_field
from instructrl.train.common import (ONE_PROCESS_FSDP2, SHARDING_HELP, Sharding, check_trainable,
                                     latest_checkpoint)
from instructrl.train.processes import make_dist
from instructrl.train.ppo_phases import (RewardFn, compute_advantages, generate_trajectory,
                                         load_data, load_models, make_optimisers,
                                         metrics_row, ppo_update, Progress, restore, save_checkpoint, save_final,
                                         score_trajectory, step_prompts)

# Fault injection for the crash test: SIGKILL this process right after finishing this step.
# why PPO cannot shard with vLLM rollouts (said by validate, and at start when engine.name=auto finds vLLM)
SHARDED_VLLM = "the engine is handed the policy's full weights after every update, which a sharded policy does not hold"
KILL_ENV = "INSTRUCTRL_PPO_KILL_AFTER_STEP"


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclass
class PPORollout:
    batch_size: int = param(16, "episodes (sampled responses) per PPO step, over all processes", min=1)
    samples_per_prompt: int = param(
        1, "responses sampled per prompt in a step: a step sees batch_size / samples_per_prompt distinct prompts. "
           "train.advantage=rloo needs >= 2 (its baseline is the other samples of the same prompt)", min=1)
    max_prompt_tokens: int = param(256, "prompts longer than this are cut from the left (latest turns kept)", min=1)
    max_new_tokens: int = param(64, "response length limit", min=1)
    temperature: float = param(1.0, "sampling temperature (InstructGPT samples at T = 1)", min=0, min_exclusive=True)
    top_k: int = param(0, "sample from the k most likely tokens; 0 = full distribution (needed for an honest KL)", min=0)
    old_logprobs: Literal["auto", "sampling", "recompute"] = param(
        "auto", "π_old log-probs: 'sampling' reuses the logits sampling computed (TRL's way; saves one policy "
                "forward per step), 'recompute' runs a fresh forward (ratio exactly 1 at the first update); "
                "auto = sampling under fp32, where both agree to float rounding, recompute under bf16")
    missing_eos_penalty: float | None = param(
        None, "subtract this from the score of responses that hit max_new_tokens without EOS (TRL's trick); "
              "null = no penalty", min=0)
    rm_eos: bool = param(
        True, "the RM scores a response cut off at max_new_tokens with EOS appended, as the finished (if bad) answer "
              "a labeler would judge: reward models are trained on answers that end in EOS (every ranked response "
              "does), so a score read at a mid-sentence token is out of distribution. false = score the last "
              "generated token (TRL's way)")

    def validate(self):
        check(self.samples_per_prompt >= 1 and self.batch_size % self.samples_per_prompt == 0,
              f"rollout.samples_per_prompt ({self.samples_per_prompt}) must be >= 1 and divide rollout.batch_size "
              f"({self.batch_size})")


@dataclass
class PPOKL:
    coef: float = param(0.02, "β, the KL penalty coefficient (InstructGPT: 0.02); initial value if adaptive", min=0)
    estimator: Literal["k1", "k3"] = param("k1", "per-token KL estimator: k1 = log π/π_SFT (the paper's), k3 = always >= 0")
    adaptive: bool = param(False, "adapt β toward kl.target (Ziegler et al. 2019); false = fixed β (InstructGPT)")
    target: float = param(6.0, "target KL per sequence (nats) for the adaptive controller", min=0, min_exclusive=True)
    horizon: int = param(10000, "adaptive controller horizon in episodes (Ziegler et al. 2019)", min=1)
    reward_clip: float | None = param(None, "clip the RM score to [-c, c] before shaping; null = no clipping", min=0, min_exclusive=True)


@dataclass
class PPOTrain:
    epochs: int = param(1, "PPO epochs per rollout batch; 1 because DeepSpeed-Chat reports more were unstable", min=1)
    minibatch_size: int = param(8, "episodes per optimizer step, over all processes (rollout.batch_size must be a multiple)", min=1)
    micro_batch_size: int = param(4, "sequences per forward/backward in one process; sorted by length and trimmed to cut padding", min=1)
    score_batch_size: int = param(8, "sequences per forward in the no-grad scoring phase (old/reference "
                                     "log-probs, values, RM); it keeps no activations, so it can exceed "
                                     "micro_batch_size (TRL: local_rollout_forward_batch_size); smaller chunks of "
                                     "length-sorted rows carry less padding (docs/ppo.md)", min=1)
    lr: float = param(1e-6, "policy learning rate (Adam)", min=0, min_exclusive=True)
    value_lr: float = param(1e-5, "value model learning rate (Adam)", min=0, min_exclusive=True)
    warmup_steps: int = param(10, "linear LR warm-up in PPO steps, from lr/10 (InstructGPT: 10 iterations)", min=0)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = param(1.0, "gradient clipping (each model separately)", min=0, min_exclusive=True)
    value_warmup_steps: int = param(0, "the first N of `steps` train only the value model: the policy samples and is "
                                          "scored but does not move, so that its first advantages come from a critic "
                                          "that has seen the reward (veRL's critic_warmup). An RM-initialised critic "
                                          "starts with negative explained variance (docs/ppo.md)", min=0)
    advantage: Literal["gae", "rloo", "grpo", "drgrpo"] = param(
        "gae", "gae = a value model (initialised from the RM) and GAE, as InstructGPT; rloo = critic-free REINFORCE "
               "leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): a response's advantage is its return "
               "(score − β·ΣKL) minus the mean return of the other samples of its prompt, at every token; no value "
               "model is loaded, run or trained; grpo = (return − group mean) / group std (Shao et al. 2024); "
               "drgrpo = return − group mean (Liu et al. 2025). rloo/grpo/drgrpo need rollout.samples_per_prompt "
               ">= 2 (docs/rl-levers.md)")
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = param(
        "token-mean", "how the policy loss averages its per-token terms: token-mean over the minibatch's tokens "
                      "(DAPO), seq-mean-token-mean (GRPO), seq-mean-token-sum with rollout.max_new_tokens as "
                      "the constant (Dr. GRPO); docs/rl-levers.md")
    drop_uninformative_groups: bool = param(
        False, "leave out of the policy loss (and of whitening) the prompts whose samples_per_prompt scores are "
               "all equal: they carry no group-relative signal (DAPO's dynamic sampling, without the re-sampling)")
    tis_cap: float = param(
        0.0, "truncated importance sampling against the engine's numerics (engine.name=vllm): each token's policy "
             "loss is weighted by min(π_old/π_engine, tis_cap), π_old the trainer's recomputed log-probs (Yao et al. "
             "2025; verl and OpenRLHF use 2); 0 = off. No effect with the built-in sampler (docs/ppo.md)", min=0)
    kl_in_loss: bool = param(
        False, "put β·KL (k3 estimator) in the policy loss, as GRPO, instead of −β·KL in the reward (InstructGPT)")
    gamma: float = param(1.0, "GAE discount; 1 = no discounting (one bandit episode per response)", min=0, max=1)
    lam: float = param(0.95, "GAE λ", min=0, max=1)
    cliprange: float = param(0.2, "PPO ratio clip ε (Schulman et al. 2017)", min=0, min_exclusive=True)
    cliprange_value: float = param(0.2, "value clip ε_v", min=0, min_exclusive=True)
    whiten_advantages: bool = param(True, "normalise advantages over the batch")
    ptx_coef: float = param(
        1.0, "γ of PPO-ptx, weight of one pretraining token's NLL against one RL token's loss; used only with "
             "ptx_data (no ptx_data or 0 = plain PPO). The paper's 27.8 is in its own scale, see docs/ppo.md", min=0)
    ptx_batch_size: int = param(4, "plain-text sequences per minibatch for the ptx term", min=1)
    ptx_max_tokens: int = param(256, "pretraining sequences are cut to this many tokens", min=2)
    precision: Precision = precision_field()
    trainable_layers: int = param(-1, "train only the top N blocks (+ final norm, value head) of policy and value "
                                      "model; with train.lora: adapters in the top N blocks only; -1 = all", min=-1)
    lora: LoraSettings = param(LoraSettings(), "LoRA adapters on policy and value model instead of full fine-tuning; "
                                               "the reference is then the policy with its adapter switched off: one "
                                               "copy of the base weights (docs/lora.md)")
    share_frozen_blocks: bool = param(
        True, "with trainable_layers: run the lower blocks that policy, reference, RM and value model hold "
              "bitwise equal and frozen (all started from one SFT model) once per sequence, and reuse that "
              "hidden state in scoring and training (docs/ppo.md, Speed); false = every model runs every block")
    attention: Literal["auto", "model", "eager", "sdpa"] = param(
        "auto", "attention kernel of the training forward/backward: auto = eager (plain matmuls) under bf16 on "
                "CPU, where the fused kernel's bf16 backward is slow (docs/ppo.md, Speed), else the model's "
                "own; model = always the model's own; or eager / sdpa")
    sharding: Sharding = param(
        "none", SHARDING_HELP + "; all four models are sharded, the frozen reference and reward model for "
                "memory alone; the rollouts sample on the policy's gathered weights; needs engine.name=hf "
                "(docs/pipeline.md, \"Sharded training\")")

    def validate(self):
        check(not (self.sharding == "fsdp2" and self.lora.enabled),
              "train.sharding=fsdp2 with train.lora.rank > 0: sharding is for full fine-tuning (LoRA trains "
              "small adapters and its saves need the unsharded base); use one of them")
        check(not (self.lora.enabled and self.trainable_layers == 0),
              "train.trainable_layers=0 with train.lora.rank > 0 leaves no block for the adapters; use -1 or N >= 1")
        check(self.tis_cap == 0 or self.tis_cap >= 1,
              f"train.tis_cap must be 0 (off) or >= 1 (a cap below 1 shrinks every token), got {self.tis_cap}")
        check(self.advantage == "gae" or self.value_warmup_steps == 0,
              f"train.value_warmup_steps needs train.advantage=gae ({self.advantage} has no value model)")


@dataclass
class PPORun:
    checkpoint_every: int = param(10, "save a resumable checkpoint every N steps (and at the end)", min=1)
    keep_checkpoints: int = param(2, "how many recent checkpoints to keep", min=1)
    threads: int = param(0, "torch CPU threads; 0 = torch's default", min=0)
    deterministic: bool = param(False, "torch.use_deterministic_algorithms (bitwise-reproducible resume on CPU)")
    sample_every: int = param(10, "with a tracker: log one sampled prompt and response every N steps", min=1)


@dataclass
class PPOConfig:
    policy: str = param("", "initial policy: the SFT model folder; empty = embedded default")
    reference: str = param("", "frozen KL reference π_SFT; empty = the initial policy. Iterated rounds continue "
                               "from the last PPO policy but keep the SFT model here (Bai et al. 2022 §4)")
    reward_model: str = param("", "reward model folder (from `instructrl rm`)")
    value_model: str = param("", "value model initialisation; empty = the reward model (InstructGPT §3.5)")
    prompts: str = param("", "prompts JSONL ({id, prompt})")
    ptx_data: str = param("", "plain-text JSONL ({text}) for the PPO-ptx term; empty = plain PPO")
    output_dir: str = param("runs/ppo", "run folder: config, metrics, checkpoints, final policy/ and value/")
    overwrite: bool = overwrite_field()
    tracker: TrackerKind = tracker_field()
    out: str = param("", "deprecated: the old name of output_dir, accepted for one release")
    device: str = device_field()
    resume: bool = param(False, "continue from the latest checkpoint in output_dir (same config, same process count)")
    seed: int = param(0, "seed for prompt order, sampling and minibatch order", min=0, max=2**32 - 1)
    steps: int = param(100, "PPO steps (rollout batches)", min=1)
    rollout: PPORollout = param(PPORollout(), "sampling")
    kl: PPOKL = param(PPOKL(), "KL penalty against the reference (SFT) policy")
    train: PPOTrain = param(PPOTrain(), "optimisation")
    run: PPORun = param(PPORun(), "checkpoints and reproducibility")
    engine: EngineSettings = param(
        EngineSettings(name="auto"), "the rollouts' sampler: auto = vLLM where it is importable, else the built-in "
                                     "sampler; with vllm the trainer recomputes π_old itself and pushes the policy's "
                                     "weights into the engine after every update (docs/vllm.md, docs/ppo.md)")

    def finalize(self):
        if self.out:  # the run folder key was `out` before 0.2; every other command says output_dir
            import sys

            print(f"[instructrl] ppo: `out` is deprecated and will be removed; use output_dir={self.out}",
                  file=sys.stderr)
            self.output_dir, self.out = self.out, ""

    def validate(self):
        check(bool(self.prompts), "prompts: a prompts JSONL file is required")
        check(self.rollout.batch_size % self.train.minibatch_size == 0,
              f"rollout.batch_size ({self.rollout.batch_size}) must be a multiple of train.minibatch_size "
              f"({self.train.minibatch_size})")
        grouped = self.train.advantage != "gae" or self.train.drop_uninformative_groups
        check(not (self.train.sharding == "fsdp2" and self.engine.name == "vllm"),
              f"train.sharding=fsdp2 with engine.name=vllm: {SHARDED_VLLM}; use engine.name=hf")
        check(not grouped or self.rollout.samples_per_prompt >= 2,
              f"train.advantage={self.train.advantage} / train.drop_uninformative_groups need "
              f"rollout.samples_per_prompt >= 2 (a response is compared with the other samples of its prompt)")


# ---------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------


def sharding_note(tc: PPOTrain, world: int, models) -> str:
    """The start line's part on ``train.sharding`` (empty when it is off)."""
    if tc.sharding != "fsdp2":
        return ""
    if not models.sharded:
        return f"; {ONE_PROCESS_FSDP2}"
    off = "; train.share_frozen_blocks off (sharded)" if tc.share_frozen_blocks and tc.trainable_layers >= 0 else ""
    return f"; sharding: fsdp2 over {world} processes ({', '.join(models.names)}){off}"


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """Run PPO(-ptx); returns the run folder. ``reward_fn`` replaces the reward model (tests, scripted rewards)."""
    from tqdm import tqdm

    from instructrl.engines import engine_for, resolve_engine
    from instructrl.io import RunDir

    rc, tc = cfg.rollout, cfg.train
    if reward_fn is None and not cfg.reward_model:
        raise ConfigError("reward_model: a reward model folder is required")
    set_threads(cfg.run.threads, "run.threads")
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    rt = make_runtime(cfg.device, tc.precision)
    tc.precision = rt.precision  # saved resolved, so the run folder says what ran
    cfg.engine, engine_why = resolve_engine(cfg.engine)  # auto -> vllm or hf, saved resolved too
    use_vllm = cfg.engine.name == "vllm"
    # fp32 sampling logits equal a fresh forward's up to rounding; under bf16 they do not. Another
    # engine's log-probs (vLLM) are never π_old: its kernels differ, and the ratio must start at 1.
    reuse_logprobs = not use_vllm and (rc.old_logprobs == "sampling" or
                                       (rc.old_logprobs == "auto" and rt.amp_dtype is None))
    dist = make_dist(cfg, rt)
    sharded = tc.sharding == "fsdp2" and dist.world > 1
    if sharded and use_vllm:  # engine.name=auto found vllm installed
        raise ConfigError(f"train.sharding=fsdp2: {engine_why}, and {SHARDED_VLLM}; set engine.name=hf")

    # --- set-up: run folder, models, data, optimizers; a resumed run continues from its checkpoint ---
    run = RunDir.start(cfg.output_dir, cfg, resume=cfg.resume, overwrite=cfg.overwrite,
                       outputs=("policy", "value", "policy_adapter", "value_adapter", "reward_vs_sqrt_kl.png"), is_main=dist.is_main)
    ckpt = latest_checkpoint(run.checkpoints) if cfg.resume else None
    if cfg.resume and ckpt is None:
        run.info("resume requested but no checkpoint found: starting from step 0")
    models = load_models(cfg, rt, ckpt, scripted_reward=reward_fn is not None,
                         mesh=dist.device_mesh(rt.device) if sharded else None)
    data = load_data(cfg, models.tok)
    opts = make_optimisers(cfg, models)
    # frozen fp32 weights cast to bf16 once per update, not at every micro-batch's forward (autocast keeps
    # copies only of weights that require grad); not under LoRA (the frozen base is the whole model) or FSDP2
    frozen_cast = rt.amp_dtype if models.ref is not None and not sharded else None
    torch.manual_seed(cfg.seed)
    progress = restore(ckpt, opts, dist) if ckpt else Progress()
    # vLLM: one engine per process, started from the policy's folder and synced from the (restored)
    # in-memory policy before the first rollout; a LoRA policy is pushed merged
    engine = engine_for(models.policy, models.tok, cfg.engine, rt.precision) if use_vllm else None
    if ckpt:  # metrics written after the checkpoint belong to steps that will be redone
        if dist.is_main:
            from instructrl.io import write_jsonl

            write_jsonl(run.path / "metrics.jsonl", [r for r in run.read_metrics() if r["step"] <= progress.step])
        run.info(f"resumed from {ckpt.name} (step {progress.step})")
    share = rc.batch_size // dist.world
    run.info(f"{len(data.prompt_ids)} prompts ({data.prompts_cut} cut from the left to {rc.max_prompt_tokens} tokens); "
             + (f"PPO-ptx with γ={tc.ptx_coef} on {len(data.ptx_ids)} texts" if data.ptx_ids else "plain PPO")
             + f"; {dist.world} process(es), {share} episodes each per step on {rt.device} ({rt.precision})"
             + f"; old log-probs {'from sampling' if reuse_logprobs else 'recomputed'}; advantages: {tc.advantage}"
             + f"; {engine_why}" + (f", TIS cap {tc.tis_cap}" if use_vllm and tc.tis_cap else "")
             + f"; training attention: {models.train_attention or 'model default'}"
             + (f"; lower {models.share} blocks shared by all models" if models.share else "")
             + sharding_note(tc, dist.world, models))
    if tc.tis_cap and not use_vllm:
        run.info("train.tis_cap has no effect with the built-in sampler (it samples with the trainer's own numerics)")
    kill_after = int(os.environ.get(KILL_ENV, "-1"))

    bar = tqdm(total=cfg.steps, initial=progress.step, desc="ppo", dynamic_ncols=True, disable=not dist.is_main)
    policy_steps = all_skipped = 0  # this run's steps that train the policy, and those whose every update was skipped
    while progress.step < cfg.steps:
        t0 = time.perf_counter()
        # 1. rollout: this process's contiguous share of the global batch (whole groups of k)
        mine = dist.local_rows(rc.batch_size)
        idx = step_prompts(cfg, data, progress)[mine]
        progress.prompt_pos += rc.batch_size // rc.samples_per_prompt
        g = generate_trajectory(cfg, models, [data.prompt_ids[i] for i in idx], range(mine.start, mine.stop),
                                progress.step, rt, reuse_logprobs, engine)
        t1 = time.perf_counter()
        # 2. score (no grad)
        scored = score_trajectory(cfg, models, g, rt, reuse_logprobs, reward_fn)
        t2 = time.perf_counter()
        # 3 + 4. KL-shaped rewards and advantages over the global batch
        batch, masks, stats = compute_advantages(cfg, g, scored, opts.kl_ctl.value, dist)
        # 5. PPO epochs over minibatches
        skipped_before = progress.skipped["policy"]
        with frozen_linears_cast(frozen_cast, *models.trained):  # cast once per update, bitwise the same
            up = ppo_update(cfg, models, opts, batch, masks, scored.lower, data, progress, rt, dist)
        policy_steps += up.policy_updated
        all_skipped += up.policy_updated and progress.skipped["policy"] - skipped_before == up.updates
        opts.kl_ctl.update(stats.seq_kl, rc.batch_size)
        progress.step += 1
        t3 = time.perf_counter()
        times = {"generate": t1 - t0, "score": t2 - t1, "train": t3 - t2}
        if engine is not None and up.policy_updated:  # the next rollout samples the updated policy
            engine.sync_weights(models.policy)
            times["sync"] = time.perf_counter() - t3
        # 6. log, checkpoint
        row = metrics_row(progress, stats, up, opts, times, dist.world, share)
        run.log_metrics(row)
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}", skipped=sum(progress.skipped.values()))
        if not all(map(math.isfinite, (row["score"], row["pg_loss"]))):
            run.info(f"step {progress.step}: non-finite score/loss; updates skipped so far {progress.skipped}")
        if progress.step % cfg.run.sample_every == 0 and run.tracker is not None:
            from instructrl.generation import decode_responses

            prompt = models.tok.decode(g.query[0][g.query_mask[0].bool()])
            answer = decode_responses(models.tok, g.response[:1], g.response_mask[:1])[0]
            run.log_text("samples", f"{prompt}\n---\n{answer}\n---\nscore {float(scored.scores[0]):.3f}", progress.step)
        if progress.step % cfg.run.checkpoint_every == 0 or progress.step == cfg.steps:
            save_checkpoint(run.checkpoints, models, opts, progress, dist, cfg.run.keep_checkpoints)
        if progress.step == kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    check_trainable(all_skipped, policy_steps, "ppo", tc.lr, cfg.prompts)  # never save a policy that never moved

    save_final(run.path, models, dist)  # every process: a sharded model is gathered first
    if dist.is_main:
        from instructrl.plots import plot_reward_vs_sqrt_kl, reward_vs_sqrt_kl

        plot_reward_vs_sqrt_kl({"ppo": reward_vs_sqrt_kl(run.read_metrics())}, run.path / "reward_vs_sqrt_kl.png")
    run.info(f"done: {progress.step} steps, skipped updates {progress.skipped}")
    run.close()
    return run.path
