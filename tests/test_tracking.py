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


def test_a_ppo_run_sends_its_metrics_rows_and_samples_to_tensorboard(tiny_model_dir, tmp_path):
    """tracker=tensorboard on `instructrl ppo`: every metrics.jsonl row (phase timings included) and a
    sampled completion reach the event files, which read back equal to metrics.jsonl."""
    pytest.importorskip("tensorboard")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from instructrl.config import load_config
    from instructrl.train.ppo import PPOConfig, train_ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"say {w}"}) + "\n" for i, w in enumerate("abcd")))
    out = tmp_path / "run"
    cfg = load_config(PPOConfig, None, [
        f"policy={tiny_model_dir}", f"prompts={prompts}", f"output_dir={out}", "steps=3", "rollout.batch_size=4",
        "rollout.max_new_tokens=4", "train.minibatch_size=4", "train.precision=fp32", "tracker=tensorboard",
        "run.sample_every=2"])
    train_ppo(cfg, reward_fn=lambda q, r, m: m.sum(1))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for key in ("score", "kl", "time_generate", "time_train", "pg_loss"):
        assert [(e.step, round(e.value, 5)) for e in acc.Scalars(key)] == \
            [(r["step"], round(r[key], 5)) for r in rows], key
    assert any("samples" in t for t in acc.Tags()["tensors"])
