"""PPO and PPO-ptx against a reward model (InstructGPT §3.5, equation 2).

    objective(φ) = E_{(x,y)~π_φ}[ r_θ(x, y) − β log(π_φ(y|x) / π_SFT(y|x)) ] + γ E_{x~D_pretrain}[ log π_φ(x) ]

``train_ppo`` is the whole algorithm, top to bottom, one numbered phase per step:

    1 rollout   sample one response per prompt (KV cache, left padding, stop at EOS)
    2 score     policy and reference log-probs, value estimates, reward-model score
    3 reward    −β·KL at every token + the RM score at the last token
    4 advantage GAE (γ, λ) then whitening over the batch
    5 optimise  PPO epochs over minibatches: clipped policy loss (+ γ·ptx), clipped value loss
    6 log       metrics.jsonl, progress bar, checkpoint every N steps

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
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from instructrl.core import rl_math
from instructrl.config import ConfigError, check, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.core.losses import ppo_policy_loss, ppo_value_loss, ptx_loss
from instructrl.core.tensors import append_eos, gather_logprobs, position_ids
from instructrl.rollout import Generation, Rollout, sample
from instructrl.scoring import micro_batches, response_logits, response_values, window

# A scripted reward for tests and experiments: (query [B,P], response [B,R], response_mask [B,R]) -> scores [B].
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Fault injection for the crash test: SIGKILL this process right after finishing this step.
KILL_ENV = "INSTRUCTRL_PPO_KILL_AFTER_STEP"


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


@dataclass
class PPORollout:
    batch_size: int = param(16, "episodes (sampled responses) per PPO step")
    samples_per_prompt: int = param(
        1, "responses sampled per prompt in a step: a step sees batch_size / samples_per_prompt distinct prompts. "
           "train.advantage=rloo needs >= 2 (its baseline is the other samples of the same prompt)")
    max_prompt_tokens: int = param(256, "prompts longer than this are cut from the left (latest turns kept)")
    max_new_tokens: int = param(64, "response length limit")
    temperature: float = param(1.0, "sampling temperature (InstructGPT samples at T = 1)")
    top_k: int = param(0, "sample from the k most likely tokens; 0 = full distribution (needed for an honest KL)")
    old_logprobs: Literal["auto", "sampling", "recompute"] = param(
        "auto", "π_old log-probs: 'sampling' reuses the logits sampling computed (TRL's way; saves one policy "
                "forward per step), 'recompute' runs a fresh forward (ratio exactly 1 at the first update); "
                "auto = sampling under fp32, where both agree to ~1e-6, recompute under bf16")
    missing_eos_penalty: float | None = param(
        None, "subtract this from the score of responses that hit max_new_tokens without EOS (TRL's trick); "
              "null = no penalty")
    rm_eos: bool = param(
        True, "the RM scores a response cut off at max_new_tokens with EOS appended, as the finished (if bad) answer "
              "a labeler would judge: reward models are trained on answers that end in EOS (every ranked response "
              "does), so a score read at a mid-sentence token is out of distribution. false = score the last "
              "generated token (TRL's way)")

    def validate(self):
        check(self.batch_size >= 1, "rollout.batch_size must be >= 1")
        check(self.samples_per_prompt >= 1 and self.batch_size % self.samples_per_prompt == 0,
              f"rollout.samples_per_prompt ({self.samples_per_prompt}) must be >= 1 and divide rollout.batch_size "
              f"({self.batch_size})")
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
        check(self.max_prompt_tokens >= 1, "rollout.max_prompt_tokens must be >= 1")
        check(self.temperature > 0, "rollout.temperature must be > 0")
        check(self.top_k >= 0, "rollout.top_k must be >= 0")


@dataclass
class PPOKL:
    coef: float = param(0.02, "β, the KL penalty coefficient (InstructGPT: 0.02); initial value if adaptive")
    estimator: Literal["k1", "k3"] = param("k1", "per-token KL estimator: k1 = log π/π_SFT (the paper's), k3 = always >= 0")
    adaptive: bool = param(False, "adapt β toward kl.target (Ziegler et al. 2019); false = fixed β (InstructGPT)")
    target: float = param(6.0, "target KL per sequence (nats) for the adaptive controller")
    horizon: int = param(10000, "adaptive controller horizon in episodes (Ziegler et al. 2019)")
    reward_clip: float | None = param(None, "clip the RM score to [-c, c] before shaping; null = no clipping")

    def validate(self):
        check(self.coef >= 0, "kl.coef must be >= 0")
        check(self.target > 0 and self.horizon > 0, "kl.target and kl.horizon must be > 0")
        check(self.reward_clip is None or self.reward_clip > 0, "kl.reward_clip must be > 0 or null")


@dataclass
class PPOTrain:
    epochs: int = param(1, "PPO epochs per rollout batch; 1 because DeepSpeed-Chat reports more were unstable")
    minibatch_size: int = param(8, "episodes per optimizer step (rollout.batch_size must be a multiple)")
    micro_batch_size: int = param(4, "sequences per forward/backward; sorted by length and trimmed to cut padding")
    score_batch_size: int = param(16, "sequences per forward in the no-grad scoring phase (old/reference "
                                      "log-probs, values, RM); it keeps no activations, so it can exceed "
                                      "micro_batch_size: fewer, fuller matmuls (TRL: local_rollout_forward_batch_size)")
    lr: float = param(1e-6, "policy learning rate (Adam)")
    value_lr: float = param(1e-5, "value model learning rate (Adam)")
    warmup_steps: int = param(10, "linear LR warm-up in PPO steps, from lr/10 (InstructGPT: 10 iterations)")
    weight_decay: float = param(0.0, "AdamW weight decay")
    max_grad_norm: float = param(1.0, "gradient clipping (each model separately)")
    value_warmup_steps: int = param(0, "the first N of `steps` train only the value model: the policy samples and is "
                                          "scored but does not move, so that its first advantages come from a critic "
                                          "that has seen the reward (veRL's critic_warmup). An RM-initialised critic "
                                          "starts with negative explained variance (docs/ppo.md)")
    advantage: Literal["gae", "rloo"] = param(
        "gae", "gae = a value model (initialised from the RM) and GAE, as InstructGPT; rloo = critic-free REINFORCE "
               "leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): a response's advantage is its return "
               "(score − β·ΣKL) minus the mean return of the other samples of its prompt, at every token; no value "
               "model is loaded, run or trained. Needs rollout.samples_per_prompt >= 2")
    gamma: float = param(1.0, "GAE discount; 1 = no discounting (one bandit episode per response)")
    lam: float = param(0.95, "GAE λ")
    cliprange: float = param(0.2, "PPO ratio clip ε (Schulman et al. 2017)")
    cliprange_value: float = param(0.2, "value clip ε_v")
    whiten_advantages: bool = param(True, "normalise advantages over the batch")
    ptx_coef: float = param(
        1.0, "γ of PPO-ptx, weight of one pretraining token's NLL against one RL token's loss; used only with "
             "ptx_data (no ptx_data or 0 = plain PPO). The paper's 27.8 is in its own scale, see docs/ppo.md")
    ptx_batch_size: int = param(4, "plain-text sequences per minibatch for the ptx term")
    ptx_max_tokens: int = param(256, "pretraining sequences are cut to this many tokens")
    precision: Precision = precision_field()
    trainable_layers: int = param(-1, "train only the top N blocks (+ final norm, value head) of policy and value model; -1 = all")
    share_frozen_blocks: bool = param(
        True, "with trainable_layers: run the lower blocks that policy, reference, RM and value model hold "
              "bitwise equal and frozen (all started from one SFT model) once per sequence, and reuse that "
              "hidden state in scoring and training (docs/ppo.md, Speed); false = every model runs every block")
    attention: Literal["auto", "model", "eager", "sdpa"] = param(
        "auto", "attention kernel of the training forward/backward: auto = eager (plain matmuls) under bf16 on "
                "CPU, where the fused kernel's bf16 backward is slow (docs/ppo.md, Speed), else the model's "
                "own; model = always the model's own; or eager / sdpa")

    def validate(self):
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.value_warmup_steps >= 0, "train.value_warmup_steps must be >= 0")
        check(self.advantage == "gae" or self.value_warmup_steps == 0,
              "train.value_warmup_steps needs train.advantage=gae (rloo has no value model)")
        check(self.trainable_layers >= -1, "train.trainable_layers must be -1 (all) or >= 0")
        check(self.minibatch_size >= 1 and self.micro_batch_size >= 1 and self.score_batch_size >= 1,
              "train.minibatch_size/micro_batch_size/score_batch_size must be >= 1")
        check(self.lr > 0 and self.value_lr > 0, "train.lr and train.value_lr must be > 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "train.gamma and train.lam must be in [0, 1]")
        check(self.cliprange > 0 and self.cliprange_value > 0, "train.cliprange and cliprange_value must be > 0")
        check(self.ptx_coef >= 0, "train.ptx_coef must be >= 0")
        check(self.max_grad_norm > 0, "train.max_grad_norm must be > 0")


@dataclass
class PPORun:
    checkpoint_every: int = param(10, "save a resumable checkpoint every N steps (and at the end)")
    keep_checkpoints: int = param(2, "how many recent checkpoints to keep")
    threads: int = param(0, "torch CPU threads; 0 = torch's default")
    deterministic: bool = param(False, "torch.use_deterministic_algorithms (bitwise-reproducible resume on CPU)")


@dataclass
class PPOConfig:
    policy: str = param("", "initial policy: the SFT model folder; empty = embedded default")
    reference: str = param("", "frozen KL reference π_SFT; empty = the initial policy. Iterated rounds continue "
                               "from the last PPO policy but keep the SFT model here (Bai et al. 2022 §4)")
    reward_model: str = param("", "reward model folder (from `instructrl reward`)")
    value_model: str = param("", "value model initialisation; empty = the reward model (InstructGPT §3.5)")
    prompts: str = param("", "prompts JSONL ({id, prompt})")
    ptx_data: str = param("", "plain-text JSONL ({text}) for the PPO-ptx term; empty = plain PPO")
    out: str = param("runs/ppo", "run folder: config, metrics, checkpoints, final policy/ and value/")
    device: str = device_field()
    resume: bool = param(False, "continue from the latest checkpoint in `out`")
    seed: int = param(0, "seed for prompt order, sampling and minibatch order")
    steps: int = param(100, "PPO steps (rollout batches)")
    rollout: PPORollout = param(PPORollout(), "sampling")
    kl: PPOKL = param(PPOKL(), "KL penalty against the reference (SFT) policy")
    train: PPOTrain = param(PPOTrain(), "optimisation")
    run: PPORun = param(PPORun(), "checkpoints and reproducibility")

    def validate(self):
        check(bool(self.prompts), "prompts: a prompts JSONL file is required")
        check(self.steps >= 1, "steps must be >= 1")
        check(self.rollout.batch_size % self.train.minibatch_size == 0,
              f"rollout.batch_size ({self.rollout.batch_size}) must be a multiple of train.minibatch_size "
              f"({self.train.minibatch_size})")
        check(self.train.advantage != "rloo" or self.rollout.samples_per_prompt >= 2,
              "train.advantage=rloo needs rollout.samples_per_prompt >= 2 (the baseline of a response is the "
              "mean return of the other samples of its prompt)")


# ---------------------------------------------------------------------------
# Helpers (each a small piece of one phase)
# ---------------------------------------------------------------------------


def stream_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items ``start .. start+count`` of an endless stream of shuffled passes over ``n`` items.

    Pass e is ``randperm(n)`` seeded by (seed, e), so the position alone (a single
    integer, saved in checkpoints) determines everything that comes next.
    """
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out














