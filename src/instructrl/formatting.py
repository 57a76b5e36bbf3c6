"""Turning (prompt messages, response) into token ids, the same way in every stage.

A sequence is always ``prompt_ids + response_ids`` where

* ``prompt_ids`` = the tokenizer's chat template applied to the prompt messages
  with ``add_generation_prompt=True`` (so it ends with the assistant header), and
* ``response_ids`` = the response text tokenized without special tokens, followed
  by the EOS token (the end-of-turn token for chat models such as SmolLM2).

SFT puts its loss on ``response_ids`` only; the reward model reads its score at
the last response token; PPO generates ``response_ids`` after ``prompt_ids``.
Using one rule everywhere means the RM scores exactly what the policy emits.

Truncation rule (documented in docs/data-formats.md): when a sequence is longer
than ``max_length``, the prompt is cut **from the left** (the latest turns are
kept), but never below ``min_prompt_tokens``; if it is still too long the
response is cut from the right (it then has no EOS). Every cut is counted in
:class:`TruncationStats` and logged by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from instructrl.data import Messages


@dataclass
class TruncationStats:
    examples: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    tokens_dropped: int = 0

    def summary(self) -> str:
        return (
            f"{self.examples} examples: {self.prompts_cut} prompts cut from the left, "
            f"{self.responses_cut} responses cut from the right, {self.tokens_dropped} tokens dropped"
        )


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding-like mapping; 4.x a list
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    # No chat template (a base model): a plain "User:/Assistant:" layout.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_for_sampling(tokenizer, messages: Messages, max_prompt_tokens: int,
                                stats: TruncationStats | None = None) -> list[int]:
    """Prompt ids for sampling a response: cut from the left to ``max_prompt_tokens`` (the latest turns kept),
    the same side the truncation rule cuts prompts from; the cut is counted in ``stats``."""
    p = encode_prompt(tokenizer, messages)
    if stats is not None:
        stats.examples += 1
        if len(p) > max_prompt_tokens:
            stats.prompts_cut += 1
            stats.tokens_dropped += len(p) - max_prompt_tokens
    return p[-max_prompt_tokens:]


def encode_response(tokenizer, response: str, add_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


@dataclass
class Example:
    """One tokenized (prompt, response); ``prompt_len`` marks where the response starts."""

    input_ids: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def build_example(
    tokenizer, messages: Messages, response: str, max_length: int, min_prompt_tokens: int = 16,
    stats: TruncationStats | None = None,
) -> Example:
    p = encode_prompt(tokenizer, messages)
    r = encode_response(tokenizer, response)
    return truncate(p, r, max_length, min_prompt_tokens, stats)


def truncate(p: list[int], r: list[int], max_length: int, min_prompt_tokens: int = 16,
             stats: TruncationStats | None = None) -> Example:
    """Apply the truncation rule (module docstring) to prompt ids ``p`` and response ids ``r``."""
    if stats is not None:
        stats.examples += 1
    over = len(p) + len(r) - max_length
    if over > 0:
        cut = min(over, max(0, len(p) - min_prompt_tokens))
        if cut:
            p = p[cut:]
            over -= cut
            if stats is not None:
                stats.prompts_cut += 1
                stats.tokens_dropped += cut
        if over > 0:
            r = r[: len(r) - over]
            if stats is not None:
                stats.responses_cut += 1
                stats.tokens_dropped += over
        if not r:
            raise ValueError(f"max_length={max_length} leaves no room for the response")
    return Example(p + r, len(p))


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a [B, T] ``input_ids`` tensor and its ``attention_mask``."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, t - len(s):] = torch.tensor(s)
            mask[i, t - len(s):] = 1
    return ids, mask


@dataclass
class LMBatch:
    """A right-padded batch for causal-LM training.

    input_ids:      [B, T] long
    attention_mask: [B, T] long, 1 on real tokens
    loss_mask:      [B, T] float, 1 on tokens whose *prediction* is trained
                    (the response tokens; position t is predicted from t-1)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    meta: dict = field(default_factory=dict)


def collate_examples(examples: list[Example], pad_id: int, train_prompt: bool = False) -> LMBatch:
    ids, attn = pad([e.input_ids for e in examples], pad_id, "right")
    loss_mask = attn.clone().float()
    if not train_prompt:
        for i, e in enumerate(examples):
            loss_mask[i, : e.prompt_len] = 0
    loss_mask[:, 0] = 0  # the first token has no prediction
    return LMBatch(ids, attn, loss_mask)
