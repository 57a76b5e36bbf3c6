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
5. after each epoch: validation loss, checkpoint (atomic; with its optimizer, schedule
   and RNG state, so ``--resume`` continues from the last finished epoch exactly)
6. selection: best epoch by validation loss, or by mean RM score of sampled
   responses on validation prompts when ``select.reward_model`` is given (sampled by
   the ``engine`` section's engine: the built-in sampler or vLLM, docs/vllm.md)

With ``train.lora.rank`` > 0 (docs/lora.md) only LoRA adapters train, checkpoints hold the
adapter alone, ``model/`` is the selected epoch merged into a plain Hugging Face folder and
``adapter/`` its adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from instructrl.config import check, overwrite_field, param
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.tracking import TrackerKind, tracker_field
from instructrl.data import Demonstration, load_demonstrations
from instructrl.engines import EngineSettings
from instructrl.formatting import Example, TruncationStats, build_example, collate_examples
from instructrl.io import DataError, RunDir, atomic_dir, atomic_write_text
from instructrl.core.losses import sft_loss
from instructrl.lora import LoraSettings
from instructrl.runtime import Runtime
from instructrl.train.common import (SHARDING_HELP, Position, Sharding, accumulate, check_trainable,
                                     checkpoint_state, cosine_schedule, drop_older_states, is_sharded, optimizer_step,
                                     prepare_model, reshard, restore, resume_checkpoint, same_count, save_checkpoint,
                                     setup_accelerator, split_global_batch, split_validation)

# Tests: SIGKILL this process right after optimizer step N (a 2-process run cut short, for --resume).
KILL_ENV = "INSTRUCTRL_SFT_KILL_AFTER_STEP"


@dataclass
class SFTData:
    train: str = param("", "demonstrations JSONL (docs/data-formats.md); required")
    val: str = param("", "validation demonstrations JSONL; empty = hold out val_fraction of train")
    val_fraction: float = param(0.1, "share of train held out for validation when val is empty", min=0, max=1,
                                 min_exclusive=True, max_exclusive=True)
    max_length: int = param(512, "max tokens of prompt + response; longer examples are truncated (prompt from the left)", min=1)
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens", min=0)

    def validate(self):
        check(bool(self.train), "data.train: a demonstrations file is required (data.train=PATH)")
        check(0 < self.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        check(self.max_length > self.min_prompt_tokens, "data.max_length must exceed data.min_prompt_tokens")


@dataclass
class SFTTrain:
    epochs: int = param(16, "passes over the demonstrations (paper: 16)", min=1)
    lr: float = param(1e-5, "peak learning rate", min=0, min_exclusive=True)
    warmup_ratio: float = param(0.03, "share of optimizer steps spent in linear warmup", min=0, max=1,
                                 max_exclusive=True)
    min_lr_ratio: float = param(0.0, "cosine decays to lr * min_lr_ratio", min=0, max=1)
    batch_size: int = param(8, "global batch: sequences per optimizer step, over all processes", min=1)
    micro_batch_size: int = param(8, "sequences per forward pass in one process (memory knob)", min=1)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = param(1.0, "gradient clipping norm; 0 disables", min=0)
    # The paper's 0.2 suits a model pretrained with dropout. SmolLM2 was not: switching 0.2 on raised
    # its loss on our demonstrations from 3.50 to 11.17 nats/token (measured), i.e. it erased the
    # pretrained model. So the default is off; set 0.1-0.2 for models pretrained with dropout.
    residual_dropout: float = param(0.0, "dropout on each attention and MLP output before the residual add (paper: 0.2; see comment)", min=0,
                                     max=1, max_exclusive=True)
    precision: Precision = precision_field()
    seed: int = param(0, "seed for shuffling, dropout and initialisation", min=0, max=2**32 - 1)
    train_prompt: bool = param(False, "also train on prompt tokens (the paper trains on responses only)")
    trainable_layers: int = param(-1, "train only the top N transformer blocks (+ final norm); -1 = all (the paper); "
                                      "with train.lora: adapters in the top N blocks only", min=-1)
    lora: LoraSettings = param(LoraSettings(), "LoRA adapters instead of full fine-tuning (docs/lora.md)")
    sharding: Sharding = param("none", SHARDING_HELP + " (docs/pipeline.md, \"Sharded training\")")

    def validate(self):
        check(self.epochs >= 1, "train.epochs must be >= 1")
        # LoRA's adapters are small and its saves (adapter, merged copy) read plain tensors: nothing to gain.
        check(not (self.sharding == "fsdp2" and self.lora.enabled),
              "train.sharding=fsdp2 with train.lora.rank > 0: sharding is for full fine-tuning (LoRA trains "
              "a small adapter and its saves need the unsharded base); use one of them")
        check(self.trainable_layers >= -1, "train.trainable_layers must be -1 (all) or >= 0")
        check(not (self.lora.enabled and self.trainable_layers == 0),
              "train.trainable_layers=0 with train.lora.rank > 0 leaves no block for the adapters; use -1 or N >= 1")
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
    num_prompts: int = param(32, "validation prompts sampled per checkpoint for metric=rm_score", min=1)
    max_new_tokens: int = param(64, "response length limit when sampling for metric=rm_score", min=1)

    def validate(self):
        check(self.metric != "rm_score" or bool(self.reward_model),
              "select.metric=rm_score needs select.reward_model=PATH (a trained reward model folder)")


@dataclass
class SFTConfig:
    model: str = param("default", "base model: 'default' (embedded SmolLM2-135M-Instruct), a folder, or a hub id")
    output_dir: str = param("runs/sft", "run folder: config.yaml, metrics.jsonl, log.txt, checkpoints/, model/")
    overwrite: bool = overwrite_field()
    tracker: TrackerKind = tracker_field()
    resume: bool = param(False, "continue from the last finished epoch's checkpoint in output_dir")
    device: str = device_field()
    data: SFTData = param(SFTData(), "demonstration data")
    train: SFTTrain = param(SFTTrain(), "optimisation")
    select: SFTSelect = param(SFTSelect(), "checkpoint selection")
    engine: EngineSettings = param(
        EngineSettings(name="auto"), "the sampler of select.metric=rm_score's responses: auto = vLLM where it is "
                                     "importable, else the built-in sampler (docs/vllm.md); unused for val_loss")


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


def load_trainable(cfg: "SFTConfig", ckpt: Path | None):
    """The model to train: base (or a full checkpoint), residual dropout, then LoRA or frozen lower blocks."""
    from instructrl.lora import apply_lora, load_adapter
    from instructrl.models import freeze_lower_layers, load_causal_lm

    tc = cfg.train
    model = load_causal_lm(str(ckpt) if ckpt is not None and not tc.lora.enabled else cfg.model)
    model.config.use_cache = False
    add_residual_dropout(model, tc.residual_dropout)
    if tc.lora.enabled:
        apply_lora(model, tc.lora, tc.trainable_layers)
        if ckpt is not None:
            load_adapter(model, ckpt / "adapter")
    else:
        freeze_lower_layers(model, tc.trainable_layers)
    model.train()
    return model


def load_checkpoint_lm(checkpoint: str | Path, base: str):
    """A checkpoint's model as a plain causal LM: the folder itself, or ``base`` + its adapter, merged."""
    from instructrl.lora import load_adapter, merged_copy
    from instructrl.models import load_causal_lm

    adapter = Path(checkpoint) / "adapter"
    if adapter.is_dir():
        return merged_copy(load_adapter(load_causal_lm(base), adapter))
    return load_causal_lm(str(checkpoint))


def write_selected(cfg: "SFTConfig", best: dict, tok) -> Path:
    """``output_dir/model`` = the selected checkpoint as a plain HF folder (merged with LoRA, and the
    adapter also in ``output_dir/adapter``). Main process only."""
    out, ckpt = Path(cfg.output_dir), Path(best["checkpoint"])
    if cfg.train.lora.enabled:
        model = load_checkpoint_lm(ckpt, cfg.model)
        with atomic_dir(out / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        with atomic_dir(out / "adapter") as tmp:
            shutil.copytree(ckpt / "adapter", tmp, dirs_exist_ok=True)
    else:
        with atomic_dir(out / "model") as tmp:
            shutil.copytree(ckpt, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("state.pt"))
    return out / "model"


def tokenize_demonstrations(tokenizer, demos: list[Demonstration], cfg: SFTData, stats: TruncationStats) -> list[Example]:
    return [build_example(tokenizer, d.messages, d.response, cfg.max_length, cfg.min_prompt_tokens, stats) for d in demos]


def load_split(cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration]]:
    """(train, validation) demonstrations; a split that leaves either side empty is a DataError naming the file."""
    demos = load_demonstrations(cfg.data.train)
    if not demos:
        raise DataError(cfg.data.train, None, None, "no demonstrations (empty file)")
    if cfg.data.val:
        train, val = demos, load_demonstrations(cfg.data.val)
        if not val:
            raise DataError(cfg.data.val, None, None, "no validation demonstrations (empty file)")
        return train, val
    train, val = split_validation(demos, cfg.data.val_fraction, cfg.train.seed)
    if not train:
        raise DataError(cfg.data.train, None, None,
                        f"{len(demos)} demonstration(s) leave none to train on after holding out {len(val)} for "
                        f"validation (data.val_fraction={cfg.data.val_fraction}); add data or set data.val=PATH")
    return train, val


@torch.no_grad()
def validation_loss(model, examples: list[Example], pad_id: int, micro: int, accelerator, autocast) -> float:
    """Token-weighted mean NLL of the response tokens over all of ``examples`` (all processes)."""
    model.eval()
    dev = accelerator.device
    nll, tokens = torch.zeros((), device=dev), torch.zeros((), device=dev)
    mine = split_global_batch(examples, accelerator)
    n = math.ceil(len(mine) / micro)
    for j in range(same_count(accelerator, model, n)):  # sharded: padding passes join the all-gathers
        b = collate_examples(mine[j * micro:(j + 1) * micro] if j < n else examples[:1], pad_id)
        with autocast():
            logits = model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev)).logits
        if j >= n:
            continue
        _, st = sft_loss(logits, b.input_ids.to(dev), b.loss_mask.to(dev))
        nll += st["nll_sum"].float()
        tokens += st["tokens"].float()
    nll, tokens = accelerator.reduce(nll, "sum"), accelerator.reduce(tokens, "sum")
    if is_sharded(model):  # FSDP2 keeps the root's parameters gathered after a forward with no backward
        reshard(model)
    model.train()
    return (nll / tokens.clamp(min=1)).item()


