"""Each phase of a PPO step (train/ppo_phases.py) on its own, on the tiny model, against values worked out
here: which prompts a step samples, the per-episode RNG streams, sampling, scoring, the advantages,
one update, the metrics row, the checkpoint round trip, the reference under LoRA and the ptx term.
tests/test_ppo.py runs them together through the whole loop."""

import random

import numpy as np
import pytest
import torch

from instructrl.config import ConfigError
from instructrl.core.tensors import gather_logprobs
from instructrl.rollout import Generation
from instructrl.runtime import make_runtime
from instructrl.scoring import response_logits, response_values, window
from instructrl.train.ppo_phases import (BatchStats, PPOData, Progress, Scored, UpdateStats, compute_advantages,
                                         episode_generators, generate_trajectory, load_data, load_models,
                                         make_optimisers, metrics_row, ppo_update, ptx_backward, reference_logits,
                                         restore, save_checkpoint, score_trajectory, step_prompts)
from instructrl.train.processes import Dist

from test_ppo import PROMPTS, good_fraction_reward, prompts_file, tiny_cfg  # noqa: F401 (prompts_file: fixture)

RT = make_runtime("cpu", "fp32")


def setup(tiny_model_dir, prompts_file, tmp_path, *extra):
    """A config (8 episodes, minibatches of 4), the models under a scripted reward, the prompts."""
    cfg = tiny_cfg(tiny_model_dir, prompts_file, tmp_path / "run", "rollout.batch_size=8", "train.minibatch_size=4",
                   "train.micro_batch_size=4", *extra)
    models = load_models(cfg, RT, None, scripted_reward=True)
    return cfg, models, load_data(cfg, models.tok)


def rollout(cfg, models, data, with_logprobs=False, step=0):
    idx = step_prompts(cfg, data, Progress(step=step))
    return generate_trajectory(cfg, models, [data.prompt_ids[i] for i in idx], range(len(idx)), step, RT,
                               with_logprobs)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------
# 1. rollout
# ---------------------------------------------------------------------------


def test_step_prompts_cover_each_epoch_once_in_groups_of_k(tiny_model_dir, prompts_file, tmp_path):
    """batch_size / k distinct prompts per step, each k times in adjacent rows; consecutive steps walk a
    shuffled pass over the prompts without repeats; the stream position and the seed alone decide it."""
    n = len(PROMPTS)  # 6
    data = PPOData(prompt_ids=[[i] for i in range(n)], ptx_ids=[])
    cfg = tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "rollout.batch_size=6", "rollout.samples_per_prompt=3",
                   "train.minibatch_size=3")

    def walk(cfg, steps):
        out, progress = [], Progress()
        for _ in range(steps):
            rows = step_prompts(cfg, data, progress)
            assert len(rows) == 6 and all(rows[j] == rows[j - j % 3] for j in range(6)), rows  # groups of 3
            out += rows[::3]
            progress.prompt_pos += len(rows) // 3  # what train_ppo does after each step
        return out

    seq = walk(cfg, 6)  # 12 distinct-prompt slots = 2 epochs of 6
    assert sorted(seq[:6]) == list(range(n)) and sorted(seq[6:]) == list(range(n))
    assert seq[:6] != seq[6:]  # each epoch has its own order
    assert walk(cfg, 6) == seq  # deterministic
    # the position decides, not the step number (a resumed run restores the position)
    assert step_prompts(cfg, data, Progress(step=9, prompt_pos=2)) == step_prompts(cfg, data, Progress(prompt_pos=2))
    assert step_prompts(cfg, data, Progress(prompt_pos=2))[::3] == seq[2:4]
    cfg.seed = 1
    other = walk(cfg, 6)
    assert sorted(other[:6]) == list(range(n)) and other != seq


def test_episode_generators_depend_on_seed_step_and_row_only():
    def draws(seed, step, rows):
        return [torch.rand(4, generator=g).tolist() for g in episode_generators(seed, step, rows, torch.device("cpu"))]

    full = draws(0, 3, range(4))
    assert draws(0, 3, range(4)) == full
    assert draws(0, 3, range(2, 4)) == full[2:]  # a process holding rows 2..3 draws what one process would
    assert len({tuple(d) for d in full}) == 4  # every row its own stream
    assert draws(0, 4, range(4))[0] != full[0] and draws(1, 3, range(4))[0] != full[0]


