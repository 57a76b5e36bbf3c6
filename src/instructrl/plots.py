"""Every PNG figure instructrl draws: the evaluation report's plots, PPO's reward vs √KL, RM calibration.

matplotlib is imported inside the functions (Agg backend: no display needed). Every figure is
written atomically and its PNG bytes returned, so an HTML report can embed it.
"""

from __future__ import annotations

import io as _io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """io.atomic_write_text for bytes (temp file in the same folder, then rename); belongs in instructrl.io."""
    from instructrl.io import _UMASK

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | Path, dpi: int = 110) -> bytes:
    """Lay out, render to PNG, close ``fig``; write the PNG to ``path`` atomically and return its bytes."""
    plt = _plt()
    buf = _io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data


# ---------------------------------------------------------------------------
# Reward vs √KL (PPO runs; the evaluation report)
# ---------------------------------------------------------------------------


def reward_vs_sqrt_kl(rows: Sequence[dict], score_key: str = "score", kl_key: str = "kl") -> dict:
    """Points (√KL, mean RM score) of a PPO run's metrics rows and their least-squares line.

    HH (Bai et al. 2022 §4.3) found reward roughly linear in √KL. KL estimates below
    0 (the k1 estimator can dip under 0 early on) are clipped to 0 before the root.
    Returns {"points": [[sqrt_kl, score, step], ...], "fit": {"slope", "intercept", "r2"} or None, "why"}.
    """
    from instructrl.core.stats import linear_fit

    pts = []
    for r in rows:
        kl, s = r.get(kl_key), r.get(score_key)
        if isinstance(kl, (int, float)) and isinstance(s, (int, float)) and math.isfinite(kl) and math.isfinite(s):
            pts.append([math.sqrt(max(float(kl), 0.0)), float(s), r.get("step")])
    out: dict[str, Any] = {"points": pts, "fit": None, "why": ""}
    xs = [p[0] for p in pts]
    if len(pts) < 2:
        out["why"] = f"{len(pts)} logged step(s): a line needs 2"
    elif max(xs) == min(xs):
        out["why"] = "√KL is constant over the run: the slope is undefined"
    else:
        slope, intercept, r2 = linear_fit(xs, [p[1] for p in pts])
        out["fit"] = {"slope": slope, "intercept": intercept, "r2": r2}
    return out


def plot_reward_vs_sqrt_kl(curves: Mapping[str, dict], path: str | Path) -> bytes | None:
    """Mean RM score per PPO step against √KL, one series (and its line, where fitted) per run.

    ``curves``: run name -> :func:`reward_vs_sqrt_kl` of its metrics rows (the evaluation's
    ``results["reward_vs_sqrt_kl"]``; a PPO run passes its own). Returns the PNG bytes,
    or None (nothing written) when no run has a point.
    """
    if not any(c["points"] for c in curves.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for name, c in curves.items():
        if not c["points"]:
            continue
        xs = np.array([p[0] for p in c["points"]])
        ys = np.array([p[1] for p in c["points"]])
        pts = ax.plot(xs, ys, "o", ms=3, alpha=0.7, label=name)
        if c["fit"]:
            f = c["fit"]
            line = np.linspace(xs.min(), xs.max(), 20)
            ax.plot(line, f["slope"] * line + f["intercept"], "-", color=pts[0].get_color(),
                    label=f"{name}: {f['slope']:.3f}·√KL {'+' if f['intercept'] >= 0 else '−'} "
                          f"{abs(f['intercept']):.3f} (r² {f['r2']:.2f})")
    ax.set_xlabel("√KL(π ‖ π_SFT)  (√nats, per sequence)")
    ax.set_ylabel("mean RM score per PPO step")
    ax.set_title("reward vs √KL during PPO", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Evaluation report figures (inputs: the results dict of evaluation.evaluate.run_eval)
# ---------------------------------------------------------------------------


def plot_win_rates(results: dict, path: Path) -> bytes:
    """Win rate vs the baseline per policy: held-out labelers and RM side by side, 95% CI bars, 0.5 line."""
    plt = _plt()
    names = list(results["policies"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    for k, (key, label, off) in enumerate((("win_rate_labelers", "held-out labelers", -0.2),
                                           ("win_rate_rm", "reward model", 0.2))):
        w = [results["policies"][n][key] for n in names]
        r = np.array([v["rate"] for v in w])
        err = np.array([[v["rate"] - v["lo"] for v in w], [v["hi"] - v["rate"] for v in w]])
        ax.bar(x + off, r, 0.4, yerr=err, capsize=3, label=label, color=("#4c72b0", "#dd8452")[k])
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {results['baseline']}")
    ax.set_title(f"win rate vs {results['baseline']} (95% CI), {results['n_prompts']} prompts", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_elo(results: dict, path: Path) -> bytes:
    plt = _plt()
    elo = results["elo"]
    names = sorted(elo, key=lambda n: elo[n]["rating"])
    fig, ax = plt.subplots(figsize=(5, 0.5 * len(names) + 1.6))
    y = np.arange(len(names))
    r = np.array([elo[n]["rating"] for n in names])
    err = np.array([[elo[n]["rating"] - elo[n]["lo"] for n in names], [elo[n]["hi"] - elo[n]["rating"] for n in names]])
    ax.errorbar(r, y, xerr=err, fmt="o", capsize=4)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"Elo (Bradley-Terry; {results['baseline']} = 1000)")
    ax.set_title("Elo from held-out labeler comparisons (95% bootstrap CI)", fontsize=10)
    return save_figure(fig, path)


def plot_gold(results: dict, path: Path) -> bytes:
    plt = _plt()
    names = list(results["policies"])
    g = [results["policies"][n]["gold_satisfaction"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(names) + 2), 3.4))
    r = np.array([v["rate"] for v in g])
    err = np.array([[v["rate"] - v["lo"] for v in g], [v["hi"] - v["rate"] for v in g]])
    ax.bar(np.arange(len(names)), r, 0.6, yerr=err, capsize=3, color="#55a868")
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share satisfying every constraint")
    ax.set_title("gold constraint satisfaction (95% Wilson CI)", fontsize=10)
    return save_figure(fig, path)


def plot_alignment_tax(results: dict, path: Path) -> bytes | None:
    tax = results.get("alignment_tax")
    if not tax:
        return None
    plt = _plt()
    pol = tax["policies"]
    names = list(pol)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(names) + 2), 3.4))
    r = np.array([pol[n]["mean"] for n in names])
    err = np.array([[pol[n]["mean"] - pol[n]["lo"] for n in names], [pol[n]["hi"] - pol[n]["mean"] for n in names]])
    ax.errorbar(np.arange(len(names)), r, yerr=err, fmt="o", capsize=4)
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylabel("mean log-likelihood per token (nats)")
    ax.set_title("held-out pretraining text (higher = less alignment tax)", fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Reward-model calibration (rm train / rm eval)
# ---------------------------------------------------------------------------


def plot_calibration(cal: dict, path: str | Path, title: str = "reward model calibration") -> bytes:
    """Reliability diagram (rm_metrics.calibration_bins) as PNG, written atomically; returns the PNG bytes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
    pts = [(a, o, c) for a, o, c in zip(cal["predicted"], cal["observed"], cal["count"]) if c]
    ax.plot([a for a, _, _ in pts], [o for _, o, _ in pts], "o-", label=f"RM (ECE {cal['ece']:.3f})")
    for a, o, c in pts:
        ax.annotate(str(c), (a, o), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("predicted P(win) = σ(r_a − r_b)")
    ax.set_ylabel("observed win rate")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path, dpi=120)
