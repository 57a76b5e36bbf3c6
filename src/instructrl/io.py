"""Small I/O helpers: atomic writes, JSON Lines, run folders.

Nothing here is half-written: files go to a temporary name in the same folder
and are renamed into place (rename is atomic on POSIX), folders likewise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class DataError(ValueError):
    """Bad input data. The message names the file, the line and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source, self.line, self.field = source, line, field
        where = source if line is None else f"{source}:{line}"
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {message}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600 files and 0700 folders; the renamed result should have the
# permissions an ordinary open()/mkdir() would give (0644/0755 under the usual umask).
_UMASK = _umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_yaml(path: str | Path, obj: Any) -> None:
    """Write a mapping as YAML, atomically, keys in their given order."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_jsonl(path: str | Path, rows: Any) -> int:
    """Write an iterable of dicts as JSON Lines, atomically. Returns the count."""
    n = 0
    lines = []
    for r in rows:
        lines.append(json.dumps(r, ensure_ascii=False))
        n += 1
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return n


def read_jsonl(path: str | Path, on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; 1-based line numbers.

    A line that is not a JSON object raises DataError naming file and line, or,
    when ``on_error`` is given, is passed to it and skipped (the loaders'
    ``errors="skip"`` mode: a generator cannot go on after raising).
    Files ending in .gz are decompressed.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, None, "file not found")
    if path.suffix == ".gz":
        import gzip

        f = gzip.open(path, "rt", encoding="utf-8")
    else:
        f = open(path, encoding="utf-8")
    with f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                err = DataError(str(path), i, None, f"not valid JSON ({e.msg} at column {e.colno})")
            else:
                if isinstance(obj, dict):
                    yield i, obj
                    continue
                err = DataError(str(path), i, None, f"expected a JSON object, got {type(obj).__name__}")
            if on_error is None:
                raise err
            on_error(err)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it into place.

    A crash inside the block leaves any previous ``final`` folder intact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunDir:
    """A run folder: ``config.yaml``, ``metrics.jsonl``, ``log.txt``, ``checkpoints/``.

    Only the main process (``is_main``) writes; other ranks get a no-op view.
    """

    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.log = logging.getLogger(f"instructrl.run.{self.path}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            if not any(isinstance(h, logging.FileHandler) for h in self.log.handlers):
                fh = logging.FileHandler(self.path / "log.txt")
                fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                self.log.addHandler(fh)
        else:
            self.log.addHandler(logging.NullHandler())

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg: Any) -> None:
        if self.is_main:
            import dataclasses

            write_yaml(self.path / "config.yaml", dataclasses.asdict(cfg))

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed at once)."""
        if not self.is_main:
            return
        row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
