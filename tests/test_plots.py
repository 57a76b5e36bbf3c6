"""instructrl.plots: the shared figures (reward vs √KL for PPO and the evaluation, calibration), atomic PNG writes."""

import pytest

from instructrl.plots import atomic_write_bytes, plot_calibration, plot_reward_vs_sqrt_kl, reward_vs_sqrt_kl

PNG = b"\x89PNG\r\n\x1a\n"


def test_reward_vs_sqrt_kl_plot_for_a_ppo_run_and_for_the_report(tmp_path):
    rows = [{"step": i, "score": 0.1 * i, "kl": 0.05 * i * i} for i in range(1, 6)]
    data = plot_reward_vs_sqrt_kl({"ppo": reward_vs_sqrt_kl(rows)}, tmp_path / "a.png")
    assert data.startswith(PNG) and (tmp_path / "a.png").read_bytes() == data
    # one logged step: a point without a line still plots (what a 1-step PPO run writes)
    one = reward_vs_sqrt_kl(rows[:1])
    assert one["fit"] is None and plot_reward_vs_sqrt_kl({"ppo": one}, tmp_path / "b.png").startswith(PNG)
    # several runs, one of them empty
    assert plot_reward_vs_sqrt_kl({"a": reward_vs_sqrt_kl(rows), "b": reward_vs_sqrt_kl([])}, tmp_path / "c.png")
    # nothing to plot: no file
    assert plot_reward_vs_sqrt_kl({"ppo": reward_vs_sqrt_kl([])}, tmp_path / "d.png") is None
    assert plot_reward_vs_sqrt_kl({}, tmp_path / "d.png") is None and not (tmp_path / "d.png").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_plot_calibration_writes_a_png(tmp_path):
    from instructrl.rm_metrics import calibration_bins

    data = plot_calibration(calibration_bins([0.5, -0.2, 1.3, 2.0, -1.0]), tmp_path / "sub" / "cal.png")
    assert data.startswith(PNG) and (tmp_path / "sub" / "cal.png").read_bytes() == data


def test_atomic_write_bytes_leaves_nothing_half_written(tmp_path, monkeypatch):
    import os

    p = tmp_path / "x.bin"
    atomic_write_bytes(p, b"old")
    plain = tmp_path.parent / f"{tmp_path.name}-plain"
    plain.write_bytes(b"")
    assert p.read_bytes() == b"old" and p.stat().st_mode == plain.stat().st_mode  # an ordinary file's permissions

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["x.bin"]
