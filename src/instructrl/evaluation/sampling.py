"""Models in, numbers out: policy answers (with their KL to a reference), RM scores, text log-likelihoods.

Every helper takes the command's :class:`~instructrl.runtime.Runtime`: it runs under ``rt.autocast()``
and moves its tensors to ``rt.device``, where the caller has put the models. The default is CPU fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

from instructrl.engines import EngineSettings
from instructrl.evaluation.metrics import sequence_kl
from instructrl.runtime import Runtime

CPU_FP32 = Runtime(torch.device("cpu"), "fp32")


@dataclass
class Samples:
    """One answer per prompt, in prompt order.

    texts:    decoded responses (special tokens, EOS included, removed)
    tokens:   response length in tokens, EOS not counted
    ended:    True where the answer ended with EOS within max_new_tokens
    kl:       per-answer Σ_t log π − log π_ref, or None when not computed
    """

    texts: list[str]
    tokens: list[int]
    ended: list[bool]
    kl: list[float] | None = None

    def pick(self, idx: Sequence[int], kl: list[float] | None = None) -> "Samples":
        """The answers at ``idx`` (best-of-N keeps one of every N), with ``kl`` as their KL."""
        return Samples([self.texts[j] for j in idx], [self.tokens[j] for j in idx], [self.ended[j] for j in idx], kl)


def encode_prompts(tok, messages_list: Sequence[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-template prompt ids (formatting.encode_prompt), cut from the left to ``max_prompt_tokens``."""
    from instructrl.formatting import encode_prompt_for_sampling

    return [encode_prompt_for_sampling(tok, m, max_prompt_tokens) for m in messages_list]


def _batch_kl(model, ref, g, t_lp: float, micro_batch_size: int, rt: Runtime) -> torch.Tensor:
    """Sequence KL of one sampled batch ``g`` to ``ref`` from the temperature-scaled logits PPO uses. [B]"""
    from instructrl.core.tensors import gather_logprobs
    from instructrl.models import autocast_weight_cache
    from instructrl.scoring import micro_batches, response_logits, window

    mask = g.response_mask
    B = mask.shape[0]
    kl = torch.zeros(B, device=mask.device)
    with autocast_weight_cache(model, ref), rt.autocast():
        for rows, p, r in micro_batches(torch.arange(B, device=mask.device), g.query_mask, mask, micro_batch_size):
            ids, am = window(g, rows, p, r)
            toks = g.response[rows, :r]
            lp = gather_logprobs(response_logits(model, ids, am, r, t_lp), toks)
            rlp = lp if ref is model else gather_logprobs(response_logits(ref, ids, am, r, t_lp), toks)
            kl[rows] = sequence_kl(lp, rlp, mask[rows, :r]).float()
    return kl.cpu()


