"""Forward passes over a sampled batch: windows cut to each chunk's real length, response logits, values.

Sampling (:mod:`instructrl.rollout`) gives left-padded queries and right-padded responses; PPO's
scoring and training phases and the evaluation's KL both read log-probs through these helpers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from instructrl.core.tensors import position_ids
from instructrl.models import decoder_blocks
from instructrl.reward_model import token_values
from instructrl.rollout import Generation, Rollout


def micro_batches(rows: torch.Tensor, query_mask: torch.Tensor, response_mask: torch.Tensor, size: int,
                  bucket: int = 16):
    """Split ``rows`` into chunks of ``size`` sequences of similar length.

    Yields (chunk rows, p, r): the chunk only needs the last ``p`` query columns
    and the first ``r`` response columns; everything else is padding for all of
    its rows. Sorting by length first makes those windows tight. ``p`` and ``r``
    are rounded up to a multiple of ``bucket`` (within the batch's width) so that
    few distinct shapes occur: CPU bf16 kernels (oneDNN) are built per shape.
    """
    qlen = query_mask[rows].sum(1)
    rlen = response_mask[rows].sum(1)
    order = rows[torch.argsort(qlen + rlen, stable=True)]
    P, R = query_mask.shape[1], response_mask.shape[1]
    for i in range(0, len(order), size):
        chunk = order[i: i + size]
        p, r = int(query_mask[chunk].sum(1).max()), max(1, int(response_mask[chunk].sum(1).max()))
        yield chunk, min(P, -(-p // bucket) * bucket), min(R, -(-r // bucket) * bucket)


def window(g: Generation | Rollout, rows: torch.Tensor, p: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [b, p + r] of the chunk ``rows`` cut to its window."""
    ids = torch.cat([g.query[rows, -p:], g.response[rows, :r]], 1)
    mask = torch.cat([g.query_mask[rows, -p:], g.response_mask[rows, :r].long()], 1)
    return ids, mask


def response_logits(model, ids: torch.Tensor, mask: torch.Tensor, r: int, temperature: float,
                    lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Logits that predict the ``r`` response tokens, [b, r, V] float32.

    Only the last r + 1 positions go through the unembedding (``logits_to_keep``):
    the prompt's positions would cost a [P, V] matmul and softmax for nothing.
    ``lower = (h, k)``: start from ``h``, the hidden state after blocks 0..k-1 shared with other
    models (``models.lower_hidden``); ``ids`` is then unused.
    """
    inputs = {"input_ids": ids} if lower is None else {"inputs_embeds": lower[0]}
    with decoder_blocks(model, lower[1]) if lower is not None else nullcontext():
        out = model(**inputs, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                    logits_to_keep=r + 1)
    logits = out.logits[:, :-1].float()
    return logits if temperature == 1.0 else logits / temperature  # skip a [b, r, V] copy at T = 1


def response_values(value_model, ids: torch.Tensor, mask: torch.Tensor, r: int,
                    lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """V(state before response token t) for t < r: the scalar head at positions P−1 .. P+r−2. [b, r]"""
    return token_values(value_model, ids, mask, lower)[:, -r - 1: -1]
