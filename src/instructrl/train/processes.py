"""Several PPO processes (torchrun / accelerate launch): who holds which rows, and the few collectives.

Process ``rank`` of ``world`` holds rows ``rank*b .. (rank+1)*b`` of every global batch of ``world*b``
rows. One process needs no torch.distributed; every method is then the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from instructrl.config import ConfigError, StageFailed
from instructrl.runtime import Runtime

# ---------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place among ``world`` processes; one process needs no torch.distributed.

    Process ``rank`` holds the rows ``rank*b .. (rank+1)*b`` of every global batch of ``world*b`` rows.
    """

    world: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, global_batch: int, rank: int | None = None) -> slice:
        """The rows process ``rank`` (default: this one) holds of a global batch."""
        b, r = global_batch // self.world, self.rank if rank is None else rank
        return slice(r * b, (r + 1) * b)

    def device_mesh(self, device: torch.device):
        """The 1-D mesh of all processes that FSDP2 shards over."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device.type, (self.world,))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's [b, ...] rows, concatenated in rank order -> [world*b, ...]; dim 1 zero-padded."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        if x.dim() >= 2:  # responses have different widths on different processes
            width = torch.tensor([x.shape[1]], device=x.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, int(width) - x.shape[1]))
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over processes of a few floats."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over processes in one flat all-reduce (one sync per optimizer step)."""
        if self.world == 1 or not params:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(g).to(g.dtype)
            offset += n

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def make_dist(cfg, rt: Runtime) -> Dist:
    """One process, or the process group torchrun / accelerate launch started (set up by accelerate)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from instructrl.train.common import setup_accelerator

    acc = setup_accelerator(rt)
    d = Dist(acc.num_processes, acc.process_index)
    B, k = cfg.rollout.batch_size, cfg.rollout.samples_per_prompt
    if B % d.world or (B // d.world) % k:
        raise ConfigError(f"rollout.batch_size={B} must split over the {d.world} processes into shares that are "
                          f"whole groups of rollout.samples_per_prompt={k} (an RLOO group never spans processes)")
    return d


def close_process_group(ok: bool) -> None:
    """End this process's part in a torchrun/accelerate launch, if one was started.

    A process that returns while the others still write files (rank 0 saves, the rest do not) and
    leaves the gloo group to the interpreter's exit can abort in a C++ destructor ("terminate called
    without an active exception", SIGABRT), which fails the whole launch. After a clean run every
    process waits for the others first; after an error it leaves at once (the others may never arrive).
    In one process a group is never ours: it is an in-process vLLM engine's, which must outlive the stage
    (destroyed here, vLLM's own shutdown fails at the interpreter's exit with "Invalid process group").
    """
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def launch(command: str, cfg, nproc: int, config_path: Path) -> None:
    """Run ``instructrl <command>`` on ``cfg`` in ``nproc`` processes (torchrun), from this process.

    The typed config is written to ``config_path`` as YAML (every key, resolved) and read back by the
    children; output streams to this terminal. Used by the pipeline's ``processes=N``.
    """
    import subprocess
    import sys

    from instructrl.config import save_config

    save_config(cfg, config_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", "instructrl", *command.split(),
           "--config", str(config_path)]
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {rc} (its own error is printed above)")
