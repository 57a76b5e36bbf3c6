"""Supervised fine-tuning on demonstrations (InstructGPT §3.5, "Supervised fine-tuning").

The paper trains 16 epochs with cosine learning-rate decay and residual dropout
0.2, and picks the final SFT model by the reward-model score on a validation
set (it notes SFT overfits on validation loss after one epoch, yet more epochs
help RM score and human preference). Loss is on response tokens only.

``train_sft(cfg)`` is the whole loop, top to bottom:

1. set-up: accelerator (1..N processes), seed, run folder
2. data: load + tokenize demonstrations (truncation counted), split validation
3. model: load, residual dropout, optimizer, cosine schedule with warmup
4. epochs: global batches -> this process's share -> micro-batches; the loss is
   normalised by the token count of the whole optimizer step across every
   micro-batch and process, so any split gives the full-batch gradient
5. after each epoch: validation loss, checkpoint (atomic)
6. selection: best epoch by validation loss, or by mean RM score of sampled
   responses on validation prompts when ``select.reward_model`` is given
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from instructrl.config import check, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.data import Demonstration, load_demonstrations
from instructrl.formatting import Example, TruncationStats, build_example, collate_examples
from instructrl.io import RunDir, atomic_dir, atomic_write_text
from instructrl.core.losses import sft_loss


@dataclass
class SFTData:
    train: str = param("", "demonstrations JSONL (docs/data-formats.md); required")
    val: str = param("", "validation demonstrations JSONL; empty = hold out val_fraction of train")
    val_fraction: float = param(0.1, "share of train held out for validation when val is empty")
    max_length: int = param(512, "max tokens of prompt + response; longer examples are truncated (prompt from the left)")
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens")

    def validate(self):
        check(bool(self.train), "data.train: a demonstrations file is required (data.train=PATH)")
        check(0 < self.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        check(self.max_length > self.min_prompt_tokens, "data.max_length must exceed data.min_prompt_tokens")


@dataclass
class SFTTrain:
    epochs: int = param(16, "passes over the demonstrations (paper: 16)")
    lr: float = param(1e-5, "peak learning rate")
    warmup_ratio: float = param(0.03, "share of optimizer steps spent in linear warmup")
    min_lr_ratio: float = param(0.0, "cosine decays to lr * min_lr_ratio")
    batch_size: int = param(8, "global batch: sequences per optimizer step, over all processes")
    micro_batch_size: int = param(8, "sequences per forward pass in one process (memory knob)")
    weight_decay: float = param(0.0, "AdamW weight decay")
    max_grad_norm: float = param(1.0, "gradient clipping norm; 0 disables")
    # The paper's 0.2 suits a model pretrained with dropout. SmolLM2 was not: switching 0.2 on raised
    # its loss on our demonstrations from 3.50 to 11.17 nats/token (measured), i.e. it erased the
    # pretrained model. So the default is off; set 0.1-0.2 for models pretrained with dropout.
    residual_dropout: float = param(0.0, "dropout on each attention and MLP output before the residual add (paper: 0.2; see comment)")
    precision: Precision = precision_field()
    seed: int = param(0, "seed for shuffling, dropout and initialisation")
    train_prompt: bool = param(False, "also train on prompt tokens (the paper trains on responses only)")
    trainable_layers: int = param(-1, "train only the top N transformer blocks (+ final norm); -1 = all (the paper)")

    def validate(self):
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.trainable_layers >= -1, "train.trainable_layers must be -1 (all) or >= 0")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "train.batch_size and micro_batch_size must be >= 1")
        check(0 <= self.residual_dropout < 1, "train.residual_dropout must be in [0, 1)")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")


@dataclass
class SFTSelect:
    metric: Literal["val_loss", "rm_score"] = param(
        "val_loss", "how the final epoch is chosen: lowest validation loss, or highest mean RM score (the paper's way)"
    )
    reward_model: str = param("", "reward model folder, needed for metric=rm_score")
    num_prompts: int = param(32, "validation prompts sampled per checkpoint for metric=rm_score")
    max_new_tokens: int = param(64, "response length limit when sampling for metric=rm_score")

    def validate(self):
        check(self.metric != "rm_score" or bool(self.reward_model),
              "select.metric=rm_score needs select.reward_model=PATH (a trained reward model folder)")


@dataclass
class SFTConfig:
    model: str = param("default", "base model: 'default' (embedded SmolLM2-135M-Instruct), a folder, or a hub id")
    output_dir: str = param("runs/sft", "run folder: config.yaml, metrics.jsonl, log.txt, checkpoints/, model/")
    device: str = device_field()
    data: SFTData = param(SFTData(), "demonstration data")
    train: SFTTrain = param(SFTTrain(), "optimisation")
    select: SFTSelect = param(SFTSelect(), "checkpoint selection")


# ---------------------------------------------------------------------------
# Pieces the loop uses
# ---------------------------------------------------------------------------


def add_residual_dropout(model: torch.nn.Module, p: float) -> list:
    """Dropout on every attention and MLP block output, before it joins the residual stream.

    GPT-style "residual dropout" (the paper uses 0.2). Llama-family models have no
    such layer, so it is added with forward hooks; hooks are not saved with the
    checkpoint. Active only in ``model.train()`` mode. Returns the hook handles.
    """
    if p <= 0:
        return []
    handles = []

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, p, True)

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "mlp", "attn"):
            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError(f"residual dropout: found no attention/MLP blocks in {type(model).__name__}")
    return handles


def tokenize_demonstrations(tokenizer, demos: list[Demonstration], cfg: SFTData, stats: TruncationStats) -> list[Example]:
    return [build_example(tokenizer, d.messages, d.response, cfg.max_length, cfg.min_prompt_tokens, stats) for d in demos]


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(items) * fraction))
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


@torch.no_grad()
def validation_loss(model, examples: list[Example], pad_id: int, micro: int, accelerator, autocast) -> float:
    """Token-weighted mean NLL of the response tokens over all of ``examples`` (all processes)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    nll, tokens = torch.zeros(()), torch.zeros(())
    mine = examples[rank::world]
    for i in range(0, len(mine), micro):
        b = collate_examples(mine[i:i + micro], pad_id)
        with autocast():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        _, st = sft_loss(logits, b.input_ids, b.loss_mask)
        nll += st["nll_sum"].float()
        tokens += st["tokens"].float()
    nll, tokens = accelerator.reduce(nll, "sum"), accelerator.reduce(tokens, "sum")
    model.train()
    return (nll / tokens.clamp(min=1)).item()


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the folder of the selected model (``output_dir/model``)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from instructrl.models import freeze_lower_layers, load_causal_lm, load_tokenizer, make_adamw

    # 1. set-up ------------------------------------------------------------
    rt = make_runtime(cfg.device, cfg.train.precision)
    cfg.train.precision = rt.precision  # saved resolved, so the run folder says what ran
    accelerator = Accelerator(cpu=rt.device.type == "cpu")
    set_seed(cfg.train.seed)
    run = RunDir(cfg.output_dir, is_main=accelerator.is_main_process)
    run.save_config(cfg)
    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {world} processes")
    per_proc = tc.batch_size // world
    dev = accelerator.device

    autocast = rt.autocast

    # 2. data --------------------------------------------------------------
    tok = load_tokenizer(cfg.model)
    stats = TruncationStats()
    demos = load_demonstrations(cfg.data.train)
    if cfg.data.val:
        train_demos, val_demos = demos, load_demonstrations(cfg.data.val)
    else:
        train_demos, val_demos = split_validation(demos, cfg.data.val_fraction, tc.seed)
    train_ex = tokenize_demonstrations(tok, train_demos, cfg.data, stats)
    val_ex = tokenize_demonstrations(tok, val_demos, cfg.data, stats)
    run.info(f"data: {len(train_ex)} train / {len(val_ex)} validation demonstrations; truncation: {stats.summary()}")
    if stats.prompts_cut or stats.responses_cut:
        accelerator.print(f"[sft] truncation: {stats.summary()}")

    # 3. model, optimizer, schedule -----------------------------------------
    model = load_causal_lm(cfg.model)
    model.config.use_cache = False
    add_residual_dropout(model, tc.residual_dropout)
    freeze_lower_layers(model, tc.trainable_layers)
    model.train()
    opt = make_adamw([p for p in model.parameters() if p.requires_grad], tc.lr, tc.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = cosine_schedule(opt, max(1, round(tc.warmup_ratio * total_steps)), total_steps, tc.min_lr_ratio)
    model, opt = accelerator.prepare(model, opt)
    order_rng = random.Random(tc.seed)  # the same order on every process

    # 4. epochs ------------------------------------------------------------
    history = []
    step = 0
    bar = tqdm(total=total_steps, desc="sft", disable=not accelerator.is_local_main_process)
    for epoch in range(1, tc.epochs + 1):
        order = list(range(len(train_ex)))
        order_rng.shuffle(order)
        for start in range(0, len(order), tc.batch_size):
            t0 = time.perf_counter()
            global_batch = [train_ex[i] for i in order[start:start + tc.batch_size]]
            mine = global_batch[rank::world]
            micro = [mine[i:i + tc.micro_batch_size] for i in range(0, len(mine), tc.micro_batch_size)]
            batches = [collate_examples(m, tok.pad_token_id, tc.train_prompt) for m in micro]
            if not batches:  # a short last batch left this process nothing: join the gradient sync with weight 0
                batches = [collate_examples(global_batch[:1], tok.pad_token_id, tc.train_prompt)]
                batches[0].loss_mask.zero_()
            # Normaliser = trained tokens in the whole step, all processes: exact full-batch gradient.
            local_tokens = sum(b.loss_mask.sum() for b in batches)
            step_tokens = accelerator.reduce(local_tokens.to(dev), "sum").item()
            nll_sum = 0.0
            for j, b in enumerate(batches):
                sync = accelerator.no_sync(model) if j < len(batches) - 1 else _null()
                with sync:
                    with autocast():
                        logits = model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev)).logits
                    loss, st = sft_loss(logits, b.input_ids.to(dev), b.loss_mask.to(dev), num_tokens=step_tokens)
                    # DDP averages gradients over processes; scale back up to a sum.
                    accelerator.backward(loss * world)
                nll_sum += st["nll_sum"].item()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm) if tc.max_grad_norm > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            n_tok = accelerator.reduce(torch.tensor(float(sum(int(b.attention_mask.sum()) for b in batches))), "sum").item()
            train_loss = accelerator.reduce(torch.tensor(nll_sum), "sum").item() / max(step_tokens, 1)
            row = {"step": step, "epoch": epoch, "loss": train_loss, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": n_tok / dt}
            run.log_metrics(row)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{n_tok / dt:.0f}")
            bar.update(1)

        # 5. validation + checkpoint --------------------------------------
        # The unwrapped module: a DDP forward would wait for processes with no validation share.
        vloss = validation_loss(accelerator.unwrap_model(model), val_ex, tok.pad_token_id, tc.micro_batch_size, accelerator, autocast)
        ckpt = run.checkpoints / f"epoch-{epoch}"
        if accelerator.is_main_process:
            with atomic_dir(ckpt) as tmp:
                accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
        accelerator.wait_for_everyone()
        entry = {"epoch": epoch, "step": step, "val_loss": vloss, "checkpoint": str(ckpt)}
        history.append(entry)
        run.log_metrics({"step": step, "epoch": epoch, "val_loss": vloss})
        run.info(f"epoch {epoch}: val_loss={vloss:.4f} -> {ckpt}")
        accelerator.print(f"[sft] epoch {epoch}: val_loss {vloss:.4f}")
    bar.close()

    # 6. selection ----------------------------------------------------------
    final = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        if cfg.select.metric == "rm_score":
            for entry in history:
                entry["rm_score"] = rm_score_checkpoint(entry["checkpoint"], val_demos, cfg.select, tc.seed)
                run.info(f"epoch {entry['epoch']}: mean RM score {entry['rm_score']:.4f}")
            best = max(history, key=lambda e: e["rm_score"])
        else:
            best = min(history, key=lambda e: e["val_loss"])
        import shutil

        with atomic_dir(final) as tmp:
            shutil.copytree(best["checkpoint"], tmp, dirs_exist_ok=True)
        atomic_write_text(Path(cfg.output_dir) / "selection.json",
                          json.dumps({"metric": cfg.select.metric, "best": best, "history": history}, indent=2))
        run.info(f"selected epoch {best['epoch']} by {cfg.select.metric} -> {final}")
        print(f"[sft] selected epoch {best['epoch']} by {cfg.select.metric} -> {final}")
    accelerator.wait_for_everyone()
    return final


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def rm_score_checkpoint(checkpoint: str, val_demos: list[Demonstration], sel: SFTSelect, seed: int) -> float:
    """Mean reward-model score of responses sampled from ``checkpoint`` on validation prompts.

    This is how InstructGPT selects its SFT model (§3.5): validation loss keeps
    rising after epoch 1 while RM score and human preference keep improving.
    """
    from instructrl.formatting import build_example, pad
    from instructrl.generation import generate_texts
    from instructrl.models import load_causal_lm, load_tokenizer
    from instructrl.reward_model import load_reward_model, score

    tok = load_tokenizer(checkpoint)
    policy = load_causal_lm(checkpoint)
    rm = load_reward_model(sel.reward_model).eval()
    prompts = [d.messages for d in val_demos[: sel.num_prompts]]
    responses = [r[0] for r in generate_texts(policy, tok, prompts, sel.max_new_tokens, seed=seed, desc="rm-score samples")]
    # The RM reads the same token layout the policy emits (formatting's one rule).
    seqs = [build_example(tok, m, r or " ", 10**6).input_ids for m, r in zip(prompts, responses)]
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            ids, mask = pad(seqs[i:i + 8], tok.pad_token_id, "right")
            scores.append(score(rm, ids, mask).float())
    return torch.cat(scores).mean().item()
