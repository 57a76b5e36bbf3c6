"""Atomic writes, JSON Lines, run folders."""

import gzip
import os
import stat

import pytest

from instructrl.io import DataError, RunDir, atomic_dir, atomic_write_text, read_jsonl, write_jsonl


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_files_and_folders_get_ordinary_permissions(tmp_path):
    # mkstemp/mkdtemp make 0600/0700; outputs must be readable like any file the user writes.
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o644 and mode(tmp_path / "d") == 0o755


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "rows.jsonl"
    write_jsonl(p, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-export")

    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert p.read_text() == '{"a": 1}\n' and sorted(x.name for x in tmp_path.iterdir()) == ["rows.jsonl"]


def test_atomic_dir_crash_keeps_previous_folder(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "model" / "w").read_text() == "v1"
    assert [x.name for x in tmp_path.iterdir()] == ["model"]
    with atomic_dir(tmp_path / "model") as tmp:  # and a finished rebuild replaces it
        (tmp / "w").write_text("v2")
    assert (tmp_path / "model" / "w").read_text() == "v2" and [x.name for x in tmp_path.iterdir()] == ["model"]


def test_write_and_read_jsonl_gz_and_unicode(tmp_path):
    rows = [{"t": "naïve ☃"}, {"n": 2}]
    assert write_jsonl(tmp_path / "a.jsonl", rows) == 2
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write((tmp_path / "a.jsonl").read_text() + "\n\n")
    assert list(read_jsonl(tmp_path / "a.jsonl.gz")) == [(1, rows[0]), (2, rows[1])]


def test_read_jsonl_on_error_skips_and_reports(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\nnot json\n"a string"\n{"a": 2}\n')
    errs: list[DataError] = []
    assert [i for i, _ in read_jsonl(p, on_error=errs.append)] == [1, 4]
    assert [(e.line, e.field) for e in errs] == [(2, None), (3, None)]
    assert str(errs[1]) == f"{p}:3: expected a JSON object, got str"


def test_data_error_message_format():
    assert str(DataError("f.jsonl", 3, "prompt", "missing")) == "f.jsonl:3: field 'prompt': missing"
    assert str(DataError("f.jsonl", None, None, "file not found")) == "f.jsonl: file not found"


def test_run_dir(tmp_path):
    import torch

    run = RunDir(tmp_path / "run")
    run.log_metrics({"step": 1, "loss": torch.tensor(0.5)})
    run.log_metrics({"step": 2, "loss": 0.25})
    run.info("hello")
    assert run.read_metrics() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert run.checkpoints.is_dir() and "hello" in (tmp_path / "run" / "log.txt").read_text()
    other = RunDir(tmp_path / "run2", is_main=False)
    other.log_metrics({"step": 1})
    other.info("x")
    assert not (tmp_path / "run2").exists() and other.read_metrics() == []


def test_run_dir_saves_resolved_config(tmp_path):
    from instructrl.config import load_config
    from instructrl.train.sft import SFTConfig

    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.lr=3e-5"])
    RunDir(tmp_path / "run").save_config(cfg)
    assert load_config(SFTConfig, tmp_path / "run" / "config.yaml") == cfg
