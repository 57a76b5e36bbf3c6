"""Sampling text from a model for data collection and evaluation (not PPO's hot loop).

``generate_texts`` turns chat prompts into decoded responses, in batches, with
a progress bar, through a generation engine (:mod:`instructrl.engines`: by default
:func:`instructrl.rollout.sample` -- KV cache, left padding, stop at EOS -- or vLLM)
and the project's one tokenization rule (:mod:`instructrl.formatting`).
"""

from __future__ import annotations

import torch

from instructrl.data import Messages
from instructrl.engines import EngineSettings
from instructrl.formatting import encode_prompt_for_sampling


def decode_responses(tok, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Decode each row's real response tokens (EOS and padding dropped)."""
    out = []
    for ids, m in zip(response, response_mask):
        out.append(tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_texts(
    model, tok, prompts: list[Messages], max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
    batch_size: int = 64, n_per_prompt: int = 1, max_prompt_tokens: int = 256, precision: str = "bf16",
    desc: str = "sampling", engine: EngineSettings | None = None,
) -> list[list[str]]:
    """``n_per_prompt`` sampled responses for each prompt: a list (per prompt) of lists of strings.

    temperature 0 means greedy decoding. Prompts longer than ``max_prompt_tokens``
    keep their last tokens (the truncation rule of :mod:`instructrl.formatting`).
    ``engine`` picks the sampler (:mod:`instructrl.engines`; None = the built-in one, auto = vLLM where
    it is importable, said once on stderr); with vLLM
    the engine samples ``model``'s current weights and batches on its own (``batch_size`` unused).
    """
    from tqdm.auto import tqdm

    from instructrl.engines import SamplingSettings, engine_for, resolved

    engine = resolved(engine)  # auto decided here as everywhere (engines.resolve_engine)
    model.eval()
    encoded = [encode_prompt_for_sampling(tok, m, max_prompt_tokens) for m in prompts]
    results: list[list[str]] = [[] for _ in prompts]
    if engine.name == "vllm":
        eng = engine_for(model, tok, engine, precision)
        g = eng.generate(encoded, SamplingSettings(max_new_tokens, temperature, n=n_per_prompt, seed=seed))
        for row, text in enumerate(decode_responses(tok, g.response, g.response_mask)):
            results[row // n_per_prompt].append(text)
        return results
    jobs = [(i, e) for i, e in enumerate(encoded) for _ in range(n_per_prompt)]
    # Longest first: similar lengths share a batch, less padding.
    jobs.sort(key=lambda j: -len(j[1]))
    # one stream across the batches (seed=None below), as rollout.sample always drew here
    eng = engine_for(model, tok, engine, precision, batch_size=batch_size,
                     generator=torch.Generator().manual_seed(seed))
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = jobs[start:start + batch_size]
        g = eng.generate([e for _, e in chunk], SamplingSettings(max_new_tokens, temperature))
        for (i, _), text in zip(chunk, decode_responses(tok, g.response, g.response_mask)):
            results[i].append(text)
    return results
