"""PPO with ``train.sharding=fsdp2``: 2 CPU processes (gloo) take the steps of 1 (GAE + PPO-ptx), and a
SIGKILLed 2-process sharded run resumes to the uninterrupted one's weights, bit for bit (RLOO + PPO-ptx).

Minibatches of 4 out of 8 episodes: a minibatch's rows fall unevenly on the two processes (the one
with fewer runs weight-0 passes), 4 ptx texts in micro-batches of 2 likewise, and token-by-token
sampling stops at a different step on each process (it runs on gathered weights).
"""

from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.train.ppo import KILL_ENV, PPOConfig
import test_ppo_dist
from launch_util import cli, rows, weights
from test_ppo_dist import write_cfg

setup = test_ppo_dist.setup  # the tiny policy, its RM, prompts and ptx texts (a fixture)

SHARDED = {"train": {"sharding": "fsdp2"}, "engine": {"name": "hf"}}


def ppo(cfg: Path, nproc: int, *extra: str, env_extra: dict | None = None):
    return cli(["ppo", "--config", str(cfg), *extra], nproc, env_extra)


def test_two_sharded_processes_take_the_steps_of_one(setup, tmp_path, tiny_model_dir):
    r = ppo(write_cfg(tmp_path, "two", setup, **SHARDED), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded_run = tmp_path / "two"
    log = (sharded_run / "log.txt").read_text()
    assert "sharding: fsdp2 over 2 processes (policy, value, reference, reward model)" in log
    r = ppo(write_cfg(tmp_path, "one", setup, **SHARDED), 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to shard over; running unsharded" in (tmp_path / "one" / "log.txt").read_text()
    assert [m["world_size"] for m in rows(sharded_run)] == [2] * 4
    start = weights(Path(tiny_model_dir))
    test_ppo_dist.assert_same_steps(tmp_path / "one", sharded_run, start)
    st = torch.load(sharded_run / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    assert st["sharded"] and st["world_size"] == 2
    key = "model.layers.0.mlp.up_proj.weight"
    assert st["policy_opt"]["state"][key]["exp_avg"].shape == start[key].shape  # full, keyed by name
    assert st["value_opt"]["state"][key]["exp_avg"].shape == start[key].shape



def test_killed_sharded_rloo_run_resumes_exactly(setup, tmp_path):
    """RLOO + PPO-ptx (no value model), killed after step 3 (the last checkpoint is step 2's), resumed:
    bitwise the uninterrupted run."""
    kw = dict(SHARDED, rollout={"samples_per_prompt": 2}, train={"sharding": "fsdp2", "advantage": "rloo"})
    full, crashed = write_cfg(tmp_path, "full", setup, **kw), write_cfg(tmp_path, "crashed", setup, **kw)
    r = ppo(full, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = ppo(crashed, 2, env_extra={KILL_ENV: "3"})
    assert r.returncode != 0
    assert not (tmp_path / "crashed" / "policy").exists()
    r = ppo(crashed, 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step-000002" in (tmp_path / "crashed" / "log.txt").read_text()
    assert not (tmp_path / "crashed" / "value").exists()
    a, b = weights(tmp_path / "full" / "policy"), weights(tmp_path / "crashed" / "policy")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    key = lambda rs: [(r["step"], r["score"], r["pg_loss"], r["ptx_loss"]) for r in rs]  # noqa: E731
    assert key(rows(tmp_path / "crashed")) == key(rows(tmp_path / "full"))
    st = torch.load(tmp_path / "full" / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    assert st["sharded"] and "value_opt" not in st


def test_sharding_with_lora_or_vllm_is_a_config_error(tmp_path):
    args = ["prompts=p.jsonl", "train.sharding=fsdp2", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="train.sharding=fsdp2 with train.lora.rank > 0"):
        load_config(PPOConfig, None, [*args, "train.lora.rank=4"])
    cfg = load_config(PPOConfig, None, [*args, "engine.name=hf"])
    cfg.engine.name = "vllm"  # as if vllm were installed (loading the config checks that it is not)
    with pytest.raises(ConfigError, match="train.sharding=fsdp2 with engine.name=vllm"):
        cfg.validate()
