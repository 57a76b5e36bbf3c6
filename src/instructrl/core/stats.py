"""Evaluation statistics: pure functions, numpy only.

* :func:`proportion_ci` - Wilson score interval for a binomial proportion.
* :func:`win_rate` - win rate with ties counted as half a win, with a Wilson CI
  (InstructGPT §4.1 reports win rates against the SFT 175B baseline).
* :func:`bradley_terry` / :func:`bootstrap_ratings` - Bradley-Terry strengths
  fitted from pairwise outcomes, on the Elo scale, with bootstrap CIs (the HH
  paper, Bai et al. 2022 §2.3, reports Elo; FastChat's arena fits the same model).
* :func:`pairwise_agreement` - inter-labeler agreement (InstructGPT §3.4 / App. B:
  training labelers agree with each other 72.6 ± 1.5% of the time).
* :func:`linear_fit` - least-squares line with r² (reward vs √KL, HH paper §4.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Hashable, Iterable, Sequence

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)  # Elo points per natural-log unit of strength
ELO_BASE = 1000.0


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


# ---------------------------------------------------------------------------
# Proportions and win rates
# ---------------------------------------------------------------------------


def proportion_ci(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) for ``successes`` out of ``n``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is sane at
    0 or n successes and for small n. ``successes`` may be fractional (ties
    counted as half). ``n == 0`` gives the uninformative (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    if n == 0:
        return (0.0, 1.0)
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class WinRate:
    rate: float  # (wins + ties / 2) / n
    lo: float
    hi: float
    wins: int
    ties: int
    n: int

    def as_dict(self) -> dict:
        return {"rate": self.rate, "lo": self.lo, "hi": self.hi, "wins": self.wins, "ties": self.ties, "n": self.n}


def win_rate(wins: int, ties: int, n: int, level: float = 0.95) -> WinRate:
    """Win rate with ties counted half, and its Wilson ``level`` interval.

    A tie is scored 0.5 (as in InstructGPT's and FastChat's win rates); the
    interval treats the score as a binomial proportion with fractional
    successes, which is slightly conservative when ties are common (a tie has
    less variance than a coin flip).
    """
    if wins < 0 or ties < 0 or wins + ties > n:
        raise ValueError(f"need wins, ties >= 0 and wins + ties <= n, got {wins}, {ties}, {n}")
    score = wins + 0.5 * ties
    lo, hi = proportion_ci(score, n, level)
    return WinRate(score / n if n else float("nan"), lo, hi, wins, ties, n)


# ---------------------------------------------------------------------------
# Bradley-Terry / Elo
# ---------------------------------------------------------------------------

Comparison = tuple[Hashable, Hashable, float]  # (a, b, outcome): 1 a wins, 0 b wins, 0.5 tie


def _index(comparisons: Sequence[Comparison], players: Sequence[Hashable] | None):
    if players is None:
        seen: dict = {}
        for a, b, _ in comparisons:
            seen.setdefault(a, None)
            seen.setdefault(b, None)
        players = list(seen)
    players = list(players)
    pos = {p: i for i, p in enumerate(players)}
    ia, ib, out = [], [], []
    for k, (a, b, o) in enumerate(comparisons):
        if a not in pos or b not in pos:
            raise ValueError(f"comparison {k}: player {a if a not in pos else b!r} is not in players")
        if a == b:
            raise ValueError(f"comparison {k}: a player cannot be compared with itself ({a!r})")
        o = float(o)
        if not 0.0 <= o <= 1.0:
            raise ValueError(f"comparison {k}: outcome must be 1 (a wins), 0 (b wins) or 0.5 (tie), got {o!r}")
        ia.append(pos[a]), ib.append(pos[b]), out.append(o)
    return players, np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64), np.asarray(out, dtype=np.float64)


def _fit_bt(n: int, ia: np.ndarray, ib: np.ndarray, out: np.ndarray, weights: np.ndarray | None,
            prior: float, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Penalised maximum likelihood of BT strengths θ (natural-log units) by Newton's method.

    Model: P(a beats b) = σ(θ_a - θ_b); a tie counts as half a win each way.
    Objective: Σ w_c [o log σ(θ_a-θ_b) + (1-o) log σ(θ_b-θ_a)] - prior/2 · |θ|².
    The tiny Gaussian prior makes the optimum unique and finite even when a
    player won (or lost) every game, and fixes the additive gauge.
    """
    w = np.ones_like(out) if weights is None else weights
    # Aggregate to a score matrix S[i, j] = points i took from j, games G[i, j].
    S = np.zeros((n, n))
    G = np.zeros((n, n))
    np.add.at(S, (ia, ib), w * out)
    np.add.at(S, (ib, ia), w * (1.0 - out))
    np.add.at(G, (ia, ib), w)
    np.add.at(G, (ib, ia), w)
    theta = np.zeros(n)
    for _ in range(max_iter):
        d = theta[:, None] - theta[None, :]
        p = 1.0 / (1.0 + np.exp(-d))  # p[i, j] = P(i beats j)
        grad = (S - G * p).sum(1) - prior * theta
        q = G * p * (1.0 - p)
        H = q - np.diag(q.sum(1)) - prior * np.eye(n)  # q_ii = 0 since G_ii = 0
        step = np.linalg.solve(H, grad)
        theta = theta - step
        if np.max(np.abs(step)) < tol:
            break
    return theta


def _to_elo(theta: np.ndarray, players: list, baseline: Hashable | None, base: float) -> np.ndarray:
    elo = ELO_SCALE * theta
    anchor = elo[players.index(baseline)] if baseline is not None else elo.mean()
    return elo - anchor + base


