"""DPO, IPO and listwise (Plackett-Luce) DPO losses: hand-worked values, equalities, naive-form gradients."""

import math
import random

import pytest
import torch

from instructrl.core.losses import (dpo_loss, ipo_loss, plackett_luce_dpo_loss, ranking_pairs, sequence_logprobs,
                                    token_logprobs)


def test_dpo_hand_worked():
    # β = 0.5; log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; margin = 0.5 * (1 - (-1)) = 1
    # loss = -log σ(1) = log(1 + e^-1) = 0.3132617
    loss, st = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    assert st["margin"].item() == pytest.approx(1.0) and st["accuracy"].item() == 1.0 and st["pairs"] == 1
    # two pairs, the second with margin 0 (log 2), weights 1 and 0.5, normaliser 3: (0.3132617 + 0.5 log 2) / 3
    loss, st = dpo_loss(torch.tensor([-1.0, 0.0]), torch.tensor([-3.0, 0.0]), torch.tensor([-2.0, 0.0]),
                        torch.tensor([-2.0, 0.0]), 0.5, weight=torch.tensor([1.0, 0.5]), num=3)
    assert loss.item() == pytest.approx((0.3132617 + 0.5 * math.log(2)) / 3, abs=1e-6)
    assert st["accuracy"].item() == 0.5  # margin 0 is not correct


def test_ipo_hand_worked():
    # h = (−1 − (−2)) − (−3 − (−2)) = 2.  τ = 0.5: target 1/(2τ) = 1, loss (2 − 1)² = 1.  τ = 0.25: target 2, loss 0
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert ipo_loss(*args, 0.5)[0].item() == pytest.approx(1.0)
    assert ipo_loss(*args, 0.25)[0].item() == pytest.approx(0.0)
    # τ = 1: target 0.5, loss (2 − 0.5)² = 2.25; margin logged as τ·h = 2
    loss, st = ipo_loss(*args, 1.0)
    assert loss.item() == pytest.approx(2.25) and st["margin"].item() == pytest.approx(2.0)


def test_plackett_luce_hand_worked_k3_and_tie():
    # β = 1, reference 0, rewards [2, 1, 0] ranked in that order:
    # NLL = [log(e²+e+1) − 2] + [log(e+1) − 1] + 0 = (2.4076059 − 2) + (1.3132617 − 1) = 0.7208676
    g, z = torch.tensor([0, 0, 0]), torch.zeros(3)
    loss, st = plackett_luce_dpo_loss(torch.tensor([2.0, 1.0, 0.0]), z, g, torch.tensor([0, 1, 2]), 1.0)
    assert loss.item() == pytest.approx(0.7208676, abs=1e-6)
    assert st["pairs"] == 3 and st["accuracy"].item() == 1.0 and st["margin"].item() == pytest.approx(4 / 3)
    # ranks [0, 1, 1] (a tie below the best), rewards [1, 0, 0]: only the best competes,
    # with both tied ones: log(e + 2) − 1 = 0.5514447; the tied pair gives no factor
    loss, st = plackett_luce_dpo_loss(torch.tensor([1.0, 0.0, 0.0]), z, g, torch.tensor([0, 1, 1]), 1.0)
    assert loss.item() == pytest.approx(0.5514447, abs=1e-6) and st["pairs"] == 2
    # an all-tied ranking has no comparison: loss 0
    assert plackett_luce_dpo_loss(torch.tensor([3.0, 0.0]), torch.zeros(2), torch.tensor([0, 0]),
                                  torch.tensor([0, 0]), 1.0)[0].item() == 0.0


