"""PPO end to end on a tiny model: learning, generation, non-finite skips, config checks, exact resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.scoring import micro_batches
from instructrl.train.ppo import KILL_ENV, PPOConfig, train_ppo
from instructrl.train.ppo_phases import stream_indices
from instructrl.rollout import sample

PROMPTS = ["write a poem", "hello world", "answer in three words", "use a numbered list",
           "please reply in json", "the quick brown fox"]
GOOD = range(4, 100)  # the scripted reward likes these token ids (~1/4 of the tiny vocabulary)


def good_fraction_reward(query, response, mask):
    """10 × the share of response tokens whose id is in GOOD: an easy property for the policy to learn."""
    good = ((response >= GOOD.start) & (response < GOOD.stop)).float() * mask
    return 10 * good.sum(1) / mask.sum(1)


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    """A prompts JSONL file (``id``, ``prompt``) at ``path``: the PPO tests' input."""
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(prompts)))
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl")


def tiny_cfg(tiny_model_dir, prompts_file, out, *extra):
    return load_config(PPOConfig, None, [
        f"policy={tiny_model_dir}", f"prompts={prompts_file}", f"output_dir={out}", "rollout.batch_size=16",
        "rollout.max_new_tokens=16", "train.minibatch_size=8", "train.micro_batch_size=8", "train.lr=1e-2",
        "train.value_lr=3e-3", "train.warmup_steps=0", "train.precision=fp32", *extra])


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_score_rises_while_kl_stays_bounded(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=30", "kl.coef=0.2"), reward_fn=good_fraction_reward)
    rows = metrics(out)
    assert len(rows) == 30
    first = sum(r["score"] for r in rows[:5]) / 5
    last = sum(r["score"] for r in rows[-5:]) / 5
    assert first < 3.5  # ~2.5 = 10 × 96/384 for the random tiny model
    assert last > first + 2.0, (first, last)
    assert max(r["kl"] for r in rows) < 25.0  # nats per sequence; β keeps the policy near the reference
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is scored by policy == reference
    for key in ("beta", "entropy", "clipfrac", "approx_kl", "explained_variance", "response_length", "ptx_loss",
                "vf_clipfrac", "time_generate", "time_score", "time_train"):
        assert key in rows[-1]
    assert (out / "reward_vs_sqrt_kl.png").stat().st_size > 0
    assert (out / "policy" / "config.json").exists() and (out / "value" / "config.json").exists()
    assert (out / "config.yaml").exists()


def test_ptx_term_is_trained_and_logged(tiny_model_dir, prompts_file, tmp_path):
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog. " * 3}) + "\n"
                           for _ in range(5)))
    out = tmp_path / "run"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=6", f"ptx_data={ptx}", "train.ptx_coef=1.0",
                       "train.ptx_batch_size=2"), reward_fn=good_fraction_reward)
    rows = metrics(out)
    assert all(r["ptx_loss"] > 0 for r in rows)
    assert rows[-1]["ptx_loss"] < rows[0]["ptx_loss"]  # the repeated sentence gets likelier


def test_nonfinite_update_is_skipped_counted_and_never_saved(tiny_model_dir, prompts_file, tmp_path):
    calls = {"n": 0}

    def reward(q, r, m):
        calls["n"] += 1
        s = good_fraction_reward(q, r, m)
        return s * float("nan") if calls["n"] == 2 else s  # step 2's rewards are NaN

    out = tmp_path / "run"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=3", "run.checkpoint_every=2"), reward_fn=reward)
    rows = metrics(out)
    assert rows[0]["skipped_policy_updates"] == 0
    assert rows[1]["skipped_policy_updates"] == 2 and rows[1]["skipped_value_updates"] == 2  # both minibatches
    assert rows[2]["skipped_policy_updates"] == 2  # step 3 trains normally again
    from safetensors.torch import load_file

    for sub in ("checkpoints/step-000002/policy", "checkpoints/step-000002/value", "policy"):
        for name, t in load_file(out / sub / "model.safetensors").items():
            assert torch.isfinite(t).all(), (sub, name)


