"""Small I/O helpers: atomic writes, JSON Lines, run folders.

Nothing here is half-written: files go to a temporary name in the same folder
and are renamed into place (rename is atomic on POSIX), folders likewise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
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


_BOM = b"\xef\xbb\xbf"


def _has_lone_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    return False


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; they are not JSON and poison scores and losses downstream.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e400: Python reads it as inf without a word
        raise ValueError(f"{text} is too large for a number")
    return v


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # JSON allows a key twice and Python keeps the last silently: {"prompt": "a", "prompt": "b"}
    # would train on "b" with nobody told
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def file_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a FIFO", "a device", ...), else None.
    A FIFO would block a read forever and /dev/zero never ends: both are refused before reading."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes; a file that cannot be opened or decompressed raises DataError."""
    if path.is_dir():
        raise DataError(str(path), None, None, "is a folder; expected a JSONL file")
    if not path.exists():
        raise DataError(str(path), None, None, "file not found")
    kind = file_kind(path)
    if kind is not None:
        raise DataError(str(path), None, None, f"is {kind}, not a regular file; expected a JSONL file")
    try:
        if path.suffix == ".gz":
            import gzip
            import zlib

            try:
                with gzip.open(path, "rb") as f:
                    yield from f
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise DataError(str(path), None, None, f"not a valid gzip file ({e or 'truncated'})") from None
        else:
            with open(path, "rb") as f:
                yield from f
    except OSError as e:
        raise DataError(str(path), None, None, f"cannot read: {e.strerror or e}") from None


