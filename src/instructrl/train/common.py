"""The skeleton the supervised loops share (SFT, reward model, DPO).

Each loop reads top to bottom and calls these phases:

    accelerator = setup_accelerator(rt)                  # 1..N processes on rt.device
    model, opt = prepare_model(accelerator, model, make_opt, sharding, info)  # DDP, or FSDP2 with sharding=fsdp2
    mine = split_global_batch(global_batch, accelerator) # this process's share
    stats = accumulate(accelerator, model, micro_batches, loss_fn)   # no_sync on all but the last
    res = optimizer_step(accelerator, params, opt, sched, max_grad_norm, step_loss)  # skips non-finite steps
    save_checkpoint(accelerator, model, tok, path)       # atomic, refuses non-finite weights; adapter only with LoRA
    pos, st = restore(accelerator, resume_checkpoint(resume, run), opt, sched, order_rng, run)   # --resume

The loss of every micro-batch is normalised by a count over the whole optimizer step and all
processes (tokens, rankings), so any split into micro-batches and processes gives the full-batch
gradient; ``accumulate`` multiplies by the process count because DDP averages gradients (and so does
FSDP2's reduce-scatter).

With ``train.sharding=fsdp2`` under torchrun (world > 1) the model is ``fully_shard``-ed instead of
DDP-wrapped: parameters, gradients and AdamW state are split over the processes. Every forward and
backward is then a collective, so each process must run the same number of micro-batches (``same_count``).
Checkpoints stay full: rank 0 gathers the weights (a plain HF folder) and the optimizer state
(``get_optimizer_state_dict(full_state_dict=True)``, keyed by parameter name) and writes them alone.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import torch

from instructrl.config import ConfigError
from instructrl.io import RunDir, atomic_dir, write_jsonl
from instructrl.runtime import Runtime, rng_state, set_rng_state

T = TypeVar("T")
Sharding = Literal["none", "fsdp2"]
SHARDING_HELP = ("none: every process holds the full weights, gradients and AdamW state (data parallel); "
                 "fsdp2: under torchrun with > 1 process, torch's fully_shard splits them over the processes "
                 "(each decoder block, then the root); one process runs unsharded; not with train.lora")


def setup_accelerator(rt: Runtime, batch_size: int | None = None):
    """An ``accelerate.Accelerator`` on ``rt.device``; checks ``batch_size`` splits over the processes."""
    import os

    from accelerate import Accelerator

    refuse_sharding(os.environ)
    accelerator = Accelerator(cpu=rt.device.type == "cpu")
    def same(a: torch.device, b: torch.device) -> bool:  # cpu == cpu:0; cuda:N must match exactly
        return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))

    if not same(accelerator.device, rt.device):
        raise ConfigError(f"device={rt.device}: this process was given {accelerator.device} by the launcher; "
                          f"use device=auto under torchrun/accelerate")
    if batch_size is not None and batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the "
                          f"{accelerator.num_processes} processes")
    return accelerator


def refuse_sharding(env) -> None:
    """Stop a launch with an FSDP or DeepSpeed accelerate config. On a CPU accelerate would quietly fall
    back to plain data parallelism, and its FSDP/DeepSpeed wrapping would bypass the loops' own checkpoint
    gathering; sharding here is ``train.sharding=fsdp2`` under torchrun (torch's ``fully_shard``)."""
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if str(env.get(var, "")).lower() in ("1", "true", "yes"):
            raise ConfigError(f"{var}=true: this accelerate config asks for {name} sharding, which instructrl "
                              f"does not take from accelerate; for sharded SFT, RM, DPO or PPO launch with "
                              f"torchrun and train.sharding=fsdp2 (docs/pipeline.md, \"Sharded training\"), "
                              f"or use a plain multi-process config (data parallel) and train.lora.rank > 0 to fit a large "
                              f"model (docs/lora.md)")


ONE_PROCESS_FSDP2 = "sharding: train.sharding=fsdp2 with 1 process has nothing to shard over; running unsharded"


def fsdp_units(model) -> list:
    """The modules of ``model`` that ``shard_model`` gave to ``fully_shard`` (empty: not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    """True for a model ``shard_model`` sharded with FSDP2."""
    return bool(fsdp_units(model))


def shard_model(model: torch.nn.Module, mesh, where: str = "train.sharding=fsdp2") -> int:
    """``fully_shard`` each decoder block, then each module the code calls directly; returns the block count.

    A causal LM is always called through its own forward: the root takes the rest (embeddings, final
    norm, a tied or untied unembedding). A reward or value model is not: ``reward_model.hidden_states``
    runs the trunk and then the scalar head as two calls, so the trunk (embeddings, final norm) and the
    head are a unit each; a unit whose hooks never run would leave its weights sharded in the forward.
    Blocks reshard after their forward, the top units keep their weights for the backward (FSDP2's own
    choice for a root), so :func:`gathered_weights` can put both back.
    """
    from torch.distributed.fsdp import fully_shard

    from instructrl.models import decoder

    blocks = list(getattr(decoder(model), "layers", None) or [])
    if not blocks:
        raise ConfigError(f"{where}: cannot find the decoder blocks of {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    heads = [decoder(model), model.score] if hasattr(model, "score") else [model]
    for unit in heads:
        fully_shard(unit, mesh=mesh, reshard_after_forward=False)
    return len(blocks)


def reshard(model) -> None:
    """Free the gathered weights a forward without a backward leaves in the top units (FSDP2 keeps a
    root's weights after its forward for the backward that would follow)."""
    for unit in fsdp_units(model):
        unit.reshard()


@contextlib.contextmanager
def gathered_weights(model):
    """Within the block a sharded ``model`` holds its full weights and its forwards communicate nothing,
    so processes may run different numbers of them (token-by-token sampling stops when a process's own
    rows end). The cost is the full model in memory while it lasts. Unsharded: does nothing."""
    from instructrl.models import decoder

    units = fsdp_units(model)
    blocks = {id(b) for b in getattr(decoder(model), "layers", [])} if units else set()
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(id(u) in blocks, recurse=False)


def prepare_model(accelerator, model: torch.nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer],
                  sharding: Sharding, info: Callable[[str], None],
                  wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m):
    """(module, optimizer) ready to train: accelerate's DDP wrapping of ``wrap(model)``, or with
    ``sharding="fsdp2"`` and more than one process ``wrap`` of the model sharded in place by
    :func:`shard_model`. The optimizer is built on the trainable parameters after sharding (FSDP2
    swaps them for DTensor shards). ``wrap``: the module the loop calls (the RM's ``RewardScorer``).
    """
    if sharding == "fsdp2" and accelerator.num_processes > 1:
        from torch.distributed.device_mesh import init_device_mesh

        # FSDP2 moves each unit to the device as it shards it: the device never holds the whole model
        n = shard_model(model, init_device_mesh(accelerator.device.type, (accelerator.num_processes,)))
        model.to(accelerator.device)
        top = "trunk + head" if hasattr(model, "score") else "root"
        info(f"sharding: fsdp2 over {accelerator.num_processes} processes ({n} decoder blocks + {top}); "
             f"weights, gradients and optimizer state split, checkpoints gathered to rank 0")
        return wrap(model), make_optimizer([p for p in model.parameters() if p.requires_grad])
    if sharding == "fsdp2":
        info(ONE_PROCESS_FSDP2)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    return accelerator.prepare(wrap(model), opt)


def same_count(accelerator, model, n: int) -> int:
    """The number of forward passes every process runs: ``n`` unless sharded, else the largest ``n`` of
    any process (an FSDP2 forward all-gathers parameters, so a process that stopped early would hang
    the others)."""
    if not is_sharded(model):
        return n
    t = torch.tensor(n, device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def pad_with_tied_rankings(accelerator, model, micro: list, collate_first: Callable[[], Any]) -> int:
    """Append all-tied ranking batches to ``micro`` until this process runs as many passes as every other,
    and at least one: a process with no share of a short last batch still joins the gradient sync, and
    sharded, FSDP2's collectives. ``collate_first()`` collates one ranking of the global batch; its
    ranks are then all tied, so it makes no comparison, no loss and no gradient. Returns the number of
    real micro-batches (the ones that count in the step's statistics)."""
    real = len(micro)
    for _ in range(real, max(1, same_count(accelerator, model, real))):
        b = collate_first()
        b.ranks.zero_()
        micro.append(b)
    return real


def split_global_batch(global_batch: Sequence[T], accelerator) -> list[T]:
    """This process's share of a global batch: every ``world``-th item from its rank (same order on all)."""
    return list(global_batch[accelerator.process_index::accelerator.num_processes])


def split_validation(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded random split: (train, held out) with round(fraction * n) >= 1 held out, order kept."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, round(len(items) * fraction))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup over ``warmup`` steps (from 1/warmup), then cosine decay to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def accumulate(accelerator, model, micro_batches: list, loss_fn: Callable) -> list[dict]:
    """Forward + backward over ``micro_batches``; gradients sync across processes on the last one only.

    ``loss_fn(batch) -> (loss, stats)``; the loss must already be normalised by the whole step's count.
    Returns the stats of every micro-batch, in order. Sharded (FSDP2): the gradients of all but the last
    micro-batch accumulate unsharded and unreduced (``set_requires_gradient_sync(False)``), one
    reduce-scatter per step; every process must pass the same number of micro-batches.
    """
    out = []
    world = accelerator.num_processes
    sharded = is_sharded(model)
    for j, b in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        for unit in fsdp_units(model) if sharded else []:
            unit.set_requires_gradient_sync(last, recurse=False)
        sync = accelerator.no_sync(model) if not (last or sharded) else contextlib.nullcontext()
        with sync:
            loss, st = loss_fn(b)
            # DDP and FSDP2's reduce-scatter average gradients over processes; scale back up to a sum
            accelerator.backward(loss * world)
        out.append(st)
    return out


@dataclass
class StepResult:
    grad_norm: float | None  # None when clipping is off (max_grad_norm = 0)
    skipped: bool            # True: non-finite loss or gradient, no update made


def optimizer_step(accelerator, params: list, opt, sched, max_grad_norm: float, loss: float) -> StepResult:
    """Clip, step, schedule, zero the gradients; a step with a non-finite loss or grad norm makes no update.

    ``loss`` is the step's loss over all processes, so every process takes the same decision. The
    schedule advances either way (it counts optimizer steps planned, not taken).
    """
    # max_norm=inf measures the norm without changing any gradient (clip coefficient clamped to 1).
    # With FSDP2's DTensor gradients accelerate's clip sums the shards' squared norms over processes, so
    # the norm (and with the global loss the skip decision) is the same on every process.
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    skipped = not (math.isfinite(loss) and bool(torch.isfinite(torch.as_tensor(norm))))
    if not skipped:
        opt.step()
        sched.step()
    else:
        with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended for a skipped step
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(float(norm) if max_grad_norm > 0 else None, skipped)


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def check_trainable(skipped: int, steps: int, where: str, lr: float, data: str) -> None:
    """Every step of ``where`` was non-finite: stop rather than go on with a model that cannot learn."""
    if steps and skipped == steps:
        raise ConfigError(f"{where}: all {steps} optimizer steps had a non-finite loss or gradient and were skipped; "
                          f"lower train.lr (now {lr}) or check the data ({data})")


def non_finite_weights_error(where: str, lr: float | None) -> ConfigError:
    with_lr = f" with train.lr={lr}" if lr is not None else ""
    return ConfigError(f"{where}: the model has non-finite weights after training{with_lr}; nothing saved. "
                       f"Lower train.lr")


def check_finite_weights(model: torch.nn.Module, where: str, lr: float) -> None:
    """Never write a model with non-finite weights (e.g. after an update with an infinite learning rate)."""
    if not all_finite(model):
        raise non_finite_weights_error(where, lr)


def gathered_state_dict(device: torch.device, model: torch.nn.Module, where: str, lr: float | None) -> dict:
    """The full (unsharded) weights of an FSDP2 ``model``, on the CPU of rank 0 (every process takes part;
    ``device``: this process's, for the collective); non-finite weights raise on every process, as
    :func:`check_finite_weights` does unsharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    bad = torch.tensor(float(not all(bool(torch.isfinite(t).all()) for t in full.values())), device=device)
    torch.distributed.all_reduce(bad)  # rank 0 holds it all; every process decides
    if bad.item():
        raise non_finite_weights_error(where, lr)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        # A tied weight (SmolLM2's lm_head = embed_tokens) comes back as two copies; one tensor under
        # both names lets save_pretrained drop the alias, as it does for an unsharded model.
        if first.setdefault(id(p), name) != name and name in full:
            full[name] = full[first[id(p)]]
    return full


def unsharded_copy(device: torch.device, model: torch.nn.Module, where: str, lr: float):
    """On rank 0 a plain (unsharded) model holding a sharded ``model``'s gathered weights, for the work
    after training that runs there alone (an RM's bias normalisation and evaluation); None elsewhere.
    Every process takes part. Rank 0 briefly holds the gathered weights twice."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    full = gathered_state_dict(device, model, where, lr)
    if torch.distributed.get_rank() != 0:
        return None
    auto = AutoModelForSequenceClassification if hasattr(model, "score") else AutoModelForCausalLM
    plain = auto.from_config(model.config)
    plain.load_state_dict(full, assign=True)  # the gathered tensors themselves, in their dtype
    plain.tie_weights()
    return plain.to(device)


def save_checkpoint(accelerator, model: torch.nn.Module, tokenizer, path: str | Path, lr: float,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (unwrapped) + tokenizer to ``path`` atomically, main process only; all processes wait.

    A model with LoRA adapters writes only them (+ an RM's head) to ``path/adapter`` (``lora.save_adapter``).
    A sharded model is gathered first (every process takes part) and rank 0 writes the full weights.
    ``extra(tmp)`` may add files (optimizer state, ...) to the folder before it is swapped into place.
    """
    from instructrl.lora import is_lora, save_adapter

    path = Path(path)
    model = accelerator.unwrap_model(model)
    state_dict = None  # None: save_pretrained reads the model's own (unsharded) weights
    if is_sharded(model):
        state_dict = gathered_state_dict(accelerator.device, model, str(path), lr)
    else:
        check_finite_weights(model, str(path), lr)
    if accelerator.is_main_process:
        with atomic_dir(path) as tmp:
            if is_lora(model):
                save_adapter(model, tmp / "adapter")
            else:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if extra is not None:
                extra(tmp)
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------
# Resume: where a loop is, saved with each checkpoint (``state.pt``)
# ---------------------------------------------------------------------------


@dataclass
class Position:
    """Where a loop is: the next batch is ``order[start:start + batch_size]`` of ``epoch``."""

    step: int = 0
    epoch: int = 1
    start: int = 0
    order: list[int] | None = None  # this epoch's shuffled order (None: not shuffled yet)
    skipped: int = 0


STATE = "state.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint (``NAME-<number>``) with the highest number that holds a ``state.pt``."""
    found = [p for p in Path(folder).glob("*-*") if (p / STATE).exists() and p.name.rsplit("-", 1)[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.rsplit("-", 1)[-1])) if found else None


def checkpoint_state(accelerator, pos: Position, opt, sched, order_rng: random.Random, model=None,
                     **extra) -> dict:
    """Everything besides the weights that a resumed run needs to continue bit for bit; every process
    must call it (each one's RNG streams are gathered: dropout draws differ between processes).

    Pass the sharded ``model`` with FSDP2: the optimizer state is then gathered in full to rank 0 (keyed by
    parameter name; the other processes' copy is empty and never written)."""
    from accelerate.utils import gather_object

    sharded = model is not None and is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
    else:
        opt_state = opt.state_dict()
    return {"position": vars(pos).copy(), "opt": opt_state, "sched": sched.state_dict(),
            "order_rng": order_rng.getstate(), "rng": gather_object([rng_state()]),
            "world_size": accelerator.num_processes, "sharded": sharded, **extra}


def load_state(path: Path, hint: str = "") -> dict:
    """``torch.load`` of a state file this package wrote; a damaged or cut-short one is a one-line
    ConfigError naming it (``hint``: what to do; default: fall back to the checkpoint before it)."""
    import pickle

    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        hint = hint or (f"remove {path.parent} to resume from the checkpoint before it (if there is one), "
                        f"or start over with --overwrite")
        raise ConfigError(f"resume: {path} is damaged or cut short ({first}); {hint}") from None


def restore(accelerator, ckpt: Path, opt, sched, order_rng: random.Random, run: RunDir,
            model=None) -> tuple[Position, dict]:
    """Load ``ckpt/state.pt`` into the optimizer, schedule and RNGs; drop metrics rows of later steps.

    Call it after the model is built (building draws from the RNG). Returns the position and the state
    (for loop-specific extras). Pass the sharded ``model`` with FSDP2 (each process takes its shard of the
    full optimizer state).
    """
    st = load_state(ckpt / STATE)
    if st.get("world_size", 1) != accelerator.num_processes:  # no world_size: an older 1-process DPO state
        raise ConfigError(f"resume: {ckpt} was written by {st.get('world_size', 1)} processes, this run has "
                          f"{accelerator.num_processes}; resume with the same number for an exact continuation")
    sharded = model is not None and is_sharded(model)
    if st.get("sharded", False) != sharded:
        raise ConfigError(f"resume: {ckpt} was written {'with' if st.get('sharded') else 'without'} "
                          f"train.sharding=fsdp2, this run is {'' if sharded else 'not '}sharded; resume with "
                          f"the train.sharding it was written with")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, st["opt"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    order_rng.setstate(st["order_rng"])
    rng = st["rng"]  # one state per process; a single one from an older DPO checkpoint
    set_rng_state(rng[accelerator.process_index] if isinstance(rng, list) else rng)
    pos = Position(**st["position"])
    if run.is_main:  # rows written after the checkpoint belong to steps that will be redone
        write_jsonl(run.path / "metrics.jsonl", [r for r in run.read_metrics() if r.get("step", 0) <= pos.step])
    run.info(f"resumed from {ckpt.name} (step {pos.step}, epoch {pos.epoch}, position {pos.start})")
    return pos, st


def drop_older_states(accelerator, folder: Path, latest: Path) -> None:
    """Delete ``state.pt`` from every checkpoint but ``latest``: only the latest is resumed from, and the
    optimizer state it holds is twice the weights (AdamW). The older checkpoints keep their weights."""
    if accelerator.is_main_process:
        for p in Path(folder).glob(f"*/{STATE}"):
            if p.parent != Path(latest):
                p.unlink()
    accelerator.wait_for_everyone()


def resume_checkpoint(resume: bool, run: RunDir) -> Path | None:
    """The checkpoint to continue from (``--resume``), or None for a fresh run; no checkpoint is an error."""
    if not resume:
        return None
    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is None:
        raise ConfigError(f"resume: no checkpoint with {STATE} in {run.checkpoints}; start without --resume "
                          f"(the rm writes checkpoints only with train.save_every > 0)")
    return ckpt
