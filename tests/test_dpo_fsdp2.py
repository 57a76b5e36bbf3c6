"""DPO with ``train.sharding=fsdp2``: 2 CPU processes (gloo) end where 1 process does.

11 mixed-K rankings in batches of 4 (the last one 3), packed into micro-batches of at most 4
sequences: the processes run different numbers of passes, the shorter one pads with all-tied
(zero-loss) rankings. The reference log-probs come from rank 0's whole reference before training.
"""

import pytest
import torch

from launch_util import cli, moved, rows, weights
from test_reward import _synthetic, _write


def common(tiny_model_dir, tmp_path, loss: str) -> list[str]:
    train = _write(tmp_path / "train.jsonl", _synthetic(11, 0))
    return [f"model={tiny_model_dir}", f"data.train={train}", f"train.loss={loss}", "train.epochs=2",
            "train.batch_size=4", "train.micro_batch_size=4", "train.lr=5e-3", "train.warmup_ratio=0",
            "train.precision=fp32", "data.max_length=64", "train.save_every=2", "train.sharding=fsdp2"]


def test_two_sharded_processes_equal_one_process(tiny_model_dir, tmp_path):
    args = common(tiny_model_dir, tmp_path, "dpo")
    r1 = cli(["dpo", *args, f"output_dir={tmp_path / 'one'}"], 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = cli(["dpo", *args, f"output_dir={tmp_path / 'two'}"], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "sharding: fsdp2 over 2 processes (2 decoder blocks + root)" in (tmp_path / "two" / "log.txt").read_text()
    a, b = weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()  # the tied lm_head is written once
    m = moved(a, weights(tiny_model_dir))
    assert m > 1e-3  # training really changed the weights
    for k in a:  # another reduction order; Adam turns that rounding into a tiny share of the movement
        torch.testing.assert_close(a[k], b[k], atol=1e-3 * m, rtol=1e-4)
    ra, rb = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ra, rb):
        for k in ("loss", "reward_margin", "accuracy", "grad_norm", "comparisons"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x["step"])
    st = torch.load(tmp_path / "two" / "checkpoints" / "step-000006" / "state.pt", weights_only=False)
    assert st["sharded"] and st["world_size"] == 2 and len(st["rng"]) == 2
    key = "model.layers.0.mlp.up_proj.weight"
    assert st["opt"]["state"][key]["exp_avg"].shape == a[key].shape