def test_value_warmup_moves_only_the_value_model(tiny_model_dir, prompts_file, tmp_path):
    """train.value_warmup_steps: during the warm-up the policy stays the SFT model, the critic learns."""
    from safetensors.torch import load_file

    out = tmp_path / "warm"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=3", "train.value_warmup_steps=2"),
              reward_fn=good_fraction_reward)
    rows = [r for r in metrics(out) if "score" in r]
    assert [r["policy_updated"] for r in rows] == [False, False, True]
    assert rows[0]["pg_loss"] == 0.0 and rows[0]["vf_loss"] > 0
    # after the two warm-up steps the policy is still bitwise the initial model; the value model moved
    warm = tmp_path / "warm2"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, warm, "steps=2", "train.value_warmup_steps=2"),
              reward_fn=good_fraction_reward)
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    pol = load_file(str(warm / "policy" / "model.safetensors"))
    shared = [k for k in init if k in pol]
    assert len(shared) == len(init) and all(torch.equal(init[k], pol[k]) for k in shared)
    val = load_file(str(warm / "value" / "model.safetensors"))  # same trunk, so the same layer names
    trunk = [k for k in init if k in val and k.startswith("model.layers.")]
    assert trunk and any(not torch.equal(init[k], val[k]) for k in trunk)
    assert rows[2]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 3 samples from the unchanged policy
    with pytest.raises(ConfigError, match="value_warmup_steps"):
        tiny_cfg(tiny_model_dir, prompts_file, out, "train.value_warmup_steps=-1")


def test_rloo_raises_the_score_without_a_value_model(tiny_model_dir, prompts_file, tmp_path):
    """train.advantage=rloo: critic-free, k samples per prompt; the score rises as under GAE."""
    seen = []

    def reward(q, r, m):
        seen.append(q.clone())
        return good_fraction_reward(q, r, m)

    out = tmp_path / "rloo"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=30", "kl.coef=0.2", "train.advantage=rloo",
                       "rollout.samples_per_prompt=4"), reward_fn=reward)
    rows = metrics(out)
    first = sum(r["score"] for r in rows[:5]) / 5
    last = sum(r["score"] for r in rows[-5:]) / 5
    assert last > first + 2.0, (first, last)
    assert max(r["kl"] for r in rows) < 25.0
    assert all(r["vf_loss"] == 0.0 and r["explained_variance"] is None for r in rows)
    assert not (out / "value").exists() and (out / "policy" / "config.json").exists()
    # 16 rows = 4 prompts x 4 samples, adjacent: each group of 4 rows shares one query
    q = seen[0].view(4, 4, -1)
    assert all(torch.equal(q[i, 0], q[i, j]) for i in range(4) for j in range(4))
    assert len({tuple(q[i, 0].tolist()) for i in range(4)}) == 4


@pytest.mark.parametrize("extra", [
    ("train.advantage=grpo", "train.whiten_advantages=false", "train.loss_aggregation=seq-mean-token-mean",
     "train.kl_in_loss=true"),
    ("train.advantage=drgrpo", "train.whiten_advantages=false", "train.loss_aggregation=seq-mean-token-sum",
     "train.drop_uninformative_groups=true"),
], ids=["grpo", "drgrpo"])
def test_group_relative_advantages_raise_the_score(tiny_model_dir, prompts_file, tmp_path, extra):
    """GRPO (KL in the loss) and Dr. GRPO (flat groups dropped): critic-free, the score rises."""
    out = tmp_path / "g"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=30", "kl.coef=0.2", "rollout.samples_per_prompt=4",
                       *extra), reward_fn=good_fraction_reward)
    rows = metrics(out)
    first = sum(r["score"] for r in rows[:5]) / 5
    last = sum(r["score"] for r in rows[-5:]) / 5
    assert last > first + 1.0, (first, last)
    assert max(r["kl"] for r in rows) < 25.0
    if "train.kl_in_loss=true" in extra:  # the KL is a loss term: none of it in the reward
        assert all(r["non_score_reward"] == 0.0 for r in rows)


