"""Reward-model metrics on scored comparisons: accuracy and log loss by K with cluster-bootstrap CIs, calibration.

No model code: the RM training command and `instructrl rm eval` both report through these;
the calibration figure is :func:`instructrl.plots.plot_calibration`."""

from __future__ import annotations



def comparison_table(items: list, scores: list[list[float]]) -> list[dict]:
    """One row per untied comparison: ranking index, K, margin d = r_w - r_l."""
    rows = []
    for g, (it, s) in enumerate(zip(items, scores)):
        for i in range(it.k):
            for j in range(i + 1, it.k):
                if it.ranks[i] == it.ranks[j]:
                    continue
                w, l = (i, j) if it.ranks[i] < it.ranks[j] else (j, i)
                rows.append({"ranking": g, "k": it.k, "margin": s[w] - s[l]})
    return rows


def _cluster_bootstrap(num, den, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of Σnum/Σden, resampling rankings (comparisons within a ranking are not independent)."""
    import numpy as np

    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    stat = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    a = (1 - level) / 2
    return float(np.quantile(stat, a)), float(np.quantile(stat, 1 - a))


def comparison_metrics(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy (a score tie counts half) and log loss -log σ(r_w - r_l), overall and by K.

    Every comparison weighs the same. 95% CIs: percentile bootstrap over
    rankings (a cluster bootstrap; for pairwise data it matches the usual binomial interval).
    """
    import numpy as np

    def block(sel: list[dict]) -> dict:
        if not sel:
            return {"comparisons": 0}
        by_r: dict[int, list[float]] = {}
        for r in sel:
            by_r.setdefault(r["ranking"], []).append(r["margin"])
        m = [np.asarray(v) for v in by_r.values()]
        correct = np.array([(x > 0).sum() + 0.5 * (x == 0).sum() for x in m])
        nll = np.array([np.logaddexp(0.0, -x).sum() for x in m])
        n = np.array([len(x) for x in m])
        acc_ci = _cluster_bootstrap(correct, n, n_boot, seed)
        ll_ci = _cluster_bootstrap(nll, n, n_boot, seed + 1)
        return {"comparisons": int(n.sum()), "rankings": len(m), "accuracy": float(correct.sum() / n.sum()),
                "accuracy_ci95": list(acc_ci), "log_loss": float(nll.sum() / n.sum()), "log_loss_ci95": list(ll_ci)}

    out = {"overall": block(rows), "by_k": {}}
    for k in sorted({r["k"] for r in rows}):
        out["by_k"][str(k)] = block([r for r in rows if r["k"] == k])
    return out


def calibration_bins(margins, n_bins: int = 10) -> dict:
    """Predicted P(a beats b) = σ(r_a - r_b) against the observed frequency.

    Each comparison enters in both orientations, (σ(d), won) and (σ(-d), lost),
    so the curve covers [0, 1] and is symmetric. Returns bin centres, mean
    predicted, observed rate and counts, and the expected calibration error.
    """
    import numpy as np

    d = np.asarray(margins, dtype=np.float64)
    p = np.concatenate([1 / (1 + np.exp(-d)), 1 / (1 + np.exp(d))])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    pred, obs, count = [], [], []
    for b in range(n_bins):
        sel = which == b
        count.append(int(sel.sum()))
        pred.append(float(p[sel].mean()) if sel.any() else float("nan"))
        obs.append(float(y[sel].mean()) if sel.any() else float("nan"))
    ece = float(sum(c * abs(a - o) for a, o, c in zip(pred, obs, count) if c) / max(len(p), 1))
    return {"edges": edges.tolist(), "predicted": pred, "observed": obs, "count": count, "ece": ece}


def format_metrics(m: dict) -> str:
    lines = [f"{'K':>8} {'rankings':>9} {'comparisons':>12} {'accuracy [95% CI]':>26} {'log loss [95% CI]':>26}"]

    def row(name, b):
        if not b.get("comparisons"):
            return f"{name:>8} {'-':>9} {0:>12}"
        a, al = b["accuracy"], b["accuracy_ci95"]
        ll, lc = b["log_loss"], b["log_loss_ci95"]
        return (f"{name:>8} {b['rankings']:>9} {b['comparisons']:>12} {a:>8.3f} [{al[0]:.3f}, {al[1]:.3f}]"
                f"   {ll:>8.3f} [{lc[0]:.3f}, {lc[1]:.3f}]")

    for k, b in m["by_k"].items():
        lines.append(row(k, b))
    lines.append(row("all", m["overall"]))
    return "\n".join(lines)
