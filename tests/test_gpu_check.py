"""benchmarks/gpu_check.py runs its stage checks on the CPU too, and its device guard catches a stray tensor."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_guard_reports_a_forward_off_the_device():
    guard = _module().DeviceGuard("cuda")  # everything here is on the CPU: every forward is off-device
    with guard:
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))
    assert guard.calls == 1 and guard.bad and "Linear" in guard.bad[0]
    with _module().DeviceGuard("cpu") as ok:
        torch.nn.Linear(3, 2)(torch.zeros(1, 3))
    assert ok.calls == 1 and not ok.bad


def test_every_stage_runs_under_the_guard_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--no-timing", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["stages"]) == {"sft", "rm", "ppo_gae", "ppo_rloo_lora", "dpo", "eval"}
    assert all(s["forwards"] > 0 and not s["off_device"] for s in report["stages"].values())