def read_jsonl(path: str | Path, on_error: Callable[[DataError], None] | None = None,
               allow_nan: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; 1-based line numbers.

    A line that is not a JSON object raises DataError naming file and line, or,
    when ``on_error`` is given, is passed to it and skipped (the loaders'
    ``errors="skip"`` mode: a generator cannot go on after raising).
    Files ending in .gz are decompressed. A UTF-8 byte-order mark (as some
    Windows editors write) is ignored; invalid UTF-8 and lone surrogate escapes
    are errors on their line, and so is a key given twice in one object; NaN/Infinity and
    numbers too large for a float (1e400) are errors too with ``allow_nan=False`` (the data
    loaders; our own metrics.jsonl may hold a NaN loss). A FIFO or device is refused unread.
    """
    path = Path(path)
    for i, raw in enumerate(_raw_lines(path), start=1):
        if i == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err = DataError(str(path), i, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "save the file as UTF-8")
        else:
            try:
                obj = json.loads(line, object_pairs_hook=_unique_keys,
                                 **({} if allow_nan else {"parse_constant": _refuse_constant,
                                                          "parse_float": _finite_float}))
            except json.JSONDecodeError as e:
                err = DataError(str(path), i, None, f"not valid JSON ({e.msg} at column {e.colno})")
            except ValueError as e:
                err = DataError(str(path), i, None, f"not valid JSON ({e})")
            else:
                if not isinstance(obj, dict):
                    err = DataError(str(path), i, None, f"expected a JSON object, got {type(obj).__name__}")
                elif "\\u" in line.lower() and _has_lone_surrogate(obj):
                    err = DataError(str(path), i, None, "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
                else:
                    yield i, obj
                    continue
        if on_error is None:
            raise err
        on_error(err)


class OutputError(DataError):
    """An output path that must not be written (it holds the user's own data, or a different run)."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(str(path), None, None, message)


def require_folder_path(path: str | Path, key: str = "output_dir") -> Path:
    """``path`` as a Path, or OutputError when it names an existing file: checked where a command
    starts, before any model loads, not when the first output is written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(path, f"exists and is not a folder; choose another {key}=")
    return path


# atomic_dir writes this file into every folder it creates; a folder carrying it may be replaced.
OUTPUT_MARKER = ".instructrl-output"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this kernel or file system has no exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _old_copies(final: Path) -> list[Path]:
    import glob

    return sorted(final.parent.glob(f".{glob.escape(final.name)}.old-*"), key=lambda p: p.stat().st_mtime_ns)


def recover_atomic_dir(final: str | Path) -> None:
    """Finish what a kill between atomic_dir's two renames left: when ``final`` is missing,
    the newest ``.NAME.old-*`` folder (the previous version) goes back into place; leftovers
    next to a present ``final`` are deleted."""
    final = Path(final)
    olds = _old_copies(final)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)


def is_ours(folder: Path, legacy: tuple[str, ...] = ()) -> bool:
    """A folder atomic_dir may replace: empty, carrying OUTPUT_MARKER, or (folders written before
    the marker existed) holding every file named in ``legacy``."""
    if (folder / OUTPUT_MARKER).exists() or not any(folder.iterdir()):
        return True
    return bool(legacy) and all((folder / n).exists() for n in legacy)


def check_replaceable(final: str | Path, legacy: tuple[str, ...] = ()) -> None:
    """Raise OutputError unless atomic_dir may write ``final`` (absent, or a folder of ours).
    Commands call it at their start too, so a bad out= fails before hours of work, not after."""
    final = Path(final)
    recover_atomic_dir(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise OutputError(final, "exists and is not a folder; choose an output folder path")
    if final.exists() and not is_ours(final, legacy):
        raise OutputError(final, f"is a folder that instructrl did not write (no {OUTPUT_MARKER} file); "
                          "refusing to replace it: choose a new or empty output folder")


@contextmanager
def atomic_dir(final: str | Path, legacy: tuple[str, ...] = ()) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it into place.

    A crash inside the block leaves any previous ``final`` folder intact, and a kill
    during the swap never leaves nothing at ``final`` (atomic exchange on Linux; elsewhere
    the next call restores the previous version). An existing ``final`` is replaced only
    when it is ours (see :func:`is_ours`; ``legacy`` names the files that mark a folder of
    ours written before the marker, e.g. ``("config.json",)`` for a saved model); a
    folder of the user's own, or a file, raises OutputError before anything is built.
    """
    final = Path(final)
    check_replaceable(final, legacy)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by instructrl; this folder may be replaced by the next run\n")
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
            return
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


# What a training/eval run writes into its folder. A fresh start with overwrite clears these and
# nothing else; a folder holding any of RUN_FILES already holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "log.txt")
RUN_FOLDERS = ("checkpoints",)

# Keys that may change between a run and its --resume: they extend or place the run without
# changing what it computes. A name without a dot matches that key in any section
# ("threads" matches "runtime.threads"); a dotted name matches that key only.
RESUME_SAFE_KEYS = frozenset({"resume", "overwrite", "output_dir", "threads", "device", "epochs", "steps",
                              "total_steps", "max_steps", "log_every", "eval_every", "save_every",
                              "tracker", "sample_every"})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _is_safe(key: str, safe_keys: set[str] | frozenset[str]) -> bool:
    return key in safe_keys or key.rsplit(".", 1)[-1] in {s for s in safe_keys if "." not in s}


def config_changes(saved: dict, new: dict, safe_keys: set[str] | frozenset[str] = RESUME_SAFE_KEYS) -> list[str]:
    """``key: old -> new`` for every dotted key that differs, keys in ``safe_keys`` left out."""
    a, b = _flatten(saved), _flatten(new)
    missing = object()
    lines = []
    for k in sorted(set(a) | set(b)):
        # YAML gives lists where the dataclass may hold tuples
        va, vb = (list(v) if isinstance(v, tuple) else v for v in (a.get(k, missing), b.get(k, missing)))
        if va == vb or _is_safe(k, safe_keys):
            continue
        show = lambda v: "(absent)" if v is missing else repr(v) if isinstance(v, str) else v  # noqa: E731
        lines.append(f"{k}: {show(va)} -> {show(vb)}")
    return lines


def holds_run(path: Path, outputs: tuple[str, ...] = ()) -> bool:
    """Whether ``path`` holds a run's results: metrics, a checkpoint or one of ``outputs``.

    A folder with only config.yaml and log.txt is a start that stopped before its first step (a model
    that did not load, a bad data line): starting again there needs no --overwrite.
    """
    ck = path / "checkpoints"
    return ((path / "metrics.jsonl").exists() or (ck.is_dir() and any(ck.iterdir()))
            or any((path / n).exists() for n in outputs))


def prepare_run_folder(path: str | Path, config: dict, resume: bool = False, overwrite: bool = False,
                       safe_keys: set[str] | frozenset[str] = RESUME_SAFE_KEYS, outputs: tuple[str, ...] = ()) -> Path:
    """Check a run folder before a run writes anything into it.

    Fresh start: a folder that already holds a run (metrics.jsonl, a checkpoint or one of ``outputs``;
    config.yaml alone is a start that never ran a step) raises OutputError, so metrics never mix and
    --resume never picks an older run's checkpoint; with ``overwrite`` only our own files (RUN_FILES, checkpoints/ and the names in ``outputs``,
    e.g. ``("model",)``) are removed, never anything else in the folder.
    Resume: the saved config.yaml must match ``config`` except ``safe_keys``; otherwise
    OutputError lists every changed key (``train.lr: 1e-05 -> 3e-05``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(path, "exists and is not a folder; choose a run folder path (output_dir=)")
    if resume:
        saved_path = path / "config.yaml"
        if saved_path.exists():
            import yaml

            try:
                saved = yaml.safe_load(saved_path.read_text()) or {}
            except yaml.YAMLError as e:
                raise OutputError(saved_path, f"cannot read the saved config to resume: {e}") from None
            changes = config_changes(saved, config, safe_keys)
            if changes:
                raise OutputError(saved_path, "--resume with a changed config (start a new output_dir=, "
                                  "or pass --overwrite to start over): " + "; ".join(changes))
        return path
    if path.is_dir() and holds_run(path, outputs):
        if not overwrite:
            raise OutputError(path, "already holds a run (metrics.jsonl/checkpoints/outputs); "
                              "use --resume to continue it, --overwrite to start it over, or another output_dir=")
        log = logging.getLogger(f"instructrl.run.{path}")
        for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(h)  # it writes to the log.txt about to go; RunDir opens the new one
            h.close()
        for name in (*RUN_FILES, *RUN_FOLDERS, *outputs):
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    return path


class RunDir:
    """A run folder: ``config.yaml``, ``metrics.jsonl``, ``log.txt``, ``checkpoints/``.

    Only the main process (``is_main``) writes; other ranks get a no-op view.
    """

    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self.tracker = None  # instructrl.tracking.Tracker: every metrics row is also sent there
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

    @classmethod
    def start(cls, path: str | Path, cfg: Any, resume: bool = False, overwrite: bool = False,
              safe_keys: set[str] | frozenset[str] = RESUME_SAFE_KEYS, outputs: tuple[str, ...] = (),
              is_main: bool = True) -> "RunDir":
        """Check the folder (see :func:`prepare_run_folder`), open it, save ``cfg`` as config.yaml."""
        import dataclasses

        if is_main:
            prepare_run_folder(path, dataclasses.asdict(cfg), resume, overwrite, safe_keys, outputs)
        run = cls(path, is_main)
        run.save_config(cfg)
        kind = getattr(cfg, "tracker", "none")
        if is_main and kind != "none":
            import atexit

            from instructrl.tracking import open_tracker

            run.tracker = open_tracker(kind, run.path, name=run.path.name, config=dataclasses.asdict(cfg))
            atexit.register(run.close)  # a run that stops early still flushes what it logged
        return run

    def close(self) -> None:
        """Flush and close the tracker (metrics.jsonl needs nothing: every row is flushed at once)."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()

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
        if self.tracker is not None:
            self.tracker.log(row, step=row.get("step"))

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """A sample of completions for the tracker (nothing without one)."""
        if self.is_main and self.tracker is not None:
            self.tracker.log_text(tag, text, step)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        lines = p.read_text().splitlines()
        rows = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines):  # a kill mid-append leaves a cut last line; the rows before it stand
                    break
                raise DataError(str(p), i, None, "not valid JSON: this run's metrics file is damaged") from None
        return rows
