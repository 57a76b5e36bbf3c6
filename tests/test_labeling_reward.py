"""End to end: generate completions from a checkpoint, label them, export, train the reward model on the export."""

import json
import math

import pytest
from labeling_util import make_project, prompts

from instructrl.data import load_demonstrations, load_rankings
from instructrl.hygiene import HygieneConfig, clean_prompts

reward = pytest.importorskip("instructrl.train.rm")


def test_export_labeled_project_and_train_reward_model(tmp_path, tiny_model_dir):
    from instructrl.cli import main
    from instructrl.config import load_config
    from instructrl.labeling.generate import GenConfig, Generator, generate_for_project
    from instructrl.labeling.store import Store

    db = f"sqlite:///{tmp_path / 'rm.db'}"
    store = Store(db)
    # a rank project whose completions come from the checkpoint
    info = make_project(store, kind="demonstration", n=8, labelers=2, overlap=0.25, name="demos")
    pid = store.create_project("ranked", "rank", k=3, model=str(tiny_model_dir), overlap_fraction=0.25)
    splits, rep = clean_prompts(prompts(24, users=12), HygieneConfig())
    store.import_prompts(pid, splits, rep.__dict__)
    gen = Generator(str(tiny_model_dir), GenConfig(max_new_tokens=12, batch_size=8))
    ticks = []
    out = generate_for_project(store, pid, gen, 3, progress=lambda d, t: ticks.append((d, t)))
    assert out["failed"] == [] and ticks[-1] == (24, 24)
    assert store.make_tasks(pid) == 24
    store.assign(pid)
    # labelers prefer longer replies (a rule the RM can pick up); every demo gets a written answer
    for uid in info["labelers"].values():
        for a in store.assignments_for(uid, status="pending"):
            v = store.task_view(a["id"], uid)
            if v["kind"] == "rank":
                texts = {c["idx"]: c["text"] for c in v["completions"]}
                order = sorted(texts, key=lambda i: -len(texts[i]))
                store.submit(a["id"], uid, {"order": order, "all_bad": False})
            else:
                store.submit(a["id"], uid, {"response": "a short helpful answer."})
    labeled = store.labeled(pid)
    assert len(labeled) == 24 + round(0.25 * 24)  # overlap tasks have two labels

    ex = tmp_path / "export"
    assert main(["label", "export", f"db={db}", "project=ranked", f"out={ex}", "labelers=all"]) == 0
    assert main(["label", "export", f"db={db}", "project=demos", f"out={tmp_path / 'demos'}", "labelers=all"]) == 0
    train = load_rankings(ex / "train" / "rankings.jsonl")
    n_total = sum(len(load_rankings(f)) for f in ex.glob("*/rankings.jsonl"))
    assert n_total == len(labeled) and all(r.k == 3 for r in train)
    assert json.loads((ex / "agreement.json").read_text())["n_pairs"] > 0
    demos = tmp_path / "demos" / "train" / "demonstrations.jsonl"
    assert load_demonstrations(demos)

    cfg = load_config(reward.RMConfig, None, [
        f"model={tiny_model_dir}", f"output_dir={tmp_path / 'rm'}", f"data.train={ex / 'train' / 'rankings.jsonl'}",
        "data.val_fraction=0.2", f"data.demonstrations={demos}", "data.max_length=64",
        "train.epochs=2", "train.batch_size=4", "train.micro_batch_size=12", "train.lr=1e-3",
        "train.precision=fp32"])
    final = reward.train_rm(cfg)
    assert (final / "config.json").exists()
    summary = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert summary["train_rankings"] + summary["val_rankings"] == len(train)
    assert summary["normalization"]["normalized"]
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def test_generation_runs_on_the_command_runtime(tiny_model_dir):
    import torch

    from instructrl.labeling.app import LabelConfig
    from instructrl.labeling.generate import GenConfig, Generator
    from instructrl.runtime import make_runtime

    rt = make_runtime("cpu", "bf16")
    gen = Generator(str(tiny_model_dir), GenConfig(max_new_tokens=6, batch_size=2), rt)
    p = next(gen.model.parameters())
    assert p.device == rt.device and p.dtype == torch.float32  # fp32 master weights; bf16 only under autocast
    seen = []
    real = gen.model.generate

    def spy(**kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(**kw)

    gen.model.generate = spy
    out = gen.distinct([[{"role": "user", "content": "hi"}]], 2)
    assert seen and all(seen) and (out[0] is None or len(out[0]) == 2)
    # the old gen.dtype key is still read as the precision; an explicit non-default precision wins
    cfg = LabelConfig()
    cfg.gen.dtype = "bf16"
    cfg.validate()
    assert cfg.precision == "bf16"
    cfg = LabelConfig(precision="auto")
    cfg.gen.dtype = "fp32"
    cfg.validate()
    assert cfg.precision == "auto"
