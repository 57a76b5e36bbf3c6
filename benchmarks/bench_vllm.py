"""Sampling throughput: the built-in sampler (rollout.sample) vs vLLM, same prompts, one process.

    flock /tmp/instructrl-heavy.lock nice python benchmarks/bench_vllm.py [--prompts 64] [--tokens 64] [--compile]
        [--model PATH | --tiny] [--kv-cache-gib G] [--gpu-memory-utilization U]

Run it with the vLLM venv's python (docs/vllm.md); without vllm it measures the built-in sampler only.
The model (default: the embedded SmolLM2-135M-Instruct), chat prompts from the constraint-task generator,
temperature 1, full vocabulary, up to --tokens new tokens, one batch of all prompts; tok/s counts the
generated tokens (EOS included). The built-in sampler is timed once before vLLM starts; then importing
vllm, starting the engine and pushing the HF weights into it (sync_weights) are timed; then, after a
vLLM warm-up, --repeats pairs of calls alternate the two engines, so that both see the same load on a
shared machine (and the built-in sampler runs with the engine living in the process).

    ... bench_vllm.py --ppo-step [--repeats 3] [--batch 16] [--tokens 64] [--model PATH | --tiny]

times whole PPO steps instead: ``train_ppo`` on the model (policy, reference and value model from its
weights; a scripted reward, so no reward-model forward), one step per run, alternating engine.name=hf
and engine.name=vllm after one untimed warm-up run of each. The engine's start (with one weight sync)
is timed first, on its own, with the settings the runs use, so that every run reuses it. Reported per
run: each phase's seconds (generate, score, train, sync), the step time (their sum), the generation
phase's tok/s (response tokens, EOS included, / generate seconds) and the hf/vllm ratios; the last
line has every run and the medians. With vllm the score phase also runs the policy forward that
recomputes π_old (the built-in sampler's fp32 log-probs are reused instead), and each step ends with
a sync_weights.

    ... bench_vllm.py --train-beside [--repeats 3] [--model PATH | --tiny]

asks whether the engine and torch training slow each other in one process (issue 19, "Threads"):
--repeats training steps of the model (forward, backward and AdamW on 8 sequences of 128 tokens,
under the run's autocast) before vLLM is imported, then vLLM starts and generates, then --repeats
pairs alternate a training step and a vLLM call. Reported: the steps' seconds before and beside the
engine, and vLLM's tok/s after its first call and between training steps.

--tiny: a tiny random Llama (hidden 128, 2 layers, head size 64, as the tests') built in a temp
folder: a smoke run of either mode in a minute. --kv-cache-gib / --gpu-memory-utilization set the
engine's engine.kv_cache_gib / engine.gpu_memory_utilization (0 = the engine's default: on CPU a KV
cache of 0.2 x RAM; docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{name} ({', '.join(ext) or 'no avx2'})"


def timed(eng, ids, settings) -> float:
    """tok/s of one call (generated tokens, EOS included)."""
    t0 = time.perf_counter()
    g = eng.generate(ids, settings)
    return round(float(g.response_mask.sum()) / (time.perf_counter() - t0), 1)


def model_folder(args) -> str:
    """--tiny: a tiny Llama vLLM's CPU attention supports (head size 64), in a temp folder; else --model."""
    from instructrl.models import build_tiny_model, resolve_model

    if not args.tiny:
        return resolve_model(args.model)
    return str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-vllm-tiny-")) / "model", hidden=128, layers=2,
                                heads=2, seed=0))


