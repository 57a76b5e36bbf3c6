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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from instructrl.core.tensors import last_token_index, position_ids

from instructrl.config import check, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.data import Demonstration, Ranking, load_demonstrations, load_rankings
from instructrl.formatting import TruncationStats, build_example, encode_prompt, encode_response, pad, truncate
from instructrl.io import DataError
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
    logging.getLogger("instructrl.train.rm").warning(
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

    from instructrl.models import _hub_error, load_tokenizer, resolve_model

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
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from None
    model.config.pad_token_id = pad
    model.config.use_cache = False
    setattr(model.config, BIAS_KEY, float(getattr(model.config, BIAS_KEY, 0.0) or 0.0))
    return model


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a reward model saved by :func:`save_reward_model` (or any 1-label HF classifier)."""
    from transformers import AutoModelForSequenceClassification

    from instructrl.models import ModelLoadError, _hub_error, resolve_model

    p = resolve_model(str(path))
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _hub_error(p, e) from None
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{p}: not a reward model (num_labels={model.config.num_labels}, expected 1)")
    if not hasattr(model.config, BIAS_KEY):
        setattr(model.config, BIAS_KEY, 0.0)
    model.config.use_cache = False
    return model


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
# ---------------------------------------------------------------------------


@dataclass
class TokenizedRanking:
    """One ranking, tokenized by the rule of :mod:`instructrl.formatting`."""

    id: str
    seqs: list[list[int]]  # K token sequences: prompt + response + eos (after truncation)
    ranks: list[int]       # K ranks, 0 = best, ties equal

    @property
    def k(self) -> int:
        return len(self.seqs)


@dataclass
class RankingBatch:
    """Whole rankings packed into one forward pass (N = Σ K over its rankings).

    input_ids:      [N, T] long, right padded
    attention_mask: [N, T] long
    group:          [N] long, index of the ranking in this batch
    ranks:          [N] long, rank within the ranking (0 = best)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    group: torch.Tensor
    ranks: torch.Tensor

    @property
    def num_rankings(self) -> int:
        return int(self.group.max()) + 1 if self.group.numel() else 0


@dataclass
class RankingTruncation(TruncationStats):
    """Truncation counts, plus comparisons that truncation made meaningless (identical token sequences)."""

    collapsed_pairs: int = 0

    def summary(self) -> str:
        return super().summary() + f"; {self.collapsed_pairs} comparisons became identical after truncation"


def tokenize_rankings(tokenizer, rankings: list[Ranking], max_length: int, min_prompt_tokens: int,
                      stats: RankingTruncation) -> list[TokenizedRanking]:
    """Prompt encoded once per ranking; each response truncated by the documented rule (counted in ``stats``)."""
    out = []
    for r in rankings:
        p = encode_prompt(tokenizer, r.messages)
        seqs = [truncate(p, encode_response(tokenizer, resp), max_length, min_prompt_tokens, stats).input_ids
                for resp in r.responses]
        stats.collapsed_pairs += sum(1 for i, j in r.pairs() if seqs[i] == seqs[j])
        out.append(TokenizedRanking(r.id, seqs, list(r.ranks)))
    return out


def pack_rankings(items: list[TokenizedRanking], max_sequences: int) -> list[list[TokenizedRanking]]:
    """Greedy packing of whole rankings into groups of at most ``max_sequences`` sequences.

    A ranking is never split (its K scores meet in one loss term); one with
    K > max_sequences forms a group by itself.
    """
    groups, cur, n = [], [], 0
    for it in items:
        if cur and n + it.k > max_sequences:
            groups.append(cur)
            cur, n = [], 0
        cur.append(it)
        n += it.k
    if cur:
        groups.append(cur)
    return groups


def collate_rankings(items: list[TokenizedRanking], pad_id: int) -> RankingBatch:
    seqs = [s for it in items for s in it.seqs]
    ids, mask = pad(seqs, pad_id, "right")
    group = torch.tensor([g for g, it in enumerate(items) for _ in range(it.k)], dtype=torch.long)
    ranks = torch.tensor([rk for it in items for rk in it.ranks], dtype=torch.long)
    return RankingBatch(ids, mask, group, ranks)


@torch.no_grad()
def score_rankings(scorer, items: list[TokenizedRanking], pad_id: int, max_sequences: int = 16,
                   autocast=None, device: torch.device | str = "cpu", desc: str | None = None) -> list[list[float]]:
    """Scores of every response of every ranking (same order), in eval mode, batched by length."""
    from tqdm.auto import tqdm

    was_training = scorer.training
    scorer.eval()
    order = sorted(range(len(items)), key=lambda i: max(len(s) for s in items[i].seqs))  # less padding
    out: list[list[float]] = [[] for _ in items]
    packs = pack_rankings([items[i] for i in order], max_sequences)
    pos = 0
    for group in tqdm(packs, desc=desc, disable=desc is None, leave=False):
        b = collate_rankings(group, pad_id)
        with autocast() if autocast is not None else _nullctx():
            s = scorer(b.input_ids.to(device), b.attention_mask.to(device)).float().cpu()
        start = 0
        for it in group:
            out[order[pos]] = s[start:start + it.k].tolist()
            start += it.k
            pos += 1
    scorer.train(was_training)
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def normalize_bias(model, tokenizer, demos: list[Demonstration], max_length: int, min_prompt_tokens: int = 16,
                   max_sequences: int = 16, autocast=None, device="cpu") -> dict:
    """Set ``config.reward_bias`` so that the mean score over ``demos`` is 0 (InstructGPT §3.5).

    Returns ``{"bias", "mean_before", "mean_after", "n"}``. The ranking loss only
    sees score differences, so this changes no comparison and no loss value.
    """
    if not demos:
        raise ValueError("bias normalization needs at least one demonstration")
    stats = RankingTruncation()
    items = [TokenizedRanking(d.id, [build_example(tokenizer, d.messages, d.response, max_length, min_prompt_tokens,
                                                   stats).input_ids], [0]) for d in demos]
    scorer = RewardScorer(model)
    old = get_bias(model)
    scores = torch.tensor([s[0] for s in score_rankings(scorer, items, model.config.pad_token_id, max_sequences,
                                                        autocast, device)])
    mean_before = scores.mean().item()
    set_bias(model, old - mean_before)
    mean_after = (scores + (get_bias(model) - old)).mean().item()
    return {"bias": get_bias(model), "mean_before": mean_before, "mean_after": mean_after, "n": len(demos),
            "truncation": stats.summary()}


# ---------------------------------------------------------------------------
# Evaluation: accuracy and log loss by K, with 95% CIs, and calibration
# ---------------------------------------------------------------------------


def comparison_table(items: list[TokenizedRanking], scores: list[list[float]]) -> list[dict]:
    """One row per untied comparison: ranking index, K, margin d = r_w - r_l."""
    rows = []
    for g, (it, s) in enumerate(zip(items, scores)):
        for i in range(it.k):
            for j in range(i + 1, it.k):
                if it.ranks[i] == it.ranks[j]:
                    continue
                w, l = (i, j) if it.ranks[i] < it.ranks[j] else (j, i)
                rows.append({"ranking": g, "k": it.k, "margin": s[w] - s[l]})
    return rows


def _cluster_bootstrap(num, den, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of Σnum/Σden, resampling rankings (comparisons within a ranking are not independent)."""
    import numpy as np

    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    stat = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    a = (1 - level) / 2
    return float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))


def comparison_metrics(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy (a score tie counts half) and log loss -log σ(r_w - r_l), overall and by K.

    Every comparison weighs the same. 95% CIs: percentile bootstrap over
    rankings (a cluster bootstrap; for pairwise data it matches the usual binomial interval).
    """
    import numpy as np

    def block(sel: list[dict]) -> dict:
        if not sel:
            return {"comparisons": 0}
        by_r: dict[int, list[float]] = {}
        for r in sel:
            by_r.setdefault(r["ranking"], []).append(r["margin"])
        m = [np.asarray(v) for v in by_r.values()]
        correct = np.array([(x > 0).sum() + 0.5 * (x == 0).sum() for x in m])
        nll = np.array([np.logaddexp(0.0, -x).sum() for x in m])
        n = np.array([len(x) for x in m])
        acc_ci = _cluster_bootstrap(correct, n, n_boot, seed)
        ll_ci = _cluster_bootstrap(nll, n, n_boot, seed + 1)
        return {"comparisons": int(n.sum()), "rankings": len(m), "accuracy": float(correct.sum() / n.sum()),
                "accuracy_ci95": list(acc_ci), "log_loss": float(nll.sum() / n.sum()), "log_loss_ci95": list(ll_ci)}

    out = {"overall": block(rows), "by_k": {}}
    for k in sorted({r["k"] for r in rows}):
        out["by_k"][str(k)] = block([r for r in rows if r["k"] == k])
    return out


def calibration_bins(margins, n_bins: int = 10) -> dict:
    """Predicted P(a beats b) = σ(r_a - r_b) against the observed frequency.

    Each comparison enters in both orientations, (σ(d), won) and (σ(-d), lost),
    so the curve covers [0, 1] and is symmetric. Returns bin centres, mean
    predicted, observed rate and counts, and the expected calibration error.
    """
    import numpy as np

    d = np.asarray(margins, dtype=np.float64)
    p = np.concatenate([1 / (1 + np.exp(-d)), 1 / (1 + np.exp(d))])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    pred, obs, count = [], [], []
    for b in range(n_bins):
        sel = which == b
        count.append(int(sel.sum()))
        pred.append(float(p[sel].mean()) if sel.any() else float("nan"))
        obs.append(float(y[sel].mean()) if sel.any() else float("nan"))
    ece = float(sum(c * abs(a - o) for a, o, c in zip(pred, obs, count) if c) / max(len(p), 1))
    return {"edges": edges.tolist(), "predicted": pred, "observed": obs, "count": count, "ece": ece}


def plot_calibration(cal: dict, path: str | Path, title: str = "reward model calibration") -> None:
    """Reliability diagram as PNG (atomic write)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    pts = [(a, o, c) for a, o, c in zip(cal["predicted"], cal["observed"], cal["count"]) if c]
    ax.plot([a for a, _, _ in pts], [o for _, o, _ in pts], "o-", label=f"RM (ECE {cal['ece']:.3f})")
    for a, o, c in pts:
        ax.annotate(str(c), (a, o), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("predicted P(win) = σ(r_a − r_b)")
    ax.set_ylabel("observed win rate")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def format_metrics(m: dict) -> str:
    lines = [f"{'K':>8} {'rankings':>9} {'comparisons':>12} {'accuracy [95% CI]':>26} {'log loss [95% CI]':>26}"]

    def row(name, b):
        if not b.get("comparisons"):
            return f"{name:>8} {'-':>9} {0:>12}"
        a, al = b["accuracy"], b["accuracy_ci95"]
        ll, lc = b["log_loss"], b["log_loss_ci95"]
        return (f"{name:>8} {b['rankings']:>9} {b['comparisons']:>12} {a:>8.3f} [{al[0]:.3f}, {al[1]:.3f}]"
                f"   {ll:>8.3f} [{lc[0]:.3f}, {lc[1]:.3f}]")

    for k, b in m["by_k"].items():
        lines.append(row(k, b))
    lines.append(row("all", m["overall"]))
    return "\n".join(lines)


def evaluate(scorer, items: list[TokenizedRanking], pad_id: int, out_dir: str | Path | None = None,
             max_sequences: int = 16, autocast=None, device="cpu", n_boot: int = 2000, seed: int = 0,
             desc: str | None = "rm eval") -> dict:
    """Score held-out rankings; metrics by K and overall; ``eval.json`` + ``calibration.png`` in ``out_dir``."""
    import json

    from instructrl.io import atomic_write_text

    scores = score_rankings(scorer, items, pad_id, max_sequences, autocast, device, desc)
    rows = comparison_table(items, scores)
    metrics = comparison_metrics(rows, n_boot, seed)
    metrics["calibration"] = calibration_bins([r["margin"] for r in rows])
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "eval.json", json.dumps(metrics, indent=2))
        plot_calibration(metrics["calibration"], out_dir / "calibration.png")
    return metrics


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@dataclass
class RMData:
    train: str = param("", "rankings/pairs JSONL (docs/data-formats.md; HH-RLHF transcripts accepted); required")
    val: str = param("", "held-out rankings JSONL; empty = hold out val_fraction of train")
    val_fraction: float = param(0.05, "share of train rankings held out for evaluation when val is empty")
    demonstrations: str = param("", "demonstrations JSONL (the SFT data) for the bias normalization; "
                                    "empty = no normalization (bias stays 0, logged)")
    max_demonstrations: int = param(1024, "at most this many demonstrations are scored for the bias (0 = all)")
    max_length: int = param(512, "max tokens of prompt + response; longer ones are truncated (prompt from the left)")
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens")
    errors: Literal["raise", "skip"] = param("raise", "bad rows: raise = stop at the first (file:line: field); "
                                                      "skip = leave them out, counted in the log")

    def validate(self):
        check(bool(self.train), "data.train: a rankings file is required (data.train=PATH)")
        check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        check(self.max_length > self.min_prompt_tokens, "data.max_length must exceed data.min_prompt_tokens")


@dataclass
class RMTrain:
    epochs: int = param(1, "passes over the rankings (paper: 1; the RM overfits after one)")
    lr: float = param(9e-6, "peak learning rate (paper, 6B RM: 9e-6)")
    warmup_ratio: float = param(0.0, "share of optimizer steps in linear warmup")
    min_lr_ratio: float = param(0.1, "cosine decays to lr * min_lr_ratio (paper: 10% of the initial value)")
    batch_size: int = param(64, "rankings per optimizer step, over all processes (paper: 64)")
    micro_batch_size: int = param(16, "sequences per forward pass in one process; whole rankings are packed")
    weight_decay: float = param(0.0, "AdamW weight decay")
    max_grad_norm: float = param(1.0, "gradient clipping norm; 0 disables")
    precision: Precision = precision_field()
    trainable_layers: int = param(-1, "train only the top N transformer blocks (+ final norm + head); -1 = all")
    seed: int = param(0, "seed for the split, shuffling and the head initialisation")
    log_every: int = param(1, "write a metrics row every N optimizer steps")

    def validate(self):
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "train.batch_size and micro_batch_size must be >= 1")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        check(self.trainable_layers >= -1, "train.trainable_layers must be -1 (all) or >= 0")
        check(self.log_every >= 1, "train.log_every must be >= 1")


@dataclass
class RMConfig:
    model: str = param("default", "the SFT model (causal LM folder) the RM starts from; 'default' = embedded SmolLM2")
    output_dir: str = param("runs/rm", "run folder: config.yaml, metrics.jsonl, log.txt, model/, eval.json, calibration.png")
    device: str = device_field()
    data: RMData = param(RMData(), "comparison data")
    train: RMTrain = param(RMTrain(), "optimisation")


@dataclass
class RMEvalConfig:
    model: str = param("", "trained reward model folder (e.g. runs/rm/model); required")
    data: str = param("", "held-out rankings/pairs JSONL; required")
    output_dir: str = param("", "where eval.json and calibration.png go; empty = <model>/eval")
    device: str = device_field()
    max_length: int = param(512, "max tokens of prompt + response (truncation as in training)")
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens")
    micro_batch_size: int = param(16, "sequences per forward pass")
    precision: Precision = precision_field()
    errors: Literal["raise", "skip"] = param("raise", "bad rows: raise or skip (counted)")
    bootstrap: int = param(2000, "bootstrap resamples for the 95% confidence intervals")

    def validate(self):
        check(bool(self.model), "model: a reward model folder is required (model=PATH)")
        check(bool(self.data), "data: a rankings file is required (data=PATH)")
        check(self.max_length > self.min_prompt_tokens, "max_length must exceed min_prompt_tokens")
        check(self.bootstrap >= 100, "bootstrap must be >= 100")


# ---------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------


def split_rankings(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split: (train, held out) with round(fraction * n) >= 1 held out."""
    import random

    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, round(len(items) * fraction))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _load_rankings_counted(path: str, errors: str, log) -> list[Ranking]:
    skipped: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below instead
        rankings = load_rankings(path, errors=errors, skipped=skipped)
    if skipped:
        msg = f"{path}: skipped {len(skipped)} invalid rows (data.errors=skip); first: {skipped[0]}"
        log(msg)
        print(f"[rm] {msg}")
    if not rankings:
        raise DataError(path, None, None, "no rankings to train or evaluate on")
    return rankings


def train_rm(cfg: RMConfig) -> Path:
    """Train the reward model; returns ``output_dir/model``.

    1. set-up: accelerator, seed, run folder
    2. data: load + validate rankings, split off validation, tokenize (truncation counted)
    3. model: SFT trunk + scalar head, frozen lower layers (optional), AdamW, cosine decay
    4. epoch(s): global batches of rankings -> this process's share -> micro-batches of whole
       rankings; K forward passes per ranking, all C(K,2) comparisons in the loss (eq. 1),
       normalised by the rankings of the whole optimizer step
    5. bias normalization: mean score over demonstrations = 0 (§3.5)
    6. save (atomic) and evaluate on the held-out rankings
    """
    import json
    import math
    import random
    import time

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from instructrl.io import RunDir, atomic_write_text
    from instructrl.core.losses import kwise_ranking_loss
    from instructrl.models import freeze_lower_layers, load_tokenizer, make_adamw
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    # 1. set-up ------------------------------------------------------------
    rt = make_runtime(cfg.device, cfg.train.precision)
    cfg.train.precision = rt.precision  # saved resolved, so the run folder says what ran
    accelerator = Accelerator(cpu=rt.device.type == "cpu")
    set_seed(cfg.train.seed)
    tc, dc = cfg.train, cfg.data
    run = RunDir(cfg.output_dir, is_main=accelerator.is_main_process)
    run.save_config(cfg)
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device

    autocast = rt.autocast

    # 2. data --------------------------------------------------------------
    tok = load_tokenizer(cfg.model)
    rankings = _load_rankings_counted(dc.train, dc.errors, run.info)
    if dc.val:
        train_r, val_r = rankings, _load_rankings_counted(dc.val, dc.errors, run.info)
    elif dc.val_fraction > 0 and len(rankings) > 1:
        train_r, val_r = split_rankings(rankings, dc.val_fraction, tc.seed)
    else:
        train_r, val_r = rankings, []
    demos = load_demonstrations(dc.demonstrations) if dc.demonstrations else []
    stats = RankingTruncation()
    model = init_reward_model(cfg.model)
    pad_id = model.config.pad_token_id
    train_items = tokenize_rankings(tok, train_r, dc.max_length, dc.min_prompt_tokens, stats)
    val_stats = RankingTruncation()
    val_items = tokenize_rankings(tok, val_r, dc.max_length, dc.min_prompt_tokens, val_stats)
    ks = sorted({it.k for it in train_items})
    n_pairs = sum(len(r.pairs()) for r in train_r)
    run.info(f"data: {len(train_items)} train rankings (K in {ks}, {n_pairs} comparisons), {len(val_items)} held out")
    run.info(f"truncation (train): {stats.summary()}")
    run.info(f"truncation (held out): {val_stats.summary()}")
    if stats.prompts_cut or stats.responses_cut:
        accelerator.print(f"[rm] truncation (train, max_length={dc.max_length}): {stats.summary()}")

    # 3. model, optimizer, schedule -----------------------------------------
    n_train = freeze_lower_layers(model, tc.trainable_layers)
    run.info(f"model: {type(model).__name__} from {cfg.model}; {n_train:,} trainable parameters")
    model.train()
    scorer = RewardScorer(model)
    opt = make_adamw([p for p in model.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_items) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, round(tc.warmup_ratio * total_steps), total_steps,
                                                         min_lr_rate=tc.min_lr_ratio)
    scorer, opt = accelerator.prepare(scorer, opt)
    order_rng = random.Random(tc.seed)  # the same order on every process

    # 4. epochs ------------------------------------------------------------
    step = 0
    bar = tqdm(total=total_steps, desc="rm", disable=not accelerator.is_local_main_process)
    for epoch in range(1, tc.epochs + 1):
        order = list(range(len(train_items)))
        order_rng.shuffle(order)
        for start in range(0, len(order), tc.batch_size):
            t0 = time.perf_counter()
            global_batch = [train_items[i] for i in order[start:start + tc.batch_size]]
            mine = global_batch[rank::world]
            micro = [collate_rankings(g, pad_id) for g in pack_rankings(mine, tc.micro_batch_size)]
            loss_sum, correct, pairs, seqs, tokens = 0.0, 0, 0, 0, 0
            for j, b in enumerate(micro):
                sync = accelerator.no_sync(scorer) if j < len(micro) - 1 else _nullctx()
                with sync:
                    with autocast():
                        s = scorer(b.input_ids.to(dev), b.attention_mask.to(dev))
                    # Normaliser = rankings in the whole optimizer step: exact full-batch gradient.
                    loss, st = kwise_ranking_loss(s, b.group.to(dev), b.ranks.to(dev), num_rankings=len(global_batch))
                    accelerator.backward(loss * world)  # DDP averages over processes; undo it
                loss_sum += st["loss_sum"].item()
                correct += int(st["correct"])
                pairs += st["pairs"]
                seqs += b.input_ids.shape[0]
                tokens += int(b.attention_mask.sum())
            params = [p for p in scorer.parameters() if p.requires_grad]
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm) if tc.max_grad_norm > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tot = accelerator.reduce(torch.tensor([loss_sum, correct, pairs, seqs, tokens], dtype=torch.float64), "sum")
            row = {"step": step, "epoch": epoch, "loss": tot[0].item() / len(global_batch),
                   "accuracy": tot[1].item() / max(tot[2].item(), 1), "comparisons": int(tot[2].item()),
                   "rankings": len(global_batch), "sequences": int(tot[3].item()), "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, "seconds": dt,
                   "tokens_per_s": tot[4].item() / dt}
            if step % tc.log_every == 0 or step == total_steps:
                run.log_metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
    bar.close()
    model = accelerator.unwrap_model(scorer).model
    model.eval()

    # 5. bias normalization (§3.5) ------------------------------------------
    norm = {"normalized": False}
    if demos:
        use = demos if not dc.max_demonstrations else demos[: dc.max_demonstrations]
        norm = {"normalized": True, **normalize_bias(model, tok, use, dc.max_length, dc.min_prompt_tokens,
                                                     tc.micro_batch_size, autocast, dev)}
        run.info(f"bias normalization over {norm['n']} demonstrations: mean score {norm['mean_before']:.4f} -> "
                 f"{norm['mean_after']:.2e} (bias {norm['bias']:.4f})")
    else:
        run.info("no data.demonstrations: reward_bias left at 0 (scores are not normalized)")
    run.log_metrics({"step": step, **{f"norm_{k}": v for k, v in norm.items() if k != "truncation"}})

    # 6. save + held-out evaluation -----------------------------------------
    final = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        save_reward_model(model, tok, final)
        run.info(f"saved reward model -> {final}")
        if val_items:
            m = evaluate(RewardScorer(model), val_items, pad_id, cfg.output_dir, tc.micro_batch_size, autocast, dev,
                         seed=tc.seed)
            run.log_metrics({"step": step, "val_accuracy": m["overall"]["accuracy"],
                             "val_log_loss": m["overall"]["log_loss"]})
            table = format_metrics(m)
            run.info("held-out evaluation:\n" + table)
            print(f"[rm] held-out comparisons ({cfg.output_dir}/eval.json, calibration.png):\n{table}")
        atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(
            {"model": str(final), "steps": step, "train_rankings": len(train_items), "val_rankings": len(val_items),
             "truncation": stats.summary(), "normalization": norm}, indent=2))
        print(f"[rm] saved reward model -> {final}")
    accelerator.wait_for_everyone()
    return final


