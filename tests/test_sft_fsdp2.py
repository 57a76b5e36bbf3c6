"""SFT with ``train.sharding=fsdp2`` under torchrun: 2 CPU processes (gloo) with torch's ``fully_shard``.

The 11 training examples in batches of 4 leave a last batch of 3: with micro-batches of 1 rank 0 runs
two passes and rank 1 one (it is padded with a weight-0 pass), and the 2 validation examples split
one each. Every run goes through a wrapper that records, on rank 1, each file-system write under the
run folder (Python audit events), so "rank 0 alone writes" is checked, not assumed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructrl.config import ConfigError, load_config
from instructrl.train.sft import KILL_ENV, SFTConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

# Runs ``python -m instructrl ...`` after installing an audit hook that, on a rank other than 0, appends
# every write-like event (open for writing, mkdir, rename, remove, ...) whose path lies under $OUT to $LOG.
WRAPPER = '''
import os, runpy, sys
out, log, rank = os.environ["WATCH_OUT"], os.environ["WATCH_LOG"], os.environ.get("RANK", "0")
WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.replace", "shutil.rmtree", "shutil.copytree",
          "shutil.copyfile", "os.link", "os.symlink", "os.truncate"}

def hook(event, args):
    if rank == "0" or not args:
        return
    if event == "open":  # (path, mode, flags): builtin open gives a mode, os.open the flags
        path, mode, flags = (list(args) + [None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    else:
        path, writing = args[0], event in WRITES
    path = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
    if writing and (path == out or path.startswith(out + os.sep)):
        with open(log, "a") as f:  # the log lies outside $OUT, so this open is not recorded
            f.write(f"{event} {path}\\n")

sys.addaudithook(hook)
sys.argv = ["instructrl", *sys.argv[1:]]
runpy.run_module("instructrl", run_name="__main__")
'''


def common(model) -> list[str]:
    return [f"model={model}", f"data.train={EXAMPLES / 'demonstrations.jsonl'}", "data.val_fraction=0.15",
            "train.epochs=3", "train.batch_size=4", "train.lr=1e-3", "train.residual_dropout=0",
            "train.precision=fp32", "train.sharding=fsdp2"]


def sft(root: Path, out: Path, nproc: int, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    wrapper = root / "watch.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WATCH_OUT": str(out), "WATCH_LOG": str(root / f"{out.name}.writes"),
           **(env_extra or {})}
    launcher = [sys.executable] if nproc == 1 else [str(Path(sys.executable).with_name("torchrun")),
                                                     "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, str(wrapper), "sft", *extra, f"output_dir={out}"], env=env,
                          capture_output=True, text=True, timeout=300)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted 2-process fsdp2 run, micro-batches of 1."""
    root = tmp_path_factory.mktemp("fsdp2")
    r = sft(root, root / "two", 2, *common(tiny_model_dir), "train.micro_batch_size=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "two"


def test_two_sharded_processes_equal_one_process(sharded_run, tiny_model_dir, tmp_path):
    """Same global batch of 4: the gradient is the sum over the step (FSDP2's reduce-scatter averages,
    the loss is scaled by the process count like DDP's), clipped by the global norm."""
    r = sft(tmp_path, tmp_path / "one", 1, *common(tiny_model_dir), "train.micro_batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fsdp2 with 1 process has nothing to shard over; running unsharded" in (tmp_path / "one" / "log.txt").read_text()
    log = (sharded_run / "log.txt").read_text()
    assert "sharding: fsdp2 over 2 processes (2 decoder blocks + root)" in log
    a, b = weights(tmp_path / "one" / "model"), weights(sharded_run / "model")
    assert a.keys() == b.keys()  # the tied lm_head is not written twice
    start = weights(Path(tiny_model_dir))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # training really changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    ra, rb = rows(tmp_path / "one"), rows(sharded_run)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "grad_norm", "val_loss"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-5), (k, x["step"])
    assert any(r.get("grad_norm", 0) > 1.0 for r in ra)  # clipping (max_grad_norm=1) was in play
    # checkpoints hold full weights, the latest one the gathered optimizer state, keyed by parameter name
    for ep in (1, 2, 3):
        assert weights(sharded_run / "checkpoints" / f"epoch-{ep}").keys() == a.keys()
    st = torch.load(sharded_run / "checkpoints" / "epoch-3" / "state.pt", weights_only=False)
    assert st["sharded"] and st["world_size"] == 2
    assert "model.layers.0.mlp.up_proj.weight" in st["opt"]["state"]
    full_shape = a["model.layers.0.mlp.up_proj.weight"].shape
    assert st["opt"]["state"]["model.layers.0.mlp.up_proj.weight"]["exp_avg"].shape == full_shape


def test_rank_zero_alone_writes(sharded_run, tmp_path):
    writes = sharded_run.parent / "two.writes"
    assert not writes.exists(), writes.read_text()[:2000]
    # the hook does see writes: a rank-1 write under the watched folder is recorded
    probe = tmp_path / "probe.py"
    probe.write_text(WRAPPER.replace('runpy.run_module("instructrl", run_name="__main__")',
                                     'open(os.path.join(out, "x"), "w").close()'))
    (tmp_path / "watched").mkdir()
    env = {**os.environ, "RANK": "1", "WATCH_OUT": str(tmp_path / "watched"), "WATCH_LOG": str(tmp_path / "log")}
    r = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "open " + str(tmp_path / "watched" / "x") in (tmp_path / "log").read_text()


def test_killed_sharded_run_resumes_exactly(sharded_run, tiny_model_dir, tmp_path):
    """SIGKILL after step 7 (epoch 3 of 3 steps each; the last checkpoint is epoch 2's), then --resume:
    the weights and the optimizer state come back from rank 0's full copies, each process its shard."""
    args = (*common(tiny_model_dir), "train.micro_batch_size=1")
    r = sft(tmp_path, tmp_path / "crashed", 2, *args, env_extra={KILL_ENV: "7"})
    assert r.returncode != 0
    assert not (tmp_path / "crashed" / "model").exists()
    assert [p.parent.name for p in (tmp_path / "crashed" / "checkpoints").glob("*/state.pt")] == ["epoch-2"]
    r = sft(tmp_path, tmp_path / "crashed", 2, *args, "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(sharded_run / "model"), weights(tmp_path / "crashed" / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    key = lambda rs: [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in rs]  # noqa: E731
    assert key(rows(sharded_run)) == key(rows(tmp_path / "crashed"))


def test_lora_with_fsdp2_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.sharding=fsdp2 with train.lora.rank > 0"):
        load_config(SFTConfig, None, [*common(tiny_model_dir), f"output_dir={tmp_path}", "train.lora.rank=4"])
