"""Simulated labelers: rankings, demonstrations, held-out judges, calibrated agreement."""

import random

import pytest

from instructrl.data import load_rankings, ranking_row
from instructrl.io import write_jsonl
from instructrl.core.stats import pairwise_agreement
from instructrl.tasks import generate_tasks, gold_score, sample_responses, satisfies_all
from instructrl.tasks.labelers import DEFAULT_NOISE, LabelerPool, SimulatedLabeler, ranking_labels


@pytest.fixture(scope="module")
def tasks():
    return generate_tasks(300, seed=21)


def test_noise_free_labeler_ranks_by_gold(tasks):
    lab = SimulatedLabeler("exact", noise=0.0)
    rng = random.Random(0)
    for t in tasks[:50]:
        rs = sample_responses(t, 6, rng)
        r = lab.rank(t, rs, rng)
        g = [gold_score(t.constraints, x, t.topic_words) for x in r.responses]
        assert g == sorted(g, reverse=True)
        assert r.ranks == list(range(len(rs))) and r.labeler_id == "exact" and r.user_id == t.user_id
        assert r.messages == t.to_prompt_record().messages


def test_length_bias_moves_preferences(tasks):
    t = tasks[0]
    short, long = "Compost is fine to do.", "Compost is fine to do. " + "Another sentence adds many more words here. " * 6
    rng = random.Random(0)
    likes_long = SimulatedLabeler("long", noise=0.05, length_bias=0.5)
    likes_short = SimulatedLabeler("short", noise=0.05, length_bias=-0.5)
    assert likes_long.mean_utility(t, long) - likes_long.mean_utility(t, short) > \
        likes_short.mean_utility(t, long) - likes_short.mean_utility(t, short) + 0.3


def test_rank_merges_duplicates_and_rejects_too_few(tasks):
    lab = SimulatedLabeler("a")
    rng = random.Random(0)
    r = lab.rank(tasks[0], ["x y z", "x y z", "a b c", "  "], rng)
    assert sorted(r.responses) == ["a b c", "x y z"]
    with pytest.raises(ValueError, match="at least 2 distinct"):
        lab.rank(tasks[0], ["same", "same"], rng)


def test_rankings_roundtrip_through_the_data_loader(tasks, tmp_path):
    pool = LabelerPool.default()
    rng = random.Random(3)
    rankings = [pool.rank(t, sample_responses(t, rng.randint(4, 9), rng), rng) for t in tasks[:40]]
    assert all(4 <= r.k <= 9 for r in rankings)
    assert {r.labeler_id for r in rankings} <= {l.id for l in pool.train}
    p = tmp_path / "rankings.jsonl"
    write_jsonl(p, (ranking_row(r) for r in rankings))
    back = load_rankings(p)
    assert [(b.responses, b.ranks, b.labeler_id) for b in back] == [(r.responses, r.ranks, r.labeler_id) for r in rankings]


def test_demonstrations_pass_gold_and_use_best_of_n(tasks):
    pool = LabelerPool.default()
    rng = random.Random(4)
    for t in tasks[:100]:
        d = pool.write_demonstration(t, sample_responses(t, 3, rng), rng)
        assert satisfies_all(t.constraints, d.response)
        assert d.labeler_id in {l.id for l in pool.train} and d.user_id == t.user_id
    assert satisfies_all(tasks[0].constraints, SimulatedLabeler("z").write_demonstration(tasks[0]).response)


def test_pool_holds_out_labelers_and_judges_with_them(tasks):
    pool = LabelerPool.default(n_train=5, n_heldout=2)
    assert len(pool.train) == 5 and len(pool.heldout) == 2
    assert not {l.id for l in pool.train} & {l.id for l in pool.heldout}
    t = tasks[1]
    good = pool.train[0].write_demonstration(t).response
    bad = "no"
    rng = random.Random(0)
    votes = [pool.prefers(t, good, bad, rng) for _ in range(200)]
    assert sum(votes) / 200 > 0.9
    assert pool.prefers(t, good, good, rng) == 0.5
    with pytest.raises(ValueError):
        LabelerPool([SimulatedLabeler("h", heldout=True)])


def test_gumbel_noise_is_centred_unit_variance():
    lab = SimulatedLabeler("g", noise=1.0, noise_kind="gumbel")
    rng = random.Random(0)
    xs = [lab._eps(rng) for _ in range(20000)]
    m = sum(xs) / len(xs)
    v = sum((x - m) ** 2 for x in xs) / len(xs)
    assert abs(m) < 0.03 and abs(v - 1) < 0.05


def test_ranking_labels_feed_pairwise_agreement(tasks):
    t = tasks[2]
    rs = ["a b c", "d e f", "g h i"]
    a, b = SimulatedLabeler("a", noise=0.0), SimulatedLabeler("b", noise=0.0)
    rng = random.Random(0)
    ag = pairwise_agreement(ranking_labels([a.rank(t, rs, rng), b.rank(t, rs, rng)]))
    assert ag.n_pairs == 3 and ag.rate == 1.0


def test_default_noise_gives_about_73_percent_agreement():
    """InstructGPT: training labelers agree on 72.6 ± 1.5% of comparisons (§3.4)."""
    tasks = generate_tasks(400, seed=77)
    rng = random.Random(5)
    sets = [sample_responses(t, rng.randint(4, 9), rng) for t in tasks]
    pool = LabelerPool.default(seed=1)
    assert all(abs(l.noise - DEFAULT_NOISE) <= 0.2 * DEFAULT_NOISE + 1e-12 for l in pool.labelers)
    ag = pool.measure_agreement(tasks, sets, rng)
    assert ag.n_pairs > 5000
    assert 0.68 <= ag.rate <= 0.78, ag.rate
    # noise and taste matter: noise-free, unbiased labelers always agree; very noisy ones far less
    exact = LabelerPool([SimulatedLabeler("x", noise=0.0), SimulatedLabeler("y", noise=0.0)])
    assert exact.measure_agreement(tasks, sets, rng).rate == 1.0
    assert LabelerPool.default(noise=1.0).measure_agreement(tasks, sets, rng).rate < 0.62
