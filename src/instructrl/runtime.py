"""The one runtime every loop runs with: device, precision, autocast, seeds and RNG state.

    rt = make_runtime(device="auto", precision="auto")   # once, when a command starts
    model.to(rt.device)
    with rt.autocast():
        logits = model(ids.to(rt.device)).logits

Nothing else in instructrl calls ``torch.autocast`` or decides precision. Resolving ``auto``
may measure the CPU (``cpu_bf16_speedup``) and write a cache file, which is why it happens here,
at a command's start, and never in a config's ``validate()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pathlib import Path

from instructrl.config import ConfigError, param

Precision = Literal["auto", "bf16", "fp32"]
DEVICE_HELP = "auto = CUDA when present (this process's local rank under torchrun), else cpu; or cpu, cuda, cuda:N"
PRECISION_HELP = ("auto = bf16 autocast where bf16 matmuls are fast (CUDA; CPUs with AMX; other CPUs where a one-off "
                  "probe measures bf16 1.5x faster or more), else fp32; fp32 master weights either way")


def set_threads(n: int, key: str = "threads") -> None:
    """torch's CPU threads = ``n`` (0 = leave torch's default). More threads than CPUs only slow a
    run down, and an absurd count (threads=100000) fails deep inside torch's thread pool, so it is
    refused here, where the command starts (not in ``validate``, which never probes the machine)."""
    if not n:
        return
    cpus = os.cpu_count() or 1
    if n > cpus:
        raise ConfigError(f"{key}={n} but this machine has {cpus} CPU(s); use at most {cpus} (0 = torch's default)")
    torch.set_num_threads(n)


def device_field(default: str = "auto"):
    """The ``device`` key of a command config (one help text for every command)."""
    return param(default, DEVICE_HELP)


def precision_field(default: str = "auto"):
    """The ``precision`` key of a command config (one help text for every command)."""
    return param(default, PRECISION_HELP)


@dataclass(frozen=True)
class Runtime:
    """Where and how a command computes. ``precision`` is resolved: bf16 or fp32, never auto."""

    device: torch.device
    precision: Literal["bf16", "fp32"]

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full fp32."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self):
        """bf16 autocast on this device type under bf16; a no-op context under fp32."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def seed(self, seed: int) -> None:
        """Seed python, numpy and torch (every device) alike."""
        seed_everything(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch.device; an unusable one is a ConfigError."""
    name = (name or "auto").strip()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available on this machine (torch {torch.__version__}); "
                              f"use device=cpu or device=auto")
        if name == "cuda":
            return torch.device("cuda", local % torch.cuda.device_count())
        idx = name.split(":", 1)[1]
        if not idx.isdigit():
            raise ConfigError(f"device={name}: expected cuda:N with N a GPU index")
        if int(idx) >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(0..{torch.cuda.device_count() - 1})")
        return torch.device("cuda", int(idx))
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """``auto`` -> ``bf16`` where bf16 matmuls are fast on ``device``, else ``fp32``; others pass through.

    bf16 pays only with fast hardware bf16 matmuls: CUDA GPUs that support them, CPUs with AMX,
    and some CPUs with AVX512-BF16 but not others (docs/configs.md has the measurements). CPU
    flags cannot tell those apart, so without AMX ``auto`` measures (:func:`cpu_bf16_speedup`)
    once per machine and picks bf16 at 1.5x or more.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision != "auto":
        return precision
    device = device if device is not None else resolve_device("auto")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_amx() or cpu_bf16_speedup() >= 1.5 else "fp32"


def make_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve a command's ``device`` and ``precision`` keys once, when it starts."""
    dev = resolve_device(device)
    return Runtime(dev, resolve_precision(precision, dev))  # type: ignore[arg-type]


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state(gen: torch.Generator | None = None) -> dict:
    """Every RNG stream a resumed run needs to continue bit for bit (python, numpy, torch, CUDA, ``gen``)."""
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        state["generation"] = gen.get_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator | None = None) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None:
        gen.set_state(state["generation"])


def _cpu_has_amx() -> bool:
    return "amx_bf16" in _cpu_info()[1]


def _cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("", set()) where there is none."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def instructrl_home() -> Path:
    """``$INSTRUCTRL_HOME`` (default ``~/.cache/instructrl``): converted models, the bf16 probe."""
    from pathlib import Path

    return Path(os.environ.get("INSTRUCTRL_HOME", Path.home() / ".cache" / "instructrl"))


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul of training shape runs than fp32 on this CPU (> 1 = faster).

    Measured once per machine (CPU model, thread count and torch version) in about 0.2 s, and
    kept in ``$INSTRUCTRL_HOME/cpu-bf16.json`` so that every run on the machine, a resumed one
    included, resolves ``auto`` the same way.
    """
    from instructrl.io import atomic_write_text

    home = instructrl_home()
    key = f"{_cpu_info()[0]} | threads {torch.get_num_threads()} | torch {torch.__version__}"
    cache = home / "cpu-bf16.json"
    try:
        seen = json.loads(cache.read_text())
    except (OSError, ValueError):
        seen = {}
    if isinstance(seen.get(key), (int, float)):
        return float(seen[key])

    def best_ms(dtype: torch.dtype) -> float:
        # one MLP projection of SmolLM2 on 1024 tokens: the shape training and scoring spend their time on
        x, w = torch.randn(1024, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        times = []
        for _ in range(4):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t)
        return min(times[1:])  # the first call pays one-off setup

    speedup = best_ms(torch.float32) / best_ms(torch.bfloat16)
    try:
        home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({**seen, key: round(speedup, 3)}, indent=1) + "\n")
    except OSError:
        pass  # a read-only home only costs the probe again next time
    return speedup
