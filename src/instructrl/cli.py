"""``instructrl <command> [--config FILE] [key.sub=value ...]``

Every command is a config dataclass plus a function that takes it. The table
below is the whole registry: adding a command is adding a line. Modules are
imported only when their command runs, so ``instructrl --help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from instructrl.config import ConfigError, StageFailed, range_text, load_config
from instructrl.io import DataError
from instructrl.models import ModelLoadError

# command words -> (module, config class, function, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str, str]] = {
    ("sft",): ("instructrl.train.sft", "SFTConfig", "train_sft", "supervised fine-tuning on demonstrations (InstructGPT §3.5)"),
    ("rm",): ("instructrl.train.rm", "RMConfig", "train_rm", "train the reward model on K-wise rankings (InstructGPT §3.5, eq. 1)"),
    ("rm", "eval"): ("instructrl.evaluation.rm_eval", "RMEvalConfig", "evaluate_rm", "reward-model accuracy/log loss by K with 95% CIs + calibration PNG"),
    ("data", "prepare"): ("instructrl.hygiene", "PrepareConfig", "prepare_command", "prompt hygiene on a JSONL file: PII, dedupe, 200/user, split by user (InstructGPT §3.2)"),
    ("label", "serve"): ("instructrl.labeling.app", "LabelConfig", "serve", "run the labeling web app (demonstrations, rankings, ratings, HH chats)"),
    ("label", "export"): ("instructrl.labeling.app", "LabelExportConfig", "export_command", "export a labeling project to JSONL (demonstrations, rankings, pairwise, ratings, agreement)"),
    ("ppo",): ("instructrl.train.ppo", "PPOConfig", "train_ppo", "PPO / PPO-ptx against a reward model (InstructGPT §3.5 eq. 2)"),
    ("dpo",): ("instructrl.train.dpo", "DPOConfig", "train_dpo", "direct preference optimisation on rankings: dpo, ipo or listwise Plackett-Luce (Rafailov et al. 2023)"),
    ("eval",): ("instructrl.evaluation.evaluate", "EvalConfig", "run_eval", "compare policies on held-out prompts: win rates (labelers, RM), gold, KL, Elo, report.html"),
    ("eval", "ifeval"): ("instructrl.evaluation.ifeval", "IFEvalConfig", "run_ifeval", "answer IFEval prompts; prompt/instruction-level strict and loose accuracy"),
    ("pipeline",): ("instructrl.pipeline", "PipelineConfig", "pipeline_command",
                    "the whole pipeline on the default model with simulated labelers (see README)"),
    ("model", "convert"): ("instructrl.models", "ConvertConfig", "convert_command",
                           "convert the embedded default GGUF model (or any GGUF file) to a safetensors folder"),
}


def _field_help(cls: type, prefix: str = "", instance=None) -> list[str]:
    """One line per key with its default; a nested section's defaults are those of its own default
    instance (the pipeline's stage configs differ from the commands' defaults)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            lines.append(f"  [{prefix}{f.name}] {f.metadata.get('help', '')}".rstrip())
            lines += _field_help(tp, prefix + f.name + ".", default if dataclasses.is_dataclass(default) else None)
            continue
        lines.append(f"  {prefix}{f.name} = {default!r}  {f.metadata.get('help', '')}{range_text(f.metadata)}".rstrip())
    return lines


