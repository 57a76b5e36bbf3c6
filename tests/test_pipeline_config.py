"""The pipeline holds the stage configs themselves: values reach every stage verbatim, never re-parsed."""

import dataclasses

import pytest

from instructrl.config import ConfigError
from instructrl.pipeline import (PipelineConfig, eval_stage_config, load_pipeline_config, ppo_stage_config,
                                 rm_stage_config, sft_stage_config)
from instructrl.train.ppo import PPOConfig
from instructrl.train.sft import SFTConfig

# each of these came back changed from a YAML round trip: '#' starts a comment, on/yes are booleans,
# 2024-01-01 is a date
AWKWARD = "runs/x #1/on/yes/2024-01-01/with space"
MODEL = "/models/on #2/2024-01-01"


def _stage_paths(cfg: PipelineConfig) -> list[str]:
    sft = sft_stage_config(cfg, cfg.model)
    rm = rm_stage_config(cfg, f"{cfg.output_dir}/sft/model", f"{cfg.output_dir}/round-1/rm",
                         f"{cfg.output_dir}/data/rankings_all.jsonl", f"{cfg.output_dir}/data/demonstrations.jsonl", 1)
    ppo = ppo_stage_config(cfg, "ppo_ptx", 1, cfg.model)
    ev = eval_stage_config(cfg, cfg.model, {"ppo_ptx": f"{cfg.output_dir}/round-1/ppo_ptx/policy"})
    return [sft.model, sft.output_dir, sft.data.train, rm.model, rm.output_dir, rm.data.train, rm.data.demonstrations,
            ppo.policy, ppo.reference, ppo.reward_model, ppo.prompts, ppo.ptx_data, ppo.output_dir, ev.tasks,
            ev.reward_model, ev.output_dir, ev.reference, ev.pretrain_eval, *ev.policies.values(), *ev.ppo_runs.values()]


def test_awkward_paths_reach_every_stage_verbatim_from_overrides():
    cfg = load_pipeline_config(None, [f"output_dir={AWKWARD}", f"model={MODEL}"])
    assert cfg.output_dir == AWKWARD and cfg.model == MODEL
    paths = _stage_paths(cfg)
    assert all(p.startswith(AWKWARD) or p == MODEL for p in paths), paths
    assert sft_stage_config(cfg, MODEL).model == MODEL
    assert cfg.sft.output_dir == f"{AWKWARD}/sft" and cfg.ppo.prompts == f"{AWKWARD}/data/ppo_tasks.jsonl"


def test_awkward_paths_reach_every_stage_verbatim_from_yaml(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(f'output_dir: "{AWKWARD}"\nmodel: "{MODEL}"\nsft:\n  train:\n    lr: 1.0e-4\n')
    cfg = load_pipeline_config(str(f), [])
    assert all(p.startswith(AWKWARD) or p == MODEL for p in _stage_paths(cfg))
    assert cfg.sft.train.lr == 1e-4


def test_every_stage_key_is_reachable_and_presets_sit_under_the_users_overrides():
    cfg = load_pipeline_config(None, ["preset=tiny", "sft.train.lr=3e-4", "ppo.steps=5", "ppo.train.cliprange=0.1",
                                      "rm.train.epochs=2", "eval.bootstrap=200"])
    assert isinstance(cfg.sft, SFTConfig) and isinstance(cfg.ppo, PPOConfig)
    assert cfg.sft.train.lr == 3e-4 and cfg.ppo.steps == 5 and cfg.ppo.train.cliprange == 0.1
    assert cfg.rm.train.epochs == 2 and cfg.eval.bootstrap == 200
    assert cfg.sft.train.batch_size == 4  # from the tiny preset
    # a section given by the user keeps the pipeline's defaults for the keys it does not name
    assert cfg.ppo.train.advantage == "rloo" and cfg.ppo.rollout.samples_per_prompt == 2
    default = load_pipeline_config(None, ["ppo.train.lr=1e-5"])
    assert default.ppo.train.advantage == "rloo" and default.ppo.steps == 8 and default.ppo.train.lr == 1e-5


def test_seeds_and_precision_are_derived_per_stage():
    cfg = load_pipeline_config(None, ["data.seed=3", "precision=fp32", "device=cpu"])
    assert cfg.sft.train.seed == 3 and cfg.sft.train.precision == "fp32" and cfg.sft.device == "cpu"
    ppo2 = ppo_stage_config(cfg, "ppo", 2, "p")
    assert ppo2.seed == 5 and ppo2.ptx_data == "" and ppo2.train.precision == "fp32"
    assert ppo2.rollout.max_new_tokens == cfg.data.max_new_tokens
    assert dataclasses.replace(cfg.ppo) is not cfg.ppo  # plain dataclasses, no strings in between


def test_setting_a_derived_key_is_an_error_naming_the_key_to_set_instead():
    with pytest.raises(ConfigError, match=r"sft.output_dir is set by the pipeline.*set output_dir instead"):
        load_pipeline_config(None, ["sft.output_dir=elsewhere"])
    with pytest.raises(ConfigError, match=r"ppo.rollout.max_new_tokens .*data.max_new_tokens"):
        load_pipeline_config(None, ["ppo.rollout.max_new_tokens=99"])


def test_unknown_preset_and_variant_are_clear_errors():
    with pytest.raises(ConfigError, match="preset must be one of"):
        load_pipeline_config(None, ["preset=huge"])
    with pytest.raises(ConfigError, match="variants"):
        load_pipeline_config(None, ["variants=[dpo_x]"])


def test_with_overrides_applies_text_on_top_of_a_derived_stage_config():
    from instructrl.config import with_overrides

    cfg = load_pipeline_config(None, [f"output_dir={AWKWARD}"])
    ppo = with_overrides(ppo_stage_config(cfg, "ppo", 1, "m"), ["train.lr=1e-4", f"output_dir={AWKWARD}/ceiling #3"])
    assert ppo.train.lr == 1e-4 and ppo.output_dir == f"{AWKWARD}/ceiling #3"
    assert ppo.prompts == f"{AWKWARD}/data/ppo_tasks.jsonl" and ppo.train.advantage == "rloo"


def test_the_deprecated_ppo_out_key_is_refused_in_the_pipeline_like_output_dir():
    with pytest.raises(ConfigError, match=r"ppo.out is set by the pipeline.*set output_dir"):
        load_pipeline_config(None, ["ppo.out=somewhere"])
