"""The evaluation report: report.json, a self-contained report.html (PNGs embedded), responses.jsonl, the summary.

Input is the results dict of :func:`instructrl.evaluation.evaluate.run_eval` (or report.json read
back), so a report can be re-rendered, with extra sections, without evaluating again. The figures
are :mod:`instructrl.plots`. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from instructrl.plots import plot_alignment_tax, plot_elo, plot_gold, plot_reward_vs_sqrt_kl, plot_win_rates


@dataclass
class ReportSection:
    """An extra report section (the pipeline adds per-round results and stage timings).

    title:   section heading
    text:    a paragraph (plain text, escaped)
    columns: table header; rows: table rows (numbers are formatted, everything else str())
    images:  PNG files to embed (base64) under the table
    data:    anything JSON-able, copied into report.json
    """

    title: str
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    data: Any = None

    @classmethod
    def coerce(cls, s: "ReportSection | dict | tuple") -> "ReportSection":
        """A ReportSection from itself, a dict of its fields, or a ``(title, payload)`` pair where payload is
        a mapping (a key/value table), a list of mappings (one row each; nested keys dotted) or text."""
        if isinstance(s, ReportSection):
            return s
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
            title, payload = s
            if isinstance(payload, str):
                return cls(title, text=payload, data=payload)
            if isinstance(payload, dict):
                return cls(title, columns=["", ""], rows=[[k, v] for k, v in payload.items()], data=payload)
            if isinstance(payload, (list, tuple)) and all(isinstance(r, dict) for r in payload):
                flat = [_flatten(r) for r in payload]
                cols = list(dict.fromkeys(k for r in flat for k in r))
                return cls(title, columns=cols, rows=[[r.get(c) for c in cols] for r in flat], data=list(payload))
            raise ValueError(f"extra section {title!r}: payload must be text, a mapping or a list of mappings")
        if not isinstance(s, dict) or "title" not in s:
            raise ValueError(f"an extra section must be a ReportSection or a dict with a 'title', got {s!r}")
        unknown = set(s) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"extra section {s['title']!r}: unknown keys {sorted(unknown)}")
        return cls(**s)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has neither); tuples -> lists; numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


HOW_TO_READ = [
    "Every policy answered the same held-out prompts (from users whose prompts were never trained on). "
    "A win rate is the share of prompts on which the policy's answer was preferred to the baseline's, "
    "ties counting half; 0.5 means no difference. The bars and brackets are 95% confidence intervals "
    "(Wilson): a policy beats the baseline convincingly when the whole interval is above 0.5.",
    "Two judges see the same pairs. The held-out simulated labelers (a programmatic stand-in for people; "
    "they never labeled training data) judge by the gold constraint score plus their own noise and taste. "
    "The reward model judges by its score. An RM-judged win rate far above the labeler-judged one means the "
    "policy learnt to please the reward model rather than the people it stands for: reward over-optimisation "
    "(the RM − labeler column; Gao et al. 2022, InstructGPT §4).",
    "Gold satisfaction is the share of answers that meet every constraint of their prompt, checked by rule, "
    "with no judge at all. Gold gain is the mean per-prompt difference of the gold score to the baseline's "
    "answer, with a paired interval: one labeler verdict is close to a coin flip whenever two answers differ by "
    "less than about one constraint, so a gain too small to move the win rate's interval off 0.5 still shows "
    "here. KL is Σ log π/π_SFT over the answer's tokens on the policy's own samples (nats): "
    "how far the policy moved from SFT. For best-of-N it is the closed form log N − (N−1)/N.",
    "Elo ratings come from a Bradley-Terry fit to every pairwise labeler comparison (every pair of policies "
    "on every prompt), anchored at baseline = 1000; 400 points mean 10:1 odds. Intervals are 95% percentile "
    "bootstrap over comparisons (the baseline's is a point by construction).",
    "Reward vs √KL: during PPO the mean RM score grows roughly linearly in √KL (HH paper §4.3); the line is a "
    "least-squares fit. Alignment tax: mean per-token log-likelihood of held-out pretraining text; RLHF "
    "lowers it, and PPO-ptx exists to lower it less (InstructGPT §3.5, §4.2). 'Δ' is the paired difference to "
    "the baseline.",
    "Caveats: the Wilson interval counts a tie as half a success, which is conservative when ties are common "
    "(the baseline against itself shows 0.5 with a wide interval); the Elo bootstrap resamples comparisons "
    "independently although comparisons on one prompt are correlated, so its intervals are somewhat narrow; "
    "with greedy decoding the KL column is the log-ratio on the greedy answer, not a KL.",
]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(json_safe(v), ensure_ascii=False)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


def _ci(d: dict | None, key: str = "mean") -> str:
    if not d:
        return "–"
    return f"{_fmt(d[key])} [{_fmt(d['lo'])}, {_fmt(d['hi'])}]"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(str(c) for c in columns) else ""  # key/value tables: no header
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right;vertical-align:top}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.5em 0}.note{color:#666;font-size:.9em}pre{white-space:pre-wrap;background:#f7f7f7;
padding:.4em;margin:0;font-size:.85em;text-align:left}section{margin-bottom:2em}"""