def test_flat_groups_are_dropped_from_the_policy_loss(tiny_model_dir, prompts_file, tmp_path):
    """A reward that is the same for every sample of a prompt: every group is flat, so with
    train.drop_uninformative_groups the policy never moves (no signal), and the metrics say so."""
    from safetensors.torch import load_file

    def per_prompt(q, r, m):  # a function of the prompt only
        return (q != 0).float().sum(1) / 10

    out = tmp_path / "flat"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=2", "train.advantage=rloo",
                       "rollout.samples_per_prompt=4", "train.drop_uninformative_groups=true"), reward_fn=per_prompt)
    assert all(r["informative_groups"] == 0.0 for r in metrics(out))
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rloo_resume_equals_an_uninterrupted_run(tiny_model_dir, prompts_file, tmp_path):
    from safetensors.torch import load_file

    args = ("train.advantage=rloo", "rollout.samples_per_prompt=2", "rollout.batch_size=8",
            "train.minibatch_size=4", "run.checkpoint_every=2")
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, tmp_path / "full", "steps=4", *args), reward_fn=good_fraction_reward)
    part = tmp_path / "part"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, part, "steps=2", *args), reward_fn=good_fraction_reward)
    assert not (part / "checkpoints" / "step-000002" / "value").exists()
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, part, "steps=4", "resume=true", *args),
              reward_fn=good_fraction_reward)
    a = load_file(tmp_path / "full" / "policy" / "model.safetensors")
    b = load_file(part / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["score"] for r in metrics(tmp_path / "full")] == [r["score"] for r in metrics(part)]


