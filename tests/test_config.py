"""Configs: YAML + dotted overrides, coercion, clear errors, hooks; every command's --help; every configs/*.yaml."""

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from instructrl.cli import COMMANDS, main
from instructrl.config import ConfigError, check, load_config, param, save_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Opt:
    lr: float = param(1e-5, "peak learning rate")
    epochs: int = param(2, "passes")
    warmup: float = param(0.0, "warmup share")
    total: int = param(0, "derived: epochs * 10")

    def finalize(self):
        self.total = self.epochs * 10

    def validate(self):
        check(self.lr > 0, "opt.lr must be > 0")


@dataclass
class Cfg:
    model: str = param("default", "model")
    precision: Literal["bf16", "fp32"] = param("bf16", "precision")
    resume: bool = param(False, "resume")
    layers: list[int] = param(factory=lambda: [1, 2], help="layers")
    note: str | None = param(None, "optional text")
    opt: Opt = param(Opt(), "optimiser")
    seen: list = param(factory=list, help="records the order hooks ran in")

    def finalize(self):
        # children are finalised first: opt.total is already derived here
        self.seen.append(("parent.finalize", self.opt.total))

    def validate(self):
        check(self.model != "bad", "model must not be 'bad'")


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(cls, path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(cls, path, overrides)
    return str(ei.value)


# --------------------------------------------------------------------------- parsing


def test_defaults_and_hooks():
    cfg = load_config(Cfg)
    assert cfg.opt.lr == 1e-5 and cfg.opt.total == 20 and cfg.layers == [1, 2]
    assert cfg.seen == [("parent.finalize", 20)]


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "model: m1\nopt:\n  lr: 3.0e-4\n  epochs: 5\nlayers: [4]\n")
    cfg = load_config(Cfg, p, ["opt.epochs=7", "precision=fp32", "resume=true", "layers=[1, 2, 3]", "note=hello world"])
    assert (cfg.model, cfg.opt.lr, cfg.opt.epochs, cfg.opt.total) == ("m1", 3e-4, 7, 70)
    assert cfg.precision == "fp32" and cfg.resume is True and cfg.layers == [1, 2, 3] and cfg.note == "hello world"


def test_type_coercion(tmp_path):
    # YAML 1.1 reads "1e-5" (no dot) as a string; a float field still takes it. An int is a fine float.
    cfg = load_config(Cfg, write(tmp_path, "opt:\n  lr: 1e-5\n  warmup: 0\n"), ["model=123", "note=null"])
    assert cfg.opt.lr == 1e-5 and isinstance(cfg.opt.warmup, float) and cfg.model == "123" and cfg.note is None
    assert load_config(Cfg, None, ["opt.lr=2e-3"]).opt.lr == 2e-3


def test_override_value_that_is_not_yaml_stays_text():
    assert load_config(Cfg, None, ["model=[unclosed"]).model == "[unclosed"


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, "opt:\n  # lr: 1.0\nmodel: x\n"), ["opt.epochs=3"])
    assert cfg.opt.epochs == 3 and cfg.opt.lr == 1e-5
    assert load_config(Cfg, write(tmp_path, "opt:\n")).opt.epochs == 2


def test_empty_file_means_defaults(tmp_path):
    assert load_config(Cfg, write(tmp_path, "# nothing\n")).model == "default"


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "opt:\n  lrr: 1\n")
    msg = error(Cfg, p)
    assert str(p) in msg and "'opt.lrr'" in msg and "known keys here: epochs, lr, total, warmup" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "modle: x\n")
    assert f"{p}: unknown config key 'modle'" in error(Cfg, p)


def test_unknown_override_key_names_the_override(tmp_path):
    p = write(tmp_path, "model: x\n")
    msg = error(Cfg, p, ["opt.lrr=1"])
    assert msg.startswith("override 'opt.lrr=1': unknown config key 'opt.lrr'")
    assert "override 'optt.lr=1': unknown config key 'optt'" in error(Cfg, p, ["optt.lr=1"])


