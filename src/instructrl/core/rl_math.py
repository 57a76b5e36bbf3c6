"""RL quantities for PPO, as small pure functions (tensors in, tensors/stats out).

The KL penalty against the SFT policy, reward shaping, GAE, group baselines (RLOO, GRPO, Dr. GRPO,
DAPO's group filter) and whitening live here and only here (InstructGPT §3.5 eq. 2; Ziegler et al. 2019;
Schulman et al. 2016; see docs/rl-levers.md for the group methods).

Shapes: ``B`` sequences (episodes), ``R`` response tokens. Every per-token
tensor is aligned with the response: column ``t`` is the action "emit response
token t". ``mask`` [B, R] is 1 on real response tokens (the EOS included) and 0
on the padding after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all dims, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries to unit variance (and zero mean if ``shift_mean``).

    Advantage whitening over the whole rollout batch (Schulman et al. 2017's
    implementation detail; every RLHF PPO uses it). Padding stays 0.
    x, mask: [B, R] -> [B, R]
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π_RL || π_SFT) from the sampled token's log-probs.

    With r = log π_SFT(y_t) − log π_RL(y_t) for y_t ~ π_RL (Schulman, "Approximating KL divergence", 2020):
      k1 = −r              (unbiased; the paper's log(π_RL/π_SFT) term, can be negative per sample)
      k3 = (e^r − 1) − r   (unbiased and always >= 0, lower variance)
    logprobs, ref_logprobs: [B, R] -> [B, R]
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        r = -log_ratio
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, clip: float | None = None
) -> tuple[torch.Tensor, dict]:
    """Per-token reward of InstructGPT eq. (2): −β·KL at every token, plus the RM score at the last one.

    scores: [B]     (normalized) reward-model score of each whole response
    kl:     [B, R]  per-token KL estimate (``kl_per_token``)
    mask:   [B, R]  1 on real response tokens; every row needs at least one
    clip:   if set, the score is clipped to [−clip, clip] first (optional reward clipping)
    returns rewards [B, R] (0 on padding) and stats
    """
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    non_score = -beta * kl * mask
    lengths = mask.sum(1).long()
    if bool((lengths == 0).any()):
        raise ValueError("shape_rewards: a response has no tokens")
    last = (lengths - 1).unsqueeze(1)  # responses are right-padded: the last real token is at length - 1
    rewards = non_score.scatter_add(1, last, scores.to(non_score.dtype).unsqueeze(1))
    return rewards, {"non_score_reward": non_score.sum(1).mean().detach(), "score": scores.mean().detach()}


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), vectorised over the batch.

    A_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γ V_{t+1} − V_t,  V after the last real token = 0
    (the episode ends at EOS or at the length limit). Returns (advantages, returns = A + V), [B, R];
    both 0 on padding. rewards, values, mask: [B, R].
    """
    values = values * mask
    rewards = rewards * mask
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", eq. 6).

    Rows come in groups of ``k`` adjacent samples of the same prompt. A response's return is its summed
    shaped reward (``shape_rewards``: score − β·Σ_t KL_t, no discounting); its baseline is the mean return
    of the other k − 1 samples of its prompt, so no value model is needed and the baseline does not
    depend on the response it judges (the estimate stays unbiased):

        A_i = G_i − 1/(k−1) · Σ_{j≠i} G_j     applied at every token of response i.

    rewards, mask: [B, R] with B a multiple of k >= 2. Returns advantages [B, R], 0 on padding.
    """
    B = rewards.shape[0]
    if k < 2 or B % k:
        raise ValueError(f"rloo_advantages: need k >= 2 dividing the batch ({B} rows, k={k})")
    g = (rewards * mask).sum(1).view(B // k, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(B, 1) * mask


def _group_returns(rewards_or_scores: torch.Tensor, mask: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """Each response's return, viewed as [B/k, k] groups of adjacent rows (the ``rloo_advantages`` layout).

    [B] scores are the returns themselves; [B, R] per-token rewards are summed over the real tokens.
    """
    B = rewards_or_scores.shape[0]
    if k < 2 or B % k:
        raise ValueError(f"{name}: need k >= 2 dividing the batch ({B} rows, k={k})")
    if rewards_or_scores.dim() == 1:
        g = rewards_or_scores
    elif rewards_or_scores.dim() == 2 and rewards_or_scores.shape == mask.shape:
        g = (rewards_or_scores * mask).sum(1)
    else:
        raise ValueError(f"{name}: rewards must be [B] scores or [B, R] like the mask {tuple(mask.shape)}; "
                         f"got {tuple(rewards_or_scores.shape)}")
    return g.view(B // k, k)


def _identical(g: torch.Tensor) -> torch.Tensor:
    """[G, k] -> [G] bool: the group's k returns are exactly equal.

    Tested by equality, not by std == 0: the mean of k equal floats can miss them by one rounding step
    (k = 3 copies of 0.4900934100151062 in float32 leave residuals of 3e-8), which a std test would
    call signal.
    """
    return g.amax(1) == g.amin(1)


GRPO_EPS = 1e-6  # added to the group std before dividing (verl's GRPO default); bounds |A| for near-ties


def grpo_advantages(rewards_or_scores: torch.Tensor, mask: torch.Tensor, k: int, scale: bool = True) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision).

    Rows come in groups of ``k`` adjacent samples of the same prompt (as in ``rloo_advantages``). With
    G_i the return of response i (its score, or the sum of its shaped rewards) and mean/std over its group:

        scale=True  (GRPO):     A_i = (G_i − mean_group) / (std_group + eps)
        scale=False (Dr. GRPO): A_i =  G_i − mean_group        (Liu et al. 2025, §3.1: no std division)

    applied at every real token of response i (the Â_{i,t} = r̃_i of DeepSeekMath eq. 3). std is the
    Bessel-corrected sample std (torch.std's default, as TRL and verl use); eps = ``GRPO_EPS`` = 1e-6.
    A group whose k returns are all identical carries no signal and gets advantage exactly 0 in both
    modes (see ``_identical``; ``informative_groups`` finds such groups). The Dr. GRPO advantage is
    (k−1)/k times the RLOO advantage: the same direction, mean baseline including the sample itself.

    rewards_or_scores: [B] scores or [B, R] per-token rewards; mask: [B, R]; B a multiple of k >= 2.
    Returns advantages [B, R] in float, 0 on padding.
    """
    g = _group_returns(rewards_or_scores, mask, k, "grpo_advantages")
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + GRPO_EPS)
    adv = torch.where(_identical(g).unsqueeze(1), torch.zeros_like(adv), adv)
    return adv.reshape(-1, 1) * mask


