"""The phases of a PPO step, each a function with a typed record in and out (``train_ppo`` calls them in order).

    load_models        policy, reference, reward model, value model (+ shared frozen blocks)
    load_data          prompt token ids and the PPO-ptx pretraining texts
    make_optimisers    Adam + LR warm-up for policy and value model, the KL controller
    step_prompts       which prompts this step samples (a seeded endless stream; groups of k adjacent)
    generate_trajectory  sample the responses (one RNG stream per episode, so any split over processes
                       samples the same tokens)
    score_trajectory   old and reference log-probs, values, RM scores — no gradients
    compute_advantages KL-shaped rewards, GAE or RLOO, whitening — over the global batch
    ppo_update         PPO epochs over minibatches: clipped policy loss (+ γ·ptx), clipped value loss
    metrics_row / save_checkpoint / restore

Several processes (torchrun / accelerate launch, see :class:`Dist`): each samples and scores its
contiguous share of the global batch; the per-token scalars (mask, log-probs, values, scores) are
gathered so that advantages, whitening, the KL controller and the metrics see the global batch;
in an update each process back-propagates the rows of the global minibatch it holds, normalised
by the global token count, and the gradients are summed across processes once per optimizer
step. One process and N processes therefore take the same steps (up to float rounding).

With ``train.sharding=fsdp2`` (N > 1) all four models are ``fully_shard``-ed over the processes
(``common.shard_model``): the policy and the value model with their gradients and Adam state, the
frozen reference and reward model for memory alone. FSDP2's reduce-scatter then sums the gradients in
each backward (divide factor 1, the manual all-reduce's sum), so the steps stay those of one process;
every forward is a collective, so each process runs the same number of passes (weight-0 ones where its
share of a minibatch is smaller), and sampling runs on the policy's gathered weights
(``common.gathered_weights``: token-by-token decoding stops at a different step on each process).
Checkpoints gather full weights and full optimizer state to rank 0, as the supervised loops do.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from instructrl.config import ConfigError
from instructrl.core import rl_math
from instructrl.core.losses import kl_loss, ppo_policy_loss, ppo_value_loss, ptx_loss
from instructrl.core.tensors import append_eos, gather_logprobs
from instructrl.rollout import Generation, Rollout, sample
from instructrl.runtime import Runtime
from instructrl.scoring import micro_batches, response_logits, response_values, window
from instructrl.train.common import (all_finite, fsdp_units, gathered_state_dict, gathered_weights, load_state,
                                     reshard, shard_model)
from instructrl.train.processes import Dist

# A scripted reward for tests and experiments: (query [B,P], response [B,R], response_mask [B,R]) -> scores [B].
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------


@dataclass
class Models:
    """Everything with weights. ``rm`` is None under a scripted reward, ``value`` None under RLOO."""

    tok: object
    policy: torch.nn.Module
    ref: torch.nn.Module
    rm: torch.nn.Module | None
    value: torch.nn.Module | None
    share: int = 0  # lower blocks shared (frozen, equal) by every model, run once per sequence
    train_attention: str | None = None
    sharded: bool = False  # train.sharding=fsdp2 over > 1 process: every model fully_shard-ed

    @property
    def trained(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.value) if m is not None]

    @property
    def names(self) -> list[str]:
        return [n for n, m in (("policy", self.policy), ("value", self.value), ("reference", self.ref),
                               ("reward model", self.rm)) if m is not None]

    @property
    def eos_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id


def load_models(cfg, rt: Runtime, ckpt: Path | None, scripted_reward: bool, mesh=None) -> Models:
    """Policy (trained), reference (frozen SFT), reward (frozen), value (trained, initialised from the RM).

    A resumed run loads the trained policy and value model from its checkpoint (under LoRA: their
    adapters, on the config's base); the rest from the config. ``mesh``: shard every model over it
    (FSDP2), after each process has loaded it whole.
    """
    from instructrl.lora import apply_lora, check_model_targets, load_adapter
    from instructrl.models import (drop_stale_quantization, freeze_lower_layers, load_causal_lm, load_tokenizer,
                                   resolve_model, shared_frozen_blocks)
    from instructrl.reward_model import init_reward_model, load_reward_model

    tc, lora = cfg.train, cfg.train.lora.enabled
    torch.manual_seed(cfg.seed)  # a fresh value head is drawn from the global RNG: same seed, same head
    policy_path = resolve_model(cfg.policy or None)
    ref_path = resolve_model(cfg.reference) if cfg.reference else policy_path
    if lora:  # a bad target_modules fails here, before any weights are read
        check_model_targets(policy_path, tc.lora)
    tok = load_tokenizer(policy_path)
    # with LoRA a checkpoint holds adapters only: the base comes from the config
    policy = load_causal_lm(str(ckpt / "policy") if ckpt and not lora else policy_path)
    # LoRA: the reference is the policy's base (adapter off), unless a different reference is asked for
    ref = None if lora and Path(ref_path).resolve() == Path(policy_path).resolve() else \
        load_causal_lm(ref_path).eval().requires_grad_(False)
    rm = None if scripted_reward else load_reward_model(cfg.reward_model).eval().requires_grad_(False)
    value = None
    if tc.advantage == "gae":  # the critic-free advantages need no value model
        if ckpt and not lora:
            value = load_reward_model(ckpt / "value")
        elif cfg.value_model or cfg.reward_model:
            value = load_reward_model(cfg.value_model or cfg.reward_model)
        else:  # a scripted reward has no weights: a fresh scalar head on the SFT trunk
            value = init_reward_model(policy_path)
    models = Models(tok, policy, ref, rm, value)
    for m in models.trained:
        drop_stale_quantization(m)
        if lora:  # adapters (+ the value head) train, the base is frozen
            apply_lora(m, tc.lora, tc.trainable_layers)
            if ckpt:
                load_adapter(m, ckpt / ("policy" if m is policy else "value"))
        else:
            freeze_lower_layers(m, tc.trainable_layers)
    models.train_attention = {"model": None, "auto": None}.get(tc.attention, tc.attention)
    if tc.attention == "auto" and rt.amp_dtype is not None and rt.device.type == "cpu":
        models.train_attention = "eager"  # the fused kernel's bf16 backward is slow on CPU (docs/ppo.md)
    # Sharded, the shared hidden state is off: it runs part of one model's trunk outside its FSDP units.
    if tc.share_frozen_blocks and tc.trainable_layers >= 0 and mesh is None:
        models.share = shared_frozen_blocks([m for m in (policy, ref, rm, value) if m is not None], models.trained)
    for m in (policy, ref, rm, value):
        if m is not None and mesh is not None:  # FSDP2 moves each unit to the device as it shards it,
            shard_model(m, mesh)                # so no process ever holds a whole model there
        if m is not None:
            m.to(rt.device)
    if mesh is not None:
        for m in models.trained:  # sum, as Dist.sum_gradients does (FSDP2 would average)
            for unit in fsdp_units(m):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no PREMUL_SUM
        models.sharded = True
    return models


def reference_logits(models: Models, ids: torch.Tensor, am: torch.Tensor, r: int, temperature: float,
                     low: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """π_SFT's logits for the response tokens: the reference model, or under LoRA the policy with its
    adapter switched off (the same base weights, no second copy)."""
    if models.ref is not None:
        return response_logits(models.ref, ids, am, r, temperature, low)
    from instructrl.lora import adapter_disabled

    with adapter_disabled(models.policy):
        return response_logits(models.policy, ids, am, r, temperature, low)


@dataclass
class PPOData:
    prompt_ids: list[list[int]]  # chat-formatted, cut from the left to rollout.max_prompt_tokens
    ptx_ids: list[list[int]]  # pretraining texts (PPO-ptx); empty = plain PPO
    prompts_cut: int = 0


def load_data(cfg, tok) -> PPOData:
    from instructrl.data import load_prompts, load_text_corpus, require_rows
    from instructrl.formatting import TruncationStats, encode_prompt_for_sampling

    records = require_rows(load_prompts(cfg.prompts), cfg.prompts, "prompt")
    trunc = TruncationStats()
    prompt_ids = [encode_prompt_for_sampling(tok, rec.messages, cfg.rollout.max_prompt_tokens, trunc) for rec in records]
    ptx_ids: list[list[int]] = []
    if cfg.ptx_data and cfg.train.ptx_coef > 0:
        texts = require_rows(load_text_corpus(cfg.ptx_data), cfg.ptx_data, "ptx_data text")
        ptx_ids = [x for x in (tok(t, add_special_tokens=False)["input_ids"][: cfg.train.ptx_max_tokens] for t in texts)
                   if len(x) >= 2]
        if not ptx_ids:
            raise ConfigError(f"ptx_data: {cfg.ptx_data} has no text of 2 or more tokens")
    return PPOData(prompt_ids, ptx_ids, trunc.prompts_cut)


def warmup_schedule(optimizer, warmup: int):
    """Linear warm-up from lr/10 over ``warmup`` PPO steps, then constant (InstructGPT App. C)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if warmup <= 0 or s >= warmup else 0.1 + 0.9 * s / warmup)


