"""RL math and PPO losses against hand-worked values and plain Python loops."""

import math

import pytest
import torch

from instructrl.core.losses import ppo_policy_loss, ppo_ptx_objective, ppo_value_loss, ptx_loss
from instructrl.core.rl_math import (
    KLController, explained_variance, gae, kl_per_token, masked_mean, rloo_advantages, shape_rewards, whiten,
)


def test_kl_estimators_hand_values():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # k1 = logπ − logπ_ref
    assert torch.allclose(kl_per_token(lp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 with r = ref − lp: (e^r − 1) − r
    r = torch.tensor([[-0.5, 1.0]])
    want = torch.exp(r) - 1 - r
    assert torch.allclose(kl_per_token(lp, ref, "k3"), want)
    assert (kl_per_token(lp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k2")


def test_kl_estimators_are_unbiased_on_a_known_pair():
    # π = [0.7, 0.3], π_ref = [0.5, 0.5]: KL = 0.7 ln 1.4 + 0.3 ln 0.6
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    true_kl = float((p * (p / q).log()).sum())
    lp, lq = p.log().unsqueeze(0), q.log().unsqueeze(0)
    for est in ("k1", "k3"):
        expected = float((p * kl_per_token(lp, lq, est)[0]).sum())  # exact expectation over y ~ π
        assert expected == pytest.approx(true_kl, abs=1e-6)


def test_shape_rewards_hand_worked():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.5, 1.0, 9.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, stats = shape_rewards(scores, kl, mask, beta=0.1)
    want = torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.01, -0.02, -0.03 - 1.0]])
    assert torch.allclose(rewards, want)
    assert float(stats["non_score_reward"]) == pytest.approx(((-0.15) + (-0.06)) / 2)
    clipped, _ = shape_rewards(scores, kl, mask, beta=0.1, clip=1.5)
    assert float(clipped[0, 1]) == pytest.approx(-0.1 + 1.5)
    with pytest.raises(ValueError):
        shape_rewards(scores, kl, torch.zeros_like(mask), beta=0.1)


def _gae_loop(rewards, values, mask, gamma, lam):
    B, R = len(rewards), len(rewards[0])
    adv = [[0.0] * R for _ in range(B)]
    for b in range(B):
        n = int(sum(mask[b]))
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


def test_gae_hand_worked_single_step():
    # one token: A = r − V
    adv, ret = gae(torch.tensor([[1.0]]), torch.tensor([[0.25]]), torch.tensor([[1.0]]), 1.0, 0.95)
    assert float(adv) == pytest.approx(0.75) and float(ret) == pytest.approx(1.0)
    # two tokens, γ = 1, λ = 0.5: δ1 = 2 − 1 = 1, δ0 = 0 + 1 − 0.5 = 0.5, A0 = 0.5 + 0.5·1 = 1
    adv, ret = gae(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(ret, torch.tensor([[1.5, 2.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, R = 5, 7
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(R)] for n in lengths])
    # garbage in the padding must not leak into the result
    rewards = rewards * mask + 100 * (1 - mask)
    values = values * mask - 100 * (1 - mask)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = torch.tensor(_gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam))
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.allclose(ret, (want + values) * mask, atol=1e-5)


def test_rloo_hand_worked():
    # one prompt, 3 samples with returns 3, 0, 1 (the sum of each row's shaped rewards; padding ignored):
    # baselines (0+1)/2 = 0.5, (3+1)/2 = 2, (3+0)/2 = 1.5 -> advantages 2.5, -2, -0.5 at every real token
    rewards = torch.tensor([[1.0, 2.0], [0.0, 9.0], [-1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    adv = rloo_advantages(rewards, mask, 3)
    assert torch.allclose(adv, torch.tensor([[2.5, 2.5], [-2.0, 0.0], [-0.5, -0.5]]))
    # two prompts of k = 2 are independent: each pair's advantages are ±(difference)
    adv = rloo_advantages(torch.tensor([[1.0], [0.0], [5.0], [5.0]]), torch.ones(4, 1), 2)
    assert adv.flatten().tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(3, 1), torch.ones(3, 1), 2)


def test_rloo_matches_python_loop():
    g = torch.Generator().manual_seed(1)
    k, n = 4, 3
    rewards = torch.randn(n * k, 5, generator=g)
    mask = (torch.rand(n * k, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    adv = rloo_advantages(rewards, mask, k)
    for i in range(n * k):
        grp = range(i // k * k, i // k * k + k)
        ret = [float((rewards[j] * mask[j]).sum()) for j in grp]
        own = ret[i % k]
        want = own - (sum(ret) - own) / (k - 1)
        assert torch.allclose(adv[i], want * mask[i], atol=1e-5)


def test_whiten_masked():
    x = torch.tensor([[1.0, 3.0, 50.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    w = whiten(x, mask)
    # real entries 1, 3, 5: mean 3, unbiased var 4 -> (−1, 0, 1)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), atol=1e-6)
    w2 = whiten(x, mask, shift_mean=False)
    assert torch.allclose(w2, torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]), atol=1e-6)
    assert float(masked_mean(x, mask)) == pytest.approx(3.0)


def test_explained_variance():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones_like(t)
    assert float(explained_variance(t, t, m)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(t, 2.5), t, m)) == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_follows_ziegler():
    c = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    c.update(current_kl=9.0, n_steps=10)  # error = clip(0.5) = 0.2 -> β·(1 + 0.2·0.1)
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(current_kl=6.0 * 0.95, n_steps=10)  # error = −0.05
    assert c.value == pytest.approx(0.1 * 1.02 * (1 - 0.005))
    c.update(float("nan"), 10)  # a non-finite KL never moves β
    assert c.value == pytest.approx(0.1 * 1.02 * 0.995)
    fixed = KLController(0.02)
    fixed.update(100.0, 10)
    assert fixed.value == 0.02
    c2 = KLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2 == c


def test_ppo_policy_loss_hand_worked():
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, st = ppo_policy_loss(lp, old, adv, mask, cliprange=0.2)
    # token 0: A>0, ρ=1.5 -> clipped 1.2: max(−1.5, −1.2) = −1.2
    # token 1: A>0, ρ=0.5 -> max(−0.5, −0.8) = −0.5 (pessimistic: unclipped)
    # token 2: A<0, ρ=1.1 -> max(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert float(st["clipfrac"]) == 1.0  # only token 0 uses the clipped branch
    # gradient flows only through the unclipped tokens
    lp2 = lp.clone().requires_grad_()
    ppo_policy_loss(lp2, old, adv, mask, 0.2)[0].backward()
    assert float(lp2.grad[0, 0]) == 0.0 and float(lp2.grad[0, 1]) == pytest.approx(-0.5 / 3)
    # masked tokens are ignored; the normaliser can be given for micro-batching
    mask2 = torch.tensor([[1.0, 1.0, 0.0]])
    l2, _ = ppo_policy_loss(lp, old, adv, mask2, 0.2, num_tokens=4)
    assert float(l2) == pytest.approx((-1.2 - 0.5) / 4, abs=1e-6)


def test_ppo_value_loss_hand_worked():
    old = torch.tensor([[0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, -1.0]])
    loss, st = ppo_value_loss(v, old, ret, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped (1−2)² = 1, clipped (0.2−2)² = 3.24 -> 3.24
    # token 1: (0.1+1)² = 1.21, clipped value 0.1 (inside) -> 1.21
    assert float(loss) == pytest.approx(0.5 * (3.24 + 1.21) / 2, abs=1e-6)
    assert float(st["vf_clipfrac"]) == 1.0


def test_ptx_term_and_mix():
    logits = torch.zeros(1, 3, 4)  # uniform: NLL per token = ln 4
    ids = torch.tensor([[0, 1, 2]])
    m = torch.tensor([[0.0, 1.0, 1.0]])
    ptx, _ = ptx_loss(logits, ids, m)
    assert float(ptx) == pytest.approx(math.log(4))
    pg = torch.tensor(0.5)
    assert float(ppo_ptx_objective(pg, ptx, 2.0)) == pytest.approx(0.5 + 2 * math.log(4))
    assert float(ppo_ptx_objective(pg, ptx, 0.0)) == 0.5
    assert float(ppo_ptx_objective(pg, None, 2.0)) == 0.5


def test_entropy_and_fused_logprobs_entropy():
    """Uniform over 4 tokens: entropy log 4, log p = -log 4; the fused version equals the two separate passes."""
    from instructrl.core.tensors import gather_logprobs
    from instructrl.core.rl_math import entropy_from_logits, logprobs_and_entropy

    lp, ent = logprobs_and_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    torch.testing.assert_close(lp, torch.full((1, 2), -math.log(4)))
    torch.testing.assert_close(ent, torch.full((1, 2), math.log(4)))
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    lp, ent = logprobs_and_entropy(logits, tokens)
    torch.testing.assert_close(lp, gather_logprobs(logits, tokens))
    torch.testing.assert_close(ent, entropy_from_logits(logits))
