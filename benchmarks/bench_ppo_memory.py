"""Peak RSS per process of PPO at SmolLM2-135M size: 1 process vs 2 processes with train.sharding=fsdp2.

    OMP_NUM_THREADS=1 python benchmarks/bench_ppo_memory.py [--root DIR] [--steps 2] [--modes one,two-fsdp2]

No download: a random init of SmolLM2-135M's configuration (as benchmarks/gpu_check.py builds it) is the
policy, and a reward model on it (fresh scalar head) is the RM and the value model's start, so the
run has all four models of GAE PPO (policy and value trained, reference and RM frozen). Each mode is
one ``instructrl ppo`` command (``torchrun`` for 2 processes); every process runs under a wrapper that
records its peak resident set (``VmHWM``) and the peak of its private part (``RssAnon``, sampled) over
the whole run (loading, sampling, training, the checkpoint at the last step, the final save) and within
each phase of the loop (see WRAPPER for why both). fp32 on the CPU, one thread per process. Modes:
``one`` (1 process), ``two-dp`` (2 processes, data parallel), ``two-fsdp2`` (2 processes, sharded).
Prints one JSON line per mode; docs/pipeline.md ("Sharded training") holds the figures measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs ``python -m instructrl ...``; each PPO phase is wrapped so that the peak resident set *within*
# it is read (the kernel's peak is reset before the phase: ``echo 5 > /proc/self/clear_refs``), and a
# thread samples the private (anonymous) part of the resident set every 20 ms. Why both: the weights are
# read through safetensors' memory map, and the map's pages stay resident (file-backed, clean, shared
# by every process reading the same file) after a sharded process has copied out its shard, so the
# kernel's peak counts each model's whole file once more in every process. At exit the peaks go to
# $PEAK_DIR/rank-N as JSON (GB): whole run and per phase, resident set and anonymous part.
WRAPPER = '''
import atexit, json, os, runpy, sys, threading, time

import instructrl.train.ppo as ppo

def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":")) * 1024 / 1e9

PHASES, ANON, WHOLE = {}, {}, {"rss": 0.0, "anon": 0.0}
current = ["start"]

def sample():
    while True:
        a = status("RssAnon")
        WHOLE["anon"] = max(WHOLE["anon"], a)
        ANON[current[0]] = round(max(ANON.get(current[0], 0.0), a), 2)
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()

def wrap(name):
    inner = getattr(ppo, name)

    def phase(*a, **k):
        WHOLE["rss"] = max(WHOLE["rss"], status("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        current[0] = name
        try:
            return inner(*a, **k)
        finally:
            current[0] = "between"
            hwm = status("VmHWM")
            WHOLE["rss"] = max(WHOLE["rss"], hwm)
            PHASES[name] = round(max(PHASES.get(name, 0.0), hwm), 2)

    setattr(ppo, name, phase)

for name in ("load_models", "load_data", "make_optimisers", "generate_trajectory", "score_trajectory",
             "compute_advantages", "ppo_update", "save_checkpoint", "save_final"):
    wrap(name)

def peak():
    out = {"rss": round(max(WHOLE["rss"], status("VmHWM")), 2), "anon": round(WHOLE["anon"], 2),
           "rss_by_phase": PHASES, "anon_by_phase": ANON}
    with open(os.path.join(os.environ["PEAK_DIR"], "rank-" + os.environ.get("RANK", "0")), "w") as f:
        json.dump(out, f)

atexit.register(peak)
sys.argv = ["instructrl", *sys.argv[1:]]
runpy.run_module("instructrl", run_name="__main__")
'''


def build(root: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import random_smollm2

    policy, rm = random_smollm2(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"write a short line about topic {i}"}) + "\n"
                               for i in range(32)))
    return {"policy": policy, "reward_model": rm, "prompts": prompts}


def run(mode: str, inputs: dict, root: Path, steps: int) -> dict:
    nproc = 1 if mode == "one" else 2
    peaks = root / f"peak-{mode}"
    peaks.mkdir(exist_ok=True)
    wrapper = root / "peak_wrapper.py"
    wrapper.write_text(WRAPPER)
    launcher = [sys.executable] if nproc == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                                     "--nproc_per_node", str(nproc)]
    args = [f"policy={inputs['policy']}", f"reward_model={inputs['reward_model']}", f"prompts={inputs['prompts']}",
            f"output_dir={root / mode}", "overwrite=true", f"steps={steps}", "seed=0",
            "rollout.batch_size=8", "rollout.max_new_tokens=32", "train.minibatch_size=4", "train.micro_batch_size=2",
            "train.score_batch_size=4", "train.precision=fp32", "train.advantage=gae", "engine.name=hf",
            f"run.checkpoint_every={steps}", f"train.sharding={'fsdp2' if mode == 'two-fsdp2' else 'none'}"]
    env = {**os.environ, "PEAK_DIR": str(peaks), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, str(wrapper), "ppo", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
    gb = {p.name: json.loads(p.read_text()) for p in sorted(peaks.iterdir())}
    return {"mode": mode, "processes": nproc, "peak_rss_gb": gb, "wall_s": round(wall, 1), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default="one,two-fsdp2")
    a = ap.parse_args()
    root = a.root or Path(tempfile.mkdtemp(prefix="ppo-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    inputs = build(root)
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")),
               platform.processor())
    for mode in a.modes.split(","):
        print(json.dumps({**run(mode, inputs, root, a.steps), "cpu": cpu,
                          "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")}),
              flush=True)


if __name__ == "__main__":
    main()
