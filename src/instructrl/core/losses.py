"""Loss functions: tensors in, ``(loss, stats)`` out. Pure, small, unit-tested.

Sections: SFT (language modelling on response tokens), reward model (K-wise
ranking loss, InstructGPT eq. 1), PPO (clipped policy/value losses, PPO-ptx
term, InstructGPT eq. 2). The RL quantities they consume (KL penalty, GAE,
whitening) live in :mod:`instructrl.core.rl_math`.

This module imports only torch, so ``import instructrl.core.losses`` stays light.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1.

    logits:    [B, T, V] (position t predicts token t + 1)
    input_ids: [B, T]
    returns:   [B, T] with column 0 set to 0 (the first token has no prediction)
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the masked (response) tokens.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 where token t is trained).
    ``num_tokens`` is the normaliser: by default the tokens in this batch; pass the
    token count of the whole optimizer step (all micro-batches, all processes) so that
    gradient accumulation and data parallelism give exactly the full-batch gradient.
    """
    nll = -token_logprobs(logits, input_ids) * loss_mask
    total = nll.sum()
    denom = loss_mask.sum() if num_tokens is None else num_tokens
    loss = total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0)
    return loss, {"nll_sum": total.detach(), "tokens": loss_mask.sum().detach()}


# ---------------------------------------------------------------------------
# Reward model (InstructGPT §3.5, equation 1; https://arxiv.org/abs/2203.02155)
#
#   loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ( r_θ(x, y_w) - r_θ(x, y_l) ) ]
#
# One ranking of K responses is one batch element: its K responses are scored
# once each (K forward passes) and all C(K,2) comparisons enter its loss, each
# with weight 1/C(K,2). Tied responses give no comparison (their weight is
# simply absent). Rankings of different K share one flat score vector.
# ---------------------------------------------------------------------------


def kwise_ranking_loss(scores: torch.Tensor, group: torch.Tensor, ranks: torch.Tensor,
                       num_rankings: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """K-wise ranking loss of InstructGPT eq. (1), for a batch of rankings of mixed K.

    scores: [N] float, r_θ(x, y) of every response in the batch (rankings concatenated)
    group:  [N] long, which ranking each response belongs to (any ids; equal id = same ranking)
    ranks:  [N] long, rank within its ranking (0 = best); equal ranks are ties
    num_rankings: the normaliser, by default the number of rankings here; pass the
        count of the whole optimizer step (all micro-batches, all processes) so that
        accumulation and data parallelism give exactly the full-batch gradient.

    loss = (1/G) Σ_rankings Σ_{(w,l) untied, rank_w < rank_l} softplus(r_l - r_w) / C(K,2)
    (softplus(-d) = -log σ(d), computed stably). Returns (loss, stats) with stats
    ``pairs`` (untied comparisons), ``correct`` (r_w > r_l), ``accuracy``,
    ``margin`` (mean r_w - r_l) and ``rankings``.
    """
    if scores.dim() != 1 or group.shape != scores.shape or ranks.shape != scores.shape:
        raise ValueError(f"scores, group, ranks must all be [N]; got {tuple(scores.shape)}, "
                         f"{tuple(group.shape)}, {tuple(ranks.shape)}")
    s = scores.float()
    same = group[:, None] == group[None, :]                                   # [N, N]
    better = same & (ranks[:, None] < ranks[None, :])                        # [N, N]: i beats j
    k = same.sum(1).to(s.dtype)                                               # [N]: K of i's ranking
    weight = better.to(s.dtype) * (2.0 / (k * (k - 1)).clamp(min=1.0))[:, None]  # 1/C(K,2) on each pair
    diff = s[:, None] - s[None, :]                                            # [N, N]: r_i - r_j
    n_groups = torch.unique(group).numel()
    denom = n_groups if num_rankings is None else num_rankings
    total = (weight * F.softplus(-diff)).sum()
    loss = total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0)
    with torch.no_grad():
        d = diff[better]
        pairs = int(better.sum())
        correct = (d > 0).sum()
        stats = {
            "pairs": pairs,
            "correct": correct,
            "accuracy": correct.float() / max(pairs, 1),
            "margin": d.mean() if pairs else torch.zeros(()),
            "rankings": n_groups,
            "loss_sum": total.detach(),
        }
    return loss, stats


# ---------------------------------------------------------------------------
# PPO (InstructGPT §3.5 eq. 2; Schulman et al. 2017 eq. 7 and the clipped value loss of
# their baselines implementation). All per-token tensors are [B, R], aligned with the response.
# ---------------------------------------------------------------------------


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, denom: float | torch.Tensor | None) -> torch.Tensor:
    d = mask.sum() if denom is None else torch.as_tensor(denom, dtype=x.dtype)
    return (x * mask).sum() / torch.clamp(d, min=1.0)


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float = 0.2, num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)),  ρ_t = exp(logπ − logπ_old).
    ``num_tokens``: normaliser (default: mask.sum()); pass the minibatch's token count when
    the minibatch is split into micro-batches so that their gradients add up exactly.
    Stats: clipfrac (share of tokens where the clipped branch is active) and approx_kl
    (k3 estimate of KL(π_old || π), the usual PPO early-warning signal).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).float() * mask).sum(),
            "approx_kl": ((torch.expm1(log_ratio) - log_ratio) * mask).sum(),
            "tokens": mask.sum(),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float = 0.2, num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 · mean_t max((V − G)², (V_old + clip(V − V_old, ±ε_v) − G)²).

    The value may move at most ε_v from its rollout-time estimate per PPO update
    (OpenAI baselines ppo2; also used by Ziegler et al. 2019 and TRL).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (clipped_values - returns) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(l1, l2), mask, num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": ((l2 > l1).float() * mask).sum(), "tokens": mask.sum()}
    return loss, stats


def ptx_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The pretraining term of PPO-ptx, −E_{x~D_pretrain}[log π_RL(x)] per token (InstructGPT eq. 2).

    Same token NLL as SFT, on plain text (every token after the first is trained).
    """
    return sft_loss(logits, input_ids, loss_mask, num_tokens)


def ppo_ptx_objective(policy_loss: torch.Tensor, ptx: torch.Tensor | None, ptx_coef: float) -> torch.Tensor:
    """Policy objective of PPO-ptx as a loss: L_PPO + γ · L_ptx (γ = 0 or no ptx batch: plain PPO).

    Both terms are per-token means, so γ weighs one pretraining token against one RL token.
    """
    if ptx is None or ptx_coef == 0:
        return policy_loss
    return policy_loss + ptx_coef * ptx