def micro_batches(accelerator, global_batch: list[Example], micro: int, pad_id: int, train_prompt: bool,
                  count: Callable[[int], int] = lambda n: n) -> list:
    """This process's share of ``global_batch`` as collated micro-batches (never empty), padded with
    weight-0 batches to ``count(n)`` (sharded: the same number on every process)."""
    mine = split_global_batch(global_batch, accelerator)
    batches = [collate_examples(mine[i:i + micro], pad_id, train_prompt) for i in range(0, len(mine), micro)]
    # A short last batch may leave this process nothing, or fewer passes than the others: join the
    # gradient sync (and FSDP2's collectives) with weight 0.
    for _ in range(len(batches), max(1, count(len(batches)))):
        batches.append(collate_examples(global_batch[:1], pad_id, train_prompt))
        batches[-1].loss_mask.zero_()
    return batches


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT; returns the folder of the selected model (``output_dir/model``)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from instructrl.engines import resolve_engine
    from instructrl.lora import check_model_targets
    from instructrl.models import load_tokenizer, make_adamw, resolve_model

    # 1. set-up ------------------------------------------------------------
    rt = make_runtime(cfg.device, cfg.train.precision)
    cfg.train.precision = rt.precision  # saved resolved, so the run folder says what ran
    cfg.engine, engine_why = resolve_engine(cfg.engine)  # auto -> vllm or hf here, saved resolved too
    tc = cfg.train
    accelerator = setup_accelerator(rt, tc.batch_size)
    set_seed(tc.seed)
    run = RunDir.start(cfg.output_dir, cfg, resume=cfg.resume, overwrite=cfg.overwrite,
                       outputs=("model", "adapter", "selection.json"), is_main=accelerator.is_main_process)
    ckpt = resume_checkpoint(cfg.resume, run)
    dev = rt.device

    # 2. data --------------------------------------------------------------
    tok = load_tokenizer(cfg.model)
    stats = TruncationStats()
    train_demos, val_demos = load_split(cfg)
    train_ex = tokenize_demonstrations(tok, train_demos, cfg.data, stats)
    val_ex = tokenize_demonstrations(tok, val_demos, cfg.data, stats)
    run.info(f"data: {len(train_ex)} train / {len(val_ex)} validation demonstrations; truncation: {stats.summary()}")
    if stats.prompts_cut or stats.responses_cut:
        accelerator.print(f"[sft] truncation: {stats.summary()}")

    # 3. model, optimizer, schedule (+ resume) -------------------------------
    if cfg.select.metric == "rm_score":  # the RM is read after the last epoch: a bad path fails now
        from instructrl.reward_model import check_reward_model

        check_reward_model(cfg.select.reward_model, "select.reward_model")
    if tc.lora.enabled:  # a bad target_modules fails here, before the weights are read
        check_model_targets(resolve_model(cfg.model), tc.lora)
    model = load_trainable(cfg, ckpt)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.info(f"model: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
             f"parameters trained" + (f" (LoRA rank {tc.lora.rank} on {','.join(tc.lora.target_modules)})"
                                      if tc.lora.enabled else ""))
    model, opt = prepare_model(accelerator, model, lambda ps: make_adamw(ps, tc.lr, tc.weight_decay),
                               tc.sharding, run.info)
    steps_per_epoch = math.ceil(len(train_ex) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = cosine_schedule(opt, max(1, round(tc.warmup_ratio * total_steps)), total_steps, tc.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    order_rng = random.Random(tc.seed)  # the same order on every process
    pos, history = Position(), []
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    if ckpt is not None:
        pos, st = restore(accelerator, ckpt, opt, sched, order_rng, run, model=model)
        history = st["history"]
    step, skipped = pos.step, pos.skipped

    # 4. epochs ------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not accelerator.is_local_main_process)
    for epoch in range(pos.epoch, tc.epochs + 1):
        order = list(range(len(train_ex)))
        order_rng.shuffle(order)
        skipped_before = skipped
        for start in range(0, len(order), tc.batch_size):
            t0 = time.perf_counter()
            global_batch = [train_ex[i] for i in order[start:start + tc.batch_size]]
            batches = micro_batches(accelerator, global_batch, tc.micro_batch_size, tok.pad_token_id, tc.train_prompt,
                                    count=lambda n: same_count(accelerator, model, n))
            # Normaliser = trained tokens in the whole step, all processes: exact full-batch gradient.
            local_tokens = sum(b.loss_mask.sum() for b in batches)
            step_tokens = accelerator.reduce(local_tokens.to(dev), "sum").item()

            def loss_fn(b):
                with rt.autocast():
                    logits = model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev)).logits
                return sft_loss(logits, b.input_ids.to(dev), b.loss_mask.to(dev), num_tokens=step_tokens)

            nll_sum = sum(st["nll_sum"].item() for st in accumulate(accelerator, model, batches, loss_fn))
            train_loss = accelerator.reduce(torch.tensor(nll_sum, device=dev), "sum").item() / max(step_tokens, 1)
            res = optimizer_step(accelerator, params, opt, sched, tc.max_grad_norm, train_loss)
            skipped += res.skipped
            step += 1
            dt = time.perf_counter() - t0
            n_tok = accelerator.reduce(torch.tensor(float(sum(int(b.attention_mask.sum()) for b in batches)),
                                                    device=dev), "sum").item()
            row = {"step": step, "epoch": epoch, "loss": train_loss, "lr": sched.get_last_lr()[0],
                   "grad_norm": res.grad_norm, "tokens_per_s": n_tok / dt, "skipped_steps": skipped}
            run.log_metrics(row)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{n_tok / dt:.0f}", skipped=skipped)
            bar.update(1)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        check_trainable(skipped - skipped_before, steps_per_epoch, f"sft epoch {epoch}", tc.lr, cfg.data.train)

        # 5. validation + checkpoint --------------------------------------
        # The unwrapped module: a DDP forward would wait for processes with no validation share.
        vloss = validation_loss(accelerator.unwrap_model(model), val_ex, tok.pad_token_id, tc.micro_batch_size,
                                accelerator, rt.autocast)
        path = run.checkpoints / f"epoch-{epoch}"
        history.append({"epoch": epoch, "step": step, "val_loss": vloss, "checkpoint": str(path)})
        state = checkpoint_state(accelerator, Position(step, epoch + 1, 0, None, skipped), opt, sched, order_rng,
                                 model=model, history=history)
        save_checkpoint(accelerator, model, tok, path, tc.lr, extra=lambda tmp: torch.save(state, tmp / "state.pt"))
        drop_older_states(accelerator, run.checkpoints, path)
        run.log_metrics({"step": step, "epoch": epoch, "val_loss": vloss})
        run.info(f"epoch {epoch}: val_loss={vloss:.4f} -> {path}")
        accelerator.print(f"[sft] epoch {epoch}: val_loss {vloss:.4f}")
    bar.close()
    run.info(f"done: {step} steps, {skipped} skipped (non-finite loss or gradient)")
    run.close()

    # 6. selection ----------------------------------------------------------
    final = Path(cfg.output_dir) / "model"
    if accelerator.is_main_process:
        if cfg.select.metric == "rm_score":
            run.info(f"selection samples: {engine_why}")
            for entry in history:
                entry["rm_score"] = rm_score_checkpoint(entry["checkpoint"], cfg.model, val_demos, cfg.select,
                                                        tc.seed, rt, cfg.engine)
                run.info(f"epoch {entry['epoch']}: mean RM score {entry['rm_score']:.4f}")
            best = max(history, key=lambda e: e["rm_score"])
        else:
            best = min(history, key=lambda e: e["val_loss"])
        write_selected(cfg, best, tok)
        atomic_write_text(Path(cfg.output_dir) / "selection.json",
                          json.dumps({"metric": cfg.select.metric, "best": best, "history": history}, indent=2))
        run.info(f"selected epoch {best['epoch']} by {cfg.select.metric} -> {final}")
        print(f"[sft] selected epoch {best['epoch']} by {cfg.select.metric} -> {final}")
    accelerator.wait_for_everyone()
    return final


