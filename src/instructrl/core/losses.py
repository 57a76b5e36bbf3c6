"""Loss functions: tensors in, ``(loss, stats)`` out. Pure, small, unit-tested.

Sections: SFT (language modelling on response tokens), reward model (K-wise
ranking loss, InstructGPT eq. 1), PPO (clipped policy/value losses, the loss
aggregations of GRPO / Dr. GRPO / DAPO, GRPO's KL loss, PPO-ptx
term, InstructGPT eq. 2), DPO, IPO and listwise Plackett-Luce DPO (Rafailov et al. 2023;
Azar et al. 2023). The RL quantities they consume (KL penalty, GAE,
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


# How the per-token losses of a minibatch become one number (docs/rl-levers.md):
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token-mean",
    num_tokens: float | torch.Tensor | None = None, num_seqs: float | torch.Tensor | None = None,
    max_len: float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses ℓ_it [B, R] (masked by ``mask`` [B, R]) to a scalar loss.

        "token-mean"          Σ_i Σ_t ℓ_it / N_tok             (DAPO, Yu et al. 2025 eq. 12; our PPO's default)
        "seq-mean-token-mean" Σ_i (Σ_t ℓ_it / |o_i|) / N_seq   (GRPO, Shao et al. 2024 eq. 3)
        "seq-mean-token-sum"  Σ_i (Σ_t ℓ_it / L) / N_seq       (Dr. GRPO, Liu et al. 2025 §3.1: L a constant)

    |o_i| is row i's own token count, mask[i].sum(). The normalisers N_tok (``num_tokens``, default
    mask.sum()) and N_seq (``num_seqs``, default B) are those of the whole minibatch: when it is split
    into micro-batches, pass the minibatch's counts to every call and the micro-batch losses (and their
    gradients) add up to the one-pass value. Each row must hold all of its response tokens (a micro-batch
    splits rows, never a row's columns). ``max_len`` = L is required for "seq-mean-token-sum": the
    generation budget (max new tokens), never this batch's longest response, which would vary with the split.
    ``num_tokens`` is read only by "token-mean", ``num_seqs`` and ``max_len`` only by the others.
    """
    if aggregation == "token-mean":
        return _masked_mean(per_token, mask, num_tokens)
    if aggregation == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    elif aggregation == "seq-mean-token-sum":
        if max_len is None or not max_len > 0:
            raise ValueError(f"aggregation 'seq-mean-token-sum' needs max_len > 0 (the generation budget), got {max_len}")
        per_seq = (per_token * mask).sum(1) / max_len
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of {', '.join(LOSS_AGGREGATIONS)}")
    n = mask.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / torch.clamp(torch.as_tensor(n, dtype=per_seq.dtype), min=1.0)


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float = 0.2, num_tokens: float | torch.Tensor | None = None, *,
    aggregation: str = "token-mean", num_seqs: float | torch.Tensor | None = None, max_len: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)),  ρ_t = exp(logπ − logπ_old).
    ``num_tokens``: normaliser (default: mask.sum()); pass the minibatch's token count when
    the minibatch is split into micro-batches so that their gradients add up exactly.
    ``aggregation`` picks how the per-token terms are averaged ("token-mean" above, or GRPO's
    "seq-mean-token-mean", Dr. GRPO's "seq-mean-token-sum"; see :func:`aggregate_token_loss`, which
    also says what ``num_seqs`` (the minibatch's row count) and ``max_len`` are).
    Stats: clipfrac (share of tokens where the clipped branch is active) and approx_kl
    (k3 estimate of KL(π_old || π), the usual PPO early-warning signal).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_token_loss(torch.maximum(unclipped, clipped), mask, aggregation, num_tokens, num_seqs, max_len)
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


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None, *,
    aggregation: str = "token-mean", num_seqs: float | torch.Tensor | None = None, max_len: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """KL(π_θ || π_ref) as a loss term, GRPO-style (Shao et al. 2024, DeepSeekMath eq. 3 and 4).

    GRPO subtracts β·D_KL inside its objective instead of folding −β·KL into the reward (InstructGPT
    eq. 2), with the per-token estimator of eq. 4, Schulman's k3 (rl_math.kl_per_token "k3"):

        D_KL,t = π_ref/π_θ − log(π_ref/π_θ) − 1 = e^r − 1 − r,   r = log π_ref(y_t) − log π_θ(y_t)  (>= 0)

    Its gradient with respect to log π_θ(y_t) is 1 − π_ref/π_θ: it pulls a token back only as far as
    the reference assigns it. logprobs [B, R] of the policy being trained (with grad), ref_logprobs
    [B, R] of the frozen reference (no grad), mask [B, R]. Aggregated like the policy loss
    (:func:`aggregate_token_loss`; pass the same normalisers); the caller adds β · this loss.
    Stats: ``kl_sum`` (Σ of D_KL,t over real tokens) and ``tokens``.
    """
    r = ref_logprobs - logprobs
    per_token = torch.expm1(r) - r
    loss = aggregate_token_loss(per_token, mask, aggregation, num_tokens, num_seqs, max_len)
    with torch.no_grad():
        stats = {"kl_sum": (per_token * mask).sum(), "tokens": mask.sum()}
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


# ---------------------------------------------------------------------------
# Direct preference optimisation (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) and IPO
# (Azar et al. 2023, https://arxiv.org/abs/2310.12036). Inputs are sequence log-probabilities of the
# response tokens, log π(y | x) = Σ_t log π(y_t | x, y_<t), under the policy and the frozen reference.
# The implicit reward of DPO is r(x, y) = β (log π_θ(y|x) - log π_ref(y|x)) (paper §5).
# ---------------------------------------------------------------------------


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log π(response | prompt) of each row: the sum of the token log-probs where ``loss_mask`` is 1.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (the response tokens, as for SFT) -> [B] float32.
    """
    return (token_logprobs(logits, input_ids) * loss_mask).sum(-1)


def ranking_pairs(group: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every untied (winner, loser) pair of a flat batch of rankings, weighted 1/C(K,2) of its ranking.

    group, ranks: [N] long (as for :func:`kwise_ranking_loss`). Returns winner [P], loser [P] (indices
    into N) and weight [P] float: the same pairs and weights as the K-wise RM loss (ties give no pair).
    """
    same = group[:, None] == group[None, :]
    better = same & (ranks[:, None] < ranks[None, :])
    k = same.sum(1).float()
    w, l = better.nonzero(as_tuple=True)
    return w, l, 2.0 / (k[w] * (k[w] - 1)).clamp(min=1.0)


def _pair_stats(margin: torch.Tensor, total: torch.Tensor) -> dict:
    with torch.no_grad():
        pairs = margin.numel()
        correct = (margin > 0).sum()
        return {"pairs": pairs, "correct": correct, "accuracy": correct.float() / max(pairs, 1),
                "margin": margin.mean() if pairs else torch.zeros(()), "loss_sum": total.detach()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weight: torch.Tensor | None = None,
             num: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """DPO loss, Rafailov et al. 2023 eq. (7):

        L = -E[ log σ( β log π_θ(y_w|x)/π_ref(y_w|x) - β log π_θ(y_l|x)/π_ref(y_l|x) ) ]

    All four inputs are [P] sequence log-probs (chosen y_w, rejected y_l). ``weight`` [P] weighs each
    pair (default 1; :func:`ranking_pairs` gives 1/C(K,2)); ``num`` is the normaliser (default: P), pass
    the count of the whole optimizer step for exact accumulation. Stats: ``margin`` = mean implicit
    reward margin r_w - r_l, ``accuracy`` = share of pairs with r_w > r_l, ``pairs``, ``loss_sum``.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    w = torch.ones_like(margin) if weight is None else weight
    total = (w * F.softplus(-margin)).sum()  # softplus(-d) = -log σ(d), stable
    denom = margin.numel() if num is None else num
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0), _pair_stats(margin.detach(), total)


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, weight: torch.Tensor | None = None,
             num: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """IPO loss, Azar et al. 2023 eq. (17) (the empirical IPO loss on a dataset of pairs), with τ = ``beta``:

        h = log π_θ(y_w|x)/π_ref(y_w|x) - log π_θ(y_l|x)/π_ref(y_l|x),   L = E[ (h - 1/(2τ))² ]

    A squared loss that pulls the log-ratio gap to the finite target 1/(2τ) instead of pushing it
    to infinity as DPO does on deterministic preferences. Shapes, ``weight``, ``num`` and stats as
    :func:`dpo_loss` (``margin`` is the DPO-style implicit reward gap τ·h, for comparable logs).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    w = torch.ones_like(h) if weight is None else weight
    total = (w * (h - 1.0 / (2.0 * beta)) ** 2).sum()
    denom = h.numel() if num is None else num
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0), _pair_stats(beta * h.detach(), total)


def plackett_luce_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, group: torch.Tensor,
                           ranks: torch.Tensor, beta: float,
                           num_rankings: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Listwise DPO under the Plackett-Luce model, Rafailov et al. 2023 Appendix A.3 ("Deriving the DPO
    Objective Under the Plackett-Luce Model"): the ranking likelihood of eq. (18) with the implicit reward
    substituted (the partition function cancels), as a negative log-likelihood:

        L = -E[ log Π_{k=1..K} exp(r(x, y_τ(k))) / Σ_{j=k..K} exp(r(x, y_τ(j))) ],  r = β log π_θ/π_ref

    One ranking of K responses is one batch element (K forward passes, no pair expansion).
    policy_logps, ref_logps: [N] sequence log-probs; group, ranks: [N] long as in
    :func:`kwise_ranking_loss` (0 = best). Ties give no comparison (the K-wise RM convention):
    response i competes only with the responses ranked strictly below it, so its factor is
    exp(r_i) / (exp(r_i) + Σ_{rank_j > rank_i} exp(r_j)), and a response with none below it adds
    nothing. At K = 2 this is exactly :func:`dpo_loss`. Normaliser: rankings here, or
    ``num_rankings``. Stats as :func:`dpo_loss`, over the untied pairs, plus ``rankings``.
    """
    if policy_logps.dim() != 1 or not (ref_logps.shape == group.shape == ranks.shape == policy_logps.shape):
        raise ValueError(f"policy_logps, ref_logps, group, ranks must all be [N]; got {tuple(policy_logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(group.shape)}, {tuple(ranks.shape)}")
    r = beta * (policy_logps.float() - ref_logps.float())                   # [N] implicit rewards
    same = group[:, None] == group[None, :]                                 # [N, N]
    below = same & (ranks[:, None] < ranks[None, :])                        # [N, N]: j ranked strictly below i
    competes = below | torch.eye(len(r), dtype=torch.bool, device=r.device)  # i's denominator: itself + below
    lse = torch.logsumexp(r[None, :].masked_fill(~competes, float("-inf")), dim=1)  # [N]
    nll = (lse - r) * below.any(1)                                          # -log factor; 0 with nothing below
    total = nll.sum()
    n_groups = torch.unique(group).numel()
    denom = n_groups if num_rankings is None else num_rankings
    loss = total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0)
    with torch.no_grad():
        margin = (r[:, None] - r[None, :])[below]
    stats = _pair_stats(margin, total)
    stats["rankings"] = n_groups
    return loss, stats
