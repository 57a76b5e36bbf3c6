"""K-wise ranking loss (InstructGPT eq. 1): hand-worked values and equality with the naive per-pair loop."""

import itertools
import math

import pytest
import torch

from instructrl.core.losses import kwise_ranking_loss


def sp(x):  # softplus(x) = log(1 + e^x); -log σ(d) = sp(-d)
    return math.log1p(math.exp(x))


def test_hand_worked_k3():
    # scores 2 > 1 > 0, ranked in that order: pairs d = 1, 2, 1, each weighted 1/C(3,2) = 1/3
    loss, st = kwise_ranking_loss(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx((2 * sp(-1) + sp(-2)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.2511505, abs=1e-6)
    assert st["pairs"] == 3 and st["correct"] == 3 and st["margin"].item() == pytest.approx(4 / 3)


def test_hand_worked_mixed_k_and_ties():
    # ranking A: K=3 [2,1,0]; ranking B: K=2 equal scores (log 2); ranking C: K=3 with a tie [1,0,0], ranks [0,1,1]
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.tensor([7, 7, 7, 3, 3, 5, 5, 5])
    ranks = torch.tensor([0, 1, 2, 0, 1, 0, 1, 1])
    loss, st = kwise_ranking_loss(scores, group, ranks)
    a = (2 * sp(-1) + sp(-2)) / 3
    b = math.log(2)
    c = 2 * sp(-1) / 3  # the tied pair gives no comparison; weight stays 1/C(3,2)
    assert loss.item() == pytest.approx((a + b + c) / 3, abs=1e-6)
    assert st["pairs"] == 3 + 1 + 2 and st["rankings"] == 3
    # ties: correct counts only strict wins
    assert st["correct"] == 3 + 0 + 2


def test_misordered_pair_and_normaliser():
    loss, st = kwise_ranking_loss(torch.tensor([0.0, 3.0]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(sp(3), abs=1e-6) and st["accuracy"].item() == 0.0
    loss4, _ = kwise_ranking_loss(torch.tensor([0.0, 3.0]), torch.tensor([0, 0]), torch.tensor([0, 1]), num_rankings=4)
    assert loss4.item() == pytest.approx(sp(3) / 4, abs=1e-6)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[N\]"):
        kwise_ranking_loss(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


def naive_loss(score_fn, rankings):
    """The plain way: every untied pair scored separately (2 passes per pair), weighted 1/C(K,2)."""
    total = 0.0
    for feats, ranks in rankings:
        k = len(ranks)
        for i, j in itertools.combinations(range(k), 2):
            if ranks[i] == ranks[j]:
                continue
            w, l = (i, j) if ranks[i] < ranks[j] else (j, i)
            rw, rl = score_fn(feats[w : w + 1]), score_fn(feats[l : l + 1])
            total = total - torch.nn.functional.logsigmoid(rw - rl).sum() / math.comb(k, 2)
    return total / len(rankings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_naive_pairs_loss_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.7)
    rankings = []
    for k in (2, 3, 4, 9, 5):
        feats = torch.randn(k, 5, generator=g)
        ranks = torch.randperm(k, generator=g).tolist()
        if k >= 4:  # a tie
            ranks[1] = ranks[0]
        rankings.append((feats, ranks))

    def score_fn(x):
        return model(x).squeeze(-1)

    ref = naive_loss(score_fn, rankings)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))

    feats = torch.cat([f for f, _ in rankings])
    group = torch.cat([torch.full((len(r),), i) for i, (_, r) in enumerate(rankings)])
    ranks = torch.cat([torch.tensor(r) for _, r in rankings])
    loss, st = kwise_ranking_loss(score_fn(feats), group, ranks)  # ONE pass per response
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert st["pairs"] == sum(sum(1 for i, j in itertools.combinations(range(len(r)), 2) if r[i] != r[j]) for _, r in rankings)


def test_shift_invariant():
    s = torch.randn(7)
    group, ranks = torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2, 3])
    a, _ = kwise_ranking_loss(s, group, ranks)
    b, _ = kwise_ranking_loss(s + 12.5, group, ranks)
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