def test_micro_and_scoring_batch_sizes_do_not_change_the_result(tiny_model_dir, prompts_file, tmp_path):
    """Invariance: how the batch is split for forward passes (training micro-batches, no-grad scoring
    batches) is a speed/memory knob only; the metrics and the trained weights agree to float tolerance."""
    from safetensors.torch import load_file

    runs = {}
    for name, micro, score in (("whole", 8, 16), ("split", 2, 4)):
        out = tmp_path / name
        train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=2", f"train.micro_batch_size={micro}",
                           f"train.score_batch_size={score}"), reward_fn=good_fraction_reward)
        runs[name] = (metrics(out), load_file(out / "policy" / "model.safetensors"))
    (ma, wa), (mb, wb) = runs["whole"], runs["split"]
    for ra, rb in zip(ma, mb):
        for key in ("score", "kl", "pg_loss", "vf_loss", "explained_variance"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_one_autocast_context_over_micro_batches_gives_the_same_gradients(tiny_model_dir):
    """PPO's training phase keeps one bf16 autocast context open over all micro-batches of an optimizer
    step (each weight is cast once, not once per micro-batch); the gradients must equal those of one
    context per micro-batch, bitwise."""
    from instructrl.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    xs = [torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def loss(x):
        return model(input_ids=x, use_cache=False).logits.float().logsumexp(-1).mean()

    def grads(one_context):
        model.zero_grad(set_to_none=True)
        if one_context:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for x in xs:
                    loss(x).backward()
        else:
            for x in xs:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    l = loss(x)
                l.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    per_micro, shared = grads(False), grads(True)
    assert per_micro.keys() == shared.keys() and per_micro
    for n in per_micro:
        assert torch.equal(per_micro[n], shared[n]), n


def test_training_attention_switch_keeps_the_gradients_and_restores_the_model(tiny_model_dir):
    """PPO trains with eager attention under bf16 on CPU (models.attention_implementation): on left-padded
    rows it must give the gradients of the model's own kernel (fp32: to rounding) and hand the model back
    with its own kernel, also when the block raises."""
    from instructrl.models import attention_implementation, load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    own = model.config._attn_implementation
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[0, :5] = 0  # left padding, as in rollouts
    am[1, :2] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits
        (logits.logsumexp(-1) * am).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    base = grads()
    with attention_implementation("eager", model):
        assert model.config._attn_implementation == "eager"
        eager = grads()
    assert model.config._attn_implementation == own
    for n in base:
        torch.testing.assert_close(eager[n], base[n], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError), attention_implementation("eager", model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == own
    with attention_implementation(None, model):
        assert model.config._attn_implementation == own


def test_sampling_respects_left_padding_and_eos(tiny_model_dir, tiny_tokenizer):
    from instructrl.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    tok = tiny_tokenizer
    short, long = tok("hello")["input_ids"], tok("the quick brown fox jumps over")["input_ids"]
    # top_k = 1 is greedy: a row's output must not depend on its neighbours' padding
    g = torch.Generator().manual_seed(0)
    both = sample(model, [short, long], 8, tok.eos_token_id, tok.pad_token_id, g, top_k=1)
    alone = sample(model, [short], 8, tok.eos_token_id, tok.pad_token_id, g, top_k=1)
    n = int(alone.response_mask[0].sum())
    assert torch.equal(both.response[0, :n], alone.response[0, :n])
    # the greedy continuation equals HF generate's
    ref = model.generate(torch.tensor([short]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, len(short):]
    assert alone.response[0, : len(ref)].tolist()[:n] == ref.tolist()[:n]
    # EOS rule: mask covers tokens up to and including the first EOS; padding after it
    eos = tok.eos_token_id
    model.lm_head.weight.data[eos] += 50.0  # make EOS the most likely token everywhere
    g2 = sample(model, [short, long], 8, eos, tok.pad_token_id, g, top_k=1)
    assert g2.ended.all() and g2.response.shape[1] == 1 and (g2.response[:, 0] == eos).all()
    assert g2.response_mask.sum() == 2


def test_sampling_logprobs_equal_a_fresh_forward(tiny_model_dir, tiny_tokenizer):
    """old_logprobs=sampling reuses the sampler's logits: they must match the recomputed ones (fp32)."""
    from instructrl.models import load_causal_lm
    from instructrl.core.tensors import gather_logprobs
    from instructrl.scoring import response_logits, window
    from instructrl.core import rl_math

    model = load_causal_lm(str(tiny_model_dir)).eval()
    tok = tiny_tokenizer
    prompts = [tok(t)["input_ids"] for t in ("hello", "the quick brown fox jumps over", "a b")]
    g = sample(model, prompts, 10, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(3),
               temperature=0.7, return_logprobs=True)
    rows, r = torch.arange(3), g.response.shape[1]
    ids, am = window(g, rows, g.query.shape[1], r)
    with torch.no_grad():
        logits = response_logits(model, ids, am, r, 0.7)
    m = g.response_mask
    torch.testing.assert_close(g.logprobs, gather_logprobs(logits, g.response) * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.entropy, rl_math.entropy_from_logits(logits) * m, atol=1e-5, rtol=0)
    assert (g.logprobs[m > 0] < 0).all() and (g.logprobs[m == 0] == 0).all()


def test_rm_scores_a_cut_off_response_with_eos_appended(tiny_model_dir, tiny_tokenizer):
    """rollout.rm_eos: a truncated row is scored as prompt + response + EOS (what the RM was trained on);
    a row that ended is scored exactly as before."""
    from instructrl.core.tensors import append_eos
    from instructrl.scoring import window
    from instructrl.models import load_causal_lm
    from instructrl.reward_model import init_reward_model, score

    tok = tiny_tokenizer
    lm = load_causal_lm(str(tiny_model_dir)).eval()
    eos = tok.eos_token_id
    prompts = [tok(t)["input_ids"] for t in ("hello", "the quick brown fox jumps over")]
    # eos_id -1 matches no token: every row is cut off at max_new_tokens
    g = sample(lm, prompts, 6, -1, tok.pad_token_id, torch.Generator().manual_seed(0))
    assert not g.ended.any()
    rm = init_reward_model(str(tiny_model_dir)).eval()
    rows = torch.arange(2)
    ids, am = window(g, rows, g.query.shape[1], g.response.shape[1])
    with torch.no_grad():
        got = score(rm, *append_eos(ids, am, g.ended, eos, tok.pad_token_id))
        want = [score(rm, torch.tensor([p + g.response[i].tolist() + [eos]]), torch.ones(1, len(p) + 7, dtype=torch.long))
                for i, p in enumerate(prompts)]
        # a row that ended gets a padding column: its score is unchanged
        ended = torch.tensor([True, False])
        same = score(rm, *append_eos(ids, am, ended, eos, tok.pad_token_id))[0]
        plain = score(rm, ids, am)[0]
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], plain)  # the EOS changes what the RM reads


def test_stream_and_micro_batches():
    a = stream_indices(5, 0, 12, seed=3)
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))  # whole passes, each shuffled
    assert stream_indices(5, 7, 5, seed=3) == a[7:12]  # the position alone determines what comes next
    qm = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1]])
    rm = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    chunks = list(micro_batches(torch.arange(4), qm, rm, 2, bucket=1))
    assert sorted(int(i) for c, _, _ in chunks for i in c) == [0, 1, 2, 3]
    assert [(p, r) for _, p, r in chunks] == [(1, 2), (2, 3)]  # sorted by length: short rows share a tight window
    assert [(p, r) for _, p, r in micro_batches(torch.arange(4), qm, rm, 2, bucket=2)] == [(2, 2), (2, 3)]


