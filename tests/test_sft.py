"""SFT stage: learning happens, checkpoints are standard HF folders, data parallel is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrl.config import load_config
from instructrl.train.sft import SFTConfig, add_residual_dropout, cosine_schedule, train_sft

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _cfg(model, out, *extra):
    return load_config(SFTConfig, None, [
        f"model={model}", f"output_dir={out}", f"data.train={EXAMPLES / 'demonstrations.jsonl'}",
        "train.epochs=3", "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", *extra,
    ])


def test_sft_lowers_validation_loss_and_saves_loadable_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    final = train_sft(_cfg(tiny_model_dir, tmp_path / "run"))
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    losses = [h["val_loss"] for h in sel["history"]]
    assert losses[-1] < losses[0] - 0.05, losses
    assert sel["best"]["val_loss"] == min(losses)
    # run folder contents
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "log.txt").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r for r in rows) and any("val_loss" in r for r in rows)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
    # the selected model is a standard HF folder
    m = AutoModelForCausalLM.from_pretrained(final)
    assert m.config.vocab_size > 0


def test_residual_dropout_is_active_only_in_training(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 100, (2, 10))
    m.eval()
    ref = m(ids).logits
    handles = add_residual_dropout(m, 0.5)
    assert len(handles) == 2 * m.config.num_hidden_layers
    assert torch.equal(m(ids).logits, ref)  # eval: no dropout
    m.train()
    assert not torch.allclose(m(ids).logits, ref)


def test_cosine_schedule_warms_up_then_decays_to_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = cosine_schedule(opt, warmup=2, total=10, min_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(s.get_last_lr()[0])
        opt.step()
        s.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] > 0.1 and s.get_last_lr()[0] == pytest.approx(0.1)


def test_two_process_data_parallel_equals_single_process(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo), micro-batch 1 each == 1 process, micro-batch 4.

    Same global batch of 4; the loss is normalised by the step's token count over
    all processes, so gradients (and weights) agree to float rounding.
    """
    from safetensors.torch import load_file

    common = [f"model={tiny_model_dir}", f"data.train={EXAMPLES / 'demonstrations.jsonl'}", "train.epochs=2",
              "train.batch_size=4", "train.lr=1e-3", "train.residual_dropout=0", "train.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "instructrl", "sft", *common, f"output_dir={tmp_path / 'one'}",
                          "train.micro_batch_size=4"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "instructrl", "sft", *common,
                          f"output_dir={tmp_path / 'two'}", "train.micro_batch_size=1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max((a[k] - load_file(tiny_model_dir / "model.safetensors")[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training really changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


def test_selection_by_reward_model_score(tiny_model_dir, tmp_path):
    """select.metric=rm_score samples from each epoch's checkpoint and keeps the RM's favourite (§3.5)."""
    from instructrl.models import load_tokenizer
    from instructrl.reward_model import init_reward_model, save_reward_model

    rm_dir = save_reward_model(init_reward_model(tiny_model_dir), load_tokenizer(tiny_model_dir), tmp_path / "rm")
    cfg = _cfg(tiny_model_dir, tmp_path / "run", "train.epochs=2", "select.metric=rm_score",
               f"select.reward_model={rm_dir}", "select.num_prompts=3", "select.max_new_tokens=6")
    train_sft(cfg)
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    scores = [h["rm_score"] for h in sel["history"]]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert sel["best"]["rm_score"] == max(scores)
    assert sel["best"]["epoch"] == 1 + scores.index(max(scores))


def test_rm_score_selection_requires_a_reward_model(tiny_model_dir, tmp_path):
    from instructrl.config import ConfigError

    with pytest.raises(ConfigError, match="select.reward_model"):
        _cfg(tiny_model_dir, tmp_path / "run", "select.metric=rm_score")


def test_trainable_layers_trains_only_the_top_blocks(tiny_model_dir, tmp_path):
    """train.trainable_layers=1: the top block and final norm move, embeddings and lower blocks stay bitwise."""
    from safetensors.torch import load_file

    final = train_sft(_cfg(tiny_model_dir, tmp_path / "run", "train.epochs=1", "train.trainable_layers=1"))
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(Path(final) / "model.safetensors"))
    n_layers = max(int(k.split(".")[2]) for k in before if k.startswith("model.layers.")) + 1
    top = f"model.layers.{n_layers - 1}."
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        assert moved == (k.startswith(top) or k == "model.norm.weight"), k


# ---------------------------------------------------------------------------
# Non-finite steps and bad data (issue 22); the guard lives in train/common.py, shared with RM and DPO
# ---------------------------------------------------------------------------


def test_sft_overflowing_lr_stops_with_config_error_and_saves_nothing(tiny_model_dir, tmp_path):
    from instructrl.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        train_sft(_cfg(tiny_model_dir, tmp_path / "run", "train.lr=1e38", "train.precision=fp32"))
    assert not (tmp_path / "run" / "model").exists()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # step 1 is finite and its update makes the weights inf/nan; the later steps are skipped and counted
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]