def informative_groups(scores: torch.Tensor, k: int, tol: float = 0.0) -> torch.Tensor:
    """Rows whose group of k rewards is not flat: DAPO's dynamic sampling filter (Yu et al. 2025, eq. 11).

    DAPO keeps a prompt only if 0 < |{correct responses}| < G, i.e. its binary rewards are not all equal;
    for real-valued rewards the same test is std_group > ``tol`` (Bessel-corrected, as ``grpo_advantages``).
    A group of identical rewards is never informative, whatever ``tol`` (tested by equality, see
    ``_identical``); such a group has zero GRPO and RLOO advantage, so dropping it only removes no-op rows.

    scores: [B] task rewards (the RM or gold score, before the KL penalty: with it no group is ever flat),
    B a multiple of k >= 2; tol >= 0. Returns a bool mask [B], equal within each group.
    """
    if not tol >= 0:
        raise ValueError(f"informative_groups: tol must be >= 0, got {tol}")
    if scores.dim() != 1:
        raise ValueError(f"informative_groups: scores must be [B], got {tuple(scores.shape)}")
    g = _group_returns(scores, torch.ones(scores.shape[0], 1), k, "informative_groups")
    keep = ~_identical(g) & (g.std(1) > tol)
    return keep.repeat_interleave(k)


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[target − pred] / Var[target] over masked entries (1 = perfect value function)."""
    var_t = masked_var(target, mask)
    return 1 - masked_var(target - pred, mask) / var_t.clamp(min=1e-12)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position. logits [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and the entropy from ONE log-softmax: logits [b, r, V], tokens [b, r] -> ([b, r], [b, r]).

    PPO's scoring phase needs both; each pass over a [16, 64, 49152] float tensor costs ~0.3 s on 2 cores.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def truncated_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (TIS) for responses sampled by a different engine than the trainer.

    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training": when a fast
    engine (vLLM) samples the responses but the trainer recomputes π_old itself, the tokens come from
    π_engine, not π_old, and the policy gradient is off by π_old/π_engine at each token. TIS weighs each
    token's policy loss by that ratio, truncated from above so a token the engine found unlikely cannot
    blow the gradient up:

        w_t = min(exp(log π_old(y_t) − log π_engine(y_t)), C)          (a constant: no gradient)

    old_logprobs:     [B, R] the trainer's log π_old of the sampled tokens
    rollout_logprobs: [B, R] the engine's log-probs of the same tokens
    mask:             [B, R] 1 on real response tokens
    cap:              C > 0
    returns (w [B, R], 0 on padding; truncated [B, R] bool, True where the cap was hit on a real token).

    w_t >= 0, and for w >= 0, w·max(a, b) = max(w·a, w·b): multiplying the advantages by w multiplies
    each token's clipped PPO loss (Schulman et al. 2017, eq. 7) by w, which is how PPO applies it.
    """
    if cap <= 0:
        raise ValueError(f"truncated_importance_weights: cap must be > 0, got {cap}")
    with torch.no_grad():
        ratio = torch.exp(old_logprobs.float() - rollout_logprobs.float())
        truncated = (ratio > cap) & (mask > 0)
        return ratio.clamp(max=cap) * mask, truncated


# ---------------------------------------------------------------------------
# KL coefficient: fixed (InstructGPT, β = 0.02) or adaptive (Ziegler et al. 2019, §2.2)
# ---------------------------------------------------------------------------


@dataclass
class KLController:
    """β for the KL penalty.

    Fixed: β stays at ``value``. Adaptive (Ziegler et al. 2019, eq. in §2.2):
    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2);  β_{t+1} = β_t (1 + K_β e_t), K_β = n_steps / horizon,
    where KL_t is the batch's mean per-sequence KL and n_steps the episodes in the batch.
    """

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "adaptive": self.adaptive, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.adaptive, self.target, self.horizon = bool(state["adaptive"]), float(state["target"]), int(state["horizon"])