def test_config_errors_are_clear(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="multiple of train.minibatch_size"):
        tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "rollout.batch_size=12", "train.minibatch_size=8")
    with pytest.raises(ConfigError, match="kl.estimator"):
        tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "kl.estimator=k2")
    with pytest.raises(ConfigError, match="prompts"):
        load_config(PPOConfig, None, [])
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "train.advantage=rloo")
    with pytest.raises(ConfigError, match="divide rollout.batch_size"):
        tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "rollout.samples_per_prompt=3")
    with pytest.raises(ConfigError, match="value_warmup_steps needs"):
        tiny_cfg(tiny_model_dir, prompts_file, tmp_path, "train.advantage=rloo", "rollout.samples_per_prompt=2",
                 "train.value_warmup_steps=1")
    with pytest.raises(ConfigError, match="reward_model"):
        train_ppo(tiny_cfg(tiny_model_dir, prompts_file, tmp_path / "r"))


# ---------------------------------------------------------------------------
# Exact resume after SIGKILL
# ---------------------------------------------------------------------------


def _run_cli(cfg_path, env_extra, resume=False):
    env = {**os.environ, "INSTRUCTRL_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "instructrl", "ppo", "--config", str(cfg_path)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_sigkill_then_resume_gives_bitwise_identical_weights(tiny_model_dir, prompts_file, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from instructrl.reward_model import init_reward_model, save_reward_model
    from instructrl.models import load_tokenizer

    rm = save_reward_model(init_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), tmp_path / "rm")
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": f"hello world {i}. the lazy dog."}) + "\n" for i in range(7)))

    def write_cfg(out):
        cfg = {"policy": str(tiny_model_dir), "reward_model": str(rm), "prompts": str(prompts_file),
               "ptx_data": str(ptx), "output_dir": str(out), "steps": 5, "seed": 1,
               "rollout": {"batch_size": 8, "max_new_tokens": 8},
               "kl": {"adaptive": True, "target": 1.0, "horizon": 100},
               "train": {"minibatch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "value_lr": 1e-3,
                         "warmup_steps": 3, "ptx_batch_size": 2, "precision": "bf16"},
               "run": {"checkpoint_every": 2, "threads": 1, "deterministic": True}}
        p = tmp_path / f"{Path(out).name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        return p

    full = write_cfg(tmp_path / "full")
    r = _run_cli(full, {})
    assert r.returncode == 0, r.stderr[-3000:]

    crashed = write_cfg(tmp_path / "crashed")
    r = _run_cli(crashed, {KILL_ENV: "3"})  # killed after step 3: its last checkpoint is step 2
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (tmp_path / "crashed" / "policy").exists()
    assert len(metrics(tmp_path / "crashed")) == 3
    r = _run_cli(crashed, {}, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]

    for sub in ("policy", "value"):
        a = load_file(tmp_path / "full" / sub / "model.safetensors")
        b = load_file(tmp_path / "crashed" / sub / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    ma, mb = metrics(tmp_path / "full"), metrics(tmp_path / "crashed")
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5]  # rows of the lost step 3 were replaced, not duplicated
    drop = ("time_generate", "time_score", "time_train", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
           [{k: v for k, v in m.items() if k not in drop} for m in mb]


def test_trainable_layers_freezes_lower_blocks_of_policy_and_value(tiny_model_dir, prompts_file, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=2", "train.trainable_layers=1"),
              reward_fn=good_fraction_reward)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "policy" / "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    top = max(int(k.split(".")[2]) for k in before if k.startswith("model.layers."))
    key = f"model.layers.{top}.mlp.up_proj.weight"
    assert not torch.equal(before[key], after[key])
    value = load_file(str(out / "value" / "model.safetensors"))
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], value["model.layers.0.mlp.up_proj.weight"])


