"""`instructrl rm eval`: reward-model accuracy and log loss on held-out comparisons, by K, with 95% CIs; calibration plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from instructrl.config import check, param
from instructrl.rm_metrics import format_metrics
from instructrl.reward_model import RewardScorer, load_reward_model
from instructrl.runtime import Precision, device_field, make_runtime, precision_field
from instructrl.train.rm import RankingTruncation, _load_rankings_counted, evaluate, tokenize_rankings


@dataclass
class RMEvalConfig:
    model: str = param("", "trained reward model folder (e.g. runs/rm/model); required")
    data: str = param("", "held-out rankings/pairs JSONL; required")
    output_dir: str = param("", "where eval.json and calibration.png go; empty = <model>/eval")
    device: str = device_field()
    max_length: int = param(512, "max tokens of prompt + response (truncation as in training)", min=1)
    min_prompt_tokens: int = param(16, "truncation never cuts the prompt below this many tokens", min=0)
    micro_batch_size: int = param(16, "sequences per forward pass", min=1)
    precision: Precision = precision_field()
    errors: Literal["raise", "skip"] = param("raise", "bad rows: raise or skip (counted)")
    bootstrap: int = param(2000, "bootstrap resamples for the 95% confidence intervals", min=100)

    def validate(self):
        check(bool(self.model), "model: a reward model folder is required (model=PATH)")
        check(bool(self.data), "data: a rankings file is required (data=PATH)")
        check(self.max_length > self.min_prompt_tokens, "max_length must exceed min_prompt_tokens")
        check(self.bootstrap >= 100, "bootstrap must be >= 100")


# ---------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------


def evaluate_rm(cfg: RMEvalConfig) -> dict:
    """``instructrl rm eval``: accuracy and log loss on held-out comparisons, by K, with 95% CIs + calibration PNG."""
    from instructrl.models import load_tokenizer

    from instructrl.io import require_folder_path

    rt = make_runtime(cfg.device, cfg.precision)
    out_dir = require_folder_path(Path(cfg.output_dir) if cfg.output_dir else Path(cfg.model) / "eval")
    model = load_reward_model(cfg.model).eval().to(rt.device)
    tok = load_tokenizer(cfg.model)
    msgs: list[str] = []
    rankings = _load_rankings_counted(cfg.data, cfg.errors, msgs.append)
    stats = RankingTruncation()
    items = tokenize_rankings(tok, rankings, cfg.max_length, cfg.min_prompt_tokens, stats)
    msg = f"truncation (max_length={cfg.max_length}): {stats.summary()}"
    print(f"[rm eval] {msg}")

    m = evaluate(RewardScorer(model), items, model.config.pad_token_id, out_dir, cfg.micro_batch_size, rt.autocast,
                 rt.device, cfg.bootstrap)
    m["truncation"] = stats.summary()
    m["skipped_rows"] = msgs
    from instructrl.io import atomic_write_text
    import json

    atomic_write_text(out_dir / "eval.json", json.dumps(m, indent=2))
    print(format_metrics(m))
    print(f"[rm eval] wrote {out_dir / 'eval.json'} and {out_dir / 'calibration.png'}")
    return m
