"""The whole pipeline on a tiny random model: every stage runs, resumes, re-runs alone, iterates rounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructrl.config import ConfigError
from instructrl.io import OutputError
from instructrl.pipeline import PRESETS, STAGES, load_pipeline_config, run_pipeline
from instructrl.tasks import load_tasks
from instructrl.tasks.constraints import satisfies_all


def tiny(model, out, *extra):
    return load_pipeline_config(None, ["preset=tiny", f"model={model}", f"output_dir={out}", "precision=fp32",
                                       *extra])


def read_jsonl(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_parses(preset):
    cfg = load_pipeline_config(None, [f"preset={preset}"])
    assert cfg.preset == preset


@pytest.mark.parametrize("override, message", [
    ("data.k_min=1", "k_min"), ("data.k_max=3", "k_min"), ("data.n_drafts=0", "n_drafts"),
    ("data.heldout_user_fraction=1", "heldout_user_fraction"), ("data.n_rm_prompts=1", "data.n_rm_prompts must be >= 2"),
    ("data.answer_words=5", "answer_words"),
])
def test_bad_data_settings_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(None, [override])


def test_bad_stage_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="only must be one of"):
        load_pipeline_config(None, ["only=rlhf"])


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    results = run_pipeline(tiny(tiny_model_dir, out, "rounds=2"))
    return out, results


def test_every_stage_finishes_and_writes_its_outputs(tiny_run):
    out, results = tiny_run
    state = json.loads((out / "state.json").read_text())
    assert set(state) == {"prompts", "demos", "sft", "rank-1", "rm-1", "ppo-1", "ppo_ptx-1",
                          "rank-2", "rm-2", "ppo-2", "ppo_ptx-2", "eval"}
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == set(state) and all(t >= 0 for t in timings.values())
    assert (out / "config.yaml").exists() and (out / "eval" / "report.html").stat().st_size > 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["policies"]) >= {"base", "sft", "ppo", "ppo_ptx", "best-of-2"}
    assert report["policies"]["sft"]["win_rate_labelers"]["rate"] == 0.5  # the baseline against itself
    sections = {s["title"] for s in report["sections"]}
    assert {"Run", "Stage timings (s)", "Rounds"} <= sections
    # finished stages drop their training checkpoints (keep_checkpoints=false); the models stay
    assert not (out / "sft" / "checkpoints").exists() and (out / "sft" / "model" / "config.json").exists()
    for r in (1, 2):
        for v in ("ppo", "ppo_ptx"):
            assert not (out / f"round-{r}" / v / "checkpoints").exists()
            assert (out / f"round-{r}" / v / "policy" / "config.json").exists()


def test_demonstrations_satisfy_their_constraints_and_eval_users_are_held_out(tiny_run):
    out, _ = tiny_run
    tasks = {t.prompt: t for t in load_tasks(out / "data" / "sft_tasks.jsonl")}
    demos = read_jsonl(out / "data" / "demonstrations.jsonl")
    assert len(demos) == len(tasks)
    for d in demos:
        prompt = d["prompt"] if isinstance(d["prompt"], str) else d["prompt"][-1]["content"]
        assert satisfies_all(tasks[prompt].constraints, d["response"])
    train_users = {t.user_id for f in ("sft", "rm", "ppo") for t in load_tasks(out / "data" / f"{f}_tasks.jsonl")}
    eval_users = {t.user_id for t in load_tasks(out / "data" / "eval_tasks.jsonl")}
    assert train_users and eval_users and not train_users & eval_users
    assert (out / "data" / "pretrain.jsonl").stat().st_size > 0  # the PPO-ptx corpus


def test_rounds_accumulate_rankings_and_continue_the_policy(tiny_run):
    out, _ = tiny_run
    r1, r2 = read_jsonl(out / "round-1" / "rankings.jsonl"), read_jsonl(out / "round-2" / "rankings.jsonl")
    assert r1 and r2 and {x["prompt"] if isinstance(x["prompt"], str) else json.dumps(x["prompt"]) for x in r1} \
        .isdisjoint({x["prompt"] if isinstance(x["prompt"], str) else json.dumps(x["prompt"]) for x in r2})
    assert all(2 <= len(x["responses"]) <= 4 for x in r1 + r2)  # tiny preset: K = 4 (duplicates merged)
    # the round-2 RM is trained on every ranking so far
    rm2 = (out / "round-2" / "rm" / "config.yaml").read_text()
    assert "rankings_all.jsonl" in rm2
    assert len(read_jsonl(out / "data" / "rankings_all.jsonl")) == len(r1) + len(r2)
    # round-2 PPO starts from the round-1 policy, keeps SFT as the KL reference, scores with the round-2 RM
    for v in ("ppo", "ppo_ptx"):
        cfg2 = (out / "round-2" / v / "config.yaml").read_text()
        assert f"round-1/{v}/policy" in cfg2 and "sft/model" in cfg2 and "round-2/rm/model" in cfg2
    assert "train.ptx_coef" not in (out / "round-1" / "ppo" / "config.yaml").read_text() or \
        "ptx_coef: 0" in (out / "round-1" / "ppo" / "config.yaml").read_text()
    rounds = next(s for s in json.loads((out / "eval" / "report.json").read_text())["sections"]
                  if s["title"] == "Rounds")
    body = rounds["data"]
    assert [r["round"] for r in body] == [1, 2] and all(r["agreement"]["n_pairs"] > 0 for r in body)


def test_a_second_start_refuses_resume_skips_and_only_reruns_one_stage(tiny_model_dir, tiny_run, capsys):
    out, _ = tiny_run
    with pytest.raises(OutputError, match="already holds a pipeline run; add --resume"):
        run_pipeline(tiny(tiny_model_dir, out, "rounds=2"))
    before = {p: p.stat().st_mtime_ns for p in (out / "sft" / "model").glob("*")}
    run_pipeline(tiny(tiny_model_dir, out, "rounds=2", "resume=true"))
    assert "=== [" not in capsys.readouterr().out  # nothing re-ran
    assert before == {p: p.stat().st_mtime_ns for p in (out / "sft" / "model").glob("*")}
    rm_before = (out / "round-2" / "rm" / "model" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(tiny(tiny_model_dir, out, "rounds=2", "only=rm"))
    printed = capsys.readouterr().out
    assert "=== [rm-2] ===" in printed and "=== [sft]" not in printed and "=== [rm-1]" not in printed
    assert (out / "round-2" / "rm" / "model" / "model.safetensors").stat().st_mtime_ns != rm_before
    assert before == {p: p.stat().st_mtime_ns for p in (out / "sft" / "model").glob("*")}
    run_pipeline(tiny(tiny_model_dir, out, "rounds=2", "only=ppo", "keep_checkpoints=true"))
    assert "=== [ppo_ptx-2] ===" in capsys.readouterr().out
    assert any((out / "round-2" / "ppo_ptx" / "checkpoints").glob("step-*"))


def test_rounds_can_be_added_to_a_finished_run(tiny_model_dir, tmp_path):
    """`rounds=2 --resume` on a finished one-round run: round 2 ranks prompts no stage has used (the
    prompts stage's reserve), every other split stays as it was, and the evaluation is redone."""
    out = tmp_path / "run"
    run_pipeline(tiny(tiny_model_dir, out))
    splits = {f: (out / "data" / f"{f}_tasks.jsonl").read_text() for f in ("sft", "ppo", "eval")}
    report_before = (out / "eval" / "report.json").stat().st_mtime_ns
    run_pipeline(tiny(tiny_model_dir, out, "rounds=2", "resume=true"))
    state = json.loads((out / "state.json").read_text())
    assert {"rank-2", "rm-2", "ppo-2", "ppo_ptx-2"} <= set(state) and state["eval"]["rounds"] == 2
    assert (out / "eval" / "report.json").stat().st_mtime_ns != report_before
    assert splits == {f: (out / "data" / f"{f}_tasks.jsonl").read_text() for f in ("sft", "ppo", "eval")}

    def prompts(path):
        return {json.dumps(x["prompt"]) for x in read_jsonl(path)}

    used = {json.dumps(t.prompt) for f in ("sft", "ppo", "eval") for t in load_tasks(out / "data" / f"{f}_tasks.jsonl")}
    r1, r2 = prompts(out / "round-1" / "rankings.jsonl"), prompts(out / "round-2" / "rankings.jsonl")
    as_text = {json.dumps(json.loads(p)[-1]["content"]) if p.startswith("[") else p for p in r2}
    assert r2 and not r1 & r2 and not as_text & used
    # more rounds than the prompts left: a clear error, not an empty round
    with pytest.raises(ConfigError, match="RM prompts"):
        run_pipeline(tiny(tiny_model_dir, out, "rounds=40", "resume=true"))


def test_stage_names_cover_the_pipeline():
    assert STAGES == ("prompts", "demos", "sft", "rank", "rm", "ppo", "eval")


def test_processes_runs_each_training_stage_under_torchrun(tiny_model_dir, tmp_path):
    """processes=2: sft, rm and ppo run as 2-process torchrun jobs on their written configs; the rest here."""
    import os

    from instructrl.config import load_config
    from instructrl.train.ppo import PPOConfig

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "instructrl", "pipeline", "--preset", "tiny", f"model={tiny_model_dir}",
                        f"output_dir={out}", "processes=2", "variants=[ppo]", "precision=fp32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "stage-configs").iterdir()) == ["round-1-ppo.yaml", "round-1-rm.yaml",
                                                                         "sft.yaml"]
    rows = [json.loads(line) for line in (out / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["world_size"] for row in rows] == [2, 2]
    # the written config is the stage's typed config: it reads back to what the 2 processes ran
    ppo = load_config(PPOConfig, out / "stage-configs" / "round-1-ppo.yaml", [])
    assert ppo.output_dir == str(out / "round-1" / "ppo") and ppo.policy == str(out / "sft" / "model")
    assert json.loads((out / "eval" / "report.json").read_text())["policies"]["ppo"]


@pytest.mark.parametrize("n,override,key", [(2, "sft.train.batch_size=5", "sft.train.batch_size=5"),
                                            (4, "ppo.train.minibatch_size=4", "ppo.rollout.batch_size=4")])
def test_processes_that_do_not_split_a_batch_are_refused_before_any_stage(tiny_model_dir, tmp_path, n, override,
                                                                          key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + f".*processes={n}"):
        run_pipeline(tiny(tiny_model_dir, tmp_path / "run", f"processes={n}", override))
    assert not (tmp_path / "run" / "sft").exists()


def test_sft_engine_comes_from_the_pipeline_engine(tiny_model_dir, tmp_path):
    """SFT's rm_score selection samples with the pipeline's engine: sft.engine is derived, setting it is refused."""
    from instructrl.pipeline import sft_stage_config

    cfg = tiny(tiny_model_dir, tmp_path / "run", "engine.name=hf")
    assert cfg.sft.engine.name == "hf" and sft_stage_config(cfg, "base").engine.name == "hf"
    with pytest.raises(ConfigError, match=r"sft\.engine is set by the pipeline.*set engine instead"):
        tiny(tiny_model_dir, tmp_path / "run", "engine.name=auto", "sft.engine.name=hf")


def test_engine_auto_is_resolved_once_for_every_stage_and_saved(tiny_model_dir, tmp_path, monkeypatch):
    """engine.name=auto (and eval.engine.name=auto) where vllm is absent: hf, said once, saved resolved."""
    import yaml

    import instructrl.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    out = tmp_path / "run"
    run_pipeline(tiny(tiny_model_dir, out, "engine.name=auto", "eval.engine.name=auto", "only=prompts"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["engine"]["name"] == saved["eval"]["engine"]["name"] == saved["ppo"]["engine"]["name"]
            == saved["sft"]["engine"]["name"] == "hf")
    said = [x for x in (out / "log.txt").read_text().splitlines() if "engine.name=auto" in x]
    assert len(said) == 1 and said[0].endswith("sampling (drafts, K samples, SFT rm_score selection, PPO rollouts) "
                                               "engine: hf (engine.name=auto "
                                               "and vllm is not installed here: docs/vllm.md); evaluation engine: hf "
                                               "(engine.name=auto and vllm is not installed here: docs/vllm.md)"), said