def _resolve(argv: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            return key, argv[n:]
    return None, argv


def _group_usage(word: str) -> str | None:
    """``instructrl label``: the subcommands of a command group word, or None if it is none."""
    subs = [(k, v) for k, v in COMMANDS.items() if len(k) == 2 and k[0] == word]
    if not subs:
        return None
    rows = "\n".join(f"  {' '.join(k):<16} {v[3]}" for k, v in subs)
    return (f"usage: instructrl {word} <subcommand> [--config FILE.yaml] [key.sub=value ...]\n\n"
            f"subcommands:\n{rows}\n\nRun `instructrl {word} <subcommand> --help` for its config keys.")


_OWN_FLAGS = {"--config", "--resume", "--overwrite", "--preset", "--help", "-h"}


def _flags_to_overrides(args: list[str]) -> list[str]:
    """``--data FILE`` / ``--max-new-tokens=64`` / ``--greedy`` become ``data=FILE`` /
    ``max_new_tokens=64`` / ``greedy=true``, so both spellings work on every command."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if not a.startswith("--") or name in _OWN_FLAGS:
            out.append(a)
            if name in ("--config", "--preset") and "=" not in a and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            i += 1
            continue
        key = name[2:].replace("-", "_")
        if "=" in a:
            out.append(f"{key}={a.split('=', 1)[1]}")
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{key}={args[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def _usage() -> str:
    rows = "\n".join(f"  {' '.join(k):<16} {v[3]}" for k, v in COMMANDS.items())
    return (
        "usage: instructrl <command> [--config FILE.yaml] [key.sub=value | --key value ...]\n\n"
        f"commands:\n{rows}\n\n"
        "Run `instructrl <command> --help` for every config key, its default and meaning."
    )


def _log_error_in_run_folder(cfg, err: Exception) -> None:
    """A run that stops on bad input says why in its own log.txt, not only on stderr."""
    from instructrl.io import RunDir

    folder = getattr(cfg, "output_dir", None)
    if folder and (Path(folder) / "log.txt").exists():  # never create a run folder just to hold the error
        RunDir(folder).log.error(str(err))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    key, rest = _resolve(argv)
    if key is None and (group := _group_usage(argv[0])) is not None:
        wants_help = argv[1:2] in (["-h"], ["--help"])
        print(group, file=sys.stdout if wants_help else sys.stderr)
        if not wants_help and len(argv) > 1:
            print(f"instructrl: unknown subcommand {' '.join(argv[:2])!r}", file=sys.stderr)
        return 0 if wants_help else 2
    if key is None:
        print(f"instructrl: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, cls_name, fn_name, help_text = COMMANDS[key]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    parser = argparse.ArgumentParser(
        prog=f"instructrl {' '.join(key)}",
        description=f"{help_text}\n\nconfig keys (set in --config YAML or as key=value):\n" + "\n".join(_field_help(cls)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file; keys as listed below")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run folder that already holds a run (removes only its own files)")
    presets = getattr(cls, "PRESETS", None)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="a named set of overrides, applied under yours")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    args = parser.parse_args(_flags_to_overrides(rest))
    overrides = list(args.overrides)
    if presets and args.preset:  # load_config puts the preset's overrides under the file's and the user's
        overrides.insert(0, f"preset={args.preset}")
    cfg = None
    ok = False
    try:
        cfg = load_config(cls, args.config, overrides)
        if args.resume:
            if not hasattr(cfg, "resume"):
                raise ConfigError(f"'instructrl {' '.join(key)}' cannot resume")
            cfg.resume = True
        if args.overwrite:
            if not hasattr(cfg, "overwrite"):
                raise ConfigError(f"'instructrl {' '.join(key)}' has no --overwrite")
            cfg.overwrite = True
        getattr(module, fn_name)(cfg)
        ok = True
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"instructrl: error: {e}", file=sys.stderr)
        _log_error_in_run_folder(cfg, e)
        return 2
    except OSError as e:  # disk full, no permission, ...: the user's environment, not a bug to trace
        where = f"{e.filename}: " if e.filename else ""
        print(f"instructrl: error: {where}{e.strerror or e}", file=sys.stderr)
        _log_error_in_run_folder(cfg, e)
        return 2
    except MemoryError as e:  # a setting too large for this machine (bootstrap=1000000000, a huge batch)
        msg = f"out of memory{f' ({e})' if str(e) else ''}; lower the sizes in the config (batch sizes, bootstrap, ...)"
        print(f"instructrl: error: {msg}", file=sys.stderr)
        _log_error_in_run_folder(cfg, MemoryError(msg))
        return 2
    except StageFailed as e:
        print(f"instructrl: error: {e}", file=sys.stderr)
        _log_error_in_run_folder(cfg, e)
        return 1
    except KeyboardInterrupt:
        print("instructrl: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a torchrun/accelerate launch: leave its group cleanly
            from instructrl.train.processes import close_process_group

            close_process_group(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
