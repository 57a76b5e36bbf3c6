"""Experiment trackers: a run's metrics rows also go to TensorBoard, trackio or Weights & Biases.

    tracker = open_tracker("tensorboard", run_dir, name="sft", config=dataclasses.asdict(cfg))
    tracker.log({"loss": 2.1, "lr": 3e-4}, step=1)
    tracker.log_text("samples", "prompt -> answer", step=1)
    tracker.close()

Built on accelerate's own tracker classes (``accelerate.tracking``). TensorBoard and trackio work
offline; wandb needs ``WANDB_MODE=offline`` without a network. Every loop logs through
``RunDir.log_metrics``, which forwards each row to the tracker attached to the run folder, so
metrics.jsonl stays the record and the tracker is a view of it. Only the main process logs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from instructrl.config import ConfigError, param

TrackerKind = Literal["none", "tensorboard", "trackio", "wandb"]


def tracker_field(default: str = "none"):
    """The ``tracker`` key of a command config."""
    return param(default, "also send metrics to an experiment tracker: none, tensorboard (<run>/tensorboard/), "
                          "trackio (local, offline) or wandb; metrics.jsonl is written either way")


@dataclasses.dataclass
class Tracker:
    """One open tracker run; ``log`` takes a metrics row and keeps only its finite numbers."""

    kind: str
    backend: Any

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        values = {k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if values:
            self.backend.log(values, step=step)

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """A sample of completions (TensorBoard's text tab; a table row elsewhere)."""
        if self.kind == "tensorboard":
            self.backend.tracker.add_text(tag, text, global_step=step)
        else:
            self.backend.log({tag: text}, step=step)

    def close(self) -> None:
        self.backend.finish()


def open_tracker(kind: str, run_dir: str | Path, name: str, config: dict[str, Any] | None = None) -> Tracker | None:
    """Start a tracker run for ``run_dir`` (None for ``none``); a missing package is a clear ConfigError."""
    if kind == "none":
        return None
    from accelerate import tracking

    try:
        if kind == "tensorboard":
            backend = tracking.TensorBoardTracker(name, str(Path(run_dir) / "tensorboard"))
        elif kind == "trackio":
            backend = tracking.TrackioTracker(name)
        elif kind == "wandb":
            backend = tracking.WandBTracker(name, dir=str(run_dir))
        else:
            raise ConfigError(f"tracker must be one of none, tensorboard, trackio, wandb; got {kind!r}")
        backend.start()
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"tracker={kind}: the package is not installed ({e.name or e}); "
                          f"pip install {'tensorboard' if kind == 'tensorboard' else kind}") from None
    if config:
        backend.store_init_configuration(_flat_hparams(config))
    return Tracker(kind, backend)


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 3e-4, ...} with the scalar types trackers accept."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v if v is not None else "none"
        else:
            out[key] = str(v)
    return out
