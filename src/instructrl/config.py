"""Configs: one dataclass per command, read from YAML plus dotted overrides.

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["train.lr=1e-5", "train.epochs=2"])

Every config is a (possibly nested) dataclass. Unknown keys, wrong types and
invalid values raise :class:`ConfigError` naming the file and the dotted key.
A config class may define ``fill(self)`` (set its children's values; runs parent first,
as the pipeline does for its stage configs), ``finalize(self)`` (derive its own values)
and ``validate(self)`` (check, raising ``ConfigError``); those two run children first.
None may probe hardware or write files.

A class with a ``PRESETS`` mapping (name -> dotted overrides) and a ``preset`` field gets
that preset's overrides applied under the file's values and the caller's overrides.

Command-line override values are read for the type of their key: a ``str`` key takes the
text verbatim (``output_dir=runs/x #1``, ``name=on``), other keys read it as YAML
(``3``, ``1e-5``, ``true``, ``[a, b]``, ``{a: 1}``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from instructrl.io import file_kind, write_yaml

T = TypeVar("T")


class StageFailed(RuntimeError):
    """A stage run in other processes failed; those processes printed the cause."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # a list or mapping as a key: SafeLoader's own error below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    where = "config"  # no file: errors name the dotted key alone
    if path is not None:
        where = str(path)
        kind = file_kind(Path(path))
        if kind is not None and kind != "a folder":  # a FIFO would block the read forever
            raise ConfigError(f"{path}: cannot read config file: it is {kind}, not a regular file")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
        except UnicodeDecodeError as e:  # a binary file, or one saved as Latin-1 / UTF-16
            line = text_line(e.object, e.start)
            raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); "
                              "save the config file as UTF-8") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:  # one line: the file, line and column, and what the parser found
            mark = getattr(e, "problem_mark", None)
            at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = getattr(e, "problem", None) or " ".join(str(e).split())
            raise ConfigError(f"{at}: not valid YAML: {what}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    overrides = list(overrides or [])
    presets = getattr(cls, "PRESETS", None)
    if presets is not None:
        named = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "preset"]
        name = named[-1] if named else raw.get("preset", _field_default(cls, "preset"))
        if name not in presets:
            raise ConfigError(f"{where}: preset must be one of {sorted(presets)}, got {name!r}")
        raw = _merge(_apply_overrides({}, presets[name], {}), raw)
    from_cli: dict[str, str] = {}  # dotted key -> the override that set it, for error messages
    raw = _apply_overrides(raw, overrides, from_cli)
    cfg = _build(cls, raw, prefix="", where=where, from_cli=from_cli)
    _post(cfg, where)
    return cfg


class _CliText(str):
    """An override's value as typed: read for the type of its key (see the module docstring)."""


