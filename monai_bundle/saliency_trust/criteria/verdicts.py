"""Pass/fail per method and criterion: the rule in words, the numbers, n and p behind each verdict.

The rules follow the paper's comparisons (``shared/reference/paper_protocol.md``) and add the
statistics the paper left unstated:

* **utility**: the map's per-image AUPRC against the average-mask prior (low baseline) and
  against the localization network (high baseline, the paper's "all methods fail"), each a
  paired one-sided Wilcoxon signed-rank test, Holm-corrected across methods. Passes when it
  beats the prior and the localization network is not significantly better.
* **randomization**: per image, SSIM(map at the verdict state, trained map) minus the image's
  chance level (mean SSIM between its trained map and trained maps of other images, the paper's
  dotted line). Passes when the 95 % bootstrap CI of the mean difference reaches 0 or below:
  the maps have degraded to chance within their uncertainty ("reaches degradation").
* **repeatability / reproducibility**: per-image SSIM between the two models' maps against the
  localization networks' replicate SSIM (the paper's comparison) and against chance (the first
  model's map of image i vs the second model's map of another image), each a paired one-sided
  Wilcoxon, Holm-corrected across methods. Passes when above chance and not significantly
  below the localization networks. The paper's 0.5 line is reported as a reference only.

A blank map's scores are undefined (NaN): they are counted in ``n_undefined`` and never enter a
mean, a CI or a test. A criterion with nothing left to judge gets ``passed: None`` and says why.
"""

from __future__ import annotations

import numpy as np

from saliency_trust.criteria.statistics import bootstrap_ci, holm, summarize, wilcoxon_greater

ALPHA = 0.05
TEST = "one-sided paired Wilcoxon signed-rank, Holm-corrected across methods"


def _comparisons(values: dict[str, np.ndarray], reference: dict[str, np.ndarray] | np.ndarray, against: str,
                 method_above: bool, alpha: float) -> dict[str, dict]:
    """One family of paired tests (one per method), Holm-corrected together.

    ``method_above``: the alternative is "method > reference" (else "reference > method").
    """
    methods = list(values)
    refs = {m: np.asarray(reference[m] if isinstance(reference, dict) else reference, dtype=np.float64)
            for m in methods}
    raw = [wilcoxon_greater(values[m], refs[m]) if method_above else wilcoxon_greater(refs[m], values[m])
           for m in methods]
    adjusted = holm(raw) if raw else []
    out = {}
    for m, p, q in zip(methods, raw, adjusted, strict=True):
        v = np.asarray(values[m], dtype=np.float64)
        both = np.isfinite(v) & np.isfinite(refs[m])
        r = summarize(refs[m])
        out[m] = {"against": against, "test": TEST,
                  "alternative": "method > reference" if method_above else "reference > method",
                  "reference_mean": r["mean"], "reference_ci95": r["ci95"], "n_pairs": int(both.sum()),
                  "p": float(p), "p_holm": float(q), "significant": bool(both.any() and q < alpha)}
    return out


def _base(values: np.ndarray, n_undefined: int, undefined_why: str) -> dict:
    s = summarize(values)
    return {"value": s["mean"], "ci95": s["ci95"], "n": s["n"], "n_undefined": n_undefined,
            "undefined_why": undefined_why if n_undefined else ""}


def utility_verdicts(auprc: dict[str, np.ndarray], prior: np.ndarray, localization: np.ndarray | None = None,
                     undefined: dict[str, int] | None = None, alpha: float = ALPHA) -> dict[str, dict]:
    """Verdict per method from per-image AUPRCs (NaN = undefined) against the two utility baselines."""
    undefined = undefined or {}
    low = _comparisons(auprc, prior, "average-mask prior", True, alpha)
    high = _comparisons(auprc, localization, "localization network", False, alpha) if localization is not None else {}
    out = {}
    for m, values in auprc.items():
        v = _base(values, undefined.get(m, int((~np.isfinite(values)).sum())), "blank map or empty mask")
        comps = {"prior": low[m]}
        if m in high:
            comps["localization"] = high[m]
        v.update(
            rule=(f"AUPRC above the average-mask prior ({TEST}, p < {alpha})"
                  + (" and not significantly below the localization network's" if m in high else "")),
            plain=("Highlights the lesion better than a fixed map of where lesions usually are"
                   + (", and not clearly worse than a dedicated lesion-finding network" if m in high else "")
                   + "."),
            paper_rule="The paper compared AUPRC with the localization network (U-Net / RetinaNet, significantly "
                       "better for every method) and showed the average-mask prior; it named no test.",
            deviation="" if m in high else "No localization network was given: judged against the prior only.",
            reference=low[m]["reference_mean"], comparisons=comps)
        if v["n"] == 0:
            v.update(passed=None, why="no image could be scored (all maps blank or masks empty)")
        else:
            beats_prior = low[m]["significant"]
            below_loc = bool(m in high and high[m]["significant"])
            v["passed"] = bool(beats_prior and not below_loc)
            v["why"] = ("" if v["passed"] else
                        "not above the prior" if not beats_prior else "the localization network is better")
        out[m] = v
    return out


