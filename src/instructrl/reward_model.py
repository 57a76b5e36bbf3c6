"""Reward model (InstructGPT §3.5 "Reward modeling", equation 1).

The reward model is a causal LM (normally the SFT model) whose unembedding is
replaced by a scalar head: a Hugging Face ``AutoModelForSequenceClassification``
with ``num_labels = 1``. The score of (prompt, response) is the head's output at
the **last real token** of ``prompt_ids + response_ids + [eos]`` (the
tokenization rule of :mod:`instructrl.formatting`), found from the attention
mask, so left and right padding give the same score.

Normalization (§3.5: "we normalize the reward model using a bias so that the
labeler demonstrations achieve a mean score of 0 before doing RL") is a scalar
``reward_bias`` stored in the model's ``config.json`` and added by
:func:`score` and :func:`token_values`.

Hugging Face interoperability, precisely: ``LlamaForSequenceClassification``'s
head is ``nn.Linear(hidden, 1, bias=False)`` and no config key gives it a bias,
and the bias cannot be folded into the weights (the head reads the output of an
RMSNorm, which has no constant feature). So a plain

    AutoModelForSequenceClassification.from_pretrained(path)(input_ids, attention_mask).logits[:, 0]

returns the **raw** score, and ``raw + config.reward_bias`` equals
:func:`score` (tested). The bias is the same constant for every input, so every
comparison, accuracy and ranking made with the raw score is identical. The RM's
``pad_token_id`` is set to a token different from EOS (when the tokenizer has
one) so that HF's "rightmost token that is not padding" rule finds the EOS that
ends every sequence; the saved tokenizer pads with that same token. With left
padding, pass ``position_ids = attention_mask.cumsum(-1) - 1`` (clamped at 0)
to HF as :func:`score` does, or the positions shift.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from instructrl.core.tensors import last_token_index, position_ids
from instructrl.models import decoder, decoder_blocks

BIAS_KEY = "reward_bias"  # config.json key holding the normalization bias


# ---------------------------------------------------------------------------
# Model: build, load, save
# ---------------------------------------------------------------------------


@contextmanager
def _quiet_transformers():
    """Silence the expected "newly initialized: score.weight" / "unused lm_head" notices."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def reward_pad_token_id(tokenizer) -> int:
    """The pad id for the RM: the tokenizer's pad if it differs from EOS, else its UNK, else EOS.

    Every sequence ends in EOS, so HF's pooling (rightmost token != pad) only
    finds it when pad != EOS. SmolLM2 pads with EOS (<|im_end|>); its UNK
    (<|endoftext|>) never ends a sequence, so it becomes the RM's pad.
    """
    eos = tokenizer.eos_token_id
    for cand in (tokenizer.pad_token_id, tokenizer.unk_token_id):
        if cand is not None and cand != eos:
            return int(cand)
    logging.getLogger("instructrl.reward_model").warning(
        "tokenizer has no token other than EOS to pad with: plain HF scoring of this RM reads the token "
        "before the final EOS; instructrl.train.rm.score is unaffected (it uses the attention mask)")
    return int(eos)