def warmup_schedule(optimizer, warmup: int):
    """Linear warm-up from lr/10 over ``warmup`` PPO steps, then constant (InstructGPT App. C)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if warmup <= 0 or s >= warmup else 0.1 + 0.9 * s / warmup)


def rng_state(gen: torch.Generator) -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "generation": gen.get_state()}


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    gen.set_state(state["generation"])


def drop_stale_quantization(model):
    """Forget a ``quantization_config`` left in config.json by the GGUF conversion.

    The converted default model holds plain fp32 weights, but its config still
    says ``quant_method: gguf``, which makes ``save_pretrained`` refuse to save.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        q = model.config.quantization_config
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        if str(getattr(method, "value", method)) == "gguf":
            del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
    return model


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob("step-*") if (p / "state.pt").exists())
    return found[-1] if found else None


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(run, step: int, policy, value_model, state: dict, keep: int) -> Path:
    """policy/, value/ (none under rloo) and state.pt, built under a temporary name and renamed into place."""
    from instructrl.io import atomic_dir

    # Updates with non-finite values are skipped, so this never fires; it guards the guarantee.
    if not (all_finite(policy) and (value_model is None or all_finite(value_model))):
        raise RuntimeError(f"step {step}: non-finite weights; refusing to write a checkpoint")
    final = run.checkpoints / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        policy.save_pretrained(tmp / "policy", safe_serialization=True)
        if value_model is not None:
            value_model.save_pretrained(tmp / "value", safe_serialization=True)
        torch.save(state, tmp / "state.pt")
    import shutil

    for old in sorted(run.checkpoints.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def plot_reward_vs_sqrt_kl(rows: list[dict], path: Path) -> Path | None:
    """Mean RM score against √KL per step (Bai et al. 2022 report a roughly linear relation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(math.sqrt(max(r["kl"], 0.0)), r["score"]) for r in rows if math.isfinite(r.get("score", math.nan))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
    ax.set_xlabel("√KL(π_RL ‖ π_SFT)  [√nats]")
    ax.set_ylabel("mean RM score")
    ax.set_title("reward vs √KL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# The algorithm
# ---------------------------------------------------------------------------


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """Run PPO(-ptx); returns the run folder. ``reward_fn`` replaces the reward model (tests, scripted rewards)."""
    from tqdm import tqdm

    from instructrl.data import load_prompts, load_text_corpus
    from instructrl.formatting import TruncationStats, encode_prompt_for_sampling
    from instructrl.io import RunDir, atomic_dir
    from instructrl.models import (attention_implementation, autocast_weight_cache, freeze_lower_layers, load_causal_lm,
                                   load_tokenizer, lower_hidden, make_adamw, resolve_model, shared_frozen_blocks)
    from instructrl.reward_model import init_reward_model, load_reward_model, score as rm_score

    rc, kc, tc = cfg.rollout, cfg.kl, cfg.train
    if reward_fn is None and not cfg.reward_model:
        raise ConfigError("reward_model: a reward model folder is required")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    rt = make_runtime(cfg.device, tc.precision)
    tc.precision = rt.precision  # saved resolved, so the run folder says what ran
    amp = rt.amp_dtype
    reuse_logprobs = rc.old_logprobs == "sampling" or (rc.old_logprobs == "auto" and amp is None)

    autocast = rt.autocast

    # --- models: policy (trained), reference (frozen SFT), reward (frozen), value (trained, init from RM) ---
    # A resumed run loads the trained policy and value model from its checkpoint; the rest from the config.
    run = RunDir(cfg.out)
    torch.manual_seed(cfg.seed)  # a fresh value head is drawn from the global RNG: same seed, same head
    ckpt = latest_checkpoint(run.checkpoints) if cfg.resume else None
    policy_path = resolve_model(cfg.policy or None)
    tok = load_tokenizer(policy_path)
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    policy = load_causal_lm(str(ckpt / "policy") if ckpt else policy_path)
    ref = load_causal_lm(resolve_model(cfg.reference) if cfg.reference else policy_path).eval().requires_grad_(False)
    rm = None if reward_fn is not None else load_reward_model(cfg.reward_model).eval().requires_grad_(False)
    critic = tc.advantage == "gae"  # rloo needs no value model
    if not critic:
        value_model = None
    elif ckpt:
        value_model = load_reward_model(ckpt / "value")
    elif cfg.value_model or cfg.reward_model:
        value_model = load_reward_model(cfg.value_model or cfg.reward_model)
    else:  # a scripted reward has no weights: a fresh scalar head on the SFT trunk
        value_model = init_reward_model(policy_path)
    trained = [m for m in (policy, value_model) if m is not None]
    for m in trained:
        drop_stale_quantization(m)
        freeze_lower_layers(m, tc.trainable_layers)
    # blocks 0..share-1: the same frozen weights in every model, run once per sequence (docs/ppo.md, Speed)
    share = 0
    if tc.share_frozen_blocks and tc.trainable_layers >= 0:
        share = shared_frozen_blocks([m for m in (policy, ref, rm, value_model) if m is not None], trained)
    train_attention = {"model": None, "auto": None}.get(tc.attention, tc.attention)
    if tc.attention == "auto" and amp is not None and next(policy.parameters()).device.type == "cpu":
        train_attention = "eager"
    policy_opt = make_adamw([p for p in policy.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
    policy_sched = warmup_schedule(policy_opt, tc.warmup_steps)
    value_opt = value_sched = None
    if critic:
        value_opt = make_adamw([p for p in value_model.parameters() if p.requires_grad], tc.value_lr, tc.weight_decay)
        value_sched = warmup_schedule(value_opt, tc.warmup_steps)
    kl_ctl = rl_math.KLController(kc.coef, kc.adaptive, kc.target, kc.horizon)

    # --- data: prompts (token ids, left-truncated) and optional pretraining text for PPO-ptx ---
    records = load_prompts(cfg.prompts)
    trunc = TruncationStats()
    prompt_ids = []
    for rec in records:
        prompt_ids.append(encode_prompt_for_sampling(tok, rec.messages, rc.max_prompt_tokens, trunc))
    ptx_ids = []
    if cfg.ptx_data and tc.ptx_coef > 0:
        ptx_ids = [tok(t, add_special_tokens=False)["input_ids"][: tc.ptx_max_tokens]
                   for t in load_text_corpus(cfg.ptx_data)]
        ptx_ids = [x for x in ptx_ids if len(x) >= 2]
        if not ptx_ids:
            raise ConfigError(f"ptx_data: {cfg.ptx_data} has no text of 2 or more tokens")
    run.info(f"{len(prompt_ids)} prompts ({trunc.prompts_cut} cut from the left to {rc.max_prompt_tokens} tokens); "
             + (f"PPO-ptx with γ={tc.ptx_coef} on {len(ptx_ids)} texts" if ptx_ids else "plain PPO (no ptx term)")
             + f"; old log-probs {'from sampling' if reuse_logprobs else 'recomputed'}"
             + f"; advantages: {tc.advantage}" + (f" over {rc.samples_per_prompt} samples per prompt" if not critic else "")
             + f"; training attention: {train_attention or 'model default'}"
             + (f"; lower {share} blocks shared by all models, run once per sequence" if share else ""))

    # --- state that checkpoints carry ---
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    step, prompt_pos, ptx_pos, skipped = 0, 0, 0, {"policy": 0, "value": 0}
    if ckpt is not None:
        st = torch.load(ckpt / "state.pt", weights_only=False)
        policy_opt.load_state_dict(st["policy_opt"])
        policy_sched.load_state_dict(st["policy_sched"])
        if critic:
            value_opt.load_state_dict(st["value_opt"])
            value_sched.load_state_dict(st["value_sched"])
        kl_ctl.load_state_dict(st["kl_ctl"])
        set_rng_state(st["rng"], gen)
        step, prompt_pos, ptx_pos, skipped = st["step"], st["prompt_pos"], st["ptx_pos"], st["skipped"]
        # metrics written after the checkpoint belong to steps that will be redone
        rows = [r for r in run.read_metrics() if r["step"] <= step]
        from instructrl.io import write_jsonl

        write_jsonl(run.path / "metrics.jsonl", rows)
        run.info(f"resumed from {ckpt.name} (step {step})")
    elif cfg.resume:
        run.info("resume requested but no checkpoint found: starting from step 0")
    run.save_config(cfg)
    kill_after = int(os.environ.get(KILL_ENV, "-1"))

    bar = tqdm(total=cfg.steps, initial=step, desc="ppo", dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.perf_counter()
        B = rc.batch_size

        # ---- 1. rollout: samples_per_prompt responses per prompt (adjacent rows), from the current policy ----
        k = rc.samples_per_prompt
        idx = [i for i in stream_indices(len(prompt_ids), prompt_pos, B // k, cfg.seed) for _ in range(k)]
        prompt_pos += B // k
        policy.eval()
        g = sample(policy, [prompt_ids[i] for i in idx], rc.max_new_tokens, eos_id, pad_id, gen,
                   rc.temperature, rc.top_k, amp, return_logprobs=reuse_logprobs)
        policy.train()
        mask = g.response_mask  # [B, R]
        R = mask.shape[1]
        t1 = time.perf_counter()

        # ---- 2. score: old log-probs, reference log-probs, entropy, values, RM score (no grad) ----
        logprobs, ref_logprobs, entropy, values = (torch.zeros(B, R) for _ in range(4))
        scores = torch.zeros(B)
        P = g.query.shape[1]
        # the shared lower blocks' output for every sequence, in the rollout's columns (+1 for the RM's EOS)
        lower_all = torch.zeros(B, P + R + 1, policy.config.hidden_size) if share else None
        scoring_models = [m for m in (policy, ref, value_model, rm) if m is not None] if amp is not None else []
        with torch.no_grad(), autocast_weight_cache(*scoring_models), autocast():  # no_grad: see rollout.sample
            for rows, p, r in micro_batches(torch.arange(B), g.query_mask, mask, tc.score_batch_size):
                ids, am = window(g, rows, p, r)
                rm_ids, rm_am = (append_eos(ids, am, g.ended[rows], eos_id, pad_id) if rm is not None and rc.rm_eos
                                 else (ids, am))
                low = rm_low = None
                if share:  # causal: the first columns of the RM's input give everyone else's hidden state
                    h = lower_hidden(ref, rm_ids, rm_am, share)
                    lower_all[rows, P - p: P - p + h.shape[1]] = h.float()
                    low, rm_low = (h[:, :ids.shape[1]], share), (h, share)
                tokens = g.response[rows, :r]
                if reuse_logprobs:
                    logprobs[rows, :r], entropy[rows, :r] = g.logprobs[rows, :r], g.entropy[rows, :r]
                else:
                    logprobs[rows, :r], entropy[rows, :r] = rl_math.logprobs_and_entropy(
                        response_logits(policy, ids, am, r, rc.temperature, low), tokens)
                ref_logprobs[rows, :r] = gather_logprobs(response_logits(ref, ids, am, r, rc.temperature, low),
                                                         tokens)
                if critic:
                    values[rows, :r] = response_values(value_model, ids, am, r, low).float()
                if rm is not None:
                    scores[rows] = rm_score(rm, rm_ids, rm_am, rm_low).float()
        if reward_fn is not None:
            scores = reward_fn(g.query, g.response, mask).float()
        if rc.missing_eos_penalty is not None:
            scores = torch.where(g.ended, scores, scores - rc.missing_eos_penalty)
        logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask
        t2 = time.perf_counter()

        # ---- 3. KL-shaped reward: −β·KL per token, RM score added at the last token (eq. 2) ----
        kl = rl_math.kl_per_token(logprobs, ref_logprobs, kc.estimator) * mask
        beta = kl_ctl.value
        rewards, reward_stats = rl_math.shape_rewards(scores, kl, mask, beta, kc.reward_clip)

        # ---- 4. advantages: GAE (or RLOO's leave-one-out baseline), then whitening over the batch ----
        if critic:
            advantages, returns = rl_math.gae(rewards, values, mask, tc.gamma, tc.lam)
        else:
            advantages = rl_math.rloo_advantages(rewards, mask, k)
            returns = advantages  # = A + V with V = 0; no value model reads it
        if tc.whiten_advantages:
            advantages = rl_math.whiten(advantages, mask)
        batch = Rollout(g.query, g.query_mask, g.response, mask, g.ended, logprobs, ref_logprobs, values,
                        scores, kl, rewards, advantages, returns)

        # ---- 5. PPO epochs over minibatches: policy (+ γ·ptx) and value model ----
        acc = {k: 0.0 for k in ("pg_loss", "vf_loss", "ptx_loss", "clipfrac", "approx_kl", "vf_clipfrac", "tokens")}
        n_updates = 0
        move_policy = step >= tc.value_warmup_steps  # critic warm-up: value model only
        mb_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _epoch in range(tc.epochs):
            perm = torch.randperm(B, generator=mb_gen)
            for start in range(0, B, tc.minibatch_size):
                mb_rows = perm[start: start + tc.minibatch_size]
                n_tok = batch.response_mask[mb_rows].sum()
                for opt in (policy_opt, value_opt):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                pg_total = vf_total = ptx_total = 0.0
                # One autocast context per optimizer step: autocast casts each weight to bf16 once and
                # reuses the copy for every micro-batch (its cache lives as long as the context); the
                # weights only change at the step below, outside it. Gradients are bitwise the same.
                with autocast(), attention_implementation(train_attention, *trained):
                    for rows, p, r in micro_batches(mb_rows, batch.query_mask, batch.response_mask, tc.micro_batch_size):
                        ids, am = window(batch, rows, p, r)
                        m = batch.response_mask[rows, :r]
                        low = (lower_all[rows, P - p: P + r], share) if share else None  # frozen: no grad needed
                        if move_policy:
                            lp = gather_logprobs(response_logits(policy, ids, am, r, rc.temperature, low),
                                                 batch.response[rows, :r])
                            pg, pst = ppo_policy_loss(lp, batch.logprobs[rows, :r], batch.advantages[rows, :r], m,
                                                      tc.cliprange, n_tok)
                            pg.backward()
                            pg_total += float(pg.detach())
                            for k in ("clipfrac", "approx_kl"):
                                acc[k] += float(pst[k])
                        if critic:
                            v = response_values(value_model, ids, am, r, low).float()
                            vf, vst = ppo_value_loss(v, batch.values[rows, :r], batch.returns[rows, :r], m,
                                                     tc.cliprange_value, n_tok)
                            vf.backward()
                            vf_total += float(vf.detach())
                            acc["vf_clipfrac"] += float(vst["vf_clipfrac"])
                        acc["tokens"] += float(m.sum())
                    if ptx_ids and move_policy:  # PPO-ptx: γ · NLL on a batch of pretraining text, same optimizer step
                        texts = [ptx_ids[i] for i in stream_indices(len(ptx_ids), ptx_pos, tc.ptx_batch_size, cfg.seed + 1)]
                        ptx_pos += tc.ptx_batch_size
                        from instructrl.formatting import pad as pad_ids

                        n_ptx = sum(len(t) - 1 for t in texts)
                        for i in range(0, len(texts), tc.micro_batch_size):
                            ids, am = pad_ids(texts[i: i + tc.micro_batch_size], pad_id, "right")
                            lm = am.float()
                            lm[:, 0] = 0
                            out = policy(input_ids=ids, attention_mask=am, use_cache=False)
                            pt, _ = ptx_loss(out.logits, ids, lm, n_ptx)
                            (tc.ptx_coef * pt).backward()  # the γ·L_ptx half of losses.ppo_ptx_objective
                            ptx_total += float(pt.detach())
                # non-finite loss or gradient: skip that model's update, count it, never save it
                pol_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm)
                if move_policy:
                    if math.isfinite(pg_total + ptx_total) and bool(torch.isfinite(pol_norm)):
                        policy_opt.step()
                    else:
                        skipped["policy"] += 1
                if critic:
                    val_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), tc.max_grad_norm)
                    if math.isfinite(vf_total) and bool(torch.isfinite(val_norm)):
                        value_opt.step()
                    else:
                        skipped["value"] += 1
                    value_opt.zero_grad(set_to_none=True)
                policy_opt.zero_grad(set_to_none=True)
                acc["pg_loss"] += pg_total
                acc["vf_loss"] += vf_total
                acc["ptx_loss"] += ptx_total
                n_updates += 1
        if move_policy:  # the policy's LR warm-up starts when the policy does
            policy_sched.step()
        if critic:
            value_sched.step()
        seq_kl = float(kl.sum(1).mean())
        kl_ctl.update(seq_kl, B)
        step += 1
        t3 = time.perf_counter()

        # ---- 6. log, checkpoint ----
        toks = float(mask.sum())
        row = {
            "step": step,
            "score": float(scores.mean()),
            "kl": seq_kl,
            "beta": beta,
            "non_score_reward": float(reward_stats["non_score_reward"]),
            "entropy": float(rl_math.masked_mean(entropy, mask)),
            "clipfrac": acc["clipfrac"] / max(acc["tokens"], 1),
            "approx_kl": acc["approx_kl"] / max(acc["tokens"], 1),
            "vf_clipfrac": acc["vf_clipfrac"] / max(acc["tokens"], 1),
            "explained_variance": float(rl_math.explained_variance(values, returns, mask)) if critic else None,
            "response_length": toks / B,
            "missing_eos": float((~g.ended).float().mean()),
            "pg_loss": acc["pg_loss"] / n_updates,
            "vf_loss": acc["vf_loss"] / n_updates,
            "ptx_loss": acc["ptx_loss"] / n_updates,
            "policy_updated": move_policy,
            "skipped_policy_updates": skipped["policy"],
            "skipped_value_updates": skipped["value"],
            "lr": policy_sched.get_last_lr()[0],
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_train": t3 - t2,
            "tokens_per_s": toks / (t3 - t0),
        }
        run.log_metrics(row)
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}", skipped=sum(skipped.values()))
        if not math.isfinite(row["score"]) or not math.isfinite(row["pg_loss"]):
            run.info(f"step {step}: non-finite score/loss; updates skipped so far {skipped}")
        if step % cfg.run.checkpoint_every == 0 or step == cfg.steps:
            state = {
                "step": step, "prompt_pos": prompt_pos, "ptx_pos": ptx_pos, "skipped": dict(skipped),
                "policy_opt": policy_opt.state_dict(), "policy_sched": policy_sched.state_dict(),
                **({"value_opt": value_opt.state_dict(), "value_sched": value_sched.state_dict()} if critic else {}),
                "kl_ctl": kl_ctl.state_dict(), "rng": rng_state(gen),
            }
            save_checkpoint(run, step, policy, value_model, state, cfg.run.keep_checkpoints)
        if step == kill_after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    with atomic_dir(run.path / "policy") as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    if critic:
        with atomic_dir(run.path / "value") as tmp:
            value_model.save_pretrained(tmp, safe_serialization=True)
    plot_reward_vs_sqrt_kl(run.read_metrics(), run.path / "reward_vs_sqrt_kl.png")
    run.info(f"done: {step} steps, skipped updates {skipped}")
    return run.path
