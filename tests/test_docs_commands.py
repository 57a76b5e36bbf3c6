"""Every `instructrl ...` command line in README.md and docs/*.md names a real command, and
every key it sets is a key of that command's config (checked by name; nothing runs)."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from instructrl.cli import COMMANDS, _flags_to_overrides, _resolve, main
from instructrl.config import known_key, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Lines in docs this branch does not own, broken when written; strict: fixing one fails here
# until its entry goes.
KNOWN_BROKEN: set[tuple[str, str]] = set()  # (file, command prefix) of a doc line known to be wrong


def _commands_in(path: Path) -> list[tuple[str, int, str]]:
    """(file, line, command) for each command line in a fenced block and each inline `instructrl ...` span."""
    found, in_block, pending = [], False, None
    rel = str(path.relative_to(ROOT))
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            text = line.strip()
            if pending is not None:  # a continuation of the line before
                start, so_far = pending
                text = so_far + " " + text
                pending = None
            elif text.startswith("instructrl "):
                start = n
            else:
                continue
            if text.endswith("\\"):
                pending = (start, text[:-1])
                continue
            found.append((rel, start, text))
            continue
        for span in re.findall(r"`(instructrl [^`]*)`", line):
            found.append((rel, n, span))
    return found


def _clean(cmd: str) -> list[str] | None:
    """The command's arguments after ``instructrl``, placeholders dropped; None for a usage template."""
    cmd = re.split(r"\s+#", cmd, maxsplit=1)[0]
    if "<" in cmd:  # `instructrl <command> ...`: a template, not a command
        return None
    cmd = re.sub(r"(?:(?<=\s)|^)\[[^\]]*\]", " ", cmd)  # [optional parts]
    return [t for t in shlex.split(cmd)[1:] if t != "..."]


CASES = [c for p in DOCS for c in _commands_in(p)]


def _case_id(c):
    return f"{c[0]}:{c[1]}"


def test_the_docs_hold_commands():
    assert len(CASES) > 30 and any("data prepare" in c[2] for c in CASES)


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="known broken doc line"))
    if (c[0], c[2]) in KNOWN_BROKEN else c
    for c in CASES], ids=_case_id)
def test_doc_command_is_real_and_uses_known_keys(case, capsys):
    rel, line, cmd = case
    args = _clean(cmd)
    if args is None:
        pytest.skip("usage template")
    key, rest = _resolve(args)
    assert key is not None, f"{rel}:{line}: {cmd!r}: no such command"
    with pytest.raises(SystemExit) as e:
        main([*key, "--help"])
    assert e.value.code == 0
    module_name, cls_name, _, _ = COMMANDS[key]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    overrides = _flags_to_overrides(rest)
    i = 0
    while i < len(overrides):
        o = overrides[i]
        if o in ("--config", "--preset"):
            value = overrides[i + 1]
            if o == "--config":
                assert (ROOT / value).is_file(), f"{rel}:{line}: config file {value} missing"
                load_config(cls, ROOT / value)  # the shipped file parses and validates
            else:
                assert value in getattr(module, "PRESETS", {}), f"{rel}:{line}: no preset {value!r}"
            i += 2
            continue
        if o in ("--resume", "--overwrite", "--help", "-h"):
            assert o != "--resume" or known_key(cls, "resume"), f"{rel}:{line}: {cmd!r} cannot --resume"
            i += 1
            continue
        assert "=" in o, f"{rel}:{line}: {o!r} is not key=value"
        dotted = o.split("=", 1)[0]
        assert known_key(cls, dotted), f"{rel}:{line}: {cmd!r}: {dotted!r} is not a key of 'instructrl {' '.join(key)}'"
        i += 1


def test_known_key():
    from instructrl.hygiene import PrepareConfig

    assert known_key(PrepareConfig, "input") and known_key(PrepareConfig, "hygiene.seed")
    assert not known_key(PrepareConfig, "data") and not known_key(PrepareConfig, "hygiene.seed.x")