def test_shared_frozen_blocks_are_found_and_the_split_forward_is_the_full_forward(tmp_path, tiny_tokenizer):
    """models.shared_frozen_blocks counts the lower blocks that policy, reference and RM hold bitwise equal
    and frozen; running them once (lower_hidden) and the rest on that state gives the full forward."""
    from instructrl.models import (build_tiny_model, decoder_blocks, freeze_lower_layers, load_causal_lm,
                                   lower_hidden, shared_frozen_blocks)
    from instructrl.core.tensors import append_eos
    from instructrl.scoring import response_logits, window
    from instructrl.reward_model import init_reward_model, score, token_values

    path = build_tiny_model(tmp_path / "m3", layers=3)
    policy, ref = load_causal_lm(str(path)), load_causal_lm(str(path)).eval()
    rm = init_reward_model(str(path)).eval()
    freeze_lower_layers(policy, 1)
    assert shared_frozen_blocks([policy, ref, rm], [policy]) == 2  # the top block is trained: not shared
    assert shared_frozen_blocks([policy, ref], []) == 3
    tok = tiny_tokenizer
    prompts = [tok(t)["input_ids"] for t in ("hi", "the quick brown fox jumps over")]  # left padding
    g = sample(ref, prompts, 5, -1, tok.pad_token_id, torch.Generator().manual_seed(0))
    ids, am = window(g, torch.arange(2), g.query.shape[1], g.response.shape[1])
    rm_ids, rm_am = append_eos(ids, am, torch.tensor([True, False]), tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        h = lower_hidden(ref, rm_ids, rm_am, 2)
        assert len(ref.model.layers) == 3 and not isinstance(ref.model.norm, torch.nn.Identity)  # restored
        low = (h[:, :ids.shape[1]], 2)  # causal: the RM input's first columns serve the others
        for m in (policy, ref):
            torch.testing.assert_close(response_logits(m, ids, am, 5, 1.0, low), response_logits(m, ids, am, 5, 1.0),
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score(rm, rm_ids, rm_am, (h, 2)), score(rm, rm_ids, rm_am), atol=1e-5, rtol=1e-5)
        real = rm_am.bool()
        torch.testing.assert_close(token_values(rm, rm_ids, rm_am, (h, 2))[real], token_values(rm, rm_ids, rm_am)[real],
                                   atol=1e-5, rtol=1e-5)
        with decoder_blocks(ref, 2):
            assert len(ref.model.layers) == 1
        ref.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0  # a different block 1: only block 0 is shared
        assert shared_frozen_blocks([policy, ref, rm], [policy]) == 1
        ref.model.embed_tokens.weight[0, 0] += 1.0  # different embeddings: nothing is
        assert shared_frozen_blocks([policy, ref, rm], [policy]) == 0


def test_shared_frozen_blocks_do_not_change_the_ppo_result(tiny_model_dir, prompts_file, tmp_path):
    """train.share_frozen_blocks is a speed knob: with trainable_layers the metrics and trained weights of
    policy and value model agree with every model running every block, to float tolerance."""
    from safetensors.torch import load_file

    runs = {}
    for share in ("true", "false"):
        out = tmp_path / share
        train_ppo(tiny_cfg(tiny_model_dir, prompts_file, out, "steps=3", "train.trainable_layers=1",
                           f"train.share_frozen_blocks={share}"), reward_fn=good_fraction_reward)
        runs[share] = (metrics(out), load_file(out / "policy" / "model.safetensors"),
                       load_file(out / "value" / "model.safetensors"), (out / "log.txt").read_text())
    (ma, pa, va, la), (mb, pb, vb, lb) = runs["true"], runs["false"]
    assert "1 blocks shared by all models" in la and "shared by all models" not in lb
    for ra, rb in zip(ma, mb):
        for key in ("score", "kl", "pg_loss", "vf_loss", "explained_variance"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    for a, b in ((pa, pb), (va, vb)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    top = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(pa[top], load_file(str(tiny_model_dir / "model.safetensors"))[top])  # it did train


def test_the_old_out_key_still_names_the_run_folder_with_a_deprecation_message(tmp_path, capsys):
    cfg = load_config(PPOConfig, None, ["prompts=p.jsonl", f"out={tmp_path / 'old'}"])
    assert cfg.output_dir == str(tmp_path / "old") and cfg.out == ""
    err = capsys.readouterr().err
    assert "`out` is deprecated" in err and f"output_dir={tmp_path / 'old'}" in err
