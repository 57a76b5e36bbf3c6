"""``instructrl eval ifeval``: answer the public IFEval prompts and score them (the checkers: :mod:`instructrl.tasks.ifeval`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from instructrl.config import ConfigError, check, param
from instructrl.engines import EngineSettings
from instructrl.evaluation.report import json_safe
from instructrl.evaluation.sampling import generate_responses
from instructrl.runtime import Precision, device_field, make_runtime, precision_field, set_threads


@dataclass
class IFEvalConfig:
    data: str = param("", "IFEval JSON Lines (key, prompt, instruction_id_list, kwargs); required")
    model: str = param("default", "model folder to evaluate; 'default' = the embedded SmolLM2-135M-Instruct")
    max_new_tokens: int = param(512, "response length limit (the reference harness allows 1280)", min=1)
    max_prompt_tokens: int = param(1024, "prompts longer than this are cut from the left", min=1)
    greedy: bool = param(True, "greedy decoding (the usual IFEval setting); false = sample at `temperature`")
    temperature: float = param(1.0, "sampling temperature when greedy=false", min=0, min_exclusive=True)
    batch_size: int = param(8, "prompts per generation batch (built-in sampler; vLLM batches on its own)", min=1)
    limit: int = param(0, "evaluate only the first N rows; 0 = all", min=0)
    seed: int = param(0, "sampling seed", min=0, max=2**32 - 1)
    output_dir: str = param("runs/ifeval", "ifeval.json and responses.jsonl go here")
    device: str = device_field()
    precision: Precision = precision_field()
    threads: int = param(0, "torch CPU threads; 0 = torch's default", min=0)
    engine: EngineSettings = param(EngineSettings(), "the sampler of the answers: engine.name=hf (built-in), "
                                                     "vllm (docs/vllm.md) or auto; greedy stays greedy on both")

    def validate(self):
        check(bool(self.data), "data: an IFEval JSONL file is required (data=PATH)")
        check(self.max_new_tokens >= 1 and self.max_prompt_tokens >= 1, "max_new_tokens/max_prompt_tokens must be >= 1")
        check(self.temperature > 0, "temperature must be > 0")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.limit >= 0, "limit must be >= 0")


def run_ifeval(cfg: IFEvalConfig) -> dict:
    """``instructrl eval ifeval``: answer the IFEval prompts with the model (chat template), check every
    instruction with :mod:`instructrl.tasks.ifeval`, print and write prompt- and instruction-level accuracy."""
    from instructrl.engines import engine_for, resolve_engine
    from instructrl.io import atomic_write_text, require_folder_path, write_jsonl
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.tasks.ifeval import evaluate_ifeval, load_ifeval

    cfg.engine, why = resolve_engine(cfg.engine)  # auto -> vllm or hf, once; saved resolved in ifeval.json
    print(f"[ifeval] {why}")
    set_threads(cfg.threads)
    out_dir = require_folder_path(cfg.output_dir)  # before the model answers, not when the results are written
    rows = load_ifeval(cfg.data)
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise ConfigError(f"data: {cfg.data} has no rows")
    rt = make_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model).eval().requires_grad_(False).to(rt.device)
    if cfg.engine.name == "vllm":  # start it here: generation_seconds times the sampling, not the start
        engine_for(model, tok, cfg.engine, rt.precision)
    t0 = time.perf_counter()
    responses = generate_responses(
        model, tok, [[{"role": "user", "content": r.prompt}] for r in rows], max_new_tokens=cfg.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens, temperature=cfg.temperature, greedy=cfg.greedy,
        batch_size=cfg.batch_size, seed=cfg.seed, rt=rt, desc="ifeval", engine=cfg.engine)
    seconds = time.perf_counter() - t0
    rep = evaluate_ifeval(rows, responses)
    out = {"data": cfg.data, "model": cfg.model, "decoding": "greedy" if cfg.greedy else f"T = {cfg.temperature}",
           "max_new_tokens": cfg.max_new_tokens, "engine": asdict(cfg.engine),
           "generation_seconds": seconds} | rep.as_dict()
    atomic_write_text(out_dir / "ifeval.json", json.dumps(json_safe(out), indent=2, ensure_ascii=False))
    # the reference harness's input_response_data format, so its own script can cross-check these answers
    write_jsonl(out_dir / "responses.jsonl", ({"key": r.key, "prompt": r.prompt, "response": x}
                                              for r, x in zip(rows, responses)))
    print(format_ifeval(out))
    print(f"[ifeval] wrote {out_dir / 'ifeval.json'} and responses.jsonl")
    return out


def format_ifeval(d: dict) -> str:
    ci = d.get("ci95", {})
    lines = [f"IFEval: {d['n_prompts']} prompts, {d['n_instructions']} instructions ({d['decoding']})"]
    for label, key, cik in (("prompt-level strict", "prompt_level_strict_accuracy", "prompt_strict"),
                            ("instruction-level strict", "instruction_level_strict_accuracy", "instruction_strict"),
                            ("prompt-level loose", "prompt_level_loose_accuracy", "prompt_loose"),
                            ("instruction-level loose", "instruction_level_loose_accuracy", "instruction_loose")):
        lo, hi = ci.get(cik, (float("nan"), float("nan")))
        lines.append(f"  {label:<26} {d[key]:.3f}  [95% CI {lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
