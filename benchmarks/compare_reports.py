"""Two pipeline runs' eval/report.json side by side: every value that differs, paths and timings aside.

Used to show that a restructure changed no behaviour (issue 17): run the tiny pipeline at the old and
the new commit, same seed and machine, and compare.

    git worktree add /tmp/old 43317c7
    (cd /tmp/old && PYTHONPATH=src python -m instructrl pipeline --preset tiny model=TINY output_dir=/tmp/a \\
        precision=fp32 ppo.advantage=gae 'ppo.extra=[rollout.top_k=1]')
    python -m instructrl pipeline --preset tiny model=TINY output_dir=/tmp/b precision=fp32 \\
        ppo.train.advantage=gae ppo.rollout.top_k=1
    python benchmarks/compare_reports.py /tmp/a /tmp/b

Exit status 1 when any value differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# keys that name the run, not its results
IGNORED_PREFIXES = ("timings", "config.")
IGNORED_SECTIONS = ("Stage timings (s)",)


def flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = d
    return out


def differences(a_dir: Path, b_dir: Path) -> list[tuple[str, object, object]]:
    a, b = (json.loads((d / "eval" / "report.json").read_text()) for d in (a_dir, b_dir))
    for r in (a, b):  # drop sections that only hold wall times
        r["sections"] = [s for s in r.get("sections", []) if s.get("title") not in IGNORED_SECTIONS]
    fa, fb = flatten(a), flatten(b)
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k), fb.get(k)
        if isinstance(va, str) and isinstance(vb, str):
            va, vb = va.replace(str(a_dir), "RUN"), vb.replace(str(b_dir), "RUN")
        if va != vb and not k.startswith(IGNORED_PREFIXES):
            out.append((k, va, vb))
    return out


def main() -> int:
    a_dir, b_dir = (Path(x).resolve() for x in sys.argv[1:3])
    diffs = differences(a_dir, b_dir)
    for k, va, vb in diffs:
        print(f"{k}: {va!r} -> {vb!r}")
    n = len(flatten(json.loads((a_dir / "eval" / "report.json").read_text())))
    print(f"{len(diffs)} of {n} values differ (paths, config keys and timings aside)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