def _rm_gold_text(results: dict) -> str:
    g = results.get("rm_gold_agreement")
    if not g or not g.get("n"):
        return ""
    return (f"RM agrees with the gold scorer on {g['rate']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}] of {g['n']} pairs of "
            f"answers to the same prompt (gold gap >= {g['min_gap']}); 0.5 = the RM has not learnt what the gold "
            f"scorer (and so the labelers) reward.")


def _rm_gold_note(results: dict) -> str:
    t = _rm_gold_text(results)
    return f"<p class='note'>{html.escape(t)}</p>" if t else ""


def format_summary(results: dict) -> str:
    """A plain-text table of the headline numbers (what the command prints)."""
    lines = [f"{'policy':<14} {'win(lab)':>22} {'win(RM)':>22} {'gold ok':>8} {'gold gain':>24} {'KL':>8} {'len':>6} "
             f"{'Elo':>7}"]
    for n, p in results["policies"].items():
        wl, wr = p["win_rate_labelers"], p["win_rate_rm"]
        kl = p["kl"]["mean"] if p.get("kl") else float("nan")
        elo = p["elo"]["rating"] if p.get("elo") else float("nan")
        gg = p.get("gold_gain") or {"mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
        lines.append(f"{n:<14} {wl['rate']:>6.3f} [{wl['lo']:.3f}, {wl['hi']:.3f}] {wr['rate']:>6.3f} "
                     f"[{wr['lo']:.3f}, {wr['hi']:.3f}] {p['gold_satisfaction']['rate']:>8.3f} "
                     f"{gg['mean']:>+7.3f} [{gg['lo']:+.3f}, {gg['hi']:+.3f}] {kl:>8.3f} "
                     f"{p['length_tokens']['mean']:>6.1f} {elo:>7.0f}")
    rm_gold = _rm_gold_text(results)
    if rm_gold:
        lines.append(rm_gold)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# report.html, one function per section (each returns its HTML chunks)
# ---------------------------------------------------------------------------

PLOT_FILES = {"win_rates": "win_rates.png", "gold": "gold_satisfaction.png", "elo": "elo.png",
              "reward_vs_sqrt_kl": "reward_vs_sqrt_kl.png", "alignment_tax": "alignment_tax.png"}


def _write_plots(results: dict, out: Path) -> dict[str, bytes | None]:
    """Every figure of the report as PNG bytes (None: nothing to plot, no file written)."""
    f = {k: out / v for k, v in PLOT_FILES.items()}
    return {"win_rates": plot_win_rates(results, f["win_rates"]), "gold": plot_gold(results, f["gold"]),
            "elo": plot_elo(results, f["elo"]) if results.get("elo") else None,
            "reward_vs_sqrt_kl": plot_reward_vs_sqrt_kl(results.get("reward_vs_sqrt_kl") or {},
                                                        f["reward_vs_sqrt_kl"]),
            "alignment_tax": plot_alignment_tax(results, f["alignment_tax"])}


def _setup_html(results: dict) -> list[str]:
    base = results["baseline"]
    return ["<section><h2>Setup</h2>" + _table(["", ""], [
        ["held-out prompts", results["n_prompts"]], ["baseline", base], ["KL reference", results.get("reference")],
        ["decoding", results.get("decoding")],
        ["judges", f"held-out simulated labelers {', '.join(results['labelers']['held_out'])} and the reward model"],
        ["seed", results["config"].get("seed") if results.get("config") else None],
    ]) + f"<p class='note'>{html.escape(results['labelers']['note'])}</p></section>",
        "<section><h2>How to read this</h2>" + "".join(f"<p>{html.escape(p)}</p>" for p in HOW_TO_READ)
        + "</section>"]


def _summary_html(results: dict, pngs: dict) -> list[str]:
    pol, base = results["policies"], results["baseline"]
    rows = []
    for n, p in pol.items():
        rows.append([n, _ci(p["win_rate_labelers"], "rate"), _ci(p["win_rate_rm"], "rate"), p["rm_minus_labeler"],
                     _ci(p["gold_satisfaction"], "rate"), _ci(p["gold_score"]), _ci(p.get("gold_gain")),
                     _ci(p["rm_score"]), _ci(p.get("kl")),
                     _ci(p["length_tokens"]), p["length_words"]["mean"], p["missing_eos"],
                     _ci(p.get("elo"), "rating")])
    return [f"<section><h2>Summary (vs {html.escape(base)})</h2>" + _table(
        ["policy", "win rate, labelers [95% CI]", "win rate, RM [95% CI]", "RM − labelers", "gold: all constraints met",
         "mean gold score", f"gold gain vs {base} (paired) [95% CI]", "mean RM score", "KL from reference (nats)",
         "length (tokens)", "length (words)", "no EOS", "Elo [95% CI]"], rows)
        + "".join(f"<p class='note'>{html.escape(n)}: {html.escape(p['note'])}</p>" for n, p in pol.items()
                  if p.get("note"))
        + "<h3>Win rates, counts</h3>" + _table(
            ["policy", "judge", "wins", "ties", "n", "rate", "lo", "hi"],
            [[n, j, p[k]["wins"], p[k]["ties"], p[k]["n"], p[k]["rate"], p[k]["lo"], p[k]["hi"]]
             for n, p in pol.items() for j, k in (("labelers", "win_rate_labelers"), ("RM", "win_rate_rm"))])
        + _img(pngs["win_rates"], "win rates") + _rm_gold_note(results) + "</section>"]


def _gold_html(results: dict, pngs: dict) -> list[str]:
    pol = results["policies"]
    return ["<section><h2>Gold constraint satisfaction</h2>" + _table(
        ["policy", "satisfied", "n", "rate", "lo", "hi", "mean gold", "lo", "hi"],
        [[n, round(p["gold_satisfaction"]["rate"] * p["gold_satisfaction"]["n"]), p["gold_satisfaction"]["n"],
          p["gold_satisfaction"]["rate"], p["gold_satisfaction"]["lo"], p["gold_satisfaction"]["hi"],
          p["gold_score"]["mean"], p["gold_score"]["lo"], p["gold_score"]["hi"]] for n, p in pol.items()])
        + _img(pngs["gold"], "gold satisfaction") + "</section>"]


def _elo_html(results: dict, pngs: dict) -> list[str]:
    h = ["<section><h2>Elo (Bradley–Terry)</h2>"]
    if results.get("elo"):
        names = list(results["policies"])
        h.append(_table(["policy", "Elo", "lo", "hi"], [[n, e["rating"], e["lo"], e["hi"]]
                                                        for n, e in results["elo"].items()]))
        h.append("<h3>Pairwise labeler win rate (row beats column)</h3>" + _table(
            [""] + names, [[a] + [results["pairwise_labelers"][a].get(b) for b in names] for a in names]))
        h.append(_img(pngs["elo"], "Elo"))
    else:
        h.append("<p>Needs at least two policies.</p>")
    return h + ["</section>"]


def _ppo_curves_html(results: dict, pngs: dict) -> list[str]:
    h = ["<section><h2>Reward vs √KL during PPO</h2>"]
    curves = results.get("reward_vs_sqrt_kl") or {}
    if curves:
        h.append(_table(["run", "folder", "steps", "slope", "intercept", "r²", "final √KL", "final score", "why no fit"], [
            [n, c.get("run"), len(c["points"]), *((c["fit"]["slope"], c["fit"]["intercept"], c["fit"]["r2"])
                                                  if c["fit"] else (None, None, None)),
             c["points"][-1][0] if c["points"] else None, c["points"][-1][1] if c["points"] else None, c["why"]]
            for n, c in curves.items()]))
        h.append(_img(pngs["reward_vs_sqrt_kl"], "reward vs sqrt KL"))
    else:
        h.append("<p>No PPO runs given (ppo_runs).</p>")
    return h + ["</section>"]


def _tax_html(results: dict, pngs: dict) -> list[str]:
    h = ["<section><h2>Alignment tax (held-out pretraining text)</h2>"]
    tax = results.get("alignment_tax")
    if tax:
        h.append(f"<p>{tax['n_texts']} texts from {html.escape(str(tax['data']))}, each cut to {tax['max_tokens']} "
                 f"tokens. Δ = policy − {html.escape(tax['baseline'])} (paired bootstrap).</p>")
        h.append(_table(["policy", "log-lik / token", "lo", "hi", "tokens", "Δ", "Δ lo", "Δ hi"], [
            [n, t["mean"], t["lo"], t["hi"], t["tokens"], *((t["delta"]["mean"], t["delta"]["lo"], t["delta"]["hi"])
                                                             if "delta" in t else (None, None, None))]
            for n, t in tax["policies"].items()]))
        if tax.get("note"):
            h.append(f"<p class='note'>{html.escape(tax['note'])}</p>")
        h.append(_img(pngs["alignment_tax"], "alignment tax"))
    else:
        h.append("<p>No held-out pretraining text given (pretrain_eval).</p>")
    return h + ["</section>"]


def _examples_html(results: dict) -> list[str]:
    if not results.get("examples"):
        return []
    h = ["<section><h2>Example answers</h2>"]
    for ex in results["examples"]:
        h.append(f"<h3>{html.escape(ex['id'])}</h3><p>{html.escape(ex['prompt'])}</p>")
        h.append("<table><thead><tr><th>policy</th><th>answer</th><th>all constraints</th><th>gold</th>"
                 "<th>RM</th></tr></thead><tbody>" + "".join(
                     f"<tr><td>{html.escape(n)}</td><td><pre>{html.escape(a['text'])}</pre></td>"
                     f"<td>{_fmt(a['gold_ok'])}</td><td>{_fmt(a['gold'])}</td><td>{_fmt(a['rm'])}</td></tr>"
                     for n, a in ex["answers"].items()) + "</tbody></table>")
    return h + ["</section>"]


def _extra_html(s: ReportSection) -> list[str]:
    h = [f"<section><h2>{html.escape(s.title)}</h2>"]
    if s.text:
        h.append(f"<p>{html.escape(s.text)}</p>")
    if s.columns or s.rows:
        h.append(_table(s.columns, s.rows))
    for img in s.images:
        h.append(_img(Path(img).read_bytes(), Path(img).name))
    return h + ["</section>"]


def write_report(results: dict, out_dir: str | Path,
                 extra_sections: Sequence[ReportSection | dict | tuple] = ()) -> dict[str, Any]:
    """Write report.html (self-contained: PNGs embedded as base64, also saved beside it) and report.json.

    ``results``: the dict :func:`~instructrl.evaluation.evaluate.run_eval` returns (or report.json read back).
    ``extra_sections``: :class:`ReportSection`s, dicts of its fields, or ``(title, payload)``
    pairs (see :meth:`ReportSection.coerce`) appended to the report, e.g. the pipeline's
    per-round results and stage timings; they go into report.json under "sections" too.
    Every file is written atomically. Returns the paths written (keys "html", "json" and
    one per plot) and, under "results", the dict that report.json holds.
    """
    from instructrl.io import atomic_write_text

    out = Path(out_dir)
    sections = [ReportSection.coerce(s) for s in extra_sections]
    results = dict(results)
    results["sections"] = [asdict(s) for s in sections]
    pngs = _write_plots(results, out)
    paths: dict[str, Any] = {k: out / PLOT_FILES[k] for k in PLOT_FILES if pngs[k]}

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>instructrl evaluation</title>"
         f"<style>{CSS}</style></head><body><h1>instructrl evaluation</h1>"]
    h += _setup_html(results) + _summary_html(results, pngs) + _gold_html(results, pngs)
    h += _elo_html(results, pngs) + _ppo_curves_html(results, pngs) + _tax_html(results, pngs)
    h += _examples_html(results)
    for s in sections:
        h += _extra_html(s)
    if results.get("timings"):
        h.append("<section><h2>Evaluation timings (s)</h2>" + _table(["phase", "seconds"], list(
            results["timings"].items())) + "</section>")
    h.append("</body></html>")

    atomic_write_text(out / "report.json", json.dumps(json_safe(results), indent=2, ensure_ascii=False))
    atomic_write_text(out / "report.html", "\n".join(h))
    paths["json"], paths["html"] = out / "report.json", out / "report.html"
    paths["results"] = results
    return paths
