"""Run ``instructrl`` in 1 process or under torchrun with N (CPU, gloo), and read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cli(args: list[str], nproc: int, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``instructrl *args`` in ``nproc`` processes; one thread each (the tests share 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m"] if nproc == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                                          "--nproc_per_node", str(nproc), "-m"]
    return subprocess.run([*launcher, "instructrl", *args], env=env, capture_output=True, text=True, timeout=timeout)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def moved(trained: dict, start: dict) -> float:
    """The largest change training made to any weight the two share."""
    return max((trained[k] - start[k]).abs().max().item() for k in trained if k in start)
