"""Sampling K completions per prompt from a checkpoint, for ranking/rating tasks and HH turns.

Prompts are encoded with :func:`instructrl.formatting.encode_prompt` (the one
tokenization rule), so what labelers rank is exactly what the policy would emit.
InstructGPT samples K = 4..9 outputs per prompt from its models (§3.5); the
outputs of one prompt must be distinct (a ranking of identical texts carries no
comparison and :func:`instructrl.data.load_rankings` rejects it), so duplicates
and empty samples are redrawn a few times. Two samples are duplicates when they
are equal after collapsing whitespace runs, stripping and ignoring case
("a", "a " and "A" are one reply to a labeler).

``gen.engine.name=vllm`` samples through the process's vLLM engine (:mod:`instructrl.engines`,
docs/vllm.md) at the same temperature and top_p, stopping at the tokenizer's EOS; ``hf`` (the
default) is Hugging Face ``model.generate``, which also applies the model's generation_config.json.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Callable

from instructrl.config import check, param
from instructrl.data import Messages
from instructrl.engines import EngineSettings

# The process has one vLLM engine (engines.engine_for), shared by every Generator: one call at a time
_VLLM_LOCK = threading.Lock()


@dataclass
class GenConfig:
    max_new_tokens: int = param(128, "tokens sampled per completion", min=1)
    temperature: float = param(1.0, "sampling temperature (InstructGPT samples at T=1 for comparison data)",
                               min=0, min_exclusive=True)
    top_p: float = param(1.0, "nucleus sampling mass; 1 = plain sampling", min=0, max=1, min_exclusive=True)
    batch_size: int = param(4, "prompts per generate() call", min=1)
    max_redraws: int = param(4, "rounds of resampling when a prompt's completions are empty or identical", min=0)
    dtype: str = param("", "deprecated: the precision key of the command replaces it; fp32 | bf16 sets precision")
    seed: int = param(0, "torch seed set before generating (vllm: the seed of the Generator's request seeds)",
                      min=0, max=2**32 - 1)
    engine: EngineSettings = param(EngineSettings(), "the sampler of the completions: engine.name=hf (Hugging Face "
                                                     "generate), vllm (docs/vllm.md) or auto")

    def validate(self) -> None:
        check(self.max_new_tokens >= 1, "gen.max_new_tokens must be >= 1")
        check(self.temperature > 0, "gen.temperature must be > 0")
        check(0 < self.top_p <= 1, "gen.top_p must be in (0, 1]")
        check(self.batch_size >= 1, "gen.batch_size must be >= 1")
        check(self.dtype in ("", "fp32", "bf16"), "gen.dtype must be fp32 or bf16 (deprecated: use precision=)")


def same_reply_key(text: str) -> str:
    """What makes two replies the same to a labeler: whitespace runs collapsed, stripped, case folded."""
    return " ".join(text.split()).casefold()


class Generator:
    """A loaded model + tokenizer that samples distinct replies. Thread-safe (one generate at a time;
    with vLLM one at a time across all Generators, since they share the process's engine)."""

    def __init__(self, model: str | None, cfg: GenConfig, rt=None):
        import random

        import torch

        from instructrl.engines import engine_for, resolved
        from instructrl.models import load_causal_lm, load_tokenizer
        from instructrl.runtime import make_runtime

        self.cfg = cfg
        self.rt = rt or make_runtime("cpu", "fp32")
        self.name = model or "default"
        self.tok = load_tokenizer(model, padding_side="left")  # left padding: generation continues every row
        self.model = load_causal_lm(model).to(self.rt.device).eval()  # fp32 master weights; bf16 via autocast
        self.lock = threading.Lock()
        torch.manual_seed(cfg.seed)
        self.engine = resolved(cfg.engine)  # `label serve` passes it resolved; auto said once (stderr) here
        if self.engine.name == "vllm":
            self._rng = random.Random(cfg.seed)  # this Generator's request seeds: its replies follow its seed
            with _VLLM_LOCK:  # start the engine now: a model vLLM cannot load fails before any job runs
                engine_for(self.model, self.tok, self.engine, self.rt.precision)

    def _sample(self, prompts: list[Messages], n: int) -> list[list[str]]:
        import torch

        from instructrl.formatting import encode_prompt, pad

        ids = [encode_prompt(self.tok, m) for m in prompts]
        if self.engine.name == "vllm":
            return self._sample_vllm(ids, n)
        input_ids, attn = pad(ids, self.tok.pad_token_id, side="left")
        input_ids, attn = input_ids.to(self.rt.device), attn.to(self.rt.device)
        with self.lock, torch.no_grad(), self.rt.autocast():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=self.cfg.temperature,
                top_p=self.cfg.top_p, max_new_tokens=self.cfg.max_new_tokens, num_return_sequences=n,
                pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id,
            )
        texts = self.tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def _sample_vllm(self, ids: list[list[int]], n: int) -> list[list[str]]:
        """n replies per prompt from the vLLM engine, each call a fresh seed from this Generator's stream
        (so a redraw samples anew). engine_for re-syncs this model's weights: another Generator may have
        pushed its own model since."""
        from instructrl.engines import SamplingSettings, engine_for
        from instructrl.generation import decode_responses

        with _VLLM_LOCK:
            eng = engine_for(self.model, self.tok, self.engine, self.rt.precision)
            s = SamplingSettings(self.cfg.max_new_tokens, self.cfg.temperature, top_p=self.cfg.top_p, n=n,
                                 seed=self._rng.getrandbits(62))
            g = eng.generate(ids, s)
        texts = decode_responses(self.tok, g.response, g.response_mask)  # stripped, EOS and padding dropped
        return [texts[i * n:(i + 1) * n] for i in range(len(ids))]

    def distinct(self, prompts: list[Messages], k: int) -> list[list[str] | None]:
        """K distinct non-empty completions per prompt; None for a prompt that still lacks them after redraws."""
        return distinct_replies(lambda todo: self._sample([prompts[i] for i in todo], k), len(prompts), k,
                                self.cfg.max_redraws)


