"""DPO as a pipeline variant: trained from SFT on the rankings, evaluated and Elo-rated beside PPO-ptx."""

import json

from instructrl.pipeline import load_pipeline_config, run_pipeline


def test_dpo_variant_is_trained_on_the_rankings_and_evaluated(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    results = run_pipeline(load_pipeline_config(None, [
        "preset=tiny", f"model={tiny_model_dir}", f"output_dir={out}", "precision=fp32", "variants=[dpo, ppo_ptx]"]))
    dpo_cfg = (out / "round-1" / "dpo" / "config.yaml").read_text()
    assert "rankings_all.jsonl" in dpo_cfg and str(out / "sft" / "model") in dpo_cfg
    assert (out / "round-1" / "dpo" / "model" / "config.json").exists()
    state = json.loads((out / "state.json").read_text())
    assert state["dpo-1"]["model"] == str(out / "round-1" / "dpo" / "model")
    assert {"dpo", "ppo_ptx", "sft", "base"} <= set(results["policies"])
    report = json.loads((out / "eval" / "report.json").read_text())
    assert "dpo" in report["elo"] and "dpo" in (out / "eval" / "report.html").read_text()
    assert report["policies"]["dpo"]["source"] == str(out / "round-1" / "dpo" / "model")