def _field_default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_overrides(raw: dict, overrides: list[str], from_cli: dict[str, str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, _, value = item.partition("=")
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key name")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty YAML section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _CliText(value)
        from_cli[".".join(parts)] = item
    return raw


def _parse_value(value: str) -> Any:
    """An override's value as YAML (``3``, ``1e-5``, ``true``, ``[a, b]``); text that is not valid YAML stays text."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_yaml(path, config_to_dict(cfg))


def _build(cls: type, raw: Any, prefix: str, where: str, from_cli: dict[str, str] | None = None,
           base: Any = None) -> Any:
    """``cls`` from the mapping ``raw``; keys it lacks keep ``base``'s values (a field's own default
    instance, e.g. a stage config with the pipeline's defaults), else the class defaults."""
    if raw is None and prefix:  # an empty YAML section (all its keys commented out) means "all defaults"
        raw = {}
    from_cli = from_cli or {}
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        raise ConfigError(f"{_origin(section, from_cli, where) if section else where}: "
                          f"{section or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        origin = _origin(key, from_cli, where)
        raise ConfigError(f"{origin}: unknown config key {key!r}; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if base is not None:
                kwargs[name] = copy.deepcopy(getattr(base, name))
            continue
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            sub = getattr(base, name) if base is not None else _field_default(cls, name)
            kwargs[name] = _build(hints[name], raw[name], prefix=key + ".", where=where, from_cli=from_cli,
                                  base=sub if dataclasses.is_dataclass(sub) else None)
        else:
            kwargs[name] = _coerce(hints[name], raw[name], key, where, from_cli)
            _check_range(f, kwargs[name], key, _origin(key, from_cli, where))
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {prefix or 'config'}: {e}") from None


def _origin(key: str, from_cli: dict[str, str], where: str) -> str:
    """Where a key's value came from: the command-line override that set it, else the file."""
    for k, item in from_cli.items():
        if k == key or k.startswith(key + "."):
            return f"override {item!r}"
    return where


def _coerce(tp: Any, value: Any, key: str, where: str, from_cli: dict[str, str] | None = None) -> Any:
    if isinstance(value, _CliText):  # typed on the command line: verbatim for text keys, else YAML
        value = str(value) if tp is str else _parse_value(str(value))
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", where=where, from_cli=from_cli)
    where = _origin(key, from_cli or {}, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key}: bad value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        if (typing.get_args(tp) or (Any, Any))[1] is str:  # policies.sft=PATH: a path like any text key
            for k, v in value.items():
                if isinstance(v, str):
                    _check_text(v, f"{key}.{k}", where)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_MAX - 1 <= value <= INT64_MAX:  # torch, numpy and the tokenizers cannot hold it
                raise ConfigError(f"{where}: {key} must fit in 64 bits, got {value}")
            return value
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _check_text(str(value), key, where)
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    return value


INT64_MAX = 2**63 - 1


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``data``."""
    return data.count(b"\n", 0, offset) + 1


def _check_text(value: str, key: str, where: str) -> str:
    """Text keys are paths, names and URLs: a NUL byte cannot be in any of them (the OS refuses it
    deep inside a run), and text of only spaces is a slip (``out= ``) that would name a folder '   '."""
    if "\x00" in value:
        raise ConfigError(f"{where}: {key} must not contain a NUL character, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise ConfigError(f"{where}: {key} is not valid UTF-8 text, got {value!r}") from None
    if value and not value.strip():
        raise ConfigError(f"{where}: {key} is only whitespace ({value!r}); leave it empty or give a value")
    return value


def known_key(cls: type, dotted: str) -> bool:
    """Whether ``dotted`` (``train.lr``) names a key of config class ``cls`` (a key inside a
    mapping field such as ``policies.sft`` counts); checks names only, builds nothing."""
    tp: Any = cls
    for part in dotted.split("."):
        if typing.get_origin(tp) is dict:
            return True
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints or part not in {f.name for f in dataclasses.fields(tp)}:
            return False
        tp = hints[part]
    return True


def _numbers(value: Any) -> list[int | float]:
    """The numbers in a field's value: the value itself, or the items of a list."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _check_range(f: dataclasses.Field, value: Any, key: str, where: str) -> None:
    """Every number a user gives is checked against its field's ``param(min=, max=)`` range;
    inf and nan are refused unless the field says ``finite=False``."""
    meta = f.metadata
    lo, hi = meta.get("min"), meta.get("max")
    for v in _numbers(value):
        if isinstance(v, float) and not math.isfinite(v) and meta.get("finite", True):
            raise ConfigError(f"{where}: {key} must be a finite number, got {v!r}{range_text(meta)}")
        if isinstance(v, float) and math.isnan(v):
            continue  # allowed nan (finite=False) has no order
        too_low = lo is not None and (v <= lo if meta.get("min_exclusive") else v < lo)
        too_high = hi is not None and (v >= hi if meta.get("max_exclusive") else v > hi)
        if too_low or too_high:
            raise ConfigError(f"{where}: {key} must be {range_text(meta)[2:]}, got {v!r}")


def range_text(meta: Any) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if meta.get('max_exclusive') else '<='} {hi}")
    return f"; {' and '.join(parts)}" if parts else ""


def _post(cfg: Any, where: str) -> None:
    """``fill`` parent first (a parent may set its children's values), then ``finalize`` and
    ``validate`` children first."""
    _walk(cfg, where, ("fill",), top_down=True)
    _walk(cfg, where, ("finalize", "validate"), top_down=False)


def _walk(cfg: Any, where: str, hooks: tuple[str, ...], top_down: bool, path: str = "",
          parent: Any = None, root: Any = None) -> None:
    root = cfg if root is None else root
    if top_down:
        for h in hooks:
            _hook(cfg, h, where, path, parent, root)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            _walk(v, where, hooks, top_down, f"{path}.{f.name}" if path else f.name, cfg, root)
    if not top_down:
        for h in hooks:
            _hook(cfg, h, where, path, parent, root)


def validate_config(cfg: Any, where: str = "config") -> Any:
    """Run every ``finalize`` and ``validate`` of a config built in code (e.g. with ``dataclasses.replace``)."""
    _post(cfg, where)
    return cfg


_KEY_TOKEN = re.compile(r"(?<![\w./=-])[A-Za-z_]\w*(?:\.\w+)*")


def qualify_keys(message: str, section: Any, path: str, parent: Any = None,
                 sources: dict[str, str] | None = None) -> str:
    """A nested section's ``validate`` names keys as its own command would (``engine.name``,
    ``train.lr``); under another command the same section sits deeper (``eval.engine.name`` in the
    pipeline, ``gen.engine.name`` in ``label serve``). Each key the message starts with, and each
    dotted key in it, gets the section's path: keys named from the parent (``engine.name`` from
    the ``engine`` section) get the parent's path, keys of the section itself the section's.
    ``sources`` maps a key the top config sets itself to the key the user sets (the pipeline's
    ``ppo.engine`` comes from ``engine``)."""
    if not path:
        return message
    leaf = path.rsplit(".", 1)[-1]
    parent_path = path[: len(path) - len(leaf)]

    def source(key: str) -> str:
        for derived, given in (sources or {}).items():
            if key == derived or key.startswith(derived + "."):
                return given + key[len(derived):]
        return key

    def full(m: re.Match) -> str:
        tok = m.group(0)
        if m.start() != 0 and "." not in tok:
            return tok
        if parent is not None and (tok == leaf or tok.startswith(leaf + ".")) and known_key(type(parent), tok):
            return source(parent_path + tok)
        if known_key(type(section), tok):
            return source(f"{path}.{tok}")
        return tok

    return _KEY_TOKEN.sub(full, message)


def _hook(cfg: Any, hook: str, where: str, path: str = "", parent: Any = None, root: Any = None) -> None:
    fn = getattr(cfg, hook, None)
    if fn is not None:
        try:
            fn()
        except ConfigError as e:
            sources = getattr(root, "DERIVED_FROM", None)
            raise ConfigError(f"{where}: {qualify_keys(str(e), cfg, path, parent, sources)}") from None


def check(cond: bool, message: str) -> None:
    """Raise ConfigError(message) unless cond; for use in ``validate``."""
    if not cond:
        raise ConfigError(message)


def param(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING, *,
          min: float | None = None, max: float | None = None, min_exclusive: bool = False,
          max_exclusive: bool = False, finite: bool = True) -> Any:
    """A documented config field: ``lr: float = param(1e-5, "peak learning rate", min=0, min_exclusive=True)``.

    The help text is what ``instructrl <command> --help`` prints for the key. ``min``/``max``
    bound every number the field is given (a list field: each item), ``*_exclusive`` makes a
    bound strict; the loader checks them and refuses inf/nan unless ``finite=False``. This
    holds for every float field, with or without ``param``.
    """
    meta = {"help": help, "finite": finite}
    meta.update({k: v for k, v in (("min", min), ("max", max)) if v is not None})
    if min_exclusive:
        meta["min_exclusive"] = True
    if max_exclusive:
        meta["max_exclusive"] = True
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use factory= for mutable defaults")
    if dataclasses.is_dataclass(default):
        # a fresh copy of the given section each time, keeping any values set in it
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def overwrite_field():
    """The ``overwrite`` key of a command config (one help text for every command)."""
    return param(False, "start over in an output_dir that already holds a run; removes only the run's own files "
                        "(config.yaml, metrics.jsonl, log.txt, checkpoints/, its outputs), never anything else")


def get_key(cfg: Any, key: str) -> Any:
    """The value at a dotted key: ``get_key(cfg, "train.lr")``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace_keys(cfg: T, changes: dict[str, Any]) -> T:
    """A copy of ``cfg`` with dotted keys replaced (``{"train.lr": 3e-4}``), through ``dataclasses.replace``:
    values are set as they are, never formatted into text and parsed back."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = replace_keys(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **top)


def with_overrides(cfg: T, overrides: list[str], where: str = "override") -> T:
    """``cfg`` with command-line style ``key.sub=value`` overrides applied on top (keys it lacks keep
    ``cfg``'s values), then finalized and validated; for scripts that start from a derived config."""
    from_cli: dict[str, str] = {}
    raw = _apply_overrides({}, list(overrides), from_cli)
    out = _build(type(cfg), raw, prefix="", where=where, from_cli=from_cli, base=cfg)
    _post(out, where)
    return out