# no_grad, not inference_mode: under inference_mode autocast caches no weight casts (rollout.sample).
@torch.no_grad()
def generate(model, tok, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, batch_size: int = 16, seed: int = 0, rt: Runtime = CPU_FP32,
             ref=None, micro_batch_size: int = 8, desc: str | None = None,
             engine: EngineSettings | None = None) -> Samples:
    """Answer every prompt with a generation engine (default ``rollout.sample``); optionally the KL to ``ref``.

    Built-in sampler: prompts are batched in order of length (less padding). vLLM (``engine.name=vllm``,
    or auto where vllm is importable: :func:`instructrl.engines.resolved`) samples ``model``'s current
    weights, all prompts in one call. Answers are returned in prompt order.
    Greedy decoding is top-k = 1. With ``ref``, each answer's sequence KL is computed from the same
    logits PPO uses (temperature-scaled; T = 1 when greedy), by Hugging Face forwards whatever the
    engine. ``model`` (and ``ref``) must be on ``rt.device``.
    """
    from tqdm.auto import tqdm

    from instructrl.engines import SamplingSettings, engine_for, resolved

    engine = resolved(engine)  # auto decided here as everywhere (engines.resolve_engine)
    model.eval()
    if ref is not None:
        ref.eval()
    n = len(prompt_ids)
    out = Samples([""] * n, [0] * n, [False] * n, [0.0] * n if ref is not None else None)
    t_lp = 1.0 if greedy else temperature
    settings = SamplingSettings(max_new_tokens, 0.0 if greedy else temperature)
    if engine.name == "vllm":
        g = engine_for(model, tok, engine, rt.precision).generate(list(prompt_ids), replace(settings, seed=seed))
        g = replace(g, **{f.name: getattr(g, f.name).to(rt.device) for f in fields(g) if getattr(g, f.name) is not None})
        kl = _batch_kl(model, ref, g, t_lp, micro_batch_size, rt) if ref is not None else None
        _fill(out, tok, list(range(n)), g, kl)
        return out
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # rollout draws on the logits' device
    eng = engine_for(model, tok, engine, rt.precision, batch_size=batch_size, generator=gen)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    bar = tqdm(total=n, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        g = eng.generate([prompt_ids[i] for i in idx], settings)
        kl = _batch_kl(model, ref, g, t_lp, micro_batch_size, rt) if ref is not None else None
        _fill(out, tok, idx, g, kl)
        bar.update(len(idx))
    bar.close()
    return out


def _fill(out: Samples, tok, idx: list[int], g, kl: torch.Tensor | None) -> None:
    """Row j of ``g`` answers prompt ``idx[j]``: its text (EOS dropped), length, ended flag and KL into ``out``."""
    eos = tok.eos_token_id
    response, mask, g_ended = g.response.cpu(), g.response_mask.cpu(), g.ended.cpu()
    for j, i in enumerate(idx):
        real = response[j][mask[j].bool()].tolist()
        if real and real[-1] == eos and bool(g_ended[j]):
            real = real[:-1]
        out.texts[i] = tok.decode(real, skip_special_tokens=True)
        out.tokens[i] = len(real)
        out.ended[i] = bool(g_ended[j])
        if kl is not None:
            out.kl[i] = float(kl[j])


def generate_responses(model, tok, messages_list: Sequence[list[dict]], *, max_new_tokens: int,
                       max_prompt_tokens: int = 1024, temperature: float = 1.0, greedy: bool = True,
                       batch_size: int = 8, seed: int = 0, rt: Runtime = CPU_FP32,
                       desc: str | None = None, engine: EngineSettings | None = None) -> list[str]:
    """Text answers to chat prompts (the chat template, then :func:`generate`)."""
    ids = encode_prompts(tok, messages_list, max_prompt_tokens)
    return generate(model, tok, ids, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                    batch_size=batch_size, seed=seed, rt=rt, desc=desc, engine=engine).texts


@torch.no_grad()
def rm_scores(rm, rm_tok, messages_list: Sequence[list[dict]], texts: Sequence[str], ended: Sequence[bool],
              max_prompt_tokens: int, micro_batch_size: int = 8, rt: Runtime = CPU_FP32,
              desc: str | None = None, rm_eos: bool = True) -> list[float]:
    """Reward-model score of each (prompt, answer), in the formatting rule's token layout.

    ``rm_eos`` (PPO's ``rollout.rm_eos``): an answer cut off at max_new_tokens is scored
    with EOS appended, as the finished answer a labeler would judge; False = scored at
    its last token, without EOS (``ended`` says which answers emitted EOS themselves).
    ``rm`` must be on ``rt.device``.
    """
    from tqdm.auto import tqdm

    from instructrl.formatting import encode_response, pad
    from instructrl.models import autocast_weight_cache
    from instructrl.reward_model import score

    rm.eval()
    prompts = encode_prompts(rm_tok, messages_list, max_prompt_tokens)
    seqs = [p + encode_response(rm_tok, t, add_eos=e or rm_eos) for p, t, e in zip(prompts, texts, ended)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    pad_id = rm.config.pad_token_id
    with autocast_weight_cache(rm), rt.autocast():  # one block: each weight cast to bf16 once
        for start in tqdm(range(0, len(seqs), micro_batch_size), desc=desc, disable=desc is None, leave=False):
            idx = order[start:start + micro_batch_size]
            ids, mask = pad([seqs[i] for i in idx], pad_id, "right")
            s = score(rm, ids.to(rt.device), mask.to(rt.device)).float().cpu()
            for j, i in enumerate(idx):
                out[i] = float(s[j])
    return out


@torch.no_grad()
def text_logliks(model, tok, texts: Sequence[str], max_tokens: int, micro_batch_size: int = 8,
                 rt: Runtime = CPU_FP32) -> tuple[list[float], list[int]]:
    """Per text: (Σ log p(token_t | tokens_<t), number of predicted tokens), the first token unpredicted.

    Texts are tokenized without special tokens and cut to ``max_tokens`` (as PPO-ptx does).
    ``model`` must be on ``rt.device``.
    """
    from instructrl.core.losses import token_logprobs
    from instructrl.formatting import pad

    model.eval()
    ids_list = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    sums, counts = [0.0] * len(ids_list), [0] * len(ids_list)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    for start in range(0, len(order), micro_batch_size):
        idx = [i for i in order[start:start + micro_batch_size] if len(ids_list[i]) >= 2]
        if not idx:
            continue
        ids, am = pad([ids_list[i] for i in idx], tok.pad_token_id or 0, "right")
        ids, am = ids.to(rt.device), am.to(rt.device)
        with rt.autocast():
            logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        lp = token_logprobs(logits, ids)
        m = am.float()
        m[:, 0] = 0
        s, c = (lp * m).sum(1).cpu(), m.sum(1).cpu()
        for j, i in enumerate(idx):
            sums[i], counts[i] = float(s[j]), int(c[j])
    return sums, counts
