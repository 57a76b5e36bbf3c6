"""Turning a project's labels into the foundation's JSONL formats, and measuring agreement.

Formats (docs/data-formats.md), written with :mod:`instructrl.data`'s row writers
and read back with its loaders before anything is renamed into place:

* ``demonstrations.jsonl`` -- demonstration tasks;
* ``rankings.jsonl`` -- rank-K tasks, responses best first (K-wise, InstructGPT §3.5);
* ``pairwise.jsonl`` -- HH turns as ``{prompt, chosen, rejected}``: in helpful mode
  the picked reply is ``chosen``; in red-team mode the picked reply is the more
  harmful one, so it is ``rejected`` (Bai et al. 2022 §2.2: harmlessness data
  prefers the less harmful reply);
* ``ratings.jsonl`` -- 1-7 ratings with the metadata flags;
* ``agreement.json`` -- inter-labeler agreement (below).

Each file exists once per split (``<split>/<file>``), so train/val/test never share
a prompt author (:mod:`instructrl.hygiene`). Labels from held-out labelers are
left out unless ``labelers="held_out"`` or ``"all"``.

Agreement (as InstructGPT measures it between labelers): for every task that two or more labelers
ranked, each pair of completions is one comparison; two labelers agree on it
when they order it the same way. The rate is agreeing labeler pairs over all
labeler pairs, overall and per labeler, with Wilson 95% intervals
(:func:`instructrl.core.stats.pairwise_agreement`). HH conversations diverge after
the first turn, so only their first turn is comparable across labelers.
"""

from __future__ import annotations

import json
from pathlib import Path

from instructrl.data import (Demonstration, Ranking, Rating, demonstration_row, load_demonstrations, load_rankings,
                             load_ratings, ranking_row, rating_row)
from instructrl.io import atomic_dir, write_jsonl

EXPORT_KINDS = ("demonstrations", "rankings", "pairwise", "ratings")


def _keep(rec: dict, labelers: str) -> bool:
    return labelers == "all" or (rec["held_out"] if labelers == "held_out" else not rec["held_out"])


def pair_row(r: Ranking) -> dict:
    """A K = 2 ranking as the pairwise layout ``{prompt, chosen, rejected}``."""
    row = {"id": r.id, "prompt": r.messages, "chosen": r.responses[0], "rejected": r.responses[1]}
    row.update({k: v for k, v in (("labeler_id", r.labeler_id), ("user_id", r.user_id)) if v})
    return row


def build_records(labeled: list[dict], hh_mode: str = "helpful", labelers: str = "train") -> dict[str, dict[str, list]]:
    """kind -> split -> list of rows (dicts in the data.py formats)."""
    out: dict[str, dict[str, list]] = {k: {} for k in EXPORT_KINDS}
    for rec in labeled:
        if not _keep(rec, labelers):
            continue
        p, split, who = rec["payload"], rec["split"], rec["labeler"]
        rid = f"{rec['prompt_ext_id']}#{who}"
        if "response" in p:
            d = Demonstration(rid, rec["messages"], p["response"], rec["user_id"], who)
            out["demonstrations"].setdefault(split, []).append(demonstration_row(d))
        elif "order" in p:
            comps = rec["completions"]
            r = Ranking(rid, rec["messages"], [comps[i] for i in p["order"]], list(range(len(p["order"]))), who,
                        rec["user_id"])
            out["rankings"].setdefault(split, []).append(ranking_row(r))
        elif "rating" in p:
            rt = Rating(f"{rec['prompt_ext_id']}:{rec['slot']}#{who}", rec["messages"], rec["completions"][rec["slot"]],
                        p["rating"], dict(p["flags"]), who)
            out["ratings"].setdefault(split, []).append(rating_row(rt))
        elif "turns" in p:
            for t, turn in enumerate(rec["turns"]):
                if turn["choice"] is None:
                    continue
                picked, other = (turn["a"], turn["b"]) if turn["choice"] == "a" else (turn["b"], turn["a"])
                better, worse = (picked, other) if hh_mode == "helpful" else (other, picked)
                if better == worse:
                    continue  # identical replies: no comparison
                r = Ranking(f"{rid}:turn{t}", turn["context"], [better, worse], [0, 1], who, rec["user_id"])
                out["pairwise"].setdefault(split, []).append(pair_row(r))
    return out


def agreement(labeled: list[dict], level: float = 0.95) -> dict:
    """Inter-labeler agreement over shared comparisons (module docstring); JSON-ready."""
    from instructrl.core.stats import pairwise_agreement

    items = []
    for rec in labeled:
        p = rec["payload"]
        if "order" in p:
            pos = {c: i for i, c in enumerate(p["order"])}
            k = len(p["order"])
            for i in range(k):
                for j in range(i + 1, k):
                    items.append(((rec["task"], i, j), rec["labeler"], int(pos[i] < pos[j])))
        elif "turns" in p and rec["turns"] and rec["turns"][0]["choice"]:
            t0 = rec["turns"][0]
            # first-turn replies differ per labeler (sampled live), so only identical pairs are comparable
            items.append(((rec["task"], "hh0", t0["a"], t0["b"]), rec["labeler"], t0["choice"]))
    def summary(its):
        ag = pairwise_agreement(its, level)
        d = ag.as_dict()
        d["rate"] = None if ag.n_pairs == 0 else d["rate"]  # JSON has no NaN
        return d

    d = summary(items)
    d["level"] = level
    # InstructGPT compares agreement among training labelers with agreement among held-out ones
    held = {rec["labeler"] for rec in labeled if rec["held_out"]}
    d["groups"] = {"train": summary([x for x in items if x[1] not in held]),
                   "held_out": summary([x for x in items if x[1] in held])}
    for g in d["groups"].values():
        g.pop("per_labeler")
    return d


def export_project(store, pid: int, out: str | Path, labelers: str = "train") -> dict:
    """Write every export of project ``pid`` to folder ``out`` (atomically); returns counts per file."""
    proj = store.project(pid)
    labeled = store.labeled(pid)
    recs = build_records(labeled, proj.hh_mode, labelers)
    loaders = {"demonstrations": load_demonstrations, "rankings": load_rankings, "pairwise": load_rankings,
               "ratings": load_ratings}
    counts: dict[str, int] = {}
    with atomic_dir(out, legacy=("agreement.json",)) as tmp:
        for kind, splits in recs.items():
            for split, rows in splits.items():
                path = Path(tmp) / split / f"{kind}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(path, rows)
                n = len(loaders[kind](path))  # round-trip check: what we wrote, the pipeline can read
                assert n == len(rows), f"{path}: wrote {len(rows)} rows, loader read {n}"
                counts[f"{split}/{kind}.jsonl"] = n
        ag = agreement(labeled)
        (Path(tmp) / "agreement.json").write_text(json.dumps(ag, indent=2) + "\n")
        meta = {"project": proj.name, "kind": proj.kind, "hh_mode": proj.hh_mode, "labelers": labelers,
                "files": counts, "all_bad_rankings": sum(1 for r in labeled if r["payload"].get("all_bad"))}
        (Path(tmp) / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts
