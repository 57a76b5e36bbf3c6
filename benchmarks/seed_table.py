"""Issue 20's acceptance table for pipeline runs that differ in their seed: one markdown row per run.

    python benchmarks/seed_table.py RUN [RUN ...]

Each RUN is a finished `instructrl pipeline` folder (its eval/report.json, config.yaml, timings.json).
Per run: the seed, the sampling engine, the wall time of its stages, SFT against base and PPO-ptx against SFT by the
held-out labelers (win rate with its 95% interval) and PPO-ptx's paired gold gain over SFT, then the
acceptance: SFT beats base (base's interval below 0.5), PPO-ptx beats SFT (interval above 0.5) and its
gold gain's interval lies above 0; "no gold loss" = the gold gain's interval does not lie below 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(x: dict, key: str = "rate", sign: str = "") -> str:
    return f"{x[key]:{sign}.3f} [{x['lo']:{sign}.3f}, {x['hi']:{sign}.3f}]"


def row(run: Path) -> str:
    import yaml

    rep = json.loads((run / "eval" / "report.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed, engine = cfg["data"]["seed"], cfg["engine"]["name"]
    minutes = sum(json.loads((run / "timings.json").read_text()).values()) / 60
    pol = rep["policies"]
    base, ptx = pol["base"]["win_rate_labelers"], pol["ppo_ptx"]["win_rate_labelers"]
    gain = pol["ppo_ptx"]["gold_gain"]
    sft_beats_base = base["hi"] < 0.5
    ptx_wins, ptx_gold = ptx["lo"] > 0.5, gain["lo"] > 0
    return (f"| {seed} | {engine} | {minutes:.1f} | {1 - base['rate']:.3f} [{1 - base['hi']:.3f}, {1 - base['lo']:.3f}] "
            f"| {ci(ptx)} | {ci(gain, 'mean', '+')} "
            f"| {'yes' if sft_beats_base else 'no'} | {'yes' if ptx_wins and ptx_gold else 'no'} "
            f"| {'yes' if gain['hi'] >= 0 else 'no'} |")


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:]]
    if not runs:
        raise SystemExit(__doc__)
    print("| seed | engine | stages (min) | SFT vs base, labelers | PPO-ptx vs SFT, labelers | PPO-ptx gold gain vs SFT "
          "| SFT beats base | PPO-ptx beats SFT (both) | no gold loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main()