def test_generate_trajectory_shapes_eos_mask_and_sampling_logprobs(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "rollout.temperature=0.7")
    eos, R_max = models.eos_id, cfg.rollout.max_new_tokens
    with torch.no_grad():  # EOS likely enough that some rows end early and some run to the limit
        models.policy.lm_head.weight[eos] *= 15.0
    g = rollout(cfg, models, data, with_logprobs=True)
    assert models.policy.training  # handed back in training mode
    prompts = [data.prompt_ids[i] for i in step_prompts(cfg, data, Progress())]
    B, P = 8, max(map(len, prompts))
    R = g.response.shape[1]
    assert g.query.shape == g.query_mask.shape == (B, P) and g.response_mask.shape == (B, R) and R <= R_max
    for i, p in enumerate(prompts):  # left padding: the prompt sits at the right end of the query
        assert g.query[i, P - len(p):].tolist() == p and g.query_mask[i].sum() == len(p)
    assert 0 < int(g.ended.sum()) < B, g.ended  # both kinds of row occur
    for i in range(B):
        n = int(g.response_mask[i].sum())
        assert g.response_mask[i, :n].eq(1).all() and g.response_mask[i, n:].eq(0).all()
        real = g.response[i, :n].tolist()
        if g.ended[i]:  # the mask ends at the first EOS, EOS included
            assert real[-1] == eos and eos not in real[:-1]
        else:
            assert n == R_max and eos not in real
    # the sampler's log-probs and entropies are a fresh forward's
    ids, am = window(g, torch.arange(B), P, R)
    with torch.no_grad():
        logits = response_logits(models.policy, ids, am, R, 0.7)
    from instructrl.core import rl_math

    lp, ent = rl_math.logprobs_and_entropy(logits, g.response)
    torch.testing.assert_close(g.logprobs, lp * g.response_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.entropy, ent * g.response_mask, atol=1e-5, rtol=0)
    assert rollout(cfg, models, data).logprobs is None  # only when asked for


def test_rows_of_one_prompt_differ_and_a_split_batch_samples_the_same_tokens(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path)
    prompt = data.prompt_ids[0]
    whole = generate_trajectory(cfg, models, [prompt] * 4, range(4), 0, RT, False)
    assert len({tuple(r) for r in whole.response.tolist()}) == 4  # one prompt, four different samples
    half = generate_trajectory(cfg, models, [prompt] * 2, range(2, 4), 0, RT, False)
    r = half.response.shape[1]
    assert torch.equal(half.response, whole.response[2:, :r]) and torch.equal(half.response_mask,
                                                                              whole.response_mask[2:, :r])


# ---------------------------------------------------------------------------
# 2. score
# ---------------------------------------------------------------------------


