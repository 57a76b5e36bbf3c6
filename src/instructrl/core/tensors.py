"""Tensor helpers shared by sampling, scoring and training: positions, last tokens, log-probs, EOS."""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever the padding side. [B, T] long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask = 1) token of each row; works for left and right padding. [B] long."""
    t = attention_mask.shape[-1]
    idx = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("a row of attention_mask has no real token")
    return (idx * (attention_mask != 0)).argmax(-1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]; logits [b, r, V], tokens [b, r] -> [b, r]."""
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def append_eos(ids: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor, eos_id: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One more column: EOS (mask 1) on the rows that did not end, padding (mask 0) on the rest. [b, T+1]

    The reward model is trained on answers that end in EOS; a response cut off at max_new_tokens is
    scored as the finished answer a labeler would judge. A row that did not end fills its window to
    the last column (its response is the longest possible), so the EOS lands right after its last token.
    """
    col = torch.where(ended, torch.full_like(ended, pad_id, dtype=ids.dtype), torch.full_like(ended, eos_id, dtype=ids.dtype))
    return torch.cat([ids, col[:, None]], 1), torch.cat([mask, (~ended).to(mask.dtype)[:, None]], 1)