def distinct_replies(sample: Callable[[list[int]], list[list[str]]], n: int, k: int,
                     max_redraws: int) -> list[list[str] | None]:
    """Draw with ``sample(prompt indices)`` until each of ``n`` prompts has ``k`` non-empty replies that are
    pairwise different under :func:`same_reply_key`; None for a prompt still short after the redraws."""
    got: list[list[str]] = [[] for _ in range(n)]
    keys: list[set[str]] = [set() for _ in range(n)]
    for _ in range(1 + max_redraws):
        todo = [i for i, g in enumerate(got) if len(g) < k]
        if not todo:
            break
        for i, texts in zip(todo, sample(todo)):
            for t in texts:
                key = same_reply_key(t)
                if key and key not in keys[i] and len(got[i]) < k:
                    got[i].append(t)
                    keys[i].add(key)
    return [g if len(g) == k else None for g in got]


def generate_for_project(store, pid: int, gen: Generator, k: int,
                         progress: Callable[[int, int], None] | None = None,
                         before_done: Callable[[], object] | None = None) -> dict:
    """Fill every prompt of the project that lacks K completions; resumable (done prompts are skipped).

    ``before_done`` (the app makes the tasks) runs before the job reads "done", so whoever polls the
    job sees the tasks as soon as it sees "done".

    Progress goes to the store's gen_jobs row (the admin page polls it) and to a tqdm bar.
    """
    from tqdm import tqdm

    todo = store.prompts_needing_completions(pid, k)
    total, done, failed = len(todo), 0, []
    store.job_update(pid, status="running", total=total, done=0, error="")
    try:
        bs = gen.cfg.batch_size
        for start in tqdm(range(0, total, bs), desc=f"generating {k} completions/prompt", unit="batch"):
            batch = todo[start:start + bs]
            outs = gen.distinct([json.loads(p.messages) for p in batch], k)
            for p, texts in zip(batch, outs):
                if texts is None:
                    failed.append(p.ext_id)
                else:
                    store.set_completions(p.id, texts, gen.name)
            done += len(batch)
            store.job_update(pid, done=done)
            if progress:
                progress(done, total)
        if before_done:
            before_done()
    except Exception as e:
        store.job_update(pid, status="failed", error=f"{type(e).__name__}: {e}")
        raise
    err = f"{len(failed)} prompts got fewer than {k} distinct completions: {failed[:5]}" if failed else ""
    store.job_update(pid, status="done", error=err)
    return {"prompts": total, "failed": failed}