def test_score_trajectory_logprobs_reference_values_and_scores(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "train.score_batch_size=3")
    with torch.no_grad():
        models.policy.lm_head.weight[models.eos_id] *= 15.0
        models.ref.lm_head.weight[models.eos_id] *= 15.0  # the reference is still the policy
    g = rollout(cfg, models, data, with_logprobs=True)
    fresh = score_trajectory(cfg, models, g, RT, reuse_logprobs=False, reward_fn=good_fraction_reward)
    reused = score_trajectory(cfg, models, g, RT, reuse_logprobs=True, reward_fn=good_fraction_reward)
    m = g.response_mask
    torch.testing.assert_close(reused.logprobs, fresh.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.entropy, fresh.entropy, atol=1e-5, rtol=0)
    assert (fresh.logprobs[m > 0] < 0).all() and (fresh.logprobs[m == 0] == 0).all()
    # policy == reference: the reference log-probs are the policy's
    torch.testing.assert_close(fresh.ref_logprobs, fresh.logprobs, atol=1e-6, rtol=0)
    # the scripted reward is the score; the values are the value model's, 0 on padding
    torch.testing.assert_close(fresh.scores, good_fraction_reward(g.query, g.response, m), atol=0, rtol=0)
    B, P, R = *m.shape[:1], g.query.shape[1], m.shape[1]
    with torch.no_grad():
        v = response_values(models.value, *window(g, torch.arange(B), P, R), R) * m
    torch.testing.assert_close(fresh.values, v, atol=1e-5, rtol=0)
    assert fresh.lower is None  # no shared blocks without train.trainable_layers
    # a policy that moved: its log-probs change, the reference's do not
    with torch.no_grad():
        for p in models.policy.model.layers[-1].parameters():
            p.add_(0.5)
    moved = score_trajectory(cfg, models, g, RT, reuse_logprobs=False, reward_fn=good_fraction_reward)
    torch.testing.assert_close(moved.ref_logprobs, fresh.ref_logprobs, atol=1e-6, rtol=0)
    assert (moved.logprobs - fresh.logprobs).abs().max() > 1e-3
    # the missing-EOS penalty hits exactly the rows that did not end
    cfg.rollout.missing_eos_penalty = 1.5
    pen = score_trajectory(cfg, models, g, RT, reuse_logprobs=True, reward_fn=good_fraction_reward)
    assert g.ended.any() and not g.ended.all()
    torch.testing.assert_close(pen.scores, fresh.scores - 1.5 * (~g.ended).float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------
# 3 + 4. rewards and advantages
# ---------------------------------------------------------------------------


def hand_batch():
    """Four responses, two prompts (k = 2), hand-chosen log-probs: per-token KL (k1) and scores below."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.5, 0], [-2.0, 0, 0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0], [-1.0, 0, 0], [-2.0, -1.0, -0.5]])
    # kl = lp - ref: [.5, -1, 0], [-.5, .5], [-1], [1, 0, -.5]; sums -0.5, 0, -1, 0.5
    g = Generation(query=torch.ones(4, 2, dtype=torch.long), query_mask=torch.ones(4, 2, dtype=torch.long),
                   response=torch.full((4, 3), 7), response_mask=mask, ended=torch.tensor([True, True, False, True]))
    s = Scored(logprobs=lp * mask, ref_logprobs=ref * mask, entropy=2.0 * mask, values=torch.zeros(4, 3),
               scores=torch.tensor([1.0, 3.0, 0.0, 2.0]), lower=None)
    return g, s


def test_rloo_advantages_and_kl_shaped_rewards_by_hand(tiny_model_dir, prompts_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "train.advantage=rloo", "rollout.samples_per_prompt=2",
                   "rollout.batch_size=4", "train.minibatch_size=4", "train.whiten_advantages=false")
    g, s = hand_batch()
    batch, masks, st = compute_advantages(cfg, g, s, 0.5, Dist())
    # reward = −β·KL per token, + the score at the last real token (β = 0.5)
    want_rewards = torch.tensor([[-0.25, 0.5, 1.0], [0.25, 2.75, 0], [0.5, 0, 0], [-0.5, 0, 2.25]])
    torch.testing.assert_close(batch.rewards, want_rewards)
    torch.testing.assert_close(batch.kl, torch.tensor([[0.5, -1.0, 0], [-0.5, 0.5, 0], [-1.0, 0, 0], [1.0, 0, -0.5]]))
    # returns G = 1.25, 3.0 | 0.5, 1.75; leave-one-out with k = 2: A = G − G_other, at every real token
    want = torch.tensor([[-1.75] * 3, [1.75, 1.75, 0], [-1.25, 0, 0], [1.25] * 3])
    torch.testing.assert_close(batch.advantages, want)
    torch.testing.assert_close(batch.returns, want)  # no value model reads them
    assert torch.equal(masks.response, g.response_mask) and torch.equal(masks.policy, g.response_mask)
    assert st.score == pytest.approx(1.5) and st.seq_kl == pytest.approx(-0.25) and st.beta == 0.5
    assert st.non_score_reward == pytest.approx(0.125) and st.entropy == pytest.approx(2.0)
    assert st.response_length == pytest.approx(2.25) and st.tokens == 9.0 and st.missing_eos == 0.25
    assert st.explained_variance is None and st.informative == 1.0

    # whitened over the batch's 9 real tokens (Bessel-corrected std), padding stays 0
    cfg.train.whiten_advantages = True
    w = compute_advantages(cfg, g, s, 0.5, Dist())[0].advantages
    m = g.response_mask.bool()
    x = want[m]
    torch.testing.assert_close(w[m], (x - x.mean()) / x.std(), atol=1e-5, rtol=0)
    assert (w[~m] == 0).all()

    # a flat group (equal scores) leaves the policy loss when asked; its value tokens stay
    cfg.train.drop_uninformative_groups, cfg.train.whiten_advantages = True, False
    s.scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    batch, masks, st = compute_advantages(cfg, g, s, 0.0, Dist())  # β = 0: the returns are the scores
    assert st.informative == 0.5
    assert torch.equal(masks.policy, g.response_mask * torch.tensor([1.0, 1, 0, 0])[:, None])
    torch.testing.assert_close(batch.advantages, torch.tensor([[-2.0] * 3, [2.0, 2.0, 0], [0, 0, 0], [0, 0, 0]]))


# ---------------------------------------------------------------------------
# 5. update
# ---------------------------------------------------------------------------


def prepared_batch(cfg, models, data):
    g = rollout(cfg, models, data)
    s = score_trajectory(cfg, models, g, RT, reuse_logprobs=False, reward_fn=good_fraction_reward)
    batch, masks, _ = compute_advantages(cfg, g, s, 0.02, Dist())
    return batch, masks, s.lower


def test_ppo_update_with_zero_lr_changes_nothing_and_counts_right(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "train.epochs=2")
    opts = make_optimisers(cfg, models)
    for opt in (opts.policy_opt, opts.value_opt):
        for group in opt.param_groups:
            group["lr"] = 0.0
    before = (params(models.policy), params(models.value))
    batch, masks, lower = prepared_batch(cfg, models, data)
    up = ppo_update(cfg, models, opts, batch, masks, lower, data, Progress(), RT, Dist())
    for model, old in zip((models.policy, models.value), before):
        assert all(torch.equal(p, old[n]) for n, p in model.named_parameters())
    assert up.updates == 2 * 8 // 4 and up.tokens == 2 * float(batch.response_mask.sum())  # epochs × tokens
    # the policy never moved, so π / π_old = 1 at every token of every minibatch: nothing is clipped
    assert up.clipfrac == 0.0 and abs(up.approx_kl) < 1e-6 and up.policy_updated
    assert up.vf_loss > 0 and up.pg_loss != 0.0 and up.ptx_loss == 0.0
    assert opts.policy_sched.last_epoch == 1 and opts.value_sched.last_epoch == 1  # one warm-up step per PPO step


def test_ppo_update_moves_only_trainable_parameters(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "train.trainable_layers=1")
    opts = make_optimisers(cfg, models)
    before = {name: params(m) for name, m in (("policy", models.policy), ("value", models.value),
                                                ("ref", models.ref))}
    batch, masks, lower = prepared_batch(cfg, models, data)
    assert models.share == 1 and lower is not None  # the frozen lower block is shared and reused
    up = ppo_update(cfg, models, opts, batch, masks, lower, data, Progress(), RT, Dist())
    assert up.updates == 2 and up.clipfrac >= 0 and up.tokens == float(batch.response_mask.sum())
    for name, m in (("policy", models.policy), ("value", models.value)):
        trained = {n for n, p in m.named_parameters() if p.requires_grad}
        frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
        assert trained and frozen, name
        new = params(m)
        assert all(torch.equal(new[n], before[name][n]) for n in frozen), name
        assert all(not torch.equal(new[n], before[name][n]) for n in trained), name
    assert all(torch.equal(p, before["ref"][n]) for n, p in models.ref.named_parameters())


def test_ptx_backward_adds_the_weighted_pretraining_nll(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, _ = setup(tiny_model_dir, prompts_file, tmp_path, "train.ptx_batch_size=2", "train.ptx_coef=3.0",
                           "train.micro_batch_size=1")
    tok = models.tok
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the quick brown fox", "hello world again ok")]
    data = PPOData(prompt_ids=[[1]], ptx_ids=texts)
    progress = Progress(ptx_pos=0)
    models.policy.zero_grad(set_to_none=True)
    loss = ptx_backward(cfg, models, data, progress, RT, Dist())
    got = {n: p.grad.clone() for n, p in models.policy.named_parameters()}
    assert progress.ptx_pos == 2
    # by hand: the token-mean NLL of both texts (each predicts its tokens after the first), γ times its gradient
    models.policy.zero_grad(set_to_none=True)
    nll = sum(models.policy(input_ids=torch.tensor([t]), labels=torch.tensor([t])).loss * (len(t) - 1) for t in texts)
    nll = nll / sum(len(t) - 1 for t in texts)
    (3.0 * nll).backward()
    assert loss == pytest.approx(float(nll.detach()), rel=1e-5)
    for n, p in models.policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# 6. log and checkpoint
# ---------------------------------------------------------------------------


def test_metrics_row_normalises_per_token_and_per_update(tiny_model_dir, prompts_file, tmp_path):
    cfg, models, _ = setup(tiny_model_dir, prompts_file, tmp_path)
    opts = make_optimisers(cfg, models)
    bs = BatchStats(score=1.5, seq_kl=0.3, beta=0.02, non_score_reward=-0.006, entropy=2.0, explained_variance=0.1,
                    response_length=12.0, missing_eos=0.25, tokens=96.0, informative=1.0)
    up = UpdateStats(pg_loss=0.4, vf_loss=2.0, ptx_loss=0.0, clipfrac=19.2, approx_kl=0.96, vf_clipfrac=9.6,
                     tokens=192.0, updates=4)
    row = metrics_row(Progress(step=3), bs, up, opts, {"generate": 1.0, "score": 0.5, "train": 0.5}, 1, 8)
    assert row["clipfrac"] == pytest.approx(0.1) and row["approx_kl"] == pytest.approx(0.005)
    assert row["vf_clipfrac"] == pytest.approx(0.05) and row["pg_loss"] == pytest.approx(0.1)
    assert row["vf_loss"] == pytest.approx(0.5) and row["tokens_per_s"] == pytest.approx(48.0)
    assert row["step"] == 3 and row["score"] == 1.5 and row["kl"] == 0.3 and row["time_score"] == 0.5
    assert row["lr"] == pytest.approx(cfg.train.lr) and row["episodes"] == 8


def assert_same_state(a, b, path="state"):
    """Nested optimizer / scheduler / controller state dicts are equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_save_checkpoint_then_restore_round_trips_every_state(tiny_model_dir, prompts_file, tmp_path):
    from safetensors.torch import load_file

    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "kl.adaptive=true", "train.warmup_steps=3")
    opts = make_optimisers(cfg, models)
    batch, masks, lower = prepared_batch(cfg, models, data)
    ppo_update(cfg, models, opts, batch, masks, lower, data, Progress(), RT, Dist())  # Adam moments, sched step
    opts.kl_ctl.update(20.0, 8)  # β moves off its initial value
    assert opts.kl_ctl.value != cfg.kl.coef and opts.policy_opt.state
    progress = Progress(step=3, prompt_pos=7, ptx_pos=5, skipped={"policy": 1, "value": 2})
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    folder = tmp_path / "ckpts"
    ckpt = save_checkpoint(folder, models, opts, progress, Dist(), keep=1)
    after_save = (torch.rand(3), random.random(), np.random.rand())
    saved = opts.state_dict()

    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a fresh process: other RNG states, new optimizers
    fresh = make_optimisers(cfg, models)
    assert fresh.kl_ctl.value == cfg.kl.coef
    got = restore(ckpt, fresh, Dist())
    assert got == progress
    assert_same_state(fresh.state_dict(), saved)
    assert fresh.kl_ctl.value == opts.kl_ctl.value and fresh.policy_sched.last_epoch == 1
    assert fresh.policy_opt.param_groups[0]["lr"] == opts.policy_opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(3), after_save[0]) and random.random() == after_save[1]
    assert np.random.rand() == after_save[2]
    for name, m in (("policy", models.policy), ("value", models.value)):
        w = load_file(ckpt / name / "model.safetensors")
        assert all(torch.equal(w[n], p.detach()) for n, p in m.state_dict().items() if n in w) and w, name
    # keep=1: the next checkpoint replaces this one; another process count cannot resume it
    progress.step = 4
    nxt = save_checkpoint(folder, models, opts, progress, Dist(), keep=1)
    assert sorted(p.name for p in folder.iterdir()) == [nxt.name] == ["step-000004"]
    with pytest.raises(ConfigError, match="same process count"):
        restore(nxt, fresh, Dist(world=2))
    state = nxt / "state.pt"  # damaged (a copy cut short): one line naming it, not a torch traceback
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"resume: {state} is damaged or cut short"):
        restore(nxt, fresh, Dist())


