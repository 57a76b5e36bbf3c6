"""DPO stage on the tiny model: learning raises the implicit reward margin, exact resume, reference cache, bad input."""

import json
from pathlib import Path

import pytest
import torch

from instructrl.io import DataError
from instructrl.config import ConfigError, load_config
from instructrl.train.dpo import DPOConfig, train_dpo

TOPICS = ["tea", "cats", "rain", "maps", "bread", "snow", "kites", "owls"]


def _rankings(path: Path) -> Path:
    # the same preference in every ranking: full sentence > short > off-topic (best first); one pairwise row
    rows = [{"id": f"r{i}", "prompt": f"Say something about {t}.",
             "responses": [f"{t.capitalize()} are lovely and worth a look.", f"{t}.", "zzz qqq xxx"]}
            for i, t in enumerate(TOPICS[:-1])]
    rows.append({"id": "p7", "prompt": f"Say something about {TOPICS[-1]}.",
                 "chosen": "Owls are lovely and worth a look.", "rejected": "zzz qqq xxx"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model, data, out, *extra):
    return load_config(DPOConfig, None, [f"model={model}", f"data.train={data}", f"output_dir={out}",
                                         "train.batch_size=4", "train.micro_batch_size=6", "train.lr=5e-3",
                                         "train.precision=fp32", "train.warmup_ratio=0", "data.max_length=64", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "listwise"])
def test_a_few_steps_raise_the_implicit_reward_margin(tiny_model_dir, tmp_path, loss):
    from transformers import AutoModelForCausalLM

    from instructrl.models import load_tokenizer
    from instructrl.train.dpo import collate, load_items, logps
    from instructrl.runtime import make_runtime

    data = _rankings(tmp_path / "r.jsonl")
    # IPO's squared loss has larger gradients far from its target margin (τ·h = 0.5 here): a smaller step
    lr = "train.lr=1e-3" if loss == "ipo" else "train.lr=5e-3"
    cfg = _cfg(tiny_model_dir, data, tmp_path / "run", "train.epochs=4", f"train.loss={loss}", "train.beta=0.5", lr)
    final = train_dpo(cfg)
    rows = _rows(tmp_path / "run")
    assert len(rows) == 8 and rows[-1]["skipped_steps"] == 0
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before the first update
    # the trained policy, scored against the cached reference on the whole set: chosen above rejected
    cache = torch.load(tmp_path / "run" / "reference_logps.pt", weights_only=False)
    tok = load_tokenizer(str(final))
    items = load_items(cfg, tok, lambda m: None)
    for it, lp in zip(items, cache["logps"]):
        it.ref = lp
    model = AutoModelForCausalLM.from_pretrained(final).eval()  # a plain HF folder
    b = collate(items, tok.pad_token_id)
    with torch.no_grad():
        r = 0.5 * (logps(model, b, make_runtime("cpu", "fp32")) - b.ref)
    better = (b.group[:, None] == b.group[None, :]) & (b.ranks[:, None] < b.ranks[None, :])
    margins = (r[:, None] - r[None, :])[better]
    assert margins.mean().item() > 0.25 and (margins > 0).float().mean().item() > 0.8, margins
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 8


def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import instructrl.train.dpo as dpo

    data = _rankings(tmp_path / "r.jsonl")
    extra = ("train.epochs=2", "train.save_every=1", "train.loss=listwise", "train.min_lr_ratio=0.1")
    whole = train_dpo(_cfg(tiny_model_dir, data, tmp_path / "a", *extra))

    real, calls = dpo.optimizer_step, []

    def interrupt_at_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed during step 4: the last checkpoint is step 3, mid-epoch 2
        return real(*a, **k)

    monkeypatch.setattr(dpo, "optimizer_step", interrupt_at_4)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(_cfg(tiny_model_dir, data, tmp_path / "b", *extra))
    monkeypatch.setattr(dpo, "optimizer_step", real)
    assert not (tmp_path / "b" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000001", "step-000002",
                                                                                  "step-000003"]
    resumed = train_dpo(_cfg(tiny_model_dir, data, tmp_path / "b", *extra, "resume=true"))
    a, b = load_file(Path(whole) / "model.safetensors"), load_file(Path(resumed) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]  # b: steps 1-3, then 4 after the resume
    assert [r["lr"] for r in ra] == [r["lr"] for r in rb]


def test_resume_without_the_reference_cache_is_a_clear_error(tiny_model_dir, tmp_path):
    data = _rankings(tmp_path / "r.jsonl")
    train_dpo(_cfg(tiny_model_dir, data, tmp_path / "run", "train.epochs=1"))
    (tmp_path / "run" / "reference_logps.pt").unlink()
    with pytest.raises(ConfigError, match="reference_logps.pt is missing"):
        train_dpo(_cfg(tiny_model_dir, data, tmp_path / "run", "train.epochs=1", "resume=true"))


def test_resume_with_other_data_is_refused(tiny_model_dir, tmp_path):
    data = _rankings(tmp_path / "r.jsonl")
    train_dpo(_cfg(tiny_model_dir, data, tmp_path / "run", "train.epochs=1"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    # another data file: the run folder's config check refuses the resume, naming the key
    with pytest.raises(DataError, match="data.train"):
        train_dpo(_cfg(tiny_model_dir, other, tmp_path / "run", "train.epochs=1", "resume=true"))
    # the same path with other rankings in it: the reference cache no longer matches
    data.write_text(other.read_text())
    with pytest.raises(ConfigError, match="was computed for"):
        train_dpo(_cfg(tiny_model_dir, data, tmp_path / "run", "train.epochs=1", "resume=true"))


def test_resume_with_no_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train_dpo(_cfg(tiny_model_dir, _rankings(tmp_path / "r.jsonl"), tmp_path / "run", "resume=true"))


@pytest.mark.parametrize("beta", ["0", "-0.1", "inf"])
def test_beta_must_be_positive(tiny_model_dir, tmp_path, beta):
    with pytest.raises(ConfigError, match="train.beta"):
        _cfg(tiny_model_dir, tmp_path / "r.jsonl", tmp_path / "run", f"train.beta={beta}")


def test_bad_rankings_are_data_errors(tiny_model_dir, tmp_path):
    from instructrl.io import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": ["only one"]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1.*K >= 2"):
        train_dpo(_cfg(tiny_model_dir, bad, tmp_path / "run"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no rankings"):
        train_dpo(_cfg(tiny_model_dir, empty, tmp_path / "run2"))


def test_overflowing_lr_stops_with_config_error_and_saves_no_model(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        train_dpo(_cfg(tiny_model_dir, _rankings(tmp_path / "r.jsonl"), tmp_path / "run", "train.lr=1e38"))
    assert not (tmp_path / "run" / "model").exists()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_two_process_data_parallel_equals_single_process(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) == 1 process, on 7 rankings in steps of 2: the last step gives process 1
    nothing (it joins the gradient sync with weight 0). The loss is normalised by the step's rankings."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "r7.jsonl"
    data.write_text("".join(_rankings(tmp_path / "r.jsonl").read_text().splitlines(keepends=True)[:7]))
    script = tmp_path / "run_dpo.py"
    script.write_text("import sys\nfrom instructrl.config import load_config\n"
                      "from instructrl.train.dpo import DPOConfig, train_dpo\n"
                      "train_dpo(load_config(DPOConfig, None, sys.argv[1:]))\n")
    common = [f"model={tiny_model_dir}", f"data.train={data}", "train.batch_size=2", "train.lr=5e-3",
              "train.precision=fp32", "train.warmup_ratio=0", "data.max_length=64", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), *common, f"output_dir={tmp_path / 'one'}",
                          "train.micro_batch_size=6"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), *common,
                          f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=3"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    moved = max((a[k] - load_file(tiny_model_dir / "model.safetensors")[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    for k in a:
        # the two split the gradient sum differently, and Adam at lr 5e-3 turns that rounding into up to
        # ~1e-5 on a few weights (7.8e-6 in 1 of 2048 on an AMX Xeon); a wrong split moves them by ~moved
        torch.testing.assert_close(a[k], b[k], atol=0.01 * moved, rtol=1e-4)
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
        assert x["comparisons"] == y["comparisons"]
