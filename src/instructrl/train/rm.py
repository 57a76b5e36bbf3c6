"""Reward-model training (InstructGPT §3.5 "Reward modeling", equation 1); the model itself is in
:mod:`instructrl.reward_model`, the evaluation command in :mod:`instructrl.evaluation.rm_eval`.

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

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from instructrl.config import check, overwrite_field, param
from instructrl.data import Demonstration, Ranking, load_demonstrations, load_rankings, require_rows
from instructrl.plots import plot_calibration
from instructrl.rm_metrics import calibration_bins, comparison_metrics, comparison_table, format_metrics
from instructrl.formatting import TruncationStats, build_example, encode_prompt, encode_response, pad, truncate
from instructrl.io import DataError
from instructrl.lora import LoraSettings
from instructrl.reward_model import RewardScorer, get_bias, init_reward_model, save_reward_model, set_bias
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.tracking import TrackerKind, tracker_field
from instructrl.train.common import (SHARDING_HELP, Position, Sharding, accumulate, check_finite_weights,
                                     check_trainable, checkpoint_state, drop_older_states, is_sharded,
                                     optimizer_step, pad_with_tied_rankings, prepare_model, restore, resume_checkpoint,
                                     save_checkpoint, setup_accelerator, split_global_batch, split_validation,
                                     unsharded_copy)



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
        with autocast() if autocast is not None else contextlib.nullcontext():
            s = scorer(b.input_ids.to(device), b.attention_mask.to(device)).float().cpu()
        start = 0
        for it in group:
            out[order[pos]] = s[start:start + it.k].tolist()
            start += it.k
            pos += 1
    scorer.train(was_training)
    return out


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


@dataclass
class RMData:
    train: str = param("", "rankings/pairs JSONL (docs/data-formats.md; HH-RLHF transcripts accepted); required")
    val: str = param("", "held-out rankings JSONL; empty = hold out val_fraction of train")
    val_fraction: float = param(0.05, "share of train rankings held out for evaluation when val is empty", min=0, max=1,
                                 max_exclusive=True)
    demonstrations: str = param("", "demonstrations JSONL (the SFT data) for the bias normalization; "
                                    "empty = no normalization (bias stays 0, logged)")
    max_demonstrations: int = param(1024, "at most this many demonstrations are scored for the bias (0 = all)", min=0)
    max_length: int = param(512, "max tokens of prompt + response; longer ones are truncated (prompt from the left)", min=1)
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens", min=0)
    errors: Literal["raise", "skip"] = param("raise", "bad rows: raise = stop at the first (file:line: field); "
                                                      "skip = leave them out, counted in the log")

    def validate(self):
        check(bool(self.train), "data.train: a rankings file is required (data.train=PATH)")
        check(0 <= self.val_fraction < 1, "data.val_fraction must be in [0, 1)")
        check(self.max_length > self.min_prompt_tokens, "data.max_length must exceed data.min_prompt_tokens")


@dataclass
class RMTrain:
    epochs: int = param(1, "passes over the rankings (paper: 1; the RM overfits after one)", min=1)
    lr: float = param(9e-6, "peak learning rate (paper, 6B RM: 9e-6)", min=0, min_exclusive=True)
    warmup_ratio: float = param(0.0, "share of optimizer steps in linear warmup", min=0, max=1,
                                 max_exclusive=True)
    min_lr_ratio: float = param(0.1, "cosine decays to lr * min_lr_ratio (paper: 10% of the initial value)", min=0, max=1)
    batch_size: int = param(64, "rankings per optimizer step, over all processes (paper: 64)", min=1)
    micro_batch_size: int = param(16, "sequences per forward pass in one process; whole rankings are packed", min=1)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = param(1.0, "gradient clipping norm; 0 disables", min=0)
    precision: Precision = precision_field()
    trainable_layers: int = param(-1, "train only the top N transformer blocks (+ final norm + head); -1 = all; "
                                      "with train.lora: adapters in the top N blocks only (+ head)", min=-1)
    lora: LoraSettings = param(LoraSettings(), "LoRA adapters on the trunk instead of full fine-tuning; the scalar "
                                               "head is trained in full (docs/lora.md)")
    seed: int = param(0, "seed for the split, shuffling and the head initialisation", min=0, max=2**32 - 1)
    log_every: int = param(1, "write a metrics row every N optimizer steps", min=1)
    save_every: int = param(0, "checkpoint every N optimizer steps and at each epoch's end, for --resume "
                               "(0 = no checkpoints: an interrupted run starts over)", min=0)
    sharding: Sharding = param("none", SHARDING_HELP + " (docs/pipeline.md, \"Sharded training\")")

    def validate(self):
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(not (self.sharding == "fsdp2" and self.lora.enabled),
              "train.sharding=fsdp2 with train.lora.rank > 0: sharding is for full fine-tuning (LoRA trains "
              "a small adapter and its saves need the unsharded base); use one of them")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "train.batch_size and micro_batch_size must be >= 1")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        check(self.trainable_layers >= -1, "train.trainable_layers must be -1 (all) or >= 0")
        check(self.log_every >= 1, "train.log_every must be >= 1")
        check(not (self.lora.enabled and self.trainable_layers == 0),
              "train.trainable_layers=0 with train.lora.rank > 0 leaves no block for the adapters; use -1 or N >= 1")


@dataclass
class RMConfig:
    model: str = param("default", "the SFT model (causal LM folder) the RM starts from; 'default' = embedded SmolLM2")
    output_dir: str = param("runs/rm", "run folder: config.yaml, metrics.jsonl, log.txt, model/, eval.json, calibration.png")
    overwrite: bool = overwrite_field()
    tracker: TrackerKind = tracker_field()
    resume: bool = param(False, "continue from the latest checkpoint in output_dir")
    device: str = device_field()
    data: RMData = param(RMData(), "comparison data")
    train: RMTrain = param(RMTrain(), "optimisation")


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


def load_trainable_rm(cfg: RMConfig, ckpt: Path | None):
    """The reward model to train: SFT trunk + new head (or a full checkpoint), then LoRA or frozen lower blocks."""
    from instructrl.lora import apply_lora, load_adapter
    from instructrl.models import freeze_lower_layers
    from instructrl.reward_model import load_reward_model

    tc = cfg.train
    if tc.lora.enabled:
        model = apply_lora(init_reward_model(cfg.model), tc.lora, tc.trainable_layers)
        if ckpt is not None:
            load_adapter(model, ckpt / "adapter")  # the adapter and the trained head
    else:
        model = load_reward_model(ckpt) if ckpt is not None else init_reward_model(cfg.model)
        freeze_lower_layers(model, tc.trainable_layers)
    model.train()
    return model


def train_rm(cfg: RMConfig) -> Path:
    """Train the reward model; returns ``output_dir/model``.

    1. set-up: accelerator, seed, run folder (``--resume``: the latest checkpoint)
    2. data: load + validate rankings, split off validation, tokenize (truncation counted)
    3. model: SFT trunk + scalar head, LoRA adapters or frozen lower layers (optional), AdamW, cosine decay
    4. epoch(s): global batches of rankings -> this process's share -> micro-batches of whole
       rankings; K forward passes per ranking, all C(K,2) comparisons in the loss (eq. 1),
       normalised by the rankings of the whole optimizer step; with ``train.save_every`` = N,
       checkpoints every N steps and at each epoch's end (weights or adapter, optimizer, schedule,
       RNG, position)
    5. bias normalization: mean score over demonstrations = 0 (§3.5)
    6. save (atomic; merged into a plain HF folder with LoRA, the adapter in ``adapter/``) and
       evaluate on the held-out rankings
    """
    import math
    import random
    import time

    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from instructrl.io import RunDir
    from instructrl.core.losses import kwise_ranking_loss
    from instructrl.lora import check_model_targets
    from instructrl.models import load_tokenizer, make_adamw, resolve_model
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    # 1. set-up ------------------------------------------------------------
    rt = make_runtime(cfg.device, cfg.train.precision)
    cfg.train.precision = rt.precision  # saved resolved, so the run folder says what ran
    tc, dc = cfg.train, cfg.data
    accelerator = setup_accelerator(rt)
    set_seed(tc.seed)
    run = RunDir.start(cfg.output_dir, cfg, resume=cfg.resume, overwrite=cfg.overwrite,
                       outputs=("model", "adapter", "eval.json", "calibration.png", "summary.json"),
                       is_main=accelerator.is_main_process)
    ckpt = resume_checkpoint(cfg.resume, run)
    dev = rt.device
    autocast = rt.autocast

    # 2. data --------------------------------------------------------------
    tok = load_tokenizer(cfg.model)
    train_items, val_items, demos, stats = load_data(cfg, tok, run, accelerator)

    # 3. model, optimizer, schedule (+ resume) -------------------------------
    if tc.lora.enabled:  # a bad target_modules fails here, before the weights are read
        check_model_targets(resolve_model(cfg.model), tc.lora, reward_model=True)
    model = load_trainable_rm(cfg, ckpt)
    pad_id = model.config.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.info(f"model: {type(model).__name__} from {cfg.model}; {sum(p.numel() for p in trainable):,} trainable "
             f"parameters" + (f" (LoRA rank {tc.lora.rank} + head)" if tc.lora.enabled else ""))
    # DDP wraps the scorer (its forward is the one call), FSDP2 shards the model inside it
    scorer, opt = prepare_model(accelerator, model, lambda ps: make_adamw(ps, tc.lr, tc.weight_decay), tc.sharding,
                                run.info, wrap=RewardScorer)
    steps_per_epoch = math.ceil(len(train_items) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, round(tc.warmup_ratio * total_steps), total_steps,
                                                         min_lr_rate=tc.min_lr_ratio)
    order_rng = random.Random(tc.seed)  # the same order on every process
    pos = Position()
    if ckpt is not None:
        pos, _ = restore(accelerator, ckpt, opt, sched, order_rng, run, model=model)

    # 4. epochs ------------------------------------------------------------
    params = [p for p in scorer.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=pos.step, desc="rm", disable=not accelerator.is_local_main_process)
    while pos.epoch <= tc.epochs:
        if pos.order is None:
            pos.order = list(range(len(train_items)))
            order_rng.shuffle(pos.order)
        t0 = time.perf_counter()
        global_batch = [train_items[i] for i in pos.order[pos.start:pos.start + tc.batch_size]]
        mine = split_global_batch(global_batch, accelerator)
        micro = [collate_rankings(g, pad_id) for g in pack_rankings(mine, tc.micro_batch_size)]
        real = pad_with_tied_rankings(accelerator, model, micro, lambda: collate_rankings(global_batch[:1], pad_id))

        def loss_fn(b):
            with autocast():
                s = scorer(b.input_ids.to(dev), b.attention_mask.to(dev))
            # Normaliser = rankings in the whole optimizer step: exact full-batch gradient.
            return kwise_ranking_loss(s, b.group.to(dev), b.ranks.to(dev), num_rankings=len(global_batch))

        sts = accumulate(accelerator, scorer, micro, loss_fn)
        local = [sum(st["loss_sum"].item() for st in sts), sum(int(st["correct"]) for st in sts),
                 sum(st["pairs"] for st in sts), sum(b.input_ids.shape[0] for b in micro[:real]),
                 sum(int(b.attention_mask.sum()) for b in micro[:real])]
        tot = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=dev), "sum").cpu()
        step_loss = tot[0].item() / len(global_batch)
        res = optimizer_step(accelerator, params, opt, sched, tc.max_grad_norm, step_loss)
        pos.skipped += res.skipped
        pos.step += 1
        pos.start += tc.batch_size
        dt = time.perf_counter() - t0
        row = {"step": pos.step, "epoch": pos.epoch, "loss": step_loss,
               "accuracy": tot[1].item() / max(tot[2].item(), 1), "comparisons": int(tot[2].item()),
               "rankings": len(global_batch), "sequences": int(tot[3].item()), "lr": sched.get_last_lr()[0],
               "grad_norm": res.grad_norm, "seconds": dt, "tokens_per_s": tot[4].item() / dt,
               "skipped_steps": pos.skipped}
        if pos.step % tc.log_every == 0 or pos.step == total_steps:
            run.log_metrics(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        skipped=pos.skipped)
        bar.update(1)
        epoch_done = pos.start >= len(train_items)
        if epoch_done:
            pos.epoch, pos.start, pos.order = pos.epoch + 1, 0, None
        if tc.save_every and (epoch_done or pos.step % tc.save_every == 0):
            state = checkpoint_state(accelerator, pos, opt, sched, order_rng, model=model)
            path = save_checkpoint(accelerator, model, tok, run.checkpoints / f"step-{pos.step:06d}", tc.lr,
                                   extra=lambda tmp: torch.save(state, tmp / "state.pt"))
            drop_older_states(accelerator, run.checkpoints, path)
            run.info(f"step {pos.step}: checkpoint -> {path}")
    bar.close()
    check_trainable(pos.skipped, pos.step, "rm", tc.lr, dc.train)
    run.info(f"done: {pos.step} steps, {pos.skipped} skipped (non-finite loss or gradient)")
    run.close()
    model = accelerator.unwrap_model(scorer).model
    if is_sharded(model):  # rank 0 normalises, saves and evaluates a plain copy of the gathered weights
        model = unsharded_copy(dev, model, cfg.output_dir, tc.lr)
        if model is None:
            accelerator.wait_for_everyone()
            return Path(cfg.output_dir) / "model"
    model.eval()
    check_finite_weights(model, cfg.output_dir, tc.lr)  # never save (or normalise) a broken model

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
    run.log_metrics({"step": pos.step, **{f"norm_{k}": v for k, v in norm.items() if k != "truncation"}})

    # 6. save + held-out evaluation -----------------------------------------
    final = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        save_and_evaluate(cfg, model, tok, train_items, val_items, stats, norm, pos.step, rt, run)
    accelerator.wait_for_everyone()
    return final


def load_data(cfg: RMConfig, tok, run, accelerator) -> tuple[list, list, list, RankingTruncation]:
    """(train rankings, held-out rankings) tokenized, the demonstrations for the bias, truncation counts."""
    tc, dc = cfg.train, cfg.data
    rankings = require_rows(_load_rankings_counted(dc.train, dc.errors, run.info), dc.train, "ranking")
    if dc.val:
        train_r, val_r = rankings, _load_rankings_counted(dc.val, dc.errors, run.info)
    elif dc.val_fraction > 0 and len(rankings) > 1:
        train_r, val_r = split_validation(rankings, dc.val_fraction, tc.seed)
    else:
        train_r, val_r = rankings, []
    # a demonstrations file that is given but empty would leave the bias silently unnormalized
    demos = (require_rows(load_demonstrations(dc.demonstrations), dc.demonstrations, "demonstration")
             if dc.demonstrations else [])
    stats = RankingTruncation()
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
    return train_items, val_items, demos, stats


def save_and_evaluate(cfg: RMConfig, model, tok, train_items: list, val_items: list, stats: RankingTruncation,
                      norm: dict, steps: int, rt, run) -> None:
    """Write ``model/`` (merged, and ``adapter/``, with LoRA), evaluate the held-out rankings, ``summary.json``."""
    import json

    from instructrl.io import atomic_write_text
    from instructrl.lora import merged_copy, save_adapter

    final = Path(cfg.output_dir) / "model"
    tc = cfg.train
    if tc.lora.enabled:  # later stages (PPO's value model, rm eval) read a plain HF folder
        save_reward_model(merged_copy(model), tok, final)
        save_adapter(model, Path(cfg.output_dir) / "adapter")
    else:
        save_reward_model(model, tok, final)
    run.info(f"saved reward model -> {final}")
    if val_items:
        m = evaluate(RewardScorer(model), val_items, model.config.pad_token_id, cfg.output_dir,
                     tc.micro_batch_size, rt.autocast, rt.device, seed=tc.seed)
        run.log_metrics({"step": steps, "val_accuracy": m["overall"]["accuracy"],
                         "val_log_loss": m["overall"]["log_loss"]})
        table = format_metrics(m)
        run.info("held-out evaluation:\n" + table)
        print(f"[rm] held-out comparisons ({cfg.output_dir}/eval.json, calibration.png):\n{table}")
    atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(
        {"model": str(final), "steps": steps, "train_rankings": len(train_items), "val_rankings": len(val_items),
         "truncation": stats.summary(), "normalization": norm}, indent=2))
    print(f"[rm] saved reward model -> {final}")


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
