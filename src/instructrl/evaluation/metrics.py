"""Evaluation statistics: pure functions from scores, texts and judgments to numbers with 95% CIs.

No models here: :mod:`instructrl.evaluation.sampling` turns models into samples and scores,
:mod:`instructrl.evaluation.evaluate` calls these on them. See docs/evaluation.md.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Sequence

import numpy as np
import torch

from instructrl.plots import reward_vs_sqrt_kl  # noqa: F401  (PPO draws it too, so it lives below train/)


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean with a normal-approximation interval: mean ± z·s/√n (s = sample std, ddof = 1).

    Returns {"mean", "lo", "hi", "n"}; with n < 2 the interval is the point itself
    (nothing to estimate a spread from); n = 0 gives NaNs.
    """
    from statistics import NormalDist

    x = np.asarray(list(values), dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    m = float(x.mean())
    if n < 2:
        return {"mean": m, "lo": m, "hi": m, "n": n}
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate Σ_t mask·(log π − log π_ref) (the k1 estimator PPO penalises, eq. 2).

    logprobs, ref_logprobs, mask: [B, R] (mask 1 on real response tokens, EOS included). Returns [B].
    On samples from π its expectation is KL(π ‖ π_ref) in nats.
    """
    return ((logprobs - ref_logprobs) * mask).sum(-1)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ reference) = log n − (n − 1)/n nats (Stiennon et al. 2020 App. G; exact for distinct samples).

    The best-of-n policy's samples are the reference's own tokens, so the plug-in
    estimate on them would be 0; this closed form is the standard figure.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_pick(scores: Sequence[float], n: int) -> list[int]:
    """Indices of the highest-scoring answer in each consecutive group of ``n`` (the first one on ties).

    ``scores``: [P·n] RM scores, the n samples of prompt p at positions p·n .. p·n + n − 1.
    """
    if n < 1 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not split into groups of {n}")
    return [p * n + int(np.argmax(scores[p * n:(p + 1) * n])) for p in range(len(scores) // n)]


def gold_gain(gold: Sequence[float], baseline_gold: Sequence[float], level: float = 0.95) -> dict:
    """Mean per-prompt gold-score difference against the baseline, with a paired interval (``mean_ci``).

    ``gold``, ``baseline_gold``: one gold score per prompt, same prompt order. A labeler's
    verdict on one pair is a coin flip whenever the two answers differ by less than its
    noise (0.165 on a [0, 1] scale, about one constraint), so the labeler win rate needs
    a large gain before its interval leaves 0.5; the paired difference of the
    noise-free gold scores shows a small gain (or loss) that the win rate cannot.
    """
    if len(gold) != len(baseline_gold):
        raise ValueError(f"{len(gold)} vs {len(baseline_gold)} gold scores")
    return mean_ci([a - b for a, b in zip(gold, baseline_gold)], level)


def score_outcomes(a_scores: Sequence[float], b_scores: Sequence[float],
                   a_texts: Sequence[str] | None = None, b_texts: Sequence[str] | None = None) -> list[float]:
    """RM judgment of each prompt: 1 if a's score is higher, 0 if lower, 0.5 if equal or the texts are identical."""
    if len(a_scores) != len(b_scores):
        raise ValueError(f"{len(a_scores)} vs {len(b_scores)} scores")
    out = []
    for i, (sa, sb) in enumerate(zip(a_scores, b_scores)):
        same = a_texts is not None and b_texts is not None and a_texts[i] == b_texts[i]
        out.append(0.5 if same or sa == sb else (1.0 if sa > sb else 0.0))
    return out


def outcomes_win_rate(outcomes: Sequence[float], level: float = 0.95) -> dict:
    """Win rate of a list of outcomes (1 win, 0 loss, 0.5 tie): ties count half, Wilson interval (stats.win_rate)."""
    from instructrl.core.stats import win_rate

    wins = sum(1 for o in outcomes if o == 1.0)
    ties = sum(1 for o in outcomes if o == 0.5)
    if wins + ties + sum(1 for o in outcomes if o == 0.0) != len(outcomes):
        raise ValueError("outcomes must be 0, 0.5 or 1")
    return win_rate(wins, ties, len(outcomes), level).as_dict()


def rm_gold_agreement(rm: dict[str, Sequence[float]], gold: dict[str, Sequence[float]],
                      texts: dict[str, Sequence[str]], min_gap: float = 0.15, level: float = 0.95) -> dict:
    """How often the RM orders two answers to the same prompt as the gold scorer does.

    ``rm``, ``gold``, ``texts``: policy -> one value per prompt (same prompt order).
    Every pair of distinct answers to one prompt whose gold scores differ by at least
    ``min_gap`` (0.15 ~ one constraint of five) counts; an RM tie counts half.
    Returns {rate, lo, hi, n}; 0.5 is an RM that knows nothing the gold scorer
    rewards, and then PPO against it cannot beat SFT by the labelers. The CI treats
    pairs as independent (they share prompts, so it is somewhat too narrow).
    """
    from instructrl.core.stats import proportion_ci

    names = list(rm)
    n_prompts = len(rm[names[0]]) if names else 0
    hits, n = 0.0, 0
    for i in range(n_prompts):
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                d = gold[a][i] - gold[b][i]
                if abs(d) < min_gap or texts[a][i] == texts[b][i]:
                    continue
                r = rm[a][i] - rm[b][i]
                hits += 0.5 if r == 0 else float(r * d > 0)
                n += 1
    if n == 0:
        return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "min_gap": min_gap}
    lo, hi = proportion_ci(hits, n, level)
    return {"rate": hits / n, "lo": lo, "hi": hi, "n": n, "min_gap": min_gap}