def randomization_verdict(state_ssim: np.ndarray, chance: np.ndarray, state: str, baseline_pairs: np.ndarray,
                          n_undefined: int = 0, n_boot: int = 10000, seed: int = 0) -> dict:
    """Verdict from per-image SSIM at ``state`` and each image's chance level (paired, same order)."""
    s = np.asarray(state_ssim, dtype=np.float64).ravel()
    c = np.asarray(chance, dtype=np.float64).ravel()
    if s.shape != c.shape:
        raise ValueError(f"state SSIM ({s.size}) and chance ({c.size}) must pair up per image")
    d = s - c
    diff = summarize(d, n_boot=n_boot, seed=seed)
    base = summarize(baseline_pairs, n_boot=n_boot, seed=seed)
    v = _base(s, n_undefined, "blank map at this state or in the trained model")
    v.update(
        state=state,
        rule=("95 % bootstrap CI of mean[SSIM(randomized map, trained map) - SSIM(trained maps of different images)] "
              f"reaches 0 or below, at state {state}"),
        plain=(f"After the network's weights are randomized (down to {state}), the map no longer looks like the "
               "trained map: no more alike than maps of two different images."),
        paper_rule="The paper: the curve falls to its baseline (mean SSIM between maps of different images).",
        deviation="The paper compared two means; we require the paired difference's 95 % CI to reach 0.",
        reference=base["mean"], reference_ci95=base["ci95"],
        comparisons={"chance": {"against": "maps of different images", "test": "paired bootstrap CI of the mean "
                                "difference", "difference": diff["mean"], "difference_ci95": diff["ci95"],
                                "reference_mean": base["mean"], "reference_ci95": base["ci95"],
                                "n_pairs": diff["n"]}})
    if diff["n"] == 0:
        v.update(passed=None, why="no image with a defined SSIM at this state")
    else:
        v["passed"] = bool(diff["ci95"][0] <= 0.0)
        v["why"] = "" if v["passed"] else "randomized maps stay more alike to the trained maps than chance"
    return v


def agreement_verdicts(ssim_values: dict[str, np.ndarray], chance: dict[str, np.ndarray],
                       localization: np.ndarray | None, criterion: str, threshold: float = 0.5,
                       undefined: dict[str, int] | None = None, alpha: float = ALPHA) -> dict[str, dict]:
    """Repeatability or reproducibility verdict per method (per-image SSIM, chance and localization paired)."""
    if criterion not in ("repeatability", "reproducibility"):
        raise ValueError(f"criterion must be repeatability or reproducibility, got {criterion!r}")
    undefined = undefined or {}
    who = "two trainings of the same network" if criterion == "repeatability" else "two different networks"
    above_chance = _comparisons(ssim_values, chance, "chance (maps of different images)", True, alpha)
    below_loc = (_comparisons(ssim_values, localization, "localization-network replicates", False, alpha)
                 if localization is not None else {})
    out = {}
    for m, values in ssim_values.items():
        v = _base(values, undefined.get(m, int((~np.isfinite(values)).sum())), "blank map in either model")
        comps = {"chance": above_chance[m]}
        if m in below_loc:
            comps["localization"] = below_loc[m]
        v.update(
            rule=(f"SSIM above chance ({TEST}, p < {alpha})"
                  + (" and not significantly below the localization networks' replicate SSIM" if m in below_loc
                     else "")),
            plain=(f"Maps from {who} agree with each other more than chance"
                   + (" and about as well as two lesion-finding networks agree" if m in below_loc else "") + "."),
            paper_rule=("The paper compared with the SSIM between two localization-network replicates "
                        "(U-Net / RetinaNet); its 0.5 line is a reference line."),
            deviation="" if m in below_loc else "No localization-network replicates: judged against chance only.",
            reference=below_loc[m]["reference_mean"] if m in below_loc else above_chance[m]["reference_mean"],
            threshold=threshold, threshold_role="reference line only (the paper's 0.5)",
            comparisons=comps)
        if v["n"] == 0:
            v.update(passed=None, why="no image with a defined SSIM")
        else:
            ok_chance = above_chance[m]["significant"]
            worse = bool(m in below_loc and below_loc[m]["significant"])
            v["passed"] = bool(ok_chance and not worse)
            v["why"] = ("" if v["passed"] else
                        "not above chance" if not ok_chance else "localization networks agree better")
        out[m] = v
    return out


def not_run(why: str) -> dict:
    """A verdict for a criterion that was not computed."""
    return {"passed": None, "why": why, "rule": "not run", "plain": why, "value": None, "ci95": None, "n": 0,
            "n_undefined": 0, "undefined_why": "", "comparisons": {}, "paper_rule": "", "deviation": "",
            "reference": None}


__all__ = ["ALPHA", "agreement_verdicts", "bootstrap_ci", "not_run", "randomization_verdict", "utility_verdicts"]