def _batch(seed, ks=(2, 3, 4, 9), ties=True):
    rng = random.Random(seed)
    group, ranks = [], []
    for gi, k in enumerate(ks):
        rk = list(range(k))
        if ties and k > 2:
            rk[rng.randrange(1, k)] = rk[rng.randrange(0, k)]  # make a tie (ranks need not be contiguous)
        rng.shuffle(rk)
        group += [10 + 3 * gi] * k
        ranks += rk
    n = len(group)
    gen = torch.Generator().manual_seed(seed)
    pol = torch.randn(n, generator=gen, dtype=torch.float64) * 3 - 20
    ref = torch.randn(n, generator=gen, dtype=torch.float64) * 3 - 20
    return pol, ref, torch.tensor(group), torch.tensor(ranks)


def _pl_nll_loop(pol, ref, group, ranks, beta):
    """The Plackett-Luce NLL of each ranking, written as the plain product over positions (ties: no comparison)."""
    total = 0.0
    for g in sorted(set(group.tolist())):
        idx = [i for i in range(len(group)) if group[i] == g]
        r = {i: beta * (pol[i] - ref[i]) for i in idx}
        for i in idx:
            below = [j for j in idx if ranks[j] > ranks[i]]
            if below:
                total = total - (r[i] - torch.log(torch.exp(r[i]) + sum(torch.exp(r[j]) for j in below)))
    return total / len(set(group.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_listwise_equals_plain_loop_with_equal_gradients(seed):
    pol, ref, group, ranks = _batch(seed)
    a = pol.clone().requires_grad_(True)
    b = pol.clone().requires_grad_(True)
    loss, _ = plackett_luce_dpo_loss(a, ref, group, ranks, 0.3)
    naive = _pl_nll_loop(b, ref, group, ranks, 0.3)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    (ga,), (gb,) = torch.autograd.grad(loss, a), torch.autograd.grad(naive, b)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-6)


def test_listwise_at_k2_equals_pairwise_dpo_loss_and_gradient():
    # 5 pairs, winner at an arbitrary position in each
    gen = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(10, generator=gen) - 5, torch.randn(10, generator=gen) - 5
    group = torch.arange(5).repeat_interleave(2)
    ranks = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0, 0, 1])
    w, l, weight = ranking_pairs(group, ranks)
    assert torch.equal(weight, torch.ones(5))
    a, b = pol.clone().requires_grad_(True), pol.clone().requires_grad_(True)
    lw, _ = plackett_luce_dpo_loss(a, ref, group, ranks, 0.1)
    pw, _ = dpo_loss(b[w], b[l], ref[w], ref[l], 0.1)
    assert lw.item() == pytest.approx(pw.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(lw, a)[0], torch.autograd.grad(pw, b)[0])


def test_pairwise_dpo_over_rankings_equals_naive_pair_loop_and_gradient():
    pol, ref, group, ranks = _batch(3)
    w, l, weight = ranking_pairs(group, ranks)
    a, b = pol.clone().requires_grad_(True), pol.clone().requires_grad_(True)
    loss, st = dpo_loss(a[w], a[l], ref[w], ref[l], 0.2, weight=weight, num=4)
    naive = 0.0
    for g in set(group.tolist()):
        idx = [i for i in range(len(group)) if group[i] == g]
        k = len(idx)
        for i in idx:
            for j in idx:
                if ranks[i] < ranks[j]:
                    m = 0.2 * ((b[i] - ref[i]) - (b[j] - ref[j]))
                    naive = naive - torch.log(torch.sigmoid(m)) / (k * (k - 1) / 2)
    naive = naive / 4
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, a)[0], torch.autograd.grad(naive, b)[0])
    assert st["pairs"] == int(((group[:, None] == group[None, :]) & (ranks[:, None] < ranks[None, :])).sum())


def test_sequence_logprobs_sums_response_tokens_only():
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 7, generator=gen), torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    tl = token_logprobs(logits, ids)
    expect = torch.stack([tl[0, 2] + tl[0, 3], tl[1, 1:].sum()])
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expect)


def test_listwise_shape_errors():
    with pytest.raises(ValueError, match=r"\[N\]"):
        plackett_luce_dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.long),
                               torch.zeros(3, dtype=torch.long), 1.0)