@dataclass
class Optimisers:
    policy_opt: torch.optim.Optimizer
    policy_sched: object
    value_opt: torch.optim.Optimizer | None
    value_sched: object | None
    kl_ctl: rl_math.KLController
    # sharded (FSDP2): (policy, value) whose optimizer states are gathered in full, keyed by parameter
    # name, and scattered back on resume; every process must then call state_dict / load_state_dict
    sharded: tuple = ()

    def _opt_state(self, i: int, opt) -> dict:
        if not self.sharded:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.sharded[i], opt, options=StateDictOptions(full_state_dict=True,
                                                                                       cpu_offload=True))

    def _load_opt(self, i: int, opt, st: dict) -> None:
        if not self.sharded:
            return opt.load_state_dict(st)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.sharded[i], opt, st, options=StateDictOptions(full_state_dict=True))

    def state_dict(self) -> dict:
        st = {"policy_opt": self._opt_state(0, self.policy_opt), "policy_sched": self.policy_sched.state_dict(),
              "kl_ctl": self.kl_ctl.state_dict(), "sharded": bool(self.sharded)}
        if self.value_opt is not None:
            st |= {"value_opt": self._opt_state(1, self.value_opt), "value_sched": self.value_sched.state_dict()}
        return st

    def load_state_dict(self, st: dict) -> None:
        self._load_opt(0, self.policy_opt, st["policy_opt"])
        self.policy_sched.load_state_dict(st["policy_sched"])
        self.kl_ctl.load_state_dict(st["kl_ctl"])
        if self.value_opt is not None:
            self._load_opt(1, self.value_opt, st["value_opt"])
            self.value_sched.load_state_dict(st["value_sched"])


