"""Metrics rows reach TensorBoard and can be read back from its event files."""

import pytest

from instructrl.config import ConfigError
from instructrl.tracking import open_tracker


def test_tensorboard_tracker_logs_rows_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr = open_tracker("tensorboard", tmp_path, name="sft", config={"train": {"lr": 3e-4, "epochs": 2}, "model": "m"})
    for step, loss in enumerate([2.0, 1.5, 1.25], start=1):
        tr.log({"loss": loss, "lr": 1e-4, "note": "text is skipped", "flag": True, "bad": float("nan")}, step=step)
    tr.log_text("samples", "prompt -> answer", step=3)
    tr.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "sft"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert "bad" not in acc.Tags()["scalars"] and "flag" not in acc.Tags()["scalars"]
    assert any("samples" in t for t in acc.Tags()["tensors"])


def test_none_opens_nothing_and_an_unknown_kind_is_a_clear_error(tmp_path):
    assert open_tracker("none", tmp_path, name="x") is None
    with pytest.raises(ConfigError, match="tracker must be one of"):
        open_tracker("mlflowx", tmp_path, name="x")