def test_rm_overflowing_lr_stops_with_config_error_and_saves_nothing(tiny_model_dir, tmp_path):
    from instructrl.config import ConfigError
    from instructrl.train.rm import RMConfig, train_rm

    cfg = load_config(RMConfig, None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'rm'}",
                                       f"data.train={EXAMPLES / 'pairwise.jsonl'}", "data.val_fraction=0",
                                       "train.batch_size=1", "train.lr=1e38", "train.precision=fp32"])
    with pytest.raises(ConfigError, match="train.lr"):
        train_rm(cfg)
    assert not (tmp_path / "rm" / "model").exists()
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 2 and rows[-1]["step"] == 3


def test_optimizer_step_skips_non_finite_and_all_skipped_is_an_error():
    from accelerate import Accelerator

    from instructrl.config import ConfigError
    from instructrl.train.common import check_trainable, optimizer_step

    acc = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (p * torch.tensor([1.0, float("nan")])).sum().backward()
    res = optimizer_step(acc, [p], opt, sched, 1.0, loss=1.0)
    assert res.skipped and torch.equal(p.detach(), torch.ones(2)) and p.grad is None
    p.sum().backward()
    res = optimizer_step(acc, [p], opt, sched, 0.0, loss=float("inf"))  # finite grad, infinite loss
    assert res.skipped and res.grad_norm is None and torch.equal(p.detach(), torch.ones(2))
    p.sum().backward()
    res = optimizer_step(acc, [p], opt, sched, 0.0, loss=2.0)
    assert not res.skipped and torch.equal(p.detach(), torch.full((2,), 0.5))
    check_trainable(2, 3, "epoch 1", 1.0, "d.jsonl")  # some step was finite: no error
    with pytest.raises(ConfigError, match=r"epoch 1: all 3 .*train.lr.*d.jsonl"):
        check_trainable(3, 3, "epoch 1", 1.0, "d.jsonl")


@pytest.mark.parametrize("n_rows", [0, 1])
def test_sft_too_little_data_is_a_data_error_naming_the_file(tiny_model_dir, tmp_path, n_rows):
    from instructrl.io import DataError

    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "response": f"r{i}"}) + "\n" for i in range(n_rows)))
    cfg = load_config(SFTConfig, None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                        f"data.train={path}"])
    with pytest.raises(DataError, match=str(path)):
        train_sft(cfg)
    assert not (tmp_path / "run" / "model").exists()


def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    """Full fine-tuning: killed in epoch 3, ``resume=true`` continues from epoch-2's checkpoint (weights,
    optimizer, schedule, RNG with residual dropout on) and ends with the same weights, bit for bit."""
    from safetensors.torch import load_file

    import instructrl.train.sft as sft

    extra = ("train.residual_dropout=0.1", "train.precision=fp32")
    whole = train_sft(_cfg(tiny_model_dir, tmp_path / "a", *extra))
    real, calls = sft.optimizer_step, []

    def interrupt_at_8(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sft, "optimizer_step", interrupt_at_8)
    with pytest.raises(KeyboardInterrupt):
        train_sft(_cfg(tiny_model_dir, tmp_path / "b", *extra))
    monkeypatch.setattr(sft, "optimizer_step", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    # only the latest keeps its optimizer state; the older ones keep their weights (for selection)
    assert [p.parent.name for p in (tmp_path / "b" / "checkpoints").glob("*/state.pt")] == ["epoch-2"]
    resumed = train_sft(_cfg(tiny_model_dir, tmp_path / "b", *extra, "resume=true"))
    a, b = load_file(Path(whole) / "model.safetensors"), load_file(Path(resumed) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [(r["step"], r.get("loss"), r.get("val_loss"))  # noqa: E731
                      for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    sel_a, sel_b = (json.loads((d / "selection.json").read_text()) for d in (tmp_path / "a", tmp_path / "b"))
    assert [h["val_loss"] for h in sel_a["history"]] == [h["val_loss"] for h in sel_b["history"]]
    assert not (Path(resumed) / "state.pt").exists()  # model/ is a plain HF folder


def test_resume_without_a_checkpoint_is_a_config_error(tiny_model_dir, tmp_path):
    from instructrl.config import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        train_sft(_cfg(tiny_model_dir, tmp_path / "run", "resume=true"))


def test_an_fsdp_accelerate_config_is_refused_not_quietly_run_data_parallel(tiny_model_dir, tmp_path):
    """On a CPU accelerate turns an FSDP config into plain DDP without a word; we refuse it by name."""
    cfg = tmp_path / "fsdp2.yaml"
    cfg.write_text("distributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: true\n"
                   "mixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    r = subprocess.run([str(accelerate), "launch", "--config_file", str(cfg), "-m", "instructrl", "sft",
                        f"model={tiny_model_dir}", f"data.train={EXAMPLES / 'demonstrations.jsonl'}",
                        f"output_dir={tmp_path / 'run'}", "train.batch_size=4"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "instructrl: error: ACCELERATE_USE_FSDP=true" in r.stderr
    assert "torchrun and train.sharding=fsdp2" in r.stderr  # where sharding is to be had
    assert "/instructrl/" not in r.stderr.split("instructrl: error:")[0]  # the launcher's own traceback follows
    assert not (tmp_path / "run" / "model").exists()