def make_optimisers(cfg, models: Models) -> Optimisers:
    from instructrl.models import make_adamw

    tc, kc = cfg.train, cfg.kl
    popt = make_adamw([p for p in models.policy.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
    vopt = vsched = None
    if models.value is not None:
        vopt = make_adamw([p for p in models.value.parameters() if p.requires_grad], tc.value_lr, tc.weight_decay)
        vsched = warmup_schedule(vopt, tc.warmup_steps)
    return Optimisers(popt, warmup_schedule(popt, tc.warmup_steps), vopt, vsched,
                      rl_math.KLController(kc.coef, kc.adaptive, kc.target, kc.horizon),
                      (models.policy, models.value) if models.sharded else ())


@dataclass
class Progress:
    """The run's position: what a checkpoint needs besides weights and optimizers."""

    step: int = 0
    prompt_pos: int = 0  # position in the endless stream of shuffled prompts
    ptx_pos: int = 0  # position in the stream of pretraining texts
    skipped: dict = field(default_factory=lambda: {"policy": 0, "value": 0})


# ---------------------------------------------------------------------------
# 1. rollout
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


def step_prompts(cfg, data: PPOData, progress: Progress) -> list[int]:
    """The global batch's prompt indices: batch_size / k prompts, each repeated k times (adjacent rows)."""
    B, k = cfg.rollout.batch_size, cfg.rollout.samples_per_prompt
    return [i for i in stream_indices(len(data.prompt_ids), progress.prompt_pos, B // k, cfg.seed) for _ in range(k)]


def episode_seed(seed: int, step: int, row: int) -> int:
    """Episode ``row`` of step ``step``'s global batch: its sampler seed, from (seed, step, row) alone."""
    return (seed * 1_000_003 + step) * 100_003 + row


def episode_generators(seed: int, step: int, rows: range, device: torch.device) -> list[torch.Generator]:
    """One RNG stream per episode of the global batch, seeded by (seed, step, row): the same tokens are
    sampled whichever process samples the row, and a resumed run needs no sampler state."""
    return [torch.Generator(device=device).manual_seed(episode_seed(seed, step, r)) for r in rows]


def generate_trajectory(cfg, models: Models, prompts: list[list[int]], rows: range, step: int, rt: Runtime,
                        with_logprobs: bool, engine=None) -> Generation:
    """Sample episodes ``rows`` of the global batch (one prompt each), each from its own seed.

    ``engine`` None: the built-in sampler on the policy itself. A vLLM engine (holding the policy's
    current weights): the same sampling rules, each episode's request seeded by :func:`episode_seed`,
    and ``logprobs`` are the engine's (never used as π_old; see score_trajectory)."""
    rc = cfg.rollout
    if engine is not None:
        from instructrl.engines import SamplingSettings

        s = SamplingSettings(rc.max_new_tokens, rc.temperature, rc.top_k, seeds=[episode_seed(cfg.seed, step, r)
                                                                                for r in rows], logprobs=True)
        g = engine.generate(prompts, s)
        return Generation(*(None if t is None else t.to(rt.device) for t in
                            (g.query, g.query_mask, g.response, g.response_mask, g.ended, g.logprobs, g.entropy)))
    models.policy.eval()
    with gathered_weights(models.policy):  # sharded: each process decodes its rows for as long as they last
        g = sample(models.policy, prompts, rc.max_new_tokens, models.eos_id, models.pad_id,
                   episode_generators(cfg.seed, step, rows, rt.device), rc.temperature, rc.top_k, rt.amp_dtype,
                   return_logprobs=with_logprobs)
    models.policy.train()
    return g


# ---------------------------------------------------------------------------
# 2. score (no grad)
# ---------------------------------------------------------------------------


@dataclass
class Scored:
    """Phase 2's output for this process's rows ([b, R] per token, [b] per response)."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    lower: torch.Tensor | None  # [b, P + R + 1, H] hidden state after the shared blocks, reused in training
    engine_logprobs: torch.Tensor | None = None  # [b, R] the sampling engine's (vLLM), when it is not the trainer


def score_trajectory(cfg, models: Models, g: Generation, rt: Runtime, reuse_logprobs: bool,
                     reward_fn: RewardFn | None) -> Scored:
    from instructrl.models import autocast_weight_cache, lower_hidden
    from instructrl.reward_model import score as rm_score

    rc, tc = cfg.rollout, cfg.train
    policy, ref, rm, value = models.policy, models.ref, models.rm, models.value
    B, R = g.response_mask.shape
    P, share, dev = g.query.shape[1], models.share, rt.device
    logprobs, ref_logprobs, entropy, values = (torch.zeros(B, R, device=dev) for _ in range(4))
    scores = torch.zeros(B, device=dev)
    lower = torch.zeros(B, P + R + 1, policy.config.hidden_size, device=dev) if share else None
    scoring = [m for m in (policy, ref, value, rm) if m is not None] if rt.amp_dtype is not None else []
    with torch.no_grad(), autocast_weight_cache(*scoring), rt.autocast():  # no_grad: see rollout.sample
        for rows, p, r in micro_batches(torch.arange(B, device=dev), g.query_mask, g.response_mask,
                                        tc.score_batch_size):
            ids, am = window(g, rows, p, r)
            rm_ids, rm_am = (append_eos(ids, am, g.ended[rows], models.eos_id, models.pad_id)
                             if rm is not None and rc.rm_eos else (ids, am))
            low = rm_low = None
            if share:  # causal: the first columns of the RM's input give everyone else's hidden state
                h = lower_hidden(ref if ref is not None else policy, rm_ids, rm_am, share)
                lower[rows, P - p: P - p + h.shape[1]] = h.float()
                low, rm_low = (h[:, :ids.shape[1]], share), (h, share)
            tokens = g.response[rows, :r]
            if reuse_logprobs:
                logprobs[rows, :r], entropy[rows, :r] = g.logprobs[rows, :r], g.entropy[rows, :r]
            else:
                logprobs[rows, :r], entropy[rows, :r] = rl_math.logprobs_and_entropy(
                    response_logits(policy, ids, am, r, rc.temperature, low), tokens)
            ref_logprobs[rows, :r] = gather_logprobs(reference_logits(models, ids, am, r, rc.temperature, low), tokens)
            if value is not None:
                values[rows, :r] = response_values(value, ids, am, r, low).float()
            if rm is not None:
                scores[rows] = rm_score(rm, rm_ids, rm_am, rm_low).float()
    for m in (policy, ref, value, rm) if models.sharded else ():  # a no-grad forward leaves the top units gathered
        if m is not None:
            reshard(m)
    if reward_fn is not None:
        scores = reward_fn(g.query, g.response, g.response_mask).float().to(dev)
    if rc.missing_eos_penalty is not None:
        scores = torch.where(g.ended, scores, scores - rc.missing_eos_penalty)
    mask = g.response_mask
    # log-probs that came with the sample but are not π_old: another engine's (vLLM), kept for the
    # engine-vs-trainer gap and truncated importance sampling
    engine_lp = None if reuse_logprobs or g.logprobs is None else g.logprobs * mask
    return Scored(logprobs * mask, ref_logprobs * mask, entropy * mask, values * mask, scores, lower, engine_lp)


# ---------------------------------------------------------------------------
# 3 + 4. rewards and advantages, over the global batch
# ---------------------------------------------------------------------------


@dataclass
class BatchStats:
    """Statistics of the global batch (every process holds the same)."""

    score: float
    seq_kl: float
    beta: float
    non_score_reward: float
    entropy: float
    explained_variance: float | None
    response_length: float
    missing_eos: float
    tokens: float
    informative: float  # share of rows the policy loss uses (train.drop_uninformative_groups)
    engine_logprob_gap: float | None = None  # mean |log π_engine − log π_old| over response tokens (vLLM)
    tis_truncated: float | None = None  # share of response tokens whose TIS weight hit train.tis_cap


@dataclass
class GlobalMasks:
    """[B, R] masks of the whole global batch, the same on every process."""

    response: torch.Tensor  # real response tokens: the value loss's tokens
    policy: torch.Tensor  # the tokens the policy loss uses (all, or the informative groups' only)


def compute_advantages(cfg, g: Generation, s: Scored, beta: float,
                       dist: Dist) -> tuple[Rollout, GlobalMasks, BatchStats]:
    """KL-shaped rewards (eq. 2), GAE / RLOO / GRPO, whitening — computed on every process's rows gathered.

    Returns this process's rows as a :class:`Rollout`, the global masks and the global batch's statistics.
    """
    tc, kc, k = cfg.train, cfg.kl, cfg.rollout.samples_per_prompt
    mask, logprobs, ref_logprobs, values, entropy = (
        dist.gather_rows(t) for t in (g.response_mask, s.logprobs, s.ref_logprobs, s.values, s.entropy))
    scores, ended = dist.gather_rows(s.scores), dist.gather_rows(g.ended)
    kl = rl_math.kl_per_token(logprobs, ref_logprobs, kc.estimator) * mask
    # with train.kl_in_loss the KL is a loss term (GRPO), not a reward: shaping with β = 0
    rewards, reward_stats = rl_math.shape_rewards(scores, kl, mask, 0.0 if tc.kl_in_loss else beta, kc.reward_clip)
    if tc.advantage == "gae":
        advantages, returns = rl_math.gae(rewards, values, mask, tc.gamma, tc.lam)
    elif tc.advantage == "rloo":
        advantages = rl_math.rloo_advantages(rewards, mask, k)
    else:
        advantages = rl_math.grpo_advantages(rewards, mask, k, scale=tc.advantage == "grpo")
    if tc.advantage != "gae":
        returns = advantages  # = A + V with V = 0; no value model reads it
    keep = (rl_math.informative_groups(scores, k) if tc.drop_uninformative_groups
            else torch.ones_like(scores, dtype=torch.bool))
    policy_mask = mask * keep[:, None]
    advantages = rl_math.whiten(advantages, policy_mask) if tc.whiten_advantages else advantages * keep[:, None]
    n = mask.shape[0]
    stats = BatchStats(
        score=float(scores.mean()), seq_kl=float(kl.sum(1).mean()), beta=beta,
        non_score_reward=float(reward_stats["non_score_reward"]), entropy=float(rl_math.masked_mean(entropy, mask)),
        explained_variance=float(rl_math.explained_variance(values, returns, mask)) if tc.advantage == "gae" else None,
        response_length=float(mask.sum()) / n, missing_eos=float((~ended).float().mean()), tokens=float(mask.sum()),
        informative=float(keep.float().mean()))
    rows, R = dist.local_rows(n), g.response_mask.shape[1]
    mine = lambda t: t[rows, :R]  # noqa: E731 — back to this process's rows and width
    is_weights = None
    if s.engine_logprobs is not None:  # sampled by vLLM: how far its numerics are from the trainer's
        engine_lp = dist.gather_rows(s.engine_logprobs)
        stats.engine_logprob_gap = float(rl_math.masked_mean((engine_lp - logprobs).abs(), mask))
        if tc.tis_cap > 0:
            w, truncated = rl_math.truncated_importance_weights(logprobs, engine_lp, mask, tc.tis_cap)
            is_weights, stats.tis_truncated = mine(w), float(truncated.sum()) / max(float(mask.sum()), 1.0)
    batch = Rollout(g.query, g.query_mask, g.response, g.response_mask, g.ended, mine(logprobs), mine(ref_logprobs),
                    mine(values), scores[rows], mine(kl), mine(rewards), mine(advantages), mine(returns), is_weights)
    return batch, GlobalMasks(mask, policy_mask), stats


# ---------------------------------------------------------------------------
# 5. PPO update
# ---------------------------------------------------------------------------


@dataclass
class UpdateStats:
    pg_loss: float = 0.0
    vf_loss: float = 0.0
    ptx_loss: float = 0.0
    clipfrac: float = 0.0
    approx_kl: float = 0.0
    vf_clipfrac: float = 0.0
    tokens: float = 0.0
    updates: int = 0
    policy_updated: bool = True


# The UpdateStats fields ppo_update sums over micro-batches, optimizer steps and processes.
SUMMED = ("pg_loss", "vf_loss", "ptx_loss", "clipfrac", "approx_kl", "vf_clipfrac", "tokens")


def most_passes(dist: Dist, mb: torch.Tensor, B: int, size: int) -> int:
    """The most micro-batches any process runs for minibatch ``mb`` (each knows every process's rows)."""
    return max(math.ceil(int(((mb >= s.start) & (mb < s.stop)).sum()) / size)
               for s in (dist.local_rows(B, r) for r in range(dist.world)))


def train_passes(local: torch.Tensor, batch: Rollout, size: int, count: int):
    """(rows, p, r, weight): this process's rows of a minibatch in micro-batches (weight 1), then weight-0
    passes over its first row up to ``count`` (sharded: every forward is a collective, so every process
    runs as many as the busiest one; a weight-0 pass adds nothing to losses, gradients or counts)."""
    n = 0
    for rows, p, r in micro_batches(local, batch.query_mask, batch.response_mask, size) if len(local) else ():
        n += 1
        yield rows, p, r, 1.0
    first = torch.zeros(1, dtype=torch.long, device=batch.query.device)
    for _ in range(n, count):
        _, p, r = next(micro_batches(first, batch.query_mask, batch.response_mask, size))
        yield first, p, r, 0.0


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as one number: sharded gradients give a DTensor over the processes' shards."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def ppo_update(cfg, models: Models, opts: Optimisers, batch: Rollout, masks: GlobalMasks,
               lower: torch.Tensor | None, data: PPOData, progress: Progress, rt: Runtime, dist: Dist) -> UpdateStats:
    """``train.epochs`` passes over the global batch in minibatches; one optimizer step each.

    Each process back-propagates the rows of the minibatch it holds; losses are normalised by the
    minibatch's global counts (tokens, sequences) and gradients summed over processes, so the step is
    the full minibatch's whatever the split into micro-batches and processes. Sharded, FSDP2 sums them
    in every backward (gradients stay sharded) and the processes run equal numbers of passes.
    """
    from instructrl.models import attention_implementation

    tc, rc = cfg.train, cfg.rollout
    policy, value = models.policy, models.value
    B = masks.response.shape[0]
    mine = dist.local_rows(B)
    policy_mask = masks.policy[mine, :batch.response_mask.shape[1]]
    beta = opts.kl_ctl.value
    P, share = batch.query.shape[1], models.share
    st = UpdateStats(policy_updated=progress.step >= tc.value_warmup_steps)  # critic warm-up: value model only
    mb_gen = torch.Generator().manual_seed(cfg.seed * 7919 + progress.step)
    pol_params = [p for p in policy.parameters() if p.requires_grad]
    val_params = [p for p in value.parameters() if p.requires_grad] if value is not None else []
    for _epoch in range(tc.epochs):
        perm = torch.randperm(B, generator=mb_gen)
        for start in range(0, B, tc.minibatch_size):
            mb = perm[start: start + tc.minibatch_size]
            n_tok = masks.response[mb].sum().to(rt.device)  # the value loss's normaliser
            pol = masks.policy[mb]  # the policy loss's normalisers: its tokens, its rows, the length budget
            norm = {"num_tokens": pol.sum().to(rt.device), "aggregation": tc.loss_aggregation,
                    "num_seqs": (pol.sum(1) > 0).sum().to(rt.device), "max_len": rc.max_new_tokens}
            move_policy = st.policy_updated and bool(norm["num_tokens"] > 0)  # else: only flat groups here
            local = (mb[(mb >= mine.start) & (mb < mine.stop)] - mine.start).to(rt.device)
            count = most_passes(dist, mb, B, tc.micro_batch_size) if models.sharded else 0
            for opt in (opts.policy_opt, opts.value_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            sums = dict.fromkeys(SUMMED, 0.0)  # this optimizer step's share of each summed UpdateStats field
            # One autocast context per optimizer step: autocast casts each weight to bf16 once and reuses
            # the copy for every micro-batch; the weights only change at the step, outside it.
            with rt.autocast(), attention_implementation(models.train_attention, *models.trained):
                for rows, p, r, w in train_passes(local, batch, tc.micro_batch_size, count):
                    ids, am = window(batch, rows, p, r)
                    m = batch.response_mask[rows, :r] * w
                    low = (lower[rows, P - p: P + r], share) if share else None  # frozen: no grad needed
                    if move_policy:
                        lp = gather_logprobs(response_logits(policy, ids, am, r, rc.temperature, low),
                                             batch.response[rows, :r])
                        mp = policy_mask[rows, :r] * w
                        adv = batch.advantages[rows, :r]
                        if batch.is_weights is not None:  # TIS: w·A weighs each token's clipped loss by w
                            adv = adv * batch.is_weights[rows, :r]
                        pg, pst = ppo_policy_loss(lp, batch.logprobs[rows, :r], adv, mp, tc.cliprange, **norm)
                        if tc.kl_in_loss:  # GRPO: β·KL(π‖π_SFT) in the loss, k3 estimator
                            kl_term, _ = kl_loss(lp, batch.ref_logprobs[rows, :r], mp, **norm)
                            pg = pg + beta * kl_term
                        pg.backward()
                        sums["pg_loss"] += float(pg.detach())
                        sums["clipfrac"] += float(pst["clipfrac"])
                        sums["approx_kl"] += float(pst["approx_kl"])
                    if value is not None:
                        v = response_values(value, ids, am, r, low).float()
                        vf, vst = ppo_value_loss(v, batch.values[rows, :r], batch.returns[rows, :r], m,
                                                 tc.cliprange_value, n_tok)
                        vf.backward()
                        sums["vf_loss"] += float(vf.detach())
                        sums["vf_clipfrac"] += float(vst["vf_clipfrac"])
                    sums["tokens"] += float(m.sum())
                if data.ptx_ids and move_policy:
                    sums["ptx_loss"] += ptx_backward(cfg, models, data, progress, rt, dist)
            sums = dict(zip(sums, dist.sum(list(sums.values()), rt.device)))
            if not models.sharded:  # sharded: FSDP2's reduce-scatter summed them in each backward
                dist.sum_gradients(pol_params + val_params)
            # non-finite loss or gradient: skip that model's update, count it, never save it
            pol_norm = full_norm(torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.max_grad_norm))
            if move_policy:
                if math.isfinite(sums["pg_loss"] + sums["ptx_loss"]) and bool(torch.isfinite(pol_norm)):
                    opts.policy_opt.step()
                else:
                    progress.skipped["policy"] += 1
            if value is not None:
                val_norm = full_norm(torch.nn.utils.clip_grad_norm_(value.parameters(), tc.max_grad_norm))
                if math.isfinite(sums["vf_loss"]) and bool(torch.isfinite(val_norm)):
                    opts.value_opt.step()
                else:
                    progress.skipped["value"] += 1
                opts.value_opt.zero_grad(set_to_none=True)
            opts.policy_opt.zero_grad(set_to_none=True)
            for name, x in sums.items():
                setattr(st, name, getattr(st, name) + x)
            st.updates += 1
    if st.policy_updated:  # the policy's LR warm-up starts when the policy does
        opts.policy_sched.step()
    if value is not None:
        opts.value_sched.step()
    return st


def ptx_backward(cfg, models: Models, data: PPOData, progress: Progress, rt: Runtime, dist: Dist) -> float:
    """PPO-ptx: back-propagate γ · NLL of ``ptx_batch_size`` pretraining texts (this process's share of them)
    in the current optimizer step; returns this process's part of the unweighted loss."""
    from instructrl.formatting import pad

    tc = cfg.train
    texts = [data.ptx_ids[i] for i in stream_indices(len(data.ptx_ids), progress.ptx_pos, tc.ptx_batch_size,
                                                     cfg.seed + 1)]
    progress.ptx_pos += tc.ptx_batch_size
    n_ptx = sum(len(t) - 1 for t in texts)  # the global count: every process sees every text's length
    mine = texts[dist.rank::dist.world]
    chunks = [mine[i: i + tc.micro_batch_size] for i in range(0, len(mine), tc.micro_batch_size)]
    # sharded: as many passes as rank 0, which holds the most texts; the extra ones weigh 0
    count = math.ceil(len(texts[0::dist.world]) / tc.micro_batch_size) if models.sharded else 0
    total = 0.0
    for j in range(max(len(chunks), count)):
        ids, am = pad(chunks[j] if j < len(chunks) else texts[:1], models.pad_id, "right")
        ids, am = ids.to(rt.device), am.to(rt.device)
        lm = am.float() * (j < len(chunks))
        lm[:, 0] = 0
        out = models.policy(input_ids=ids, attention_mask=am, use_cache=False)
        pt, _ = ptx_loss(out.logits, ids, lm, n_ptx)
        (tc.ptx_coef * pt).backward()  # the γ·L_ptx half of losses.ppo_ptx_objective
        total += float(pt.detach())
    return total


# ---------------------------------------------------------------------------
# 6. log and checkpoint
# ---------------------------------------------------------------------------


def metrics_row(progress: Progress, bs: BatchStats, up: UpdateStats, opts: Optimisers, times: dict,
                world: int, episodes: int) -> dict:
    tok = max(up.tokens, 1)
    return {
        "step": progress.step, "score": bs.score, "kl": bs.seq_kl, "beta": bs.beta,
        "non_score_reward": bs.non_score_reward, "entropy": bs.entropy,
        "clipfrac": up.clipfrac / tok, "approx_kl": up.approx_kl / tok, "vf_clipfrac": up.vf_clipfrac / tok,
        "explained_variance": bs.explained_variance, "response_length": bs.response_length,
        "missing_eos": bs.missing_eos, "pg_loss": up.pg_loss / up.updates, "vf_loss": up.vf_loss / up.updates,
        "ptx_loss": up.ptx_loss / up.updates, "policy_updated": up.policy_updated,
        "skipped_policy_updates": progress.skipped["policy"], "skipped_value_updates": progress.skipped["value"],
        "lr": opts.policy_sched.get_last_lr()[0], **{f"time_{k}": v for k, v in times.items()},
        "tokens_per_s": bs.tokens / max(sum(times.values()), 1e-9), "world_size": world, "episodes": episodes,
        "informative_groups": bs.informative,
        **({"engine_logprob_gap": bs.engine_logprob_gap} if bs.engine_logprob_gap is not None else {}),
        **({"tis_truncated": bs.tis_truncated} if bs.tis_truncated is not None else {}),
    }


def save_checkpoint(folder: Path, models: Models, opts: Optimisers, progress: Progress, dist: Dist,
                    keep: int) -> Path | None:
    """policy/, value/ (none under rloo) and state.pt (optimizers, progress, every process's RNG streams),
    built under a temporary name and renamed into place by the main process."""
    from instructrl.io import atomic_dir
    from instructrl.lora import is_lora, save_adapter
    from instructrl.runtime import rng_state

    final = folder / f"step-{progress.step:06d}"
    # every process takes part (RNG streams; sharded: weights and optimizer states), the main one writes
    rngs = dist.gather_objects(rng_state())
    weights = trained_state_dicts(models, str(final))
    opt_state = opts.state_dict()
    if not dist.is_main:
        return None
    # Updates with non-finite values are skipped; a finite update can still overflow the weights
    # (train.lr=1e308), and such a model is never written (sharded: gathered_state_dict checks).
    if not models.sharded and not all(all_finite(m) for m in models.trained):
        raise ConfigError(f"ppo step {progress.step}: the model has non-finite weights after an update; nothing "
                          f"saved. Lower train.lr / train.value_lr")
    state = {"step": progress.step, "prompt_pos": progress.prompt_pos, "ptx_pos": progress.ptx_pos,
             "skipped": dict(progress.skipped), **opt_state, "rng": rngs, "world_size": dist.world}
    with atomic_dir(final, legacy=("state.pt",)) as tmp:
        for name, m in (("policy", models.policy), ("value", models.value)):
            if m is None:
                continue
            if is_lora(m):  # adapters (+ value head) only; the base is the config's
                save_adapter(m, tmp / name)
            else:
                m.save_pretrained(tmp / name, state_dict=weights[name], safe_serialization=True)
        torch.save(state, tmp / "state.pt")
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trained_state_dicts(models: Models, where: str) -> dict:
    """Sharded: the policy's and value model's full weights gathered to rank 0 (every process takes part;
    non-finite weights raise on all). Unsharded: None each, save_pretrained reads the model itself."""
    out = {"policy": None, "value": None}
    for name, m in (("policy", models.policy), ("value", models.value)) if models.sharded else ():
        if m is not None:
            out[name] = gathered_state_dict(next(m.parameters()).device, m, where, None)
    return out


def restore(ckpt: Path, opts: Optimisers, dist: Dist) -> Progress:
    """Optimizers, KL controller, this process's RNG streams and the run's position from ``ckpt/state.pt``."""
    from instructrl.runtime import set_rng_state

    st = load_state(ckpt / "state.pt")
    saved_world = st.get("world_size", 1)
    if saved_world != dist.world:
        raise ConfigError(f"resume: {ckpt} was written by {saved_world} process(es), this run has {dist.world}; "
                          f"resume with the same process count")
    if st.get("sharded", False) != bool(opts.sharded):
        raise ConfigError(f"resume: {ckpt} was written {'with' if st.get('sharded') else 'without'} "
                          f"train.sharding=fsdp2, this run is {'' if opts.sharded else 'not '}sharded; resume "
                          f"with the train.sharding it was written with")
    opts.load_state_dict(st)
    rng = st["rng"]
    set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)
    return Progress(st["step"], st["prompt_pos"], st["ptx_pos"], st["skipped"])


def save_final(folder: Path, models: Models, dist: Dist) -> None:
    """policy/ (with the tokenizer) and value/ as plain Hugging Face folders; LoRA adapters merged
    into them, and also kept as adapters in policy_adapter/ and value_adapter/. Every process calls
    it (sharded: the weights are gathered), the main one writes."""
    from instructrl.io import atomic_dir
    from instructrl.lora import is_lora, merged_copy, save_adapter

    weights = trained_state_dicts(models, str(folder))
    if not dist.is_main:
        return
    for name, m in (("policy", models.policy), ("value", models.value)):
        if m is None:
            continue
        if is_lora(m):
            save_adapter(m, folder / f"{name}_adapter")
            m = merged_copy(m)
        with atomic_dir(folder / name, legacy=("config.json",)) as tmp:
            m.save_pretrained(tmp, state_dict=weights[name], safe_serialization=True)
            if name == "policy":
                models.tok.save_pretrained(tmp)
