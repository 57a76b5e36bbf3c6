"""Issue 22: never lose a user's data, never exit 0 on garbage, never show a traceback."""

import dataclasses
import gzip
import json
import os

import pytest

from instructrl import io
from instructrl.cli import main
from instructrl.config import ConfigError, load_config, param
from instructrl.data import load_demonstrations, load_prompts, require_rows
from instructrl.io import (OUTPUT_MARKER, DataError, OutputError, RunDir, atomic_dir, prepare_run_folder,
                           read_jsonl)

PROMPTS = [{"id": "a", "prompt": "hello there", "user_id": "u1"}, {"id": "b", "prompt": "second one", "user_id": "u2"}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- 1. out= never deletes what is not ours ------------------------------------------------


def test_atomic_dir_refuses_a_users_folder_and_a_file(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="did not write"):
        with atomic_dir(mine) as tmp:
            (tmp / "x").write_text("y")
    assert (mine / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "file.txt"
    f.write_text("keep")
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_dir(f):
            pass
    assert f.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine"]  # no temp folder left
    with pytest.raises(OutputError, match="did not write"):  # the same check, for a command's start
        io.check_replaceable(mine)
    io.check_replaceable(tmp_path / "new")


def test_atomic_dir_replaces_its_own_empty_and_legacy_folders(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    assert (out / OUTPUT_MARKER).exists()
    with atomic_dir(out) as tmp:  # ours: marker
        (tmp / "w").write_text("v2")
    assert (out / "w").read_text() == "v2"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "w").write_text("v1")
    assert (empty / "w").read_text() == "v1"
    old = tmp_path / "old-model"  # written before the marker existed
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OutputError):
        with atomic_dir(old):
            pass
    with atomic_dir(old, legacy=("config.json",)) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert json.loads((old / "config.json").read_text()) == {"new": 1}


def test_atomic_dir_uses_an_atomic_exchange_where_the_kernel_has_one(tmp_path, monkeypatch):
    calls = []
    real = io._exchange
    monkeypatch.setattr(io, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v2")
    assert (out / "w").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["d"]
    assert len(calls) == 1  # the first build has nothing to swap with
    if not calls[0]:
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported on this file system; the fallback ran")


def test_kill_between_the_two_renames_is_recovered_on_the_next_call(tmp_path, monkeypatch):
    out = tmp_path / "policy"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v1")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # the two-rename fallback
    real_replace = os.replace
    n = []

    def killed_after_first_rename(src, dst):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt  # the process dies before moving the new folder in
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "w").write_text("v2")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".old-" in p.name]
    io.recover_atomic_dir(out)  # what the next atomic_dir call does first
    assert (out / "w").read_text() == "v1" and [p.name for p in tmp_path.iterdir()] == ["policy"]
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("v3")
    assert (out / "w").read_text() == "v3" and [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_data_prepare_into_the_inputs_own_folder_keeps_everything_else(tmp_path, capsys):
    write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "NOTES.txt").write_text("notes")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "orig.csv").write_text("a,b\n")
    assert main(["data", "prepare", f"input={tmp_path / 'prompts.jsonl'}", f"out={tmp_path}"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["NOTES.txt", "prompts.jsonl", "raw", "report.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert (tmp_path / "raw" / "orig.csv").read_text() == "a,b\n"
    assert len(load_prompts(tmp_path / "prompts.jsonl")) == 2
    assert len(load_prompts(tmp_path / "train.jsonl")) + len(load_prompts(tmp_path / "val.jsonl")) + \
        len(load_prompts(tmp_path / "test.jsonl")) == 2


def test_data_prepare_refuses_an_out_file_and_overwriting_its_input(tmp_path, capsys):
    src = write_rows(tmp_path / "train.jsonl", PROMPTS)
    notes = tmp_path / "NOTES.txt"
    notes.write_text("notes")
    assert main(["data", "prepare", f"input={src}", f"out={notes}"]) == 2
    assert notes.read_text() == "notes"
    assert main(["data", "prepare", f"input={src}", f"out={tmp_path}"]) == 2
    assert "input would be overwritten" in capsys.readouterr().err
    assert [json.loads(x)["id"] for x in src.read_text().splitlines()] == ["a", "b"]


# --- 2. runs never mix ----------------------------------------------------------------------


@dataclasses.dataclass
class _Train:
    lr: float = 1e-5
    epochs: int = 1


@dataclasses.dataclass
class _Cfg:
    output_dir: str = ""
    resume: bool = False
    train: _Train = dataclasses.field(default_factory=_Train)


def test_fresh_start_refuses_a_folder_holding_a_run(tmp_path):
    cfg = _Cfg(output_dir=str(tmp_path))
    run = RunDir.start(tmp_path, cfg)
    run.log_metrics({"step": 1})
    with pytest.raises(OutputError, match="already holds a run"):
        RunDir.start(tmp_path, cfg)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "checkpoints" / "epoch-1").mkdir()  # a checkpoint alone is a run too
    with pytest.raises(OutputError):
        prepare_run_folder(tmp_path, dataclasses.asdict(cfg))
    (tmp_path / "checkpoints" / "epoch-1").rmdir()
    (tmp_path / "model").mkdir()  # and so is a saved output
    with pytest.raises(OutputError):
        prepare_run_folder(tmp_path, dataclasses.asdict(cfg), outputs=("model",))


def test_a_start_that_failed_before_its_first_step_can_simply_be_run_again(tiny_model_dir, tmp_path, capsys):
    # e.g. a mistyped model path: the folder holds config.yaml and log.txt, nothing else
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi there."}) + "\n")
    run = tmp_path / "run"
    argv = ["sft", f"data.train={data}", f"output_dir={run}", "train.epochs=1", "train.batch_size=1",
            "train.micro_batch_size=1", f"data.val={data}"]
    assert main([*argv, f"model={tmp_path / 'no-such-model'}"]) == 2
    assert "does not exist" in capsys.readouterr().err and (run / "config.yaml").exists()
    assert main([*argv, f"model={tiny_model_dir}"]) == 0  # no --overwrite needed
    assert (run / "model").is_dir() and "does not exist" in (run / "log.txt").read_text()  # the log keeps both


def test_overwrite_clears_only_our_own_files(tmp_path):
    cfg = _Cfg(output_dir=str(tmp_path))
    run = RunDir.start(tmp_path, cfg)
    run.log_metrics({"step": 1})
    (run.checkpoints / "epoch-1").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "my-notes.md").write_text("mine")
    RunDir.start(tmp_path, cfg, overwrite=True, outputs=("model",)).log_metrics({"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml", "log.txt",
                                                          "metrics.jsonl", "my-notes.md"]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not any((tmp_path / "checkpoints").iterdir())


def test_resume_refuses_a_changed_config_listing_each_key(tmp_path):
    RunDir.start(tmp_path, _Cfg(output_dir=str(tmp_path)))
    changed = _Cfg(output_dir=str(tmp_path), resume=True, train=_Train(lr=3e-5, epochs=3))
    with pytest.raises(OutputError, match=r"train\.lr: 1e-05 -> 3e-05") as e:
        RunDir.start(tmp_path, changed, resume=True)
    assert str(e.value).endswith("start over): train.lr: 1e-05 -> 3e-05")  # epochs, resume: safe keys
    ok = _Cfg(output_dir=str(tmp_path), resume=True, train=_Train(epochs=3))
    RunDir.start(tmp_path, ok, resume=True)  # extending the run is fine
    with pytest.raises(OutputError, match="train.epochs: 3 -> 5"):
        prepare_run_folder(tmp_path, dataclasses.asdict(_Cfg(train=_Train(epochs=5))), resume=True, safe_keys=set())


def test_cli_overwrite_flag_needs_a_config_that_has_it(tmp_path, capsys):
    src = write_rows(tmp_path / "p.jsonl", PROMPTS)
    assert main(["data", "prepare", f"input={src}", f"out={tmp_path / 'o'}", "--overwrite"]) == 2
    assert "has no --overwrite" in capsys.readouterr().err


# --- 3. range checks ------------------------------------------------------------------------


@dataclasses.dataclass
class _Ranged:
    lr: float = param(1e-5, "lr", min=0, min_exclusive=True)
    min_lr_ratio: float = param(0.0, "ratio", min=0, max=1)
    max_grad_norm: float = param(1.0, "clip; 0 disables", min=0)
    seed: int = param(0, "seed", min=0)
    plain: float = 0.5
    fractions: list[float] = param(factory=lambda: [0.5, 0.5], help="f", min=0, max=1)
    scale: float = param(1.0, "may be inf", finite=False)


@pytest.mark.parametrize("override, message", [
    ("lr=inf", "lr must be a finite number"),
    ("lr=nan", "lr must be a finite number"),
    ("lr=.inf", "lr must be a finite number"),
    ("lr=0", "lr must be > 0"),
    ("min_lr_ratio=7", "min_lr_ratio must be >= 0 and <= 1, got 7"),
    ("max_grad_norm=-1", "max_grad_norm must be >= 0, got -1"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("plain=-inf", "plain must be a finite number"),
    ("fractions=[0.5, 1.5]", "fractions must be >= 0 and <= 1, got 1.5"),
])
def test_out_of_range_numbers_name_the_key_and_range(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
        load_config(_Ranged, None, [override])
    assert f"override {override!r}" in str(e.value)


def test_in_range_values_and_allowed_inf_pass():
    cfg = load_config(_Ranged, None, ["lr=3e-5", "min_lr_ratio=1", "max_grad_norm=0", "seed=7", "scale=inf"])
    assert cfg.scale == float("inf") and cfg.min_lr_ratio == 1.0


def test_range_in_a_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("min_lr_ratio: 7\n")
    with pytest.raises(ConfigError, match=f"{p}: min_lr_ratio must be"):
        load_config(_Ranged, p)


def test_help_shows_the_range(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "seed of the user -> split assignment; >= 0" in capsys.readouterr().out


# --- 4. clear errors, not tracebacks ----------------------------------------------------------


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid UTF-8"):
        load_prompts(p)


def test_a_bom_is_tolerated(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(PROMPTS[0]).encode() + b"\n")
    assert [r.id for r in load_prompts(p)] == ["a"]


def test_a_folder_where_a_file_belongs(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_demonstrations(tmp_path)


@pytest.mark.parametrize("content", [b"this is not gzip at all", gzip.compress(b'{"id": "a"}\n' * 50)[:30]])
def test_a_corrupt_or_truncated_gzip(tmp_path, content):
    p = tmp_path / "p.jsonl.gz"
    p.write_bytes(content)
    with pytest.raises(DataError, match="not a valid gzip file"):
        list(read_jsonl(p))


def test_nan_and_lone_surrogates_are_refused_on_their_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": NaN}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: not valid JSON \(NaN"):
        list(read_jsonl(p, allow_nan=False))
    assert [r["a"] for _, r in read_jsonl(p)][0] == 1  # our own metrics may hold a NaN loss
    p.write_text('{"id": "a", "prompt": "x", "score": Infinity}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:1: not valid JSON \(Infinity"):
        load_prompts(p)
    p.write_text('{"a": "ok \\u00e9"}\n{"a": "bad \\ud800"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: .*surrogate"):
        list(read_jsonl(p))


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    p = write_rows(tmp_path / "p.jsonl", PROMPTS)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io, "open", denied, raising=False)  # chmod 0 means nothing to root
    with pytest.raises(DataError, match="p.jsonl: cannot read: Permission denied"):
        load_prompts(p)


def test_read_metrics_survives_a_cut_last_line_but_not_damage(tmp_path):
    run = RunDir(tmp_path)
    run.log_metrics({"step": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-append
    assert run.read_metrics() == [{"step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(DataError, match="metrics.jsonl:1: .*damaged"):
        run.read_metrics()


def test_require_rows(tmp_path):
    assert require_rows([1, 2], "x.jsonl", "demonstration") == [1, 2]
    with pytest.raises(DataError, match="x.jsonl: needs at least one demonstration, found 0"):
        require_rows([], "x.jsonl", "demonstration")
    with pytest.raises(DataError, match="needs at least 2 ranking"):
        require_rows([1], "x.jsonl", "ranking", minimum=2)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe{}\n")
    for args in (["input=" + str(empty)], ["input=" + str(bad)], ["input=" + str(tmp_path)]):
        assert main(["data", "prepare", *args, f"out={tmp_path / 'o'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("instructrl: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import instructrl.hygiene as hygiene

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "train.jsonl"))

    monkeypatch.setattr(hygiene, "load_prompts", full)
    assert main(["data", "prepare", "input=x.jsonl", f"out={tmp_path / 'o'}"]) == 2
    assert capsys.readouterr().err == f"instructrl: error: {tmp_path / 'o' / 'train.jsonl'}: No space left on device\n"


# --- 5. command groups ---------------------------------------------------------------------


@pytest.mark.parametrize("group", ["label", "data", "model"])
def test_a_group_word_lists_its_subcommands(group, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: instructrl {group} <subcommand>" in out and f"  {group} " in out
    assert main([group]) == 2
    assert "subcommands:" in capsys.readouterr().err
    assert main([group, "nonsense"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err


# --- 6. IFEval language check with langdetect --------------------------------------------------


def test_response_language_uses_langdetect(monkeypatch):
    pytest.importorskip("langdetect")  # a default dependency; absent only in a partial install
    from instructrl.tasks.ifeval import check_instruction, detect_language

    en = "The weather was lovely this morning, so we walked along the river and talked about our plans."
    de = "Heute Morgen war das Wetter schön, also sind wir am Fluss entlang gegangen und haben geredet."
    assert detect_language(en) == ("en", "langdetect")
    assert check_instruction("language:response_language", {"language": "en"}, en)
    assert not check_instruction("language:response_language", {"language": "de"}, en)
    assert check_instruction("language:response_language", {"language": "de"}, de)
    assert [detect_language(en)[0] for _ in range(5)] == ["en"] * 5  # seeded: the same answer every time


def test_response_language_falls_back_to_the_heuristic(monkeypatch):
    import sys

    from instructrl.tasks.ifeval import detect_language

    monkeypatch.setitem(sys.modules, "langdetect", None)  # import fails as if not installed
    assert detect_language("The dog and the cat are in the house with the children.") == ("en", "heuristic")


def test_langdetect_is_not_fooled_by_capitals():
    pytest.importorskip("langdetect")
    from instructrl.tasks.ifeval import check_instruction

    fr = "C'EST UNE VILLE MAGNIFIQUE ET LES GENS SONT TRÈS GENTILS."
    assert not check_instruction("change_case:english_capital", {}, fr)
    assert check_instruction("change_case:english_capital", {}, "THE CITY IS BEAUTIFUL AND THE PEOPLE ARE KIND.")


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "dpo", "eval"])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_an_unusable_device_is_one_clear_line_before_any_model_loads(command, device, tmp_path, monkeypatch, capsys):
    """device=cuda without CUDA (and cuda:3 on a machine with fewer GPUs): refused by the runtime,
    which every command builds before it reads data or weights (the model paths here do not exist)."""
    import torch

    from instructrl.cli import main

    if torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    args = {"sft": ["model=/nonexistent", "data.train=/nonexistent.jsonl"],
            "rm": ["model=/nonexistent", "data.train=/nonexistent.jsonl"],
            "ppo": ["policy=/nonexistent", "reward_model=/nonexistent", "prompts=/nonexistent.jsonl"],
            "dpo": ["model=/nonexistent", "data.train=/nonexistent.jsonl"],
            "eval": ["policies={\"a\": \"/nonexistent\"}", "baseline=a", "tasks=/nonexistent.jsonl",
                     "reward_model=/nonexistent"]}[command]
    code = main([command, *args, f"device={device}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"device={device}" in err and ("CUDA is not available" in err or "CUDA device(s)" in err), err
    assert "Traceback" not in err and "nonexistent" not in err


# --- 7. model convert on a file that is not GGUF ------------------------------------------------


def _not_gguf(tmp_path, kind):
    import struct

    p = tmp_path / {"text": "notes.txt", "empty": "empty.gguf", "safetensors": "model.safetensors",
                    "truncated": "cut.gguf", "no_arch": "bare.gguf", "missing": "missing.gguf",
                    "folder": "models"}[kind]
    if kind == "text":
        p.write_text("hello, not a model\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "safetensors":
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(p))
    elif kind == "truncated":  # the magic bytes, then the header cut short
        p.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    elif kind == "no_arch":  # a valid GGUF v3 header with no tensors and no metadata
        p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    elif kind == "folder":
        p.mkdir()
    return p


@pytest.mark.parametrize("kind, message", [
    ("text", "is not a GGUF file (it does not start with the GGUF magic bytes)"),
    ("empty", "is not a GGUF file (an empty file)"),
    ("safetensors", "needs no conversion"),
    ("truncated", "cannot convert"),
    ("no_arch", "general.architecture"),
    ("missing", "does not exist"),
    ("folder", "is a folder, not a GGUF file"),
])
def test_model_convert_of_a_non_gguf_file_is_one_line_naming_it(kind, message, tmp_path, capsys):
    src = _not_gguf(tmp_path, kind)
    out = tmp_path / "converted"
    assert main(["model", "convert", f"gguf={src}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("instructrl: error: gguf: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(src) in err and message in err, err
    assert not out.exists()


# --- 8. no measured figures in --help ---------------------------------------------------------


def test_help_texts_hold_no_measured_timings_or_speedups(capsys):
    """Timings, speed-ups and measured shares belong in docs/ (with the CPU that measured them); --help
    says what a key does. Paper defaults ("InstructGPT: 0.02") and the precision rule's threshold are
    not measurements."""
    import re

    from instructrl.cli import COMMANDS

    figure = re.compile(r"~\s?\d|\b\d+(\.\d+)?\s?(x\b|×|s\b|ms\b|min\b|h\b)|faster|slower|speed-?up", re.I)
    rule = "one-off probe measures bf16 1.5x faster or more"  # the threshold resolve_precision applies
    found = []
    for key in COMMANDS:
        with pytest.raises(SystemExit):
            main([*key, "--help"])
        for line in capsys.readouterr().out.replace(rule, "").splitlines():
            if figure.search(line):
                found.append(f"{' '.join(key)}: {line.strip()}")
    assert not found, "\n".join(found)


# --- 9. a demanding user's inputs: one line each, exit 2 -----------------------------------------


def _one_line_error(capsys, argv) -> str:
    """Exit 2 and one error line on stderr (besides progress bars: loading weights prints one)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [seg for x in err.split("\n") if (seg := x.split("\r")[-1].strip()) and "it/s]" not in seg]
    assert len(lines) == 1 and lines[0].startswith("instructrl: error: ") and "Traceback" not in err, err
    return lines[0] + "\n"


def test_invalid_yaml_is_one_line_with_its_line_and_column(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  lr: 1e-5\n  epochs: [1,\n")
    err = _one_line_error(capsys, ["sft", "--config", str(bad)])
    assert f"{bad}:4:1: not valid YAML: " in err, err
    tab = tmp_path / "tab.yaml"
    tab.write_text("model: x\n\tdata: y\n")
    assert f"{tab}:2:1: not valid YAML: found character '\\t'" in _one_line_error(capsys, ["sft", "--config", str(tab)])


def test_a_key_given_twice_in_a_yaml_config_is_an_error_naming_both_lines(tmp_path, capsys):
    # plain YAML keeps the second value silently: a user who set train.lr twice trains with one of them
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1e-5\n  epochs: 2\n  lr: 3e-4\nmodel: x\n")
    err = _one_line_error(capsys, ["sft", "--config", str(twice)])
    assert f"{twice}:4:3: not valid YAML: duplicate key 'lr' (first given on line 2)" in err, err
    ok = tmp_path / "ok.yaml"  # the same key in two different mappings is fine
    ok.write_text("sft:\n  train:\n    lr: 1e-5\nrm:\n  train:\n    lr: 1e-5\n")
    from instructrl.config import load_config
    from instructrl.pipeline import PipelineConfig

    assert load_config(PipelineConfig, ok, []).rm.train.lr == 1e-5


@pytest.fixture
def damaged_model(tiny_model_dir, tmp_path):
    """The tiny model with its weights file cut short (a copy interrupted, a disk that filled up)."""
    import shutil

    bad = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return bad


def test_damaged_weights_are_one_line_naming_the_folder(damaged_model, tmp_path, capsys):
    demos = write_rows(tmp_path / "demos.jsonl", [{"prompt": "hi", "response": "hello"}] * 4)
    rankings = write_rows(tmp_path / "r.jsonl", [{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 1]}] * 2)
    for argv in (["sft", f"model={damaged_model}", f"data.train={demos}", f"output_dir={tmp_path / 's'}"],
                 ["rm", "eval", f"model={damaged_model}", f"data={rankings}", f"output_dir={tmp_path / 'r'}"]):
        err = _one_line_error(capsys, argv)
        assert f"could not load the model folder {damaged_model}: SafetensorError" in err and "damaged" in err, err


def test_walked_inputs_that_must_stay_one_line(tiny_model_dir, tmp_path, capsys):
    """Inputs tried for issue 22 that already gave one line: kept that way."""
    k1 = write_rows(tmp_path / "k1.jsonl", [{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 1]},
                                           {"prompt": "bye", "responses": ["only one"], "ranking": [0]}])
    err = _one_line_error(capsys, ["dpo", f"model={tiny_model_dir}", f"data.train={k1}", f"output_dir={tmp_path / 'd'}"])
    assert f"{k1}:2: field 'responses': a ranking needs K >= 2 responses, got 1" in err
    err = _one_line_error(capsys, ["rm", "eval", f"model={tmp_path / 'nothere'}", f"data={k1}",
                                   f"output_dir={tmp_path / 'r'}"])
    assert "does not exist" in err and "nothere" in err
    empty_file, empty_dir = tmp_path / "policy.bin", tmp_path / "policy"
    empty_file.write_bytes(b"")
    empty_dir.mkdir()
    tasks = tmp_path / "tasks.jsonl"
    from instructrl.tasks.generator import generate_tasks, save_tasks

    save_tasks(tasks, generate_tasks(2, seed=0))
    for policy, needle in ((empty_file, "not a model folder (a file)"), (empty_dir, "not a model folder (no config.json)")):
        err = _one_line_error(capsys, ["eval", f"policies={{sft: {policy}}}", "baseline=sft", f"tasks={tasks}",
                                       f"reward_model={tiny_model_dir}", f"output_dir={tmp_path / 'e'}"])
        assert f"policies.sft: {policy}: {needle}" in err, err
    lst = tmp_path / "list.yaml"
    lst.write_text("- train.lr: 1e-5\n")
    assert "top level must be a mapping" in _one_line_error(capsys, ["ppo", "--config", str(lst)])
    assert "train.lr must be a number, got 'abc'" in _one_line_error(capsys, ["sft", "train.lr=abc"])


def test_eval_output_dir_that_is_a_file_fails_before_any_sampling(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import instructrl.models as models
    from instructrl.tasks.generator import generate_tasks, save_tasks

    tasks = tmp_path / "tasks.jsonl"
    save_tasks(tasks, generate_tasks(2, seed=0))
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("sampled before checking output_dir"))
    err = _one_line_error(capsys, ["eval", f"policies={{sft: {tiny_model_dir}}}", "baseline=sft", f"tasks={tasks}",
                                   f"reward_model={tiny_model_dir}", f"output_dir={tasks}"])
    assert f"output_dir: {tasks} exists and is not a folder" in err, err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"hello world"], ids=["empty", "cut", "text"])
def test_a_damaged_state_file_is_a_config_error_naming_it(tmp_path, content):
    from instructrl.train.common import load_state

    p = tmp_path / "step-000002" / "state.pt"
    p.parent.mkdir()
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=r"resume: .*state\.pt is damaged or cut short .*; remove .*step-000002"):
        load_state(p)


def test_resume_from_a_damaged_checkpoint_is_one_line(tiny_model_dir, tmp_path, capsys):
    demos = write_rows(tmp_path / "demos.jsonl", [{"prompt": "hi there", "response": "hello you"}] * 4)
    args = ["sft", f"model={tiny_model_dir}", f"data.train={demos}", f"output_dir={tmp_path / 'run'}",
            "train.batch_size=2", "train.micro_batch_size=2", "train.precision=fp32"]
    assert main([*args, "train.epochs=1"]) == 0
    capsys.readouterr()
    (state,) = (tmp_path / "run" / "checkpoints").glob("*/state.pt")
    state.write_bytes(state.read_bytes()[:100])
    err = _one_line_error(capsys, [*args, "train.epochs=2", "--resume"])
    assert f"resume: {state} is damaged or cut short" in err, err
