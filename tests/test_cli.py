"""`instructrl <command>`: bad input exits 2 with one clear line, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructrl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("instructrl: error: "), err
    assert "Traceback" not in err
    return lines[-1]


def test_sft_malformed_demonstrations(tmp_path, tiny_model_dir, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n"
                     + json.dumps({"prompt": "Hi", "reply": "Hello"}) + "\n")
    code, _, err = run_cli(["sft", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                            f"data.train={demos}"], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert f"{demos}:2: field 'response': missing" in line
    log = tmp_path / "run" / "log.txt"  # the run folder says why it stopped, too
    assert f"{demos}:2: field 'response': missing" in log.read_text()


def test_sft_malformed_json_line(tmp_path, tiny_model_dir, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi", \n')
    code, _, err = run_cli(["sft", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                            f"data.train={demos}"], capsys)
    assert code == 2 and f"{demos}:2: not valid JSON" in assert_one_line_error(err)


def test_unknown_override_key(tmp_path, capsys):
    code, _, err = run_cli(["sft", "train.learning_rate=1e-4", "data.train=x.jsonl"], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert "'train.learning_rate'" in line and "override 'train.learning_rate=1e-4'" in line and "lr" in line


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("data:\n  train: x.jsonl\n  shuffle: true\n")
    code, _, err = run_cli(["sft", "--config", str(cfg)], capsys)
    assert code == 2 and f"{cfg}: unknown config key 'data.shuffle'" in assert_one_line_error(err)


def test_missing_train_file_setting(capsys):
    code, _, err = run_cli(["sft"], capsys)
    assert code == 2 and "data.train" in assert_one_line_error(err)


def test_train_file_that_does_not_exist(tmp_path, tiny_model_dir, capsys):
    code, _, err = run_cli(["sft", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                            f"data.train={tmp_path / 'missing.jsonl'}"], capsys)
    assert code == 2 and "missing.jsonl: file not found" in assert_one_line_error(err)


def test_missing_model_folder(tmp_path, capsys):
    demos = ROOT / "docs" / "examples" / "demonstrations.jsonl"
    code, _, err = run_cli(["sft", f"model={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'run'}",
                            f"data.train={demos}"], capsys)
    assert code == 2 and "does not exist" in assert_one_line_error(err)


def test_unknown_command(capsys):
    code, _, err = run_cli(["sfft"], capsys)
    assert code == 2 and "unknown command 'sfft'" in err


def test_console_entry_point_exit_code(tmp_path):
    """The real process: exit status 2 and a single stderr line."""
    r = subprocess.run([sys.executable, "-m", "instructrl", "sft", "train.nope=1", "data.train=x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("instructrl: error: override 'train.nope=1'")
    assert "Traceback" not in r.stderr


def test_double_dash_flags_become_dotted_overrides():
    from instructrl.cli import _flags_to_overrides

    assert _flags_to_overrides(["--data", "x.jsonl", "--model=/m", "--max-new-tokens", "8", "--greedy",
                                "--config", "c.yaml", "--preset", "quick", "--resume", "train.lr=1e-5"]) == \
        ["data=x.jsonl", "model=/m", "max_new_tokens=8", "greedy=true", "--config", "c.yaml", "--preset", "quick",
         "--resume", "train.lr=1e-5"]


def test_ifeval_accepts_flag_spelling(tmp_path, capsys):
    from instructrl.cli import main

    assert main(["eval", "ifeval", "--data", str(tmp_path / "missing.jsonl"), "--model", "/tmp"]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
