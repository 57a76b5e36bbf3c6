"""Direct preference optimisation on rankings (Rafailov et al. 2023; docs/dpo.md).

DPO trains the SFT policy directly on comparisons, with no reward model and no sampling: the
implicit reward r(x, y) = β log π_θ(y|x)/π_ref(y|x) of the chosen response is pushed above that of
the rejected one. ``train.loss`` picks the objective (core/losses.py):

* ``dpo``      pairwise DPO, eq. 7; a K-ranking gives its C(K,2) untied pairs, each weighted 1/C(K,2)
               (the weighting of the K-wise RM loss, InstructGPT eq. 1)
* ``ipo``      IPO (Azar et al. 2023, eq. 17) on the same pairs
* ``listwise`` Plackett-Luce DPO (DPO Appendix A.3; the ranking model is eq. 18): one term per ranking

Either way each of a ranking's K responses is one forward pass of the policy. The reference's
sequence log-probs are computed once per dataset, before training, with the frozen reference, and
cached in the run folder (``reference_logps.pt``): the reference model is then freed, and a
resumed run reuses the cache. ``train_dpo(cfg)`` reads top to bottom:

1. set-up: runtime, accelerator, seed, run folder
2. data: load rankings (pairwise rows allowed), tokenize (response tokens scored, formatting's rule)
3. reference log-probs: load the cache, or compute it with the reference and free the model
4. policy, optimizer, schedule; on resume the latest checkpoint's weights, optimizer, scheduler, RNG, position
5. steps: global batch of rankings -> this process's share -> micro-batches of whole rankings
6. checkpoints (every epoch, and every ``train.save_every`` steps); final ``model/``
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from instructrl.config import ConfigError, check, overwrite_field, param
from instructrl.core.losses import dpo_loss, ipo_loss, plackett_luce_dpo_loss, ranking_pairs, sequence_logprobs
from instructrl.data import Ranking, load_rankings
from instructrl.formatting import Example, TruncationStats, collate_examples, encode_prompt, encode_response, truncate
from instructrl.io import DataError, RunDir, atomic_write_text
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.tracking import TrackerKind, tracker_field
from instructrl.train.common import (SHARDING_HELP, Position, Sharding, accumulate, check_trainable, checkpoint_state,
                                     cosine_schedule, latest_checkpoint, load_state, optimizer_step,
                                     pad_with_tied_rankings, prepare_model, restore, save_checkpoint,
                                     setup_accelerator, split_global_batch)

CACHE = "reference_logps.pt"


@dataclass
class DPOData:
    train: str = param("", "rankings/pairs JSONL (docs/data-formats.md; HH-RLHF transcripts accepted); required")
    max_length: int = param(512, "max tokens of prompt + response; longer ones are truncated (prompt from the left)", min=1)
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens", min=0)
    errors: Literal["raise", "skip"] = param("raise", "bad rows: raise = stop at the first (file:line: field); "
                                                      "skip = leave them out, counted in the log")

    def validate(self):
        check(bool(self.train), "data.train: a rankings file is required (data.train=PATH)")
        check(self.max_length > self.min_prompt_tokens, "data.max_length must exceed data.min_prompt_tokens")


@dataclass
class DPOTrain:
    loss: Literal["dpo", "ipo", "listwise"] = param("dpo", "dpo = pairwise (eq. 7), ipo = Azar et al. 2023, "
                                                           "listwise = Plackett-Luce over the whole ranking")
    beta: float = param(0.1, "β: strength of the pull towards the reference (DPO paper: 0.1); IPO's τ", min=0,
                        min_exclusive=True)
    epochs: int = param(1, "passes over the rankings", min=1)
    lr: float = param(1e-6, "peak learning rate (DPO paper: 1e-6)", min=0, min_exclusive=True)
    warmup_ratio: float = param(0.1, "share of optimizer steps in linear warmup", min=0, max=1,
                                 max_exclusive=True)
    min_lr_ratio: float = param(1.0, "cosine decays to lr * min_lr_ratio; 1 = constant after warmup (the paper)", min=0, max=1)
    batch_size: int = param(64, "rankings per optimizer step, over all processes (DPO paper: 64 pairs)", min=1)
    micro_batch_size: int = param(16, "sequences per forward pass in one process; whole rankings are packed", min=1)
    weight_decay: float = param(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = param(1.0, "gradient clipping norm; 0 disables", min=0)
    precision: Precision = precision_field()
    seed: int = param(0, "seed for shuffling and dropout", min=0, max=2**32 - 1)
    save_every: int = param(0, "also checkpoint every N optimizer steps (0 = at the end of each epoch only)", min=0)
    sharding: Sharding = param("none", SHARDING_HELP + "; the reference log-probs are computed before, by rank 0 "
                                       "with the whole reference (docs/pipeline.md, \"Sharded training\")")

    def validate(self):
        check(self.beta > 0 and math.isfinite(self.beta), "train.beta must be a finite number > 0")
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "train.batch_size and micro_batch_size must be >= 1")
        check(0 <= self.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        check(self.save_every >= 0, "train.save_every must be >= 0")


@dataclass
class DPOConfig:
    model: str = param("default", "the SFT policy to train (causal LM folder); 'default' = embedded SmolLM2")
    reference: str = param("", "frozen reference policy; empty = the same as model (the DPO paper's π_ref = π_SFT)")
    output_dir: str = param("runs/dpo", "run folder: config.yaml, metrics.jsonl, log.txt, reference_logps.pt, "
                                        "checkpoints/, model/, summary.json")
    device: str = device_field()
    resume: bool = param(False, "continue from the latest checkpoint in output_dir (needs its reference_logps.pt)")
    overwrite: bool = overwrite_field()
    tracker: TrackerKind = tracker_field()
    data: DPOData = param(DPOData(), "comparison data")
    train: DPOTrain = param(DPOTrain(), "optimisation")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass
class DPOItem:
    """One ranking, tokenized; ``ref`` holds the reference log-probs of its K responses once known."""

    id: str
    examples: list[Example]  # K x (prompt + response + eos), response tokens scored
    ranks: list[int]         # 0 = best, ties equal
    ref: list[float] | None = None

    @property
    def k(self) -> int:
        return len(self.examples)


def tokenize(tok, rankings: list[Ranking], dc: DPOData, stats: TruncationStats) -> list[DPOItem]:
    """Prompt encoded once per ranking; each response by formatting's rule (build_example's truncate)."""
    out = []
    for r in rankings:
        p = encode_prompt(tok, r.messages)
        ex = [truncate(p, encode_response(tok, y), dc.max_length, dc.min_prompt_tokens, stats) for y in r.responses]
        out.append(DPOItem(r.id, ex, list(r.ranks)))
    return out


def load_items(cfg: DPOConfig, tok, log) -> list[DPOItem]:
    import warnings

    skipped: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below instead
        rankings = load_rankings(cfg.data.train, errors=cfg.data.errors, skipped=skipped)
    if skipped:
        log(f"{cfg.data.train}: skipped {len(skipped)} invalid rows (data.errors=skip); first: {skipped[0]}")
    if not rankings:
        raise DataError(cfg.data.train, None, None, "no rankings to train on")
    stats = TruncationStats()
    items = tokenize(tok, rankings, cfg.data, stats)
    log(f"data: {len(items)} rankings (K in {sorted({it.k for it in items})}, "
        f"{sum(len(r.pairs()) for r in rankings)} comparisons); truncation: {stats.summary()}")
    return items


def pack(items: list[DPOItem], max_sequences: int) -> list[list[DPOItem]]:
    """Whole rankings into groups of at most ``max_sequences`` sequences (a larger ranking goes alone)."""
    from instructrl.train.rm import pack_rankings

    return pack_rankings(items, max_sequences)


@dataclass
class PackedBatch:
    """Whole rankings in one forward pass; N = Σ K.  lm: [N, T] right-padded; group, ranks, ref: [N]."""

    lm: object
    group: torch.Tensor
    ranks: torch.Tensor
    ref: torch.Tensor


def collate(items: list[DPOItem], pad_id: int) -> PackedBatch:
    lm = collate_examples([e for it in items for e in it.examples], pad_id)
    group = torch.tensor([g for g, it in enumerate(items) for _ in range(it.k)], dtype=torch.long)
    ranks = torch.tensor([r for it in items for r in it.ranks], dtype=torch.long)
    ref = torch.tensor([x for it in items for x in (it.ref or [0.0] * it.k)], dtype=torch.float32)
    return PackedBatch(lm, group, ranks, ref)


def logps(model, b: PackedBatch, rt) -> torch.Tensor:
    """[N] log π(response | prompt) of every sequence, response tokens only (the SFT loss mask)."""
    dev = rt.device
    with rt.autocast():
        logits = model(input_ids=b.lm.input_ids.to(dev), attention_mask=b.lm.attention_mask.to(dev)).logits
    return sequence_logprobs(logits, b.lm.input_ids.to(dev), b.lm.loss_mask.to(dev))


@torch.no_grad()
def score_items(model, items: list[DPOItem], pad_id: int, micro: int, rt) -> list[list[float]]:
    """log π(y | x) of every response of every ranking (same order), batched by length."""
    where = {id(it): i for i, it in enumerate(items)}
    out: list[list[float]] = [[] for _ in items]
    by_length = sorted(items, key=lambda it: max(len(e.input_ids) for e in it.examples))  # less padding
    for group in pack(by_length, micro):
        lp = logps(model, collate(group, pad_id), rt).float().cpu().tolist()
        for it in group:
            out[where[id(it)]], lp = lp[:it.k], lp[it.k:]
    return out


# ---------------------------------------------------------------------------
# Reference log-probs: computed once, cached in the run folder
# ---------------------------------------------------------------------------


def reference_logps(cfg: DPOConfig, items: list[DPOItem], pad_id: int, rt, accelerator, run: RunDir) -> None:
    """Fill ``item.ref`` from ``reference_logps.pt``, computing it first (main process) unless resuming."""
    from instructrl.models import load_causal_lm

    path = run.path / CACHE
    key = {"reference": cfg.reference or cfg.model, "data": str(cfg.data.train), "max_length": cfg.data.max_length,
           "min_prompt_tokens": cfg.data.min_prompt_tokens, "ids": [it.id for it in items]}
    if cfg.resume and not path.exists():
        raise ConfigError(f"resume: {path} is missing; the reference log-probs of the interrupted run are needed for "
                          f"an exact resume. Start a new run (no --resume) or restore the file")
    if not cfg.resume and accelerator.is_main_process:
        ref = load_causal_lm(cfg.reference or cfg.model).to(rt.device).eval()
        out = score_items(ref, items, pad_id, cfg.train.micro_batch_size, rt)
        del ref
        gc.collect()  # the reference is not kept in memory during training
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({**key, "logps": out}, tmp)
        tmp.replace(path)
        run.info(f"reference log-probs of {len(items)} rankings from {key['reference']} -> {path}")
    accelerator.wait_for_everyone()
    cached = load_state(path, "start a new run (no --resume) to recompute it")
    for k in ("reference", "data", "max_length", "min_prompt_tokens", "ids"):
        if cached.get(k) != key[k]:
            raise ConfigError(f"{path} was computed for {k}={_short(cached.get(k))}, this run has {_short(key[k])}; "
                              f"start a new run (no --resume) to recompute it")
    for it, lp in zip(items, cached["logps"]):
        it.ref = lp


def _short(v) -> str:
    return f"[{len(v)} ranking ids]" if isinstance(v, list) else repr(v)


# ---------------------------------------------------------------------------
# Loss and checkpoints
# ---------------------------------------------------------------------------


def batch_loss(pol: torch.Tensor, b: PackedBatch, loss: str, beta: float, num_rankings: int):
    """The chosen objective on one packed batch, normalised by the rankings of the whole step."""
    dev = pol.device
    group, ranks, ref = b.group.to(dev), b.ranks.to(dev), b.ref.to(dev)
    if loss == "listwise":
        return plackett_luce_dpo_loss(pol, ref, group, ranks, beta, num_rankings=num_rankings)
    w, l, weight = ranking_pairs(group, ranks)
    fn = dpo_loss if loss == "dpo" else ipo_loss
    return fn(pol[w], pol[l], ref[w], ref[l], beta, weight=weight, num=num_rankings)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def train_dpo(cfg: DPOConfig) -> Path:
    """Run DPO / IPO / listwise DPO; returns ``output_dir/model`` (a plain AutoModelForCausalLM folder)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from instructrl.models import load_causal_lm, load_tokenizer, make_adamw

    # 1. set-up ------------------------------------------------------------
    rt = make_runtime(cfg.device, cfg.train.precision)
    cfg.train.precision = rt.precision  # saved resolved, so the run folder says what ran
    tc = cfg.train
    accelerator = setup_accelerator(rt, tc.batch_size)
    set_seed(tc.seed)
    run = RunDir.start(cfg.output_dir, cfg, resume=cfg.resume, overwrite=cfg.overwrite,
                       outputs=("model", "reference_logps.pt"), is_main=accelerator.is_main_process)
    ckpt = latest_checkpoint(run.checkpoints) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ConfigError(f"resume: no checkpoint in {run.checkpoints}; start without --resume")

    # 2. data + 3. reference log-probs ---------------------------------------
    tok = load_tokenizer(cfg.model)
    items = load_items(cfg, tok, run.info)
    reference_logps(cfg, items, tok.pad_token_id, rt, accelerator, run)

    # 4. policy, optimizer, schedule (+ resume) ------------------------------
    model = load_causal_lm(str(ckpt) if ckpt else cfg.model)
    model.config.use_cache = False
    model.train()
    model, opt = prepare_model(accelerator, model, lambda ps: make_adamw(ps, tc.lr, tc.weight_decay), tc.sharding,
                               run.info)
    steps_per_epoch = math.ceil(len(items) / tc.batch_size)
    total_steps = steps_per_epoch * tc.epochs
    sched = cosine_schedule(opt, max(1, round(tc.warmup_ratio * total_steps)), total_steps, tc.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    order_rng = random.Random(tc.seed)  # the same order on every process
    pos = Position()
    if ckpt is not None:
        pos, _ = restore(accelerator, ckpt, opt, sched, order_rng, run, model=model)

    # 5. steps -------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=pos.step, desc=f"dpo ({tc.loss})", disable=not accelerator.is_local_main_process)
    while pos.epoch <= tc.epochs:
        if pos.order is None:
            pos.order = list(range(len(items)))
            order_rng.shuffle(pos.order)
        t0 = time.perf_counter()
        global_batch = [items[i] for i in pos.order[pos.start:pos.start + tc.batch_size]]
        micro = [collate(g, tok.pad_token_id) for g in pack(split_global_batch(global_batch, accelerator),
                                                            tc.micro_batch_size)]
        real = pad_with_tied_rankings(accelerator, model, micro, lambda: collate(global_batch[:1], tok.pad_token_id))

        def loss_fn(b):
            return batch_loss(logps(model, b, rt), b, tc.loss, tc.beta, len(global_batch))

        sts = accumulate(accelerator, model, micro, loss_fn)
        local = [sum(s["loss_sum"].item() for s in sts), sum(s["margin"].item() * s["pairs"] for s in sts),
                 sum(int(s["correct"]) for s in sts), sum(s["pairs"] for s in sts),
                 sum(int(b.lm.attention_mask.sum()) for b in micro[:real])]
        tot = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=rt.device), "sum").cpu().tolist()
        step_loss = tot[0] / len(global_batch)
        res = optimizer_step(accelerator, params, opt, sched, tc.max_grad_norm, step_loss)
        pos.skipped += res.skipped
        pos.step += 1
        pos.start += tc.batch_size
        dt = time.perf_counter() - t0
        row = {"step": pos.step, "epoch": pos.epoch, "loss": step_loss, "reward_margin": tot[1] / max(tot[3], 1),
               "accuracy": tot[2] / max(tot[3], 1), "comparisons": int(tot[3]), "rankings": len(global_batch),
               "lr": sched.get_last_lr()[0], "grad_norm": res.grad_norm, "seconds": dt, "tokens_per_s": tot[4] / dt,
               "skipped_steps": pos.skipped}
        run.log_metrics(row)
        bar.set_postfix(loss=f"{step_loss:.3f}", margin=f"{row['reward_margin']:.3f}", acc=f"{row['accuracy']:.2f}",
                        skipped=pos.skipped)
        bar.update(1)
        epoch_done = pos.start >= len(items)
        if epoch_done:
            pos.epoch, pos.start, pos.order = pos.epoch + 1, 0, None

        # 6. checkpoints ---------------------------------------------------
        if epoch_done or (tc.save_every and pos.step % tc.save_every == 0):
            check_trainable(pos.skipped, pos.step, "dpo", tc.lr, cfg.data.train)
            state = checkpoint_state(accelerator, pos, opt, sched, order_rng, model=model)
            path = save_checkpoint(accelerator, model, tok, run.checkpoints / f"step-{pos.step:06d}", tc.lr,
                                   extra=lambda tmp: torch.save(state, tmp / "state.pt"))
            run.info(f"step {pos.step}: checkpoint -> {path}")
    bar.close()

    final = save_checkpoint(accelerator, model, tok, Path(cfg.output_dir) / "model", tc.lr)
    if accelerator.is_main_process:
        atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(
            {"model": str(final), "reference": cfg.reference or cfg.model, "loss": tc.loss, "beta": tc.beta,
             "steps": pos.step, "skipped_steps": pos.skipped, "rankings": len(items)}, indent=2))
        print(f"[dpo] saved policy -> {final}")
    run.info(f"done: {pos.step} steps, {pos.skipped} skipped (non-finite loss or gradient) -> {final}")
    run.close()
    return final
