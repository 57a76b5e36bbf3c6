"""PPO under torchrun: 2 CPU processes (gloo) take the steps of 1 process; a killed 2-process run resumes exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from instructrl.train.ppo import KILL_ENV
from launch_util import cli, moved, rows, weights

PROMPTS = ["write a haiku about the sea", "list three colors", "say hello", "explain rain",
           "name a fruit", "count to five", "describe a cat", "what is two plus two"]


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model

    torch.manual_seed(0)
    rm = save_reward_model(init_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": f"hello world {i}. the lazy dog."}) + "\n" for i in range(7)))
    return {"policy": str(tiny_model_dir), "reward_model": str(rm), "prompts": str(prompts), "ptx_data": str(ptx)}


def write_cfg(tmp_path: Path, name: str, base: dict, **sections) -> Path:
    cfg = {**base, "output_dir": str(tmp_path / name), "steps": 4, "seed": 3,
           "rollout": {"batch_size": 8, "max_new_tokens": 8},
           "train": {"minibatch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "value_lr": 3e-3, "warmup_steps": 0,
                     "ptx_batch_size": 4, "precision": "fp32"},
           "run": {"checkpoint_every": 2, "threads": 1, "deterministic": True}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run(cfg: Path, nproc: int, resume: bool = False, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return cli(["ppo", "--config", str(cfg)] + (["--resume"] if resume else []), nproc, env_extra, timeout=600)


def assert_same_steps(one: Path, two: Path, start: dict) -> None:
    """Two PPO runs of one global batch took the same steps: equal metrics, and policy and value weights
    equal to 1% of how far training moved them. The runs sum the gradients in another order; Adam turns
    that rounding into up to ~2e-5 on a few weights (2.3e-5 in 1 of 12288 on an AMX Xeon). A wrong split
    or scaling moves weights by about as much as training does, far beyond 1% of it."""
    for a, b in zip(rows(one), rows(two)):
        for k in ("score", "kl", "response_length", "pg_loss", "vf_loss", "ptx_loss", "explained_variance"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    for sub in ("policy", "value"):
        a, b = weights(one / sub), weights(two / sub)
        assert a.keys() == b.keys()  # the tied lm_head is written once
        m = moved(a, start)
        assert m > 1e-3  # it really trained
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0.01 * m, rtol=1e-4)


def test_two_processes_take_the_steps_of_one(setup, tmp_path, tiny_model_dir):
    """GAE + PPO-ptx, minibatches of 4 out of 8 episodes (a minibatch's rows fall unevenly on the two
    processes): the gradients are summed over processes, normalised by the global token count."""
    one, two = write_cfg(tmp_path, "one", setup), write_cfg(tmp_path, "two", setup)
    r1 = run(one, 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(two, 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [m["world_size"] for m in m2] == [2] * 4 and [m["episodes"] for m in m2] == [4] * 4
    assert [m["world_size"] for m in m1] == [1] * 4
    assert_same_steps(tmp_path / "one", tmp_path / "two", weights(Path(tiny_model_dir)))
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "2 process(es), 4 episodes each per step" in log


def test_killed_two_process_run_resumes_exactly(setup, tmp_path):
    """RLOO (groups of 2 never span processes), killed after step 3 (last checkpoint: step 2), resumed."""
    kw = dict(rollout={"samples_per_prompt": 2}, train={"advantage": "rloo"})
    full, crashed = write_cfg(tmp_path, "full", setup, **kw), write_cfg(tmp_path, "crashed", setup, **kw)
    r = run(full, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(crashed, 2, env_extra={KILL_ENV: "3"})
    assert r.returncode != 0
    assert not (tmp_path / "crashed" / "policy").exists()
    r = run(crashed, 2, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "full" / "policy"), weights(tmp_path / "crashed" / "policy")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in rows(tmp_path / "crashed")] == [1, 2, 3, 4]


def test_a_batch_that_does_not_split_over_the_processes_is_refused(setup, tmp_path):
    cfg = write_cfg(tmp_path, "bad", setup, rollout={"batch_size": 6, "samples_per_prompt": 2},
                    train={"advantage": "rloo", "minibatch_size": 6})
    r = run(cfg, 2)
    assert r.returncode != 0
    assert "must split over the 2 processes" in r.stderr
    assert "Traceback" not in r.stderr.split("must split")[0][-300:]