def vllm_settings(args):
    """The engine section both modes use for vLLM (and --ppo-step passes to every run as engine.* keys)."""
    from instructrl.engines import EngineSettings

    return EngineSettings(name="vllm", enforce_eager=not args.compile, kv_cache_gib=args.kv_cache_gib,
                          gpu_memory_utilization=args.gpu_memory_utilization)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", help="auto = runtime.resolve_precision on this machine")
    ap.add_argument("--compile", action="store_true", help="vLLM with torch.compile (enforce_eager=false)")
    ap.add_argument("--ppo-step", action="store_true", help="time PPO steps with engine=hf vs engine=vllm")
    ap.add_argument("--train-beside", action="store_true", help="time training steps before and beside the engine")
    ap.add_argument("--batch", type=int, default=16, help="--ppo-step: rollout.batch_size")
    ap.add_argument("--model", default="default", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (a smoke run)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.0,
                    help="engine.kv_cache_gib: the vLLM KV cache in GiB; 0 = from --gpu-memory-utilization")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.0,
                    help="engine.gpu_memory_utilization: on CPU the share of RAM for the KV cache; 0 = 0.2")
    args = ap.parse_args()
    if args.ppo_step:
        return ppo_steps(args)
    if args.train_beside:
        return train_beside(args)

    import torch

    from instructrl.engines import HFEngine, SamplingSettings, engine_for, vllm_available
    from instructrl.formatting import encode_prompt_for_sampling
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.runtime import resolve_precision
    from instructrl.tasks import generate_tasks

    precision = resolve_precision(args.precision, torch.device("cpu"))
    path = model_folder(args)
    tok, model = load_tokenizer(path), load_causal_lm(path).eval()
    msgs = [[{"role": "user", "content": t.prompt}] for t in generate_tasks(args.prompts, seed=11)]
    ids = [encode_prompt_for_sampling(tok, m, 256) for m in msgs]
    settings = SamplingSettings(args.tokens, temperature=1.0, seed=0)
    res: dict = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "precision": precision,
                 "model": path, "prompts": args.prompts, "max_new_tokens": args.tokens,
                 "mean_prompt_tokens": round(sum(map(len, ids)) / len(ids), 1)}
    hf = HFEngine(model, tok.eos_token_id, tok.pad_token_id, batch_size=args.prompts,
                  autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    hf.generate(ids[:8], SamplingSettings(8))  # warm-up: kernels and allocator
    res["hf_before_vllm"] = timed(hf, ids, settings)
    print(json.dumps(res), flush=True)
    if not vllm_available():
        print("vllm is not importable here: vLLM half skipped (docs/vllm.md installs it)")
        return

    t0 = time.perf_counter()
    import vllm  # noqa: F401  (timed apart: the first import in a fresh venv also compiles .pyc files)

    res["vllm_import_s"] = round(time.perf_counter() - t0, 1)
    es = vllm_settings(args)
    t0 = time.perf_counter()
    eng = engine_for(model, tok, es, precision)  # start + one sync_weights
    res["vllm_start_s"] = round(time.perf_counter() - t0, 1)
    res["vllm_enforce_eager"], res["vllm_dtype"] = es.enforce_eager, eng.dtype
    res["vllm_kv_cache_gib"] = None if eng.kv_cache_gib is None else round(eng.kv_cache_gib, 2)
    syncs = []
    for _ in range(3):
        t0 = time.perf_counter()
        eng.sync_weights(model)
        syncs.append(round(time.perf_counter() - t0, 2))
    res["vllm_sync_s"] = syncs
    print(json.dumps(res), flush=True)
    eng.generate(ids, settings)  # warm-up with the timed shapes (compiles them under --compile)
    # Interleaved, so that both engines see the same load on a shared machine
    res["hf"], res["vllm"] = [], []
    for _ in range(args.repeats):
        res["hf"].append(timed(hf, ids, settings))
        res["vllm"].append(timed(eng, ids, settings))
        print(json.dumps({"pair": len(res["hf"]), "hf": res["hf"][-1], "vllm": res["vllm"][-1]}), flush=True)
    res["ratio_per_pair"] = [round(v / h, 2) for h, v in zip(res["hf"], res["vllm"])]
    print(json.dumps(res), flush=True)


def train_beside(args) -> None:
    """Training steps before and beside a live engine, and the engine's calls between them."""
    import torch

    from instructrl.engines import SamplingSettings, engine_for, vllm_available
    from instructrl.formatting import encode_prompt_for_sampling
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.runtime import make_runtime
    from instructrl.tasks import generate_tasks

    if not vllm_available():
        print("vllm is not importable here: run this with the vLLM venv's python (docs/vllm.md)")
        return
    rt = make_runtime("cpu", args.precision)
    path = model_folder(args)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t0 = time.perf_counter()
        with rt.autocast():
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return round(time.perf_counter() - t0, 2)

    ids = [encode_prompt_for_sampling(tok, [{"role": "user", "content": t.prompt}], 256)
           for t in generate_tasks(args.prompts, seed=11)]
    settings = SamplingSettings(args.tokens, temperature=1.0, seed=0)
    res: dict = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "precision": rt.precision,
                 "model": path, "train_batch": list(batch.shape), "prompts": args.prompts, "max_new_tokens": args.tokens,
                 "cpus_before_engine": sorted(os.sched_getaffinity(0))}
    step()  # warm-up
    res["train_s_before_engine"] = [step() for _ in range(args.repeats)]
    print(json.dumps(res), flush=True)
    eng = engine_for(model, tok, vllm_settings(args), rt.precision)
    eng.generate(ids, settings)  # warm-up
    res["cpus_after_engine"] = sorted(os.sched_getaffinity(0))  # vLLM's CPU worker binds its threads
    res["vllm_tok_s_alone"] = timed(eng, ids, settings)
    res["train_s_beside_engine"], res["vllm_tok_s_between_steps"] = [], []
    for _ in range(args.repeats):
        res["train_s_beside_engine"].append(step())
        res["vllm_tok_s_between_steps"].append(timed(eng, ids, settings))
    res["train_beside_over_before"] = round(statistics.median(res["train_s_beside_engine"])
                                            / statistics.median(res["train_s_before_engine"]), 3)
    print(json.dumps(res), flush=True)