def init_reward_model(lm_path: str | Path | None, dtype: torch.dtype = torch.float32):
    """A reward model built from a causal-LM folder: same trunk, scalar head instead of the unembedding.

    ``lm_path``: the SFT model folder (or ``None``/"default" for the embedded model).
    The new head is initialised by HF's ``_init_weights`` (normal, std =
    ``initializer_range``); ``config.reward_bias`` starts at 0.
    """
    from transformers import AutoModelForSequenceClassification

    from instructrl.models import LOAD_ERRORS, hub_error, load_tokenizer, resolve_model

    path = resolve_model(None if lm_path is None else str(lm_path))
    tok = load_tokenizer(path)
    pad = reward_pad_token_id(tok)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, num_labels=1, pad_token_id=pad)
        # A folder converted from GGUF keeps a stale quantization_config although its safetensors
        # weights are plain floats; left in, transformers refuses to save (and Trainer to train) it.
        q = getattr(config, "quantization_config", None)
        if isinstance(q, dict) and q.get("quant_method") == "gguf":
            del config.quantization_config
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
    except LOAD_ERRORS as e:
        raise hub_error(path, e) from None
    model.config.pad_token_id = pad
    model.config.use_cache = False
    setattr(model.config, BIAS_KEY, float(getattr(model.config, BIAS_KEY, 0.0) or 0.0))
    return model


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a reward model saved by :func:`save_reward_model` (or any 1-label HF classifier)."""
    from transformers import AutoModelForSequenceClassification

    from instructrl.models import LOAD_ERRORS, ModelLoadError, hub_error, resolve_model

    p = resolve_model(str(path))
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype)
    except LOAD_ERRORS as e:
        raise hub_error(p, e) from None
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{p}: not a reward model (num_labels={model.config.num_labels}, expected 1)")
    if not hasattr(model.config, BIAS_KEY):
        setattr(model.config, BIAS_KEY, 0.0)
    model.config.use_cache = False
    return model


def check_reward_model(path: str | Path, key: str) -> None:
    """ModelLoadError unless ``path`` is a reward model folder, from its config.json alone (no weights
    read): for a command that needs the RM only at its end (SFT's rm_score selection), so a wrong
    path stops it before the training, not after."""
    from transformers import AutoConfig

    from instructrl.models import LOAD_ERRORS, ModelLoadError, hub_error, resolve_model

    try:
        p = resolve_model(str(path))
    except ModelLoadError as e:
        raise ModelLoadError(f"{key}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(p)
    except LOAD_ERRORS as e:
        raise hub_error(p, e) from None
    if config.num_labels != 1:
        raise ModelLoadError(f"{key}: {p}: not a reward model (num_labels={config.num_labels}, expected 1)")


def save_reward_model(model, tokenizer, path: str | Path) -> Path:
    """Save model + tokenizer atomically; the tokenizer pads with the RM's pad token."""
    from instructrl.io import atomic_dir

    path = Path(path)
    model.config.architectures = [type(model).__name__]
    tok_pad = model.config.pad_token_id
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            old = tokenizer.pad_token
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(tok_pad))
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                tokenizer.pad_token = old
    return path


def get_bias(model) -> float:
    return float(getattr(model.config, BIAS_KEY, 0.0) or 0.0)


def set_bias(model, bias: float) -> None:
    setattr(model.config, BIAS_KEY, float(bias))


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------






def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Final hidden states of the trunk. [B, T, H]

    ``lower = (h, k)``: ``h`` [B, T, H] is the hidden state after the model's blocks 0..k-1 for these
    inputs (``models.lower_hidden``, shared with other models); only blocks k.. run.
    """
    pos = position_ids(attention_mask)
    if lower is None:
        return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                             use_cache=False).last_hidden_state
    with decoder_blocks(model, lower[1]):
        return decoder(model)(inputs_embeds=lower[0], attention_mask=attention_mask, position_ids=pos,
                             use_cache=False).last_hidden_state


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
          lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Reward of each sequence: head output at its last real token, plus the normalization bias.

    input_ids, attention_mask: [B, T] (left or right padded). Returns [B] float32.
    Only the gathered positions go through the head (one H-vector per row).
    ``lower``: see :func:`hidden_states`.
    """
    h = hidden_states(model, input_ids, attention_mask, lower)
    last = last_token_index(attention_mask)
    picked = h[torch.arange(h.shape[0], device=h.device), last]  # [B, H]
    return model.score(picked).squeeze(-1).float() + get_bias(model)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 lower: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """The scalar head at every position, plus the bias. [B, T] float32.

    ``token_values(...)[b, last_token_index(mask)[b]] == score(...)[b]``. The PPO
    value model is initialised from the RM (InstructGPT §3.5) and reads this.
    Values at padding positions are meaningless; mask them. ``lower``: see :func:`hidden_states`.
    """
    h = hidden_states(model, input_ids, attention_mask, lower)
    return model.score(h).squeeze(-1).float() + get_bias(model)


class RewardScorer(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> score [B]`` as one module, so that
    accelerate/DDP sees a normal forward call (DDP syncs gradients through it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return score(self.model, input_ids, attention_mask)


# ---------------------------------------------------------------------------
# Data: tokenized rankings and packed batches