@pytest.mark.parametrize("text,needle", [
    ("opt:\n  epochs: 1.5\n", "opt.epochs must be an integer, got 1.5"),
    ("opt:\n  epochs: true\n", "opt.epochs must be an integer, got True"),
    ("opt:\n  lr: fast\n", "opt.lr must be a number, got 'fast'"),
    ("resume: 1\n", "resume must be true or false, got 1"),
    ("precision: fp16\n", "precision must be one of ['bf16', 'fp32'], got 'fp16'"),
    ("layers: 3\n", "layers must be a list, got 3"),
    ("layers: [1, x]\n", "layers[1] must be an integer, got 'x'"),
    ("model: [a]\n", "model must be a string, got ['a']"),
    ("opt: 3\n", "opt must be a mapping, got 3"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_types_name_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    msg = error(Cfg, p)
    assert msg.startswith(str(p)) and needle in msg, msg


def test_bad_override_type_names_the_override(tmp_path):
    p = write(tmp_path, "opt:\n  lr: 1.0e-5\n")
    assert error(Cfg, p, ["opt.epochs=two"]) == "override 'opt.epochs=two': opt.epochs must be an integer, got 'two'"


@pytest.mark.parametrize("override,needle", [
    ("opt.lr", "expected key.sub=value"),
    ("model.x=1", "'model' is not a section"),
    ("opt..lr=1", "empty key name"),
])
def test_malformed_overrides(tmp_path, override, needle):
    assert needle in error(Cfg, write(tmp_path, "model: m\n"), [override])


def test_validate_runs_on_children_and_parent(tmp_path):
    p = write(tmp_path, "opt:\n  lr: -1.0\n")
    assert error(Cfg, p) == f"{p}: opt.lr must be > 0"
    assert error(Cfg, None, ["model=bad"]) == "config: model must not be 'bad'"


def test_missing_file():
    assert "cannot read config file" in error(Cfg, "/nonexistent/c.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Cfg, None, ["opt.lr=3e-4", "note=x", "precision=fp32"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(Cfg, tmp_path / "saved.yaml")
    # finalize() appends to `seen` again on reload; everything else is identical
    assert dataclasses.replace(again, seen=[]) == dataclasses.replace(cfg, seen=[])


# --------------------------------------------------------------------------- every command


def _config_class(key):
    module, cls_name, _, _ = COMMANDS[key]
    return getattr(importlib.import_module(module), cls_name)


@pytest.mark.parametrize("key", list(COMMANDS), ids=lambda k: "-".join(k))
def test_help_works_for_every_command(key, capsys):
    with pytest.raises(SystemExit) as ei:
        main([*key, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"instructrl {' '.join(key)}" in out
    # every top-level field is listed with its help text
    for f in dataclasses.fields(_config_class(key)):
        assert f.name in out
        assert f.metadata.get("help", "") in out, f"{f.name} has no help text in --help"


@pytest.mark.parametrize("key", list(COMMANDS), ids=lambda k: "-".join(k))
def test_every_config_field_is_documented(key):
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{prefix}{f.name} has no help text (use param(default, help))"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")

    walk(_config_class(key))


def test_top_level_usage(capsys):
    assert main([]) == 0 and main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(" ".join(k) in out for k in COMMANDS)
    assert main(["no-such-command"]) == 2


def command_for_config(stem: str) -> tuple[str, ...] | None:
    """configs/<stem>.yaml -> its command: sft -> sft, rm_eval -> rm eval, label -> label serve, pipeline* -> pipeline."""
    if stem.startswith("pipeline"):
        return ("pipeline",) if ("pipeline",) in COMMANDS else None
    words = tuple(stem.replace("-", "_").split("_"))
    for n in range(len(words), 0, -1):
        if words[:n] in COMMANDS:
            return words[:n]
    if words[0] == "label":
        return ("label", "serve")
    return None


CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.yml"))


def test_config_folder_is_not_empty():
    assert CONFIG_FILES, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_parses(path, monkeypatch):
    key = command_for_config(path.stem)
    assert key is not None, f"{path.name}: no command in cli.COMMANDS matches this file name"
    monkeypatch.chdir(ROOT)  # configs name paths relative to the repository root
    cfg = load_config(_config_class(key), path)
    assert dataclasses.is_dataclass(cfg)


def test_section_default_keeps_its_values_and_is_not_shared():
    @dataclass
    class WithSection:
        opt: Opt = param(Opt(lr=3e-4, epochs=9), "a section with non-default values")

    a, b = load_config(WithSection), load_config(WithSection)
    assert (a.opt.lr, a.opt.epochs, a.opt.total) == (3e-4, 9, 90)
    a.opt.epochs = 1
    assert b.opt.epochs == 9 and WithSection().opt.epochs == 9


def test_mutable_default_needs_factory():
    with pytest.raises(TypeError, match="factory="):
        param([1], "a list")


def test_precision_auto_picks_bf16_only_where_bf16_matmuls_are_fast(monkeypatch):
    import torch

    from instructrl import runtime as c
    from instructrl.train.sft import SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(c, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(c, "cpu_bf16_speedup", lambda: 0.6)  # the AVX512-BF16 VM where bf16 was slower
    assert c.resolve_precision("auto") == "fp32"
    # validate() never probes hardware: the config keeps "auto"; the runtime resolves it when a command starts
    assert load_config(SFTConfig, None, ["data.train=x"]).train.precision == "auto"
    assert c.make_runtime("cpu", "auto").precision == "fp32"
    monkeypatch.setattr(c, "cpu_bf16_speedup", lambda: 2.6)  # the AMD EPYC where it was 2.6x faster
    assert c.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(c, "cpu_bf16_speedup", lambda: 0.6)
    monkeypatch.setattr(c, "_cpu_has_amx", lambda: True)  # AMX: bf16 without measuring
    assert c.resolve_precision("auto") == "bf16"
    assert c.resolve_precision("fp32") == "fp32" and c.resolve_precision("bf16") == "bf16"


def test_cpu_bf16_probe_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path):
    import json

    from instructrl import runtime as c

    monkeypatch.setenv("INSTRUCTRL_HOME", str(tmp_path))
    c.cpu_bf16_speedup.cache_clear()
    measured = c.cpu_bf16_speedup()
    assert measured > 0
    kept = json.loads((tmp_path / "cpu-bf16.json").read_text())
    (key, value), = kept.items()
    assert value == round(measured, 3) and "threads" in key and "torch" in key
    # a later process reads the kept figure instead of measuring again
    (tmp_path / "cpu-bf16.json").write_text(json.dumps({key: 9.5}))
    c.cpu_bf16_speedup.cache_clear()
    assert c.cpu_bf16_speedup() == 9.5
    c.cpu_bf16_speedup.cache_clear()


# What each command needs before any other key can be checked (validate() reads no files).
_REQUIRED = {
    ("sft",): ["data.train=x.jsonl"], ("rm",): ["data.train=x.jsonl"], ("rm", "eval"): ["model=m", "data=x.jsonl"],
    ("data", "prepare"): ["input=x.jsonl", "out=o"], ("label", "export"): ["project=p"],
    ("ppo",): ["prompts=x.jsonl", "reward_model=m"], ("dpo",): ["data.train=x.jsonl"],
    ("eval",): ["policies.sft=m", "tasks=x.jsonl", "reward_model=m"], ("eval", "ifeval"): ["data=x.jsonl"],
}
# Bounds that hold only together with another key (checked by validate with both named).
_CROSS_FIELD = {"max_length", "k_max", "processes", "batch_size", "samples_per_prompt"}


def config_fields(cls, prefix=""):
    """(dotted key, field metadata, type) of every leaf field of config class ``cls``, sections walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from config_fields(t, prefix + f.name + ".")
        else:
            yield prefix + f.name, f.metadata, t


def test_every_inclusive_bound_that_help_advertises_is_accepted():
    # `--help` prints "; >= 0 and <= 1" from param(min=, max=): validate() must not refuse the bound itself
    refused = []
    for key, (module, cls_name, _, _) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        for name, meta, t in config_fields(cls):
            if t not in (int, float) or name.split(".")[-1] in _CROSS_FIELD:
                continue
            for bound, strict in (("min", "min_exclusive"), ("max", "max_exclusive")):
                if bound in meta and not meta.get(strict):
                    try:
                        load_config(cls, None, [*_REQUIRED.get(key, []), f"{name}={t(meta[bound])}"])
                    except ConfigError as e:
                        if "is set by the pipeline" not in str(e):  # the pipeline derives it: not a user key
                            refused.append(f"{' '.join(key)} {name}={t(meta[bound])}: {e}")
    assert not refused, "\n".join(refused)
