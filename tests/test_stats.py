"""Hand-worked checks of instructrl.core.stats."""

import math

import numpy as np
import pytest

from instructrl.core.stats import (
    ELO_SCALE, bootstrap_ratings, bradley_terry, linear_fit, pairwise_agreement, proportion_ci, win_rate,
)


def test_wilson_known_values():
    # Textbook values (e.g. Newcombe 1998, Table I; Wikipedia "Binomial proportion confidence interval").
    lo, hi = proportion_ci(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = proportion_ci(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = proportion_ci(81, 263)  # Newcombe's example: 0.2553 - 0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)


def test_wilson_edges_and_errors():
    assert proportion_ci(0, 0) == (0.0, 1.0)
    lo, hi = proportion_ci(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    # higher level -> wider
    a, b = proportion_ci(30, 50, 0.9), proportion_ci(30, 50, 0.99)
    assert b[0] < a[0] and b[1] > a[1]
    with pytest.raises(ValueError):
        proportion_ci(11, 10)
    with pytest.raises(ValueError):
        proportion_ci(1, 10, level=1.5)


def test_win_rate_ties_count_half():
    w = win_rate(6, 4, 20)
    assert w.rate == pytest.approx(0.4)
    assert (w.lo, w.hi) == pytest.approx(proportion_ci(8, 20))
    assert w.lo < 0.4 < w.hi
    assert win_rate(0, 10, 10).rate == 0.5
    with pytest.raises(ValueError):
        win_rate(8, 5, 10)


def test_bt_two_players_closed_form():
    # With two players the MLE is θa - θb = log(wins_a / wins_b).
    comps = [("a", "b", 1)] * 3 + [("b", "a", 1)] * 1
    r = bradley_terry(comps, prior=0.0 + 1e-9)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert (r["a"] + r["b"]) / 2 == pytest.approx(1000)
    rb = bradley_terry(comps, baseline="b", prior=1e-9)
    assert rb["b"] == pytest.approx(1000) and rb["a"] == pytest.approx(1000 + 400 * math.log10(3), abs=1e-3)


def test_bt_ties_count_half_each_way():
    # 2 wins + 2 ties for a, 0 wins for b  -> scores 3 vs 1 -> same as 3:1
    comps = [("a", "b", 1), ("a", "b", 1), ("a", "b", 0.5), ("b", "a", 0.5)]
    r = bradley_terry(comps, prior=1e-9)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_bt_recovers_true_strengths_and_matches_gradient_condition():
    rng = np.random.default_rng(0)
    true = {"x": 0.0, "y": 1.0, "z": -0.5, "w": 2.0}
    names = list(true)
    comps = []
    for _ in range(6000):
        a, b = rng.choice(4, 2, replace=False)
        p = 1 / (1 + math.exp(-(true[names[a]] - true[names[b]])))
        comps.append((names[a], names[b], float(rng.random() < p)))
    r = bradley_terry(comps, baseline="x")
    for n in names:
        assert r[n] == pytest.approx(1000 + ELO_SCALE * true[n], abs=35), n
    # At the MLE (prior ~ 0) each player's expected score equals its actual score.
    th = {n: (r[n] - 1000) / ELO_SCALE for n in names}
    for n in names:
        actual = sum(o if a == n else 1 - o for a, b, o in comps if n in (a, b))
        expected = sum(1 / (1 + math.exp(-(th[a] - th[b]))) if a == n else 1 / (1 + math.exp(-(th[b] - th[a])))
                       for a, b, o in comps if n in (a, b))
        assert actual == pytest.approx(expected, abs=0.5)


def test_bt_undefeated_player_is_finite_and_on_top():
    comps = [("a", "b", 1)] * 5 + [("b", "c", 1)] * 3 + [("c", "b", 1)]
    r = bradley_terry(comps)
    assert all(math.isfinite(v) for v in r.values())
    assert r["a"] > r["b"] > r["c"]


def test_bt_errors():
    with pytest.raises(ValueError, match="itself"):
        bradley_terry([("a", "a", 1)])
    with pytest.raises(ValueError, match="outcome"):
        bradley_terry([("a", "b", 2)])
    with pytest.raises(ValueError, match="baseline"):
        bradley_terry([("a", "b", 1)], baseline="q")


def test_bootstrap_ratings_seeded_and_covering():
    comps = [("a", "b", 1)] * 30 + [("b", "a", 1)] * 10 + [("b", "c", 1)] * 25 + [("c", "b", 1)] * 15
    r1 = bootstrap_ratings(comps, n_boot=200, seed=3, baseline="b")
    r2 = bootstrap_ratings(comps, n_boot=200, seed=3, baseline="b")
    assert r1 == r2
    point = bradley_terry(comps, baseline="b")
    for p, ci in r1.items():
        assert ci.rating == pytest.approx(point[p])
        assert ci.lo <= ci.rating <= ci.hi
    assert r1["b"].lo == r1["b"].hi == pytest.approx(1000)
    assert r1["a"].lo > 1000  # 30:10 is decisive
    assert r1["a"].hi - r1["a"].lo > 50  # ...but not infinitely precise
    r3 = bootstrap_ratings(comps, n_boot=200, seed=4, baseline="b")
    assert r3["a"].lo != r1["a"].lo


def test_pairwise_agreement_hand_worked():
    labels = [
        ("q1", "L1", 1), ("q1", "L2", 1), ("q1", "L3", 0),   # pairs: L1L2 agree, L1L3 no, L2L3 no
        ("q2", "L1", 0), ("q2", "L2", 0),                    # L1L2 agree
        ("q3", "L3", 1),                                     # single label: no pair
    ]
    a = pairwise_agreement(labels)
    assert a.n_pairs == 4 and a.rate == pytest.approx(0.5)
    assert (a.lo, a.hi) == pytest.approx(proportion_ci(2, 4))
    assert a.per_labeler["L1"]["rate"] == pytest.approx(2 / 3) and a.per_labeler["L1"]["n_pairs"] == 3
    assert a.per_labeler["L3"]["rate"] == 0.0 and a.per_labeler["L3"]["n_pairs"] == 2
    with pytest.raises(ValueError, match="twice"):
        pairwise_agreement([("q", "L1", 1), ("q", "L1", 0)])
    assert math.isnan(pairwise_agreement([("q", "L1", 1)]).rate)


def test_linear_fit():
    s, b, r2 = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert (s, b, r2) == pytest.approx((2.0, 1.0, 1.0))
    # y = [0, 2, 1]: slope 0.5, intercept 0.5, SS_res = 1.5, SS_tot = 2 -> r2 = 0.25
    s, b, r2 = linear_fit([0, 1, 2], [0, 2, 1])
    assert (s, b, r2) == pytest.approx((0.5, 0.5, 0.25))
    with pytest.raises(ValueError):
        linear_fit([1, 1], [0, 1])
    with pytest.raises(ValueError):
        linear_fit([1], [1])