def test_reference_under_lora_is_the_base_model_with_the_adapter_off(tiny_model_dir, prompts_file, tmp_path):
    from instructrl.models import load_causal_lm

    cfg, models, data = setup(tiny_model_dir, prompts_file, tmp_path, "train.lora.rank=4", "train.lora.dropout=0",
                              "train.advantage=rloo", "rollout.samples_per_prompt=2")
    assert models.ref is None and models.value is None  # one copy of the base weights, no critic
    with torch.no_grad():  # move the adapters off their B = 0 start, so the policy differs from its base
        for n, p in models.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    g = rollout(cfg, models, data)
    B, P, R = g.response.shape[0], g.query.shape[1], g.response.shape[1]
    ids, am = window(g, torch.arange(B), P, R)
    base = load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        ref = reference_logits(models, ids, am, R, 1.0, None)
        want = response_logits(base, ids, am, R, 1.0)
        pol = response_logits(models.policy, ids, am, R, 1.0)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)
    assert (pol - want).abs().max() > 1e-2  # the adapter is back on afterwards
    s = score_trajectory(cfg, models, g, RT, reuse_logprobs=False, reward_fn=good_fraction_reward)
    torch.testing.assert_close(s.ref_logprobs, gather_logprobs(want, g.response) * g.response_mask,
                               atol=1e-5, rtol=0)