def rm_score_checkpoint(checkpoint: str, base: str, val_demos: list[Demonstration], sel: SFTSelect, seed: int,
                        rt: Runtime, engine: EngineSettings | None = None) -> float:
    """Mean reward-model score of responses sampled from ``checkpoint`` on validation prompts.

    This is how InstructGPT selects its SFT model (§3.5): validation loss keeps
    rising after epoch 1 while RM score and human preference keep improving.
    ``engine`` samples them (None or hf: the built-in sampler, as before engines existed; vllm: the
    process's engine, started once and synced with each checkpoint's weights).
    """
    from instructrl.formatting import pad
    from instructrl.generation import generate_texts
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import load_reward_model, score

    tok = load_tokenizer(base if (Path(checkpoint) / "adapter").is_dir() else checkpoint)  # a LoRA checkpoint: base's
    policy = load_checkpoint_lm(checkpoint, base).to(rt.device)
    rm = load_reward_model(sel.reward_model).to(rt.device).eval()
    prompts = [d.messages for d in val_demos[: sel.num_prompts]]
    responses = [r[0] for r in generate_texts(policy, tok, prompts, sel.max_new_tokens, seed=seed,
                                              precision=rt.precision, desc="rm-score samples", engine=engine)]
    # The RM reads the same token layout the policy emits: formatting's one rule (response + EOS).
    seqs = [build_example(tok, m, r or " ", 10**6).input_ids for m, r in zip(prompts, responses)]
    scores = []
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            ids, mask = pad(seqs[i:i + 8], tok.pad_token_id, "right")
            with rt.autocast():
                scores.append(score(rm, ids.to(rt.device), mask.to(rt.device)).float().cpu())
    return torch.cat(scores).mean().item()