def evaluate_rm(cfg: RMEvalConfig) -> dict:
    """``instructrl rm eval``: accuracy and log loss on held-out comparisons, by K, with 95% CIs + calibration PNG."""
    from instructrl.models import load_tokenizer

    rt = make_runtime(cfg.device, cfg.precision)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.model) / "eval"
    model = load_reward_model(cfg.model).eval().to(rt.device)
    tok = load_tokenizer(cfg.model)
    msgs: list[str] = []
    rankings = _load_rankings_counted(cfg.data, cfg.errors, msgs.append)
    stats = RankingTruncation()
    items = tokenize_rankings(tok, rankings, cfg.max_length, cfg.min_prompt_tokens, stats)
    msg = f"truncation (max_length={cfg.max_length}): {stats.summary()}"
    print(f"[rm eval] {msg}")

    m = evaluate(RewardScorer(model), items, model.config.pad_token_id, out_dir, cfg.micro_batch_size, rt.autocast,
                 rt.device, cfg.bootstrap)
    m["truncation"] = stats.summary()
    m["skipped_rows"] = msgs
    from instructrl.io import atomic_write_text
    import json

    atomic_write_text(out_dir / "eval.json", json.dumps(m, indent=2))
    print(format_metrics(m))
    print(f"[rm eval] wrote {out_dir / 'eval.json'} and {out_dir / 'calibration.png'}")
    return m