def ppo_steps(args) -> None:
    """One PPO step per run, engine=hf and engine=vllm alternating (see the module docstring)."""
    import torch

    from instructrl.config import load_config
    from instructrl.engines import engine_for, vllm_available
    from instructrl.io import write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.runtime import make_runtime
    from instructrl.tasks import generate_tasks
    from instructrl.train.ppo import PPOConfig, train_ppo

    if not vllm_available():
        print("vllm is not importable here: run this with the vLLM venv's python (docs/vllm.md)")
        return
    path = model_folder(args)
    es = vllm_settings(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-engine-"))
    prompts = tmp / "prompts.jsonl"
    write_jsonl(prompts, [{"id": i, "prompt": t.prompt} for i, t in enumerate(generate_tasks(64, seed=11))])

    def reward(query, response, mask):  # scripted: the RM's forward costs the same under both engines
        return mask.sum(1) / mask.shape[1]

    def one_step(engine: str, run: int) -> dict:
        cfg = load_config(PPOConfig, None, [
            f"policy={path}", f"prompts={prompts}", f"output_dir={tmp / f'{engine}-{run}'}", "steps=1", f"seed={run}",
            f"rollout.batch_size={args.batch}", f"rollout.max_new_tokens={args.tokens}",
            f"train.minibatch_size={min(8, args.batch)}", f"train.precision={args.precision}",
            f"engine.name={engine}", f"engine.enforce_eager={es.enforce_eager}",
            f"engine.kv_cache_gib={es.kv_cache_gib}", f"engine.gpu_memory_utilization={es.gpu_memory_utilization}",
            f"run.threads={torch.get_num_threads()}"])
        run_dir = train_ppo(cfg, reward_fn=reward)
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        shutil.rmtree(run_dir)  # a checkpoint and two final models each: GBs at the default model's size
        t = {k[5:]: round(v, 2) for k, v in row.items() if k.startswith("time_")}
        tokens = round(row["response_length"] * args.batch)
        return {"engine": engine, "step_s": round(sum(t.values()), 2), **t, "response_tokens": tokens,
                "generate_tok_s": round(tokens / t["generate"], 1), "gap": row.get("engine_logprob_gap")}

    precision = make_runtime("cpu", args.precision).precision  # what train_ppo resolves: the same engine key
    res: dict = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "precision": precision,
                 "model": path, "batch": args.batch, "max_new_tokens": args.tokens, "runs": []}
    # the engine's start, timed alone: every run below finds it started (same settings) and only syncs
    policy = load_causal_lm(path)
    t0 = time.perf_counter()
    eng = engine_for(policy, load_tokenizer(path), es, precision)
    res["vllm_start_s"] = round(time.perf_counter() - t0, 1)
    res["vllm_enforce_eager"], res["vllm_dtype"] = es.enforce_eager, eng.dtype
    res["vllm_kv_cache_gib"] = None if eng.kv_cache_gib is None else round(eng.kv_cache_gib, 2)
    del policy
    print(json.dumps(res), flush=True)
    for engine in ("hf", "vllm"):  # warm-up: kernels, allocator
        print(json.dumps({"warm-up": one_step(engine, 0)}), flush=True)
    for run in range(1, args.repeats + 1):
        pair = {e: one_step(e, run) for e in ("hf", "vllm")}  # same seed: the same prompts in both
        pair["step_ratio"] = round(pair["hf"]["step_s"] / pair["vllm"]["step_s"], 2)
        pair["generate_ratio"] = round(pair["hf"]["generate"] / pair["vllm"]["generate"], 2)
        res["runs"].append(pair)
        print(json.dumps(pair), flush=True)
    res["median"] = {e: {k: round(statistics.median(p[e][k] for p in res["runs"]), 2)
                         for k in ("step_s", "generate", "score", "train", "sync", "generate_tok_s")
                         if all(k in p[e] for p in res["runs"])} for e in ("hf", "vllm")}
    res["median"]["step_ratio"] = statistics.median(p["step_ratio"] for p in res["runs"])
    res["median"]["generate_ratio"] = statistics.median(p["generate_ratio"] for p in res["runs"])
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
