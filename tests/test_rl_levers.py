"""RL levers of issue 20 (docs/rl-levers.md): GRPO / Dr. GRPO advantages, DAPO's group filter, the three
loss aggregations, GRPO's KL loss. Hand-worked values, plain Python loops, and exact micro-batching."""

import itertools
import math
import statistics

import pytest
import torch

from instructrl.core.losses import LOSS_AGGREGATIONS, aggregate_token_loss, kl_loss, ppo_policy_loss
from instructrl.core.rl_math import GRPO_EPS, grpo_advantages, informative_groups, kl_per_token, rloo_advantages

# k = 3 copies of this float32 value have a mean one rounding step off (residuals 3e-8, std 3.7e-8):
# a plain (r − mean)/(std + eps) would give 0.03 instead of 0 for this flat group.
FLAT = 0.4900934100151062


# ---------------------------------------------------------------------------
# GRPO / Dr. GRPO advantages
# ---------------------------------------------------------------------------


def test_grpo_hand_worked():
    # group 1 (k = 3) scores 3, 0, 0: mean 1, deviations 2, −1, −1; sample var (4 + 1 + 1)/2 = 3, std √3 = 1.7320508
    #   GRPO: 2/√3 = 1.1547005, −1/√3 = −0.5773503 (eps 1e-6 moves the 7th digit only)
    # group 2 (k = 3) scores 1, 1, 1: flat -> 0
    scores = torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    a = grpo_advantages(scores, mask, 3)
    s = math.sqrt(3)
    want = torch.tensor([[2 / s, 2 / s], [-1 / s, 0.0], [-1 / s, -1 / s], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(a, want, atol=1e-5, rtol=0)
    assert float(a[0, 0]) == pytest.approx(1.1547005, abs=1e-5)
    # Dr. GRPO: deviations only, 2, −1, −1, at every real token
    d = grpo_advantages(scores, mask, 3, scale=False)
    assert d.tolist() == [[2.0, 2.0], [-1.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_grpo_k2_is_plus_minus_one_over_root_two():
    # k = 2, scores 1, 0: mean 0.5, deviations ±0.5, sample var (0.25 + 0.25)/1 = 0.5, std 0.7071068
    #   -> ±0.5/0.7071068 = ±0.7071068.  Scores 5, −3: deviations ±4, std √32 = 5.656854 -> ±0.7071068 again:
    # GRPO at k = 2 keeps only the sign of the difference; Dr. GRPO keeps its size (±0.5, ±4).
    scores = torch.tensor([1.0, 0.0, 5.0, -3.0])
    a = grpo_advantages(scores, torch.ones(4, 1), 2).flatten()
    torch.testing.assert_close(a, torch.tensor([1, -1, 1, -1.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    assert grpo_advantages(scores, torch.ones(4, 1), 2, scale=False).flatten().tolist() == [0.5, -0.5, 4.0, -4.0]


def test_grpo_flat_group_is_exactly_zero():
    g = torch.tensor([FLAT] * 3)
    naive = (g - g.mean()) / (g.std() + GRPO_EPS)
    assert float(naive.abs().max()) > 0.01  # the rounding residual a std-only test would turn into signal
    for scale in (True, False):
        a = grpo_advantages(torch.tensor([FLAT] * 3 + [1.0, 2.0, 3.0]), torch.ones(6, 2), 3, scale=scale)
        assert a[:3].abs().max().item() == 0.0
        assert a[3:].abs().max().item() > 0.5


def test_grpo_per_token_rewards_are_summed_like_rloo():
    # [B, R] shaped rewards: each row's return is the sum over its real tokens (padding 9s ignored):
    # rows 1+2 = 3, 0, −1+1 = 0 -> the same as scores 3, 0, 0
    rewards = torch.tensor([[1.0, 2.0], [0.0, 9.0], [-1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    for scale in (True, False):
        torch.testing.assert_close(grpo_advantages(rewards, mask, 3, scale),
                                   grpo_advantages(torch.tensor([3.0, 0.0, 0.0]), mask, 3, scale))


def test_grpo_matches_python_loop():
    g = torch.Generator().manual_seed(3)
    k, n, R = 4, 5, 6
    scores = torch.randn(n * k, generator=g)
    scores[4:8] = 0.7  # one flat group
    scores[8:12] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # binary rewards
    mask = (torch.rand(n * k, R, generator=g) > 0.3).float()
    mask[:, 0] = 1
    for scale in (True, False):
        adv = grpo_advantages(scores, mask, k, scale)
        for i in range(n * k):
            grp = scores[i // k * k: i // k * k + k].tolist()
            mu, sd = statistics.mean(grp), statistics.stdev(grp)
            want = 0.0 if len(set(grp)) == 1 else (grp[i % k] - mu) / ((sd + GRPO_EPS) if scale else 1.0)
            torch.testing.assert_close(adv[i], want * mask[i], atol=1e-5, rtol=1e-5)


def test_drgrpo_is_rloo_scaled_by_k_minus_1_over_k():
    # A_DrGRPO = G_i − mean = (k−1)/k · (G_i − mean of the others) = (k−1)/k · A_RLOO
    g = torch.Generator().manual_seed(4)
    k = 4
    rewards = torch.randn(3 * k, 5, generator=g)
    mask = (torch.rand(3 * k, 5, generator=g) > 0.2).float()
    mask[:, 0] = 1
    torch.testing.assert_close(grpo_advantages(rewards, mask, k, scale=False),
                               (k - 1) / k * rloo_advantages(rewards, mask, k), atol=1e-5, rtol=1e-5)


def test_grpo_bad_input():
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(torch.zeros(3), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(torch.zeros(4), torch.ones(4, 1), 1)
    with pytest.raises(ValueError, match=r"\[B\] scores or \[B, R\]"):
        grpo_advantages(torch.zeros(4, 3), torch.ones(4, 2), 2)


# ---------------------------------------------------------------------------
# DAPO's dynamic sampling filter
# ---------------------------------------------------------------------------


def test_informative_groups_hand_worked():
    # groups of 3: [1,1,1] flat; [1,0,1] std 0.57735; [FLAT]*3 flat (rounding-safe);
    # [0, 0.01, 0]: mean 0.0033333, squared deviations 1.1111e-5, 4.4444e-5, 1.1111e-5 -> var 3.3333e-5, std 0.0057735
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, FLAT, FLAT, FLAT, 0.0, 0.01, 0.0])
    keep = informative_groups(scores, 3)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert informative_groups(scores, 3, tol=0.005).tolist()[9:] == [True] * 3  # 0.0057735 > 0.005
    assert informative_groups(scores, 3, tol=0.01).tolist() == [False] * 3 + [True] * 3 + [False] * 6
    assert keep.dtype == torch.bool


def test_informative_groups_is_dapo_constraint_on_binary_rewards():
    # DAPO eq. 11: keep a prompt iff 0 < #correct < G; check every 0/1 pattern of a group of 4
    patterns = list(itertools.product([0.0, 1.0], repeat=4))
    scores = torch.tensor([x for p in patterns for x in p])
    keep = informative_groups(scores, 4).view(-1, 4)
    for p, row in zip(patterns, keep.tolist()):
        assert row == [0 < sum(p) < 4] * 4


def test_informative_groups_zero_advantage_exactly_where_dropped():
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (24,), generator=g).float()  # few values: many flat groups of 3
    keep = informative_groups(scores, 3)
    assert 0 < int(keep.sum()) < 24
    for scale in (True, False):
        a = grpo_advantages(scores, torch.ones(24, 1), 3, scale).flatten()
        assert (a[~keep] == 0).all()
    assert (rloo_advantages(scores.unsqueeze(1), torch.ones(24, 1), 3).flatten()[~keep] == 0).all()


def test_informative_groups_bad_input():
    with pytest.raises(ValueError, match="tol must be >= 0"):
        informative_groups(torch.zeros(4), 2, tol=-1.0)
    with pytest.raises(ValueError, match=r"must be \[B\]"):
        informative_groups(torch.zeros(4, 2), 2)
    with pytest.raises(ValueError, match="k >= 2"):
        informative_groups(torch.zeros(5), 2)


# ---------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------


def _aggregation_case():
    # ratio 1 everywhere (logπ = logπ_old), so every per-token loss is −A_t, with grad −A_t w.r.t. logπ.
    # row 0: A = 1, 2, 3 (3 tokens); row 1: A = 4 (1 token, then padding holding 9s that must not count)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return old, adv, mask


@pytest.mark.parametrize("aggregation,kwargs,want_loss,want_grad", [
    # token-mean: (−1 −2 −3 −4)/4 tokens = −2.5; each token weighs 1/4
    ("token-mean", {}, -2.5, [[-0.25, -0.5, -0.75], [-1.0, 0.0, 0.0]]),
    # seq-mean-token-mean: (−6/3 + −4/1)/2 rows = (−2 − 4)/2 = −3; row 0 tokens weigh 1/6, row 1's 1/2
    ("seq-mean-token-mean", {}, -3.0, [[-1 / 6, -2 / 6, -3 / 6], [-2.0, 0.0, 0.0]]),
    # seq-mean-token-sum, L = 4: (−6/4 + −4/4)/2 = (−1.5 − 1)/2 = −1.25; every token weighs 1/(4·2) = 1/8
    ("seq-mean-token-sum", {"max_len": 4}, -1.25, [[-0.125, -0.25, -0.375], [-0.5, 0.0, 0.0]]),
])
def test_policy_loss_aggregations_hand_worked(aggregation, kwargs, want_loss, want_grad):
    old, adv, mask = _aggregation_case()
    lp = old.clone().requires_grad_()
    loss, _ = ppo_policy_loss(lp, old, adv, mask, 0.2, aggregation=aggregation, **kwargs)
    assert float(loss.detach()) == pytest.approx(want_loss, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad), atol=1e-6, rtol=0)


def test_default_aggregation_is_bitwise_the_old_token_mean():
    g = torch.Generator().manual_seed(6)
    lp, old, adv = (torch.randn(4, 7, generator=g) * 0.1 for _ in range(3))
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    n_tok = mask.sum() + 5  # a minibatch count larger than this micro-batch's
    for denom in (None, n_tok):
        new, st = ppo_policy_loss(lp, old, adv, mask, 0.2, denom)
        explicit, _ = ppo_policy_loss(lp, old, adv, mask, 0.2, denom, aggregation="token-mean")
        ratio = torch.exp(lp - old)
        per_tok = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        d = mask.sum() if denom is None else torch.as_tensor(denom, dtype=per_tok.dtype)
        assert torch.equal(new, (per_tok * mask).sum() / torch.clamp(d, min=1.0))  # the formula before this change
        assert torch.equal(new, explicit)
        assert set(st) == {"clipfrac", "approx_kl", "tokens"}


def test_aggregations_match_python_loop():
    g = torch.Generator().manual_seed(7)
    B, R, L = 5, 6, 10
    per_tok = torch.randn(B, R, generator=g)
    lengths = [6, 1, 3, 5, 2]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(R)] for n in lengths])
    x = per_tok.tolist()
    tok = sum(x[i][t] for i in range(B) for t in range(lengths[i])) / sum(lengths)
    smtm = sum(sum(x[i][:lengths[i]]) / lengths[i] for i in range(B)) / B
    smts = sum(sum(x[i][:lengths[i]]) / L for i in range(B)) / B
    assert float(aggregate_token_loss(per_tok, mask, "token-mean")) == pytest.approx(tok, abs=1e-6)
    assert float(aggregate_token_loss(per_tok, mask, "seq-mean-token-mean")) == pytest.approx(smtm, abs=1e-6)
    assert float(aggregate_token_loss(per_tok, mask, "seq-mean-token-sum", max_len=L)) == pytest.approx(smts, abs=1e-6)


def test_aggregation_bad_input():
    old, adv, mask = _aggregation_case()
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq-sum'"):
        ppo_policy_loss(old, old, adv, mask, aggregation="seq-sum")
    with pytest.raises(ValueError, match="needs max_len > 0"):
        ppo_policy_loss(old, old, adv, mask, aggregation="seq-mean-token-sum")
    with pytest.raises(ValueError, match="needs max_len > 0"):
        aggregate_token_loss(adv, mask, "seq-mean-token-sum", max_len=0)
    with pytest.raises(TypeError):  # the new arguments are keyword-only: old positional calls cannot shift
        ppo_policy_loss(old, old, adv, mask, 0.2, None, "token-mean")


# ---------------------------------------------------------------------------
# Micro-batching: the minibatch normalisers make the summed micro-batch gradients the one-pass gradient
# ---------------------------------------------------------------------------


def _tiny_policy_batch():
    """A linear 'policy' W [d, V] over fixed features; 6 responses of lengths 1..6, right-padded to 6."""
    g = torch.Generator().manual_seed(8)
    B, R, d, V = 6, 6, 4, 5
    feats = torch.randn(B, R, d, generator=g)
    tokens = torch.randint(0, V, (B, R), generator=g)
    lengths = [3, 6, 1, 4, 2, 5]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(R)] for n in lengths])
    W0 = torch.randn(d, V, generator=g)
    old = torch.log_softmax(feats @ (W0 + 0.1 * torch.randn(d, V, generator=g)), -1).gather(
        -1, tokens.unsqueeze(-1)).squeeze(-1)
    ref = old + 0.2 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, R) * mask
    return feats, tokens, mask, W0, old, ref, adv


def _loss(kind, W, feats, tokens, mask, old, ref, adv, rows, **kw):
    r = int(mask[rows].sum(1).max())  # a micro-batch is cut to its own longest response, as in train/ppo.py
    lp = torch.log_softmax(feats[rows, :r] @ W, -1).gather(-1, tokens[rows, :r].unsqueeze(-1)).squeeze(-1)
    m = mask[rows, :r]
    if kind == "policy":
        return ppo_policy_loss(lp, old[rows, :r], adv[rows, :r], m, 0.2, kw.pop("num_tokens", None), **kw)[0]
    return kl_loss(lp, ref[rows, :r], m, kw.pop("num_tokens", None), **kw)[0]


@pytest.mark.parametrize("kind", ["policy", "kl"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_micro_batches_sum_to_the_minibatch_gradient(kind, aggregation):
    feats, tokens, mask, W0, old, ref, adv = _tiny_policy_batch()
    B = mask.shape[0]
    norm = {"aggregation": aggregation, "num_tokens": mask.sum(), "num_seqs": B, "max_len": 6}
    W = W0.clone().requires_grad_()
    full = _loss(kind, W, feats, tokens, mask, old, ref, adv, torch.arange(B), **norm)
    full.backward()
    g_full = W.grad.clone()

    W = W0.clone().requires_grad_()
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    total = 0.0
    for start in range(0, B, 2):
        part = _loss(kind, W, feats, tokens, mask, old, ref, adv, perm[start: start + 2], **dict(norm))
        part.backward()
        total += float(part.detach())
    assert total == pytest.approx(float(full.detach()), abs=1e-6)
    torch.testing.assert_close(W.grad, g_full, atol=1e-6, rtol=0)


def test_micro_batches_without_the_minibatch_normaliser_differ():
    # the test above can fail: with each micro-batch's own row count (the default), 3 micro-batches of
    # 2 rows give 3× the minibatch's seq-mean loss
    feats, tokens, mask, W0, old, ref, adv = _tiny_policy_batch()
    full = _loss("policy", W0, feats, tokens, mask, old, ref, adv, torch.arange(6), aggregation="seq-mean-token-mean")
    parts = sum(float(_loss("policy", W0, feats, tokens, mask, old, ref, adv, torch.arange(s, s + 2),
                            aggregation="seq-mean-token-mean")) for s in (0, 2, 4))
    assert parts == pytest.approx(3 * float(full), abs=1e-5)


# ---------------------------------------------------------------------------
# GRPO's KL loss (k3 in the objective)
# ---------------------------------------------------------------------------


def test_kl_loss_hand_worked():
    # token 0: π_θ = 0.5, π_ref = 0.25: r = ln 0.5; k3 = 0.5 − 1 − ln 0.5 = 0.1931472; d/dlogπ_θ = 1 − 0.5 = 0.5
    # token 1: π_θ = 0.25, π_ref = 0.5: r = ln 2;   k3 = 2 − 1 − ln 2 = 0.3068528;   d/dlogπ_θ = 1 − 2 = −1
    # token 2: padding. token-mean over 2 tokens: (0.1931472 + 0.3068528)/2 = 0.25 (the ln 2 terms cancel)
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = kl_loss(lp, ref, mask)
    assert float(loss.detach()) == pytest.approx(0.25, abs=1e-6)
    assert float(st["kl_sum"]) == pytest.approx(0.5, abs=1e-6) and float(st["tokens"]) == 2
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.25, -0.5, 0.0]]), atol=1e-6, rtol=0)
    # the per-token term is rl_math's k3 estimator; it is 0, with gradient 0, where π_θ = π_ref
    assert float(st["kl_sum"]) == pytest.approx(float((kl_per_token(lp.detach(), ref, "k3") * mask).sum()), abs=1e-6)
    same = ref.clone().requires_grad_()
    z, _ = kl_loss(same, ref, mask)
    z.backward()
    assert float(z.detach()) == 0.0 and same.grad.abs().max().item() == 0.0
    # seq-mean-token-sum with L = 4, one row: 0.5/4 = 0.125
    assert float(kl_loss(lp.detach(), ref, mask, aggregation="seq-mean-token-sum", max_len=4)[0]) == pytest.approx(0.125, abs=1e-6)
