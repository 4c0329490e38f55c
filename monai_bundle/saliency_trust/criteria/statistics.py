"""Statistics behind the verdicts: bootstrap CIs, paired one-sided Wilcoxon, Holm correction.

Non-finite values (NaN from an empty mask, a constant map) are never averaged silently:
:func:`summarize` drops them from the statistics and reports how many there were.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wilcoxon


def _finite(values) -> tuple[np.ndarray, int]:
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = np.isfinite(v)
    return v[ok], int((~ok).sum())


def bootstrap_ci(values, n_boot: int = 10000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` of the mean of the finite ``values``; NaNs if none."""
    v, _ = _finite(values)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(values, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean, median, SD, 95 % bootstrap CI and counts (``n`` used, ``n_excluded`` non-finite)."""
    v, bad = _finite(values)
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    empty = v.size == 0
    return {
        "mean": float("nan") if empty else float(v.mean()),
        "median": float("nan") if empty else float(np.median(v)),
        "sd": float("nan") if v.size < 2 else float(v.std(ddof=1)),
        "ci95": [lo, hi],
        "n": int(v.size),
        "n_excluded": bad,
    }


def wilcoxon_greater(a, b) -> float:
    """One-sided paired Wilcoxon signed-rank p-value for ``a > b`` over pairs where both are finite."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    if d.size == 0 or np.all(d == 0):
        return 1.0
    return float(wilcoxon(a[ok], b[ok], alternative="greater").pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out
