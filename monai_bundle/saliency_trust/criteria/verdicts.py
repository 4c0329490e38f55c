"""Pass/fail per method and criterion, each with the rule and the numbers behind it.

Rules (configurable where a number is involved):

* utility: AUPRC significantly above the average-mask prior -- paired one-sided Wilcoxon on the
  per-image AUPRCs, Holm-corrected across methods, ``alpha`` 0.05;
* randomization: mean SSIM of the fully randomized state below the method's random-pair baseline;
* repeatability / reproducibility: mean SSIM >= ``threshold`` (0.5), shown next to the
  localization-network baseline.

A criterion that cannot be judged (no finite value) gets ``passed: None`` and says why.
"""

from __future__ import annotations

import numpy as np

from saliency_trust.criteria.statistics import holm, summarize, wilcoxon_greater


def utility_verdicts(auprc: dict[str, np.ndarray], prior: np.ndarray, alpha: float = 0.05) -> dict:
    """Verdict per method: is its per-image AUPRC above the prior's, after Holm correction?"""
    methods = list(auprc)
    raw = [wilcoxon_greater(auprc[m], prior) for m in methods]
    adjusted = holm(raw)
    prior_summary = summarize(prior)
    out = {}
    for m, p, q in zip(methods, raw, adjusted, strict=True):
        s = summarize(auprc[m])
        judged = s["n"] > 0
        out[m] = {
            "passed": bool(q < alpha) if judged else None,
            "rule": f"AUPRC > average-mask prior, one-sided paired Wilcoxon, Holm-adjusted p < {alpha}",
            "value": s["mean"], "ci95": s["ci95"], "reference": prior_summary["mean"],
            "p": p, "p_holm": float(q), "n": s["n"], "n_excluded": s["n_excluded"],
            **({} if judged else {"why": "no image could be scored"}),
        }
    return out


def randomization_verdict(final_state_ssim: np.ndarray, baseline_ssim: np.ndarray) -> dict:
    """Pass when the fully randomized maps are less like the trained ones than unrelated maps are."""
    s, b = summarize(final_state_ssim), summarize(baseline_ssim)
    judged = s["n"] > 0 and b["n"] > 0
    return {
        "passed": bool(s["mean"] < b["mean"]) if judged else None,
        "rule": "mean SSIM(fully randomized map, trained map) < mean SSIM between maps of different images",
        "value": s["mean"], "ci95": s["ci95"], "reference": b["mean"], "n": s["n"],
        "n_excluded": s["n_excluded"], **({} if judged else {"why": "no finite SSIM"}),
    }


def agreement_verdict(ssim_values: np.ndarray, baseline: np.ndarray | None, threshold: float = 0.5,
                      criterion: str = "repeatability") -> dict:
    """Pass when the mean map SSIM reaches ``threshold``; the localization baseline is reported beside it."""
    s = summarize(ssim_values)
    ref = summarize(baseline)["mean"] if baseline is not None else None
    return {
        "passed": bool(s["mean"] >= threshold) if s["n"] else None,
        "rule": f"mean SSIM between {'replicates' if criterion == 'repeatability' else 'architectures'} "
                f">= {threshold}",
        "value": s["mean"], "ci95": s["ci95"], "threshold": threshold, "reference": ref, "n": s["n"],
        "n_excluded": s["n_excluded"], **({} if s["n"] else {"why": "no finite SSIM"}),
    }