def bradley_terry(comparisons: Sequence[Comparison], players: Sequence[Hashable] | None = None,
                  baseline: Hashable | None = None, prior: float = 1e-4, base: float = ELO_BASE) -> dict:
    """Bradley-Terry ratings on the Elo scale from ``(a, b, outcome)`` triples.

    outcome: 1 if ``a`` won, 0 if ``b`` won, 0.5 for a tie. Returns
    ``{player: rating}`` where a 400-point gap means 10:1 odds
    (rating = 400·log10(strength)), anchored so that ``baseline`` has rating
    ``base`` (default 1000) or, without a baseline, the mean rating is ``base``.
    ``prior`` is the precision of a N(0, 1/prior) prior on log-strengths: tiny,
    so it only matters for players who won or lost everything.
    """
    players, ia, ib, out = _index(comparisons, players)
    if baseline is not None and baseline not in players:
        raise ValueError(f"baseline {baseline!r} is not among the players {players!r}")
    if not players:
        return {}
    theta = _fit_bt(len(players), ia, ib, out, None, prior)
    return dict(zip(players, _to_elo(theta, players, baseline, base).tolist()))


@dataclass
class RatingCI:
    rating: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"rating": self.rating, "lo": self.lo, "hi": self.hi}


def bootstrap_ratings(comparisons: Sequence[Comparison], n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                      players: Sequence[Hashable] | None = None, baseline: Hashable | None = None,
                      prior: float = 1e-4, base: float = ELO_BASE) -> dict[Hashable, RatingCI]:
    """BT/Elo ratings with percentile bootstrap intervals (resampling comparisons).

    Each replicate redraws the comparisons with replacement (multinomial
    weights, seeded by ``seed``) and refits; the point estimate is the fit on
    the data itself. With a ``baseline`` the baseline's interval is [base, base]
    by construction: the intervals are then relative to it.
    """
    players, ia, ib, out = _index(comparisons, players)
    if baseline is not None and baseline not in players:
        raise ValueError(f"baseline {baseline!r} is not among the players {players!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    _z(level)
    n = len(players)
    point = _to_elo(_fit_bt(n, ia, ib, out, None, prior), players, baseline, base)
    rng = np.random.default_rng(seed)
    m = len(out)
    reps = np.empty((n_boot, n))
    for r in range(n_boot):
        w = rng.multinomial(m, np.full(m, 1.0 / m)).astype(np.float64) if m else np.zeros(0)
        reps[r] = _to_elo(_fit_bt(n, ia, ib, out, w, prior), players, baseline, base)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, alpha, axis=0), np.quantile(reps, 1.0 - alpha, axis=0)
    return {p: RatingCI(float(point[i]), float(lo[i]), float(hi[i])) for i, p in enumerate(players)}


# ---------------------------------------------------------------------------
# Labeler agreement
# ---------------------------------------------------------------------------


@dataclass
class Agreement:
    rate: float  # agreeing labeler pairs / all labeler pairs on shared comparisons
    lo: float
    hi: float
    n_pairs: int
    per_labeler: dict = field(default_factory=dict)  # labeler -> {"rate", "lo", "hi", "n_pairs"}

    def as_dict(self) -> dict:
        return {"rate": self.rate, "lo": self.lo, "hi": self.hi, "n_pairs": self.n_pairs, "per_labeler": self.per_labeler}


def pairwise_agreement(labels: Iterable[tuple[Hashable, Hashable, Hashable]], level: float = 0.95) -> Agreement:
    """Share of comparisons on which two labelers give the same answer.

    ``labels``: ``(item, labeler, label)`` triples, where ``item`` names one
    comparison (e.g. ``(prompt_id, response_a, response_b)`` with a fixed order)
    and ``label`` the answer (e.g. 1 = a preferred, 0 = b, 0.5 = tie). For every
    item labelled by several labelers, each unordered pair of labelers counts
    once: agreement = agreeing pairs / pairs (InstructGPT App. B.3 measures it
    the same way on overlapping comparisons). ``per_labeler[l]`` is the rate
    over the pairs that include ``l``. The Wilson intervals treat labeler
    pairs as independent, which they are not quite (pairs share items), so
    read them as approximate. A labeler labelling one item twice is an error.
    """
    by_item: dict[Hashable, dict[Hashable, Hashable]] = {}
    for k, (item, labeler, label) in enumerate(labels):
        got = by_item.setdefault(item, {})
        if labeler in got:
            raise ValueError(f"label {k}: labeler {labeler!r} labelled item {item!r} twice")
        got[labeler] = label
    agree = total = 0
    per: dict[Hashable, list[int]] = {}
    for got in by_item.values():
        names = list(got)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                same = int(got[names[i]] == got[names[j]])
                agree += same
                total += 1
                for l in (names[i], names[j]):
                    c = per.setdefault(l, [0, 0])
                    c[0] += same
                    c[1] += 1
    lo, hi = proportion_ci(agree, total, level)
    per_labeler = {}
    for l, (a, t) in per.items():
        plo, phi = proportion_ci(a, t, level)
        per_labeler[l] = {"rate": a / t, "lo": plo, "hi": phi, "n_pairs": t}
    return Agreement(agree / total if total else float("nan"), lo, hi, total, per_labeler)


# ---------------------------------------------------------------------------
# Linear fit
# ---------------------------------------------------------------------------


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Ordinary least squares ``y ≈ slope·x + intercept``; returns (slope, intercept, r²).

    r² = 1 - SS_res / SS_tot (1.0 when y is constant and fitted exactly).
    Used for the HH paper's reward-vs-√KL line (Bai et al. 2022 §4.3, Fig. 13).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"a line needs at least 2 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("x is constant: the slope is undefined")
    slope = float(dx @ (y - y.mean())) / sxx
    intercept = float(y.mean() - slope * x.mean())
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, intercept, r2