def loglik_bootstrap(sums: dict[str, Sequence[float]], counts: dict[str, Sequence[int]], baseline: str | None,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean per-token log-likelihood Σ sums / Σ counts per model, with percentile bootstrap CIs over texts.

    ``sums[m][i]``: total log-likelihood of text i under model m; ``counts[m][i]``: its predicted tokens.
    Every model is resampled with the same text indices, so ``delta`` (model − baseline) is a
    paired difference: the alignment tax when negative (InstructGPT §4.2).
    """
    names = list(sums)
    n = len(sums[names[0]]) if names else 0
    if any(len(sums[k]) != n or len(counts[k]) != n for k in names):
        raise ValueError("every model needs one sum and one count per text")
    if n == 0:
        raise ValueError("no texts")
    S = {k: np.asarray(sums[k], dtype=np.float64) for k in names}
    C = {k: np.asarray(counts[k], dtype=np.float64) for k in names}
    rng = np.random.default_rng(seed)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [n_boot, n]
    reps = {k: (W @ S[k]) / np.maximum(W @ C[k], 1.0) for k in names}
    a = (1 - level) / 2
    out = {}
    for k in names:
        mean = float(S[k].sum() / max(C[k].sum(), 1.0))
        row = {"mean": mean, "lo": float(np.quantile(reps[k], a)), "hi": float(np.quantile(reps[k], 1 - a)),
               "tokens": int(C[k].sum())}
        if baseline is not None and baseline in S:
            base = float(S[baseline].sum() / max(C[baseline].sum(), 1.0))
            d = reps[k] - reps[baseline]
            row["delta"] = {"mean": mean - base, "lo": float(np.quantile(d, a)), "hi": float(np.quantile(d, 1 - a))}
        out[k] = row
    return out


def seed_for(seed: int, name: str) -> int:
    """A per-policy seed that does not depend on the order policies are listed in."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def labeler_outcome(pool, task, a: str, b: str, a_text: str, b_text: str, seed: int) -> float:
    """Held-out labeler judgment of a vs b on one prompt: 1 (a), 0 (b), 0.5 (identical answers).

    The random stream (which held-out labeler, their noise) is seeded by the prompt
    and the unordered pair of policy names, so a judgment is the same whichever
    order the policies are listed in, and the same comparison feeds both the win
    rate and the Bradley-Terry fit.
    """
    first, second = sorted((a, b))
    rng = random.Random(f"{seed}|{task.id}|{first}|{second}")
    x, y = (a_text, b_text) if first == a else (b_text, a_text)
    o = pool.prefers(task, x, y, rng)
    return o if first == a else 1.0 - o
