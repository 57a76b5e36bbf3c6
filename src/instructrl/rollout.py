"""Rollouts for PPO: batched sampling with a KV cache, and the typed rollout record.

One bandit episode per prompt (InstructGPT §3.5): the policy samples a response
to a prompt, the episode ends at EOS or at ``max_new_tokens``.

Layout of every rollout tensor: prompts are **left**-padded to ``P`` columns
and responses **right**-padded to ``R`` columns, so ``query ++ response`` is one
[B, P + R] sequence whose response always starts at column ``P``. Response
column ``t`` is the action "emit response token t"; its log-prob and value are
read at sequence position ``P − 1 + t``.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from instructrl.core.tensors import position_ids

from instructrl.formatting import pad
from instructrl.models import autocast_weight_cache


@dataclass
class Generation:
    """What sampling returns.

    query:         [B, P] long, left-padded prompt ids
    query_mask:    [B, P] long, 1 on real prompt tokens
    response:      [B, R] long, right-padded (pad id after the EOS)
    response_mask: [B, R] float, 1 on real response tokens, the EOS included
    ended:         [B] bool, True where the response ended with EOS within the limit
    logprobs:      [B, R] float or None, log π(token t) under the sampling distribution softmax(logits / T)
                   (before any top-k cut), 0 on padding; filled only when sampling was asked for it
    entropy:       [B, R] float or None, entropy of softmax(logits / T) at each response step, 0 on padding
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:  # [B, P + R]
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + R]
        return torch.cat([self.query_mask, self.response_mask.long()], 1)


@dataclass
class Rollout:
    """A PPO batch: one generation plus everything scored on it (phases 1–4 of ppo.train_ppo).

    query, query_mask, response, response_mask, ended: as in :class:`Generation` ([B, P], [B, R], [B])
    logprobs:      [B, R] float, log π_old(token t) — the rollout policy, before this batch's updates
    ref_logprobs:  [B, R] float, log π_SFT(token t) — the frozen reference
    values:        [B, R] float, V_old(state before token t) — the value model before this batch's updates
                   (0 under train.advantage=rloo, which has no value model)
    scores:        [B]    float, RM score (normalized; missing-EOS penalty and clipping applied)
    kl:            [B, R] float, per-token KL estimate (k1 or k3)
    rewards:       [B, R] float, −β·KL at every token + score at the last token
    advantages:    [B, R] float, whitened GAE (or RLOO) advantages
    returns:       [B, R] float, GAE returns (value targets, not whitened); under RLOO = advantages, unused
    is_weights:    [B, R] float or None, truncated importance weights min(π_old/π_engine, C) of each token's
                   policy loss (train.tis_cap, vLLM rollouts only); None = every weight 1
    All per-token tensors are 0 on padding.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    is_weights: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rows ``idx`` (a minibatch)."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                          for f in fields(self)})




def sample_categorical(logits: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Draw one index per row from softmax(logits) by inverting the CDF.

    ``generator``: one RNG for the batch, or one per row (then a row's draw does not depend
    on which other rows share its batch: PPO's episodes sample alike on any process).

    logits: [B, V] (``-inf`` = excluded) -> [B] long. Exactly the categorical
    distribution, like ``torch.multinomial``, but it draws B uniforms instead of
    B·V random numbers: on a 16 x 49k batch, 2.3 ms instead of 28 ms a decode
    step on 2 CPU cores (multinomial's cost was a third of the whole step).
    The CDF is accumulated in float64 so tail tokens keep their probability.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    if isinstance(generator, torch.Generator):
        u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=logits.device) for g in generator])
    # the first index whose CDF exceeds u; zero-probability tokens never are (CDF flat there)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return idx.clamp_(max=logits.shape[-1] - 1)


# no_grad, not inference_mode: autocast does not cache weight casts under inference_mode, so every
# decode step would re-cast all weights (13.8 s vs 9.0 s a PPO rollout of 16 x 64 tokens).
@torch.no_grad()
def sample(
    model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
    generator: torch.Generator | list[torch.Generator], temperature: float = 1.0, top_k: int = 0,
    autocast_dtype: torch.dtype | None = None, return_logprobs: bool = False,
) -> Generation:
    """Sample one response per prompt with a KV cache; stop each row at EOS.

    Left padding keeps every row's next token in the last column, so one cache
    serves the whole batch. The prompt is pre-filled in one forward that
    computes logits for its last position only. Sampling draws from
    ``generator`` (its own RNG stream, or one per row), not from torch's
    global one. Rows that finished keep receiving ``pad_id``; the loop
    stops as soon as every row has emitted EOS.

    Missing-EOS rule: a response that reaches ``max_new_tokens`` without EOS is
    kept as is (no EOS appended) and flagged ``ended = False``; PPO can give it
    a fixed score penalty (``PPOConfig.missing_eos_penalty``).

    ``return_logprobs``: also return each sampled token's log-prob and the entropy
    of the tempered distribution, from the logits sampling computed anyway (PPO's
    "old" log-probs without a second policy forward, as TRL does).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    query, query_mask = pad(prompts, pad_id, side="left")
    query, query_mask = query.to(device), query_mask.to(device)
    B = query.shape[0]
    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` (5.24 warns, 5.40 drops the old name)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    attn = query_mask
    tokens, token_logps, entropies = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ctx = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    # frozen weights would otherwise be re-cast to bf16 at every token (10.2 s vs 6.0 s for 16 x 64)
    with autocast_weight_cache(model) if autocast_dtype is not None else nullcontext(), ctx:
        out = model(input_ids=query, attention_mask=attn, position_ids=position_ids(attn), **{cache_kw: cache},
                    use_cache=True, logits_to_keep=1)
        next_pos = position_ids(attn)[:, -1:] + 1
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if temperature != 1.0:
                logits = logits / temperature
            if return_logprobs:
                logp = torch.log_softmax(logits, dim=-1)
                entropies.append(-(logp.exp() * logp).sum(-1))
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = sample_categorical(logits, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            if return_logprobs:
                token_logps.append(logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=device)], 1)
            out = model(input_ids=nxt.unsqueeze(1), attention_mask=attn, position_ids=next_pos,
                        use_cache=True, **{cache_kw: cache})
            next_pos = next_pos + 1
    response = torch.stack(tokens, 1)
    # real tokens: everything up to and including the first EOS
    is_eos = response == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).float()
    response = response.masked_fill(after_eos, pad_id)
    logprobs = entropy = None
    if return_logprobs:
        logprobs = torch.stack(token_logps, 1) * response_mask
        entropy = torch.stack(entropies, 1) * response_mask
    return Generation(query, query_mask, response, response_mask, is_eos.any(1), logprobs, entropy)
