"""Loss functions: tensors in, ``(loss, stats)`` out. Pure, small, unit-tested.

Sections: SFT (language modelling on response tokens), reward model (K-wise
ranking loss, InstructGPT eq. 1), PPO (clipped policy/value losses, PPO-ptx
term, InstructGPT eq. 2). The RL quantities they consume (KL penalty, GAE,
whitening) live in :mod:`instructrl.rl_math`.

This module imports only torch, so ``import instructrl.losses`` stays light.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1.

    logits:    [B, T, V] (position t predicts token t + 1)
    input_ids: [B, T]
    returns:   [B, T] with column 0 set to 0 (the first token has no prediction)
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0), value=0.0)


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
             num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the masked (response) tokens.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 where token t is trained).
    ``num_tokens`` is the normaliser: by default the tokens in this batch; pass the
    token count of the whole optimizer step (all micro-batches, all processes) so that
    gradient accumulation and data parallelism give exactly the full-batch gradient.
    """
    nll = -token_logprobs(logits, input_ids) * loss_mask
    total = nll.sum()
    denom = loss_mask.sum() if num_tokens is None else num_tokens
    loss = total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype), min=1.0)
    return loss, {"nll_sum": total.detach(), "tokens": loss_mask.sum().detach()}
