"""Reward-model training with ``train.sharding=fsdp2``: 2 CPU processes (gloo) end where 1 process does.

11 mixed-K rankings in batches of 4 (the last one 3), packed into micro-batches of at most 4
sequences: the two processes run different numbers of passes (the shorter one pads with all-tied,
zero-loss rankings). The reward model is sharded as blocks, trunk and scalar head (reward_model's
score calls the trunk and the head separately).
"""

import json

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.train.rm import RMConfig
from launch_util import cli, moved, rows, weights
from test_reward import WORDS, _synthetic, _write


def common(tiny_model_dir, tmp_path) -> list[str]:
    train = _write(tmp_path / "train.jsonl", _synthetic(11, 0))
    val = _write(tmp_path / "val.jsonl", _synthetic(6, 1))
    demos = _write(tmp_path / "demos.jsonl", [{"prompt": "write a poem", "response": f"the {w}"} for w in WORDS])
    return [f"model={tiny_model_dir}", f"data.train={train}", f"data.val={val}", f"data.demonstrations={demos}",
            "train.epochs=2", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=3e-3",
            "train.precision=fp32", "data.max_length=64", "train.save_every=2", "train.sharding=fsdp2"]


def test_two_sharded_processes_equal_one_process(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, tmp_path)
    r1 = cli(["rm", *args, f"output_dir={tmp_path / 'one'}"], 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = cli(["rm", *args, f"output_dir={tmp_path / 'two'}"], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    log = (tmp_path / "two" / "log.txt").read_text()
    assert "sharding: fsdp2 over 2 processes (2 decoder blocks + trunk + head)" in log
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    from instructrl.reward_model import init_reward_model

    torch.manual_seed(0)  # the seed=0 head both runs drew
    start = {k: v for k, v in init_reward_model(str(tiny_model_dir)).state_dict().items()}
    m = moved(a, start)
    assert m > 1e-3  # training really changed the weights
    for k in a:  # the two reduce in another order; Adam turns that rounding into a tiny share of the movement
        torch.testing.assert_close(a[k], b[k], atol=1e-3 * m, rtol=1e-4)
    ra, rb = [r for r in rows(tmp_path / "one") if "loss" in r], [r for r in rows(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ra, rb):
        for k in ("loss", "accuracy", "grad_norm", "comparisons", "sequences"):
            assert x[k] == pytest.approx(y[k], rel=1e-4), (k, x["step"])
    assert any(r["grad_norm"] > 1.0 for r in ra)  # clipping (max_grad_norm=1) was in play
    # rank 0 normalised and evaluated a plain copy of the gathered weights
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert sb["normalization"]["bias"] == pytest.approx(sa["normalization"]["bias"], abs=1e-4)
    ea, eb = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert ea["overall"]["comparisons"] == eb["overall"]["comparisons"] > 0
    # the last checkpoint: full weights, the gathered optimizer state keyed by parameter name
    st = torch.load(tmp_path / "two" / "checkpoints" / "step-000006" / "state.pt", weights_only=False)
    assert st["sharded"] and st["world_size"] == 2
    key = "model.layers.0.mlp.up_proj.weight"
    assert st["opt"]["state"][key]["exp_avg"].shape == a[key].shape


def test_lora_with_fsdp2_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.sharding=fsdp2 with train.lora.rank > 0"):
        load_config(RMConfig, None, [*common(tiny_model_dir, tmp_path), f"output_dir={tmp_path}",
                                     "train.lora.rank=4"])
