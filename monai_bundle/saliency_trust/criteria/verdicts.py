"""Pass/fail per method and criterion: the rule in words, the numbers, n and p behind each verdict.

The rules follow the paper's comparisons (``shared/reference/paper_protocol.md``) and add the
statistics the paper left unstated:

* **utility**: the map's per-image AUPRC against the average-mask prior (low baseline) and
  against the localization network (high baseline, the paper's "all methods fail"), each a
  paired one-sided Wilcoxon signed-rank test. Passes when it beats the prior and the
  localization network is not significantly better.
* **randomization**: the paper's rule decides: the mean over replicates of the mean SSIM(map at
  the verdict state, trained map) must fall below the random-pair baseline (mean SSIM between
  trained maps of different images). Beside it an *evidence* status from a bootstrap over images
  (replicates averaged per image first, n = images) of SSIM minus each image's chance level:
  ``fail`` when the CI's lower bound is above chance, ``pass`` when its upper bound is within
  :data:`EQUIVALENCE_MARGIN` of chance, ``inconclusive`` otherwise.
* **repeatability / reproducibility**: per-image SSIM between the two models' maps against
  chance (the first model's map of image i vs the second model's map of another image) and
  against the localization networks' replicate SSIM (the paper's comparison), each a paired
  one-sided Wilcoxon. Passes when above chance and not significantly below the localization
  networks. The paper's 0.5 line is reported as a reference only.

Multiplicity: only the legs whose rejection lets a method pass ("above the prior", "above
chance") are Holm-corrected across methods; the legs whose rejection makes it fail ("below the
localization network") are tested at the raw level, since correcting them would make passing
easier. A leg with no valid pair is undetermined (``passed: None``), never a pass. Each leg
reports the reference on the same images as the method (paired), the paired mean difference and
its 95 % bootstrap CI.

A blank map's scores are undefined (NaN): they are counted in ``n_undefined`` and never enter a
mean, a CI or a test. A criterion with nothing left to judge gets ``passed: None`` and says why.
"""

from __future__ import annotations

import warnings

import numpy as np

from saliency_trust.criteria.statistics import bootstrap_ci, holm, summarize, wilcoxon_greater
from saliency_trust.results import Verdict

# Randomization evidence: a CI upper bound within EQUIVALENCE_MARGIN SSIM of chance counts as "at chance"
# (the default; an assessment may set its own).
from saliency_trust.settings import EQUIVALENCE_MARGIN

ALPHA = 0.05
TEST = "one-sided paired Wilcoxon signed-rank"
EVIDENCE = ("pass", "fail", "inconclusive")


def _comparisons(values: dict[str, np.ndarray], reference: dict[str, np.ndarray] | np.ndarray, against: str,
                 method_above: bool, alpha: float, correct: bool) -> dict[str, dict]:
    """One family of paired tests (one per method); Holm-corrected together when ``correct``.

    ``method_above``: the alternative is "method > reference" (else "reference > method"). Each
    entry carries the method's and the reference's means on the same (paired) images, the paired
    mean difference (method - reference) with its bootstrap CI, and ``significant``: None when no
    pair has both values defined.
    """
    methods = list(values)
    refs = {m: np.asarray(reference[m] if isinstance(reference, dict) else reference, dtype=np.float64).ravel()
            for m in methods}
    raw = [wilcoxon_greater(values[m], refs[m]) if method_above else wilcoxon_greater(refs[m], values[m])
           for m in methods]
    adjusted = holm(raw) if (raw and correct) else np.asarray(raw, dtype=np.float64)
    out = {}
    for m, p, q in zip(methods, raw, adjusted, strict=True):
        v = np.asarray(values[m], dtype=np.float64).ravel()
        if v.shape != refs[m].shape:
            raise ValueError(f"{m}: {v.size} values and {refs[m].size} reference values do not pair up")
        both = np.isfinite(v) & np.isfinite(refs[m])
        d = v[both] - refs[m][both]
        n_pairs = int(both.sum())
        out[m] = {"against": against, "test": TEST + (", Holm-corrected across methods" if correct else
                                                      ", not corrected (its rejection fails the method)"),
                  "alternative": "method > reference" if method_above else "reference > method",
                  "method_mean": float(v[both].mean()) if n_pairs else None,
                  "reference_mean": float(refs[m][both].mean()) if n_pairs else None,
                  "difference": float(d.mean()) if n_pairs else None,
                  "difference_ci95": list(bootstrap_ci(d)) if n_pairs else None,
                  "n_pairs": n_pairs, "p": float(p) if n_pairs else None,
                  "p_holm": (float(q) if n_pairs else None) if correct else None,
                  "correction": "holm" if correct else "none",
                  "significant": bool(q < alpha) if n_pairs else None}
    return out


def _decide(legs: list[tuple[str, dict | None, bool]]) -> tuple[bool | None, str, str]:
    """(passed, decided_by, why) from legs ``(name, comparison, pass_when_significant)``, in order.

    A leg that fails decides FAIL at once (a determined fail needs no other leg); a leg without
    data makes the verdict undetermined unless another leg fails.
    """
    undetermined = ""
    for name, comp, pass_when_significant in legs:
        if comp is None:
            continue
        sig = comp["significant"]
        if sig is None:
            undetermined = undetermined or name
        elif sig != pass_when_significant:
            return False, name, ""
    if undetermined:
        return None, undetermined, ""
    return True, "", ""


def _base(values: np.ndarray, n_undefined: int, undefined_why: str) -> dict:
    s = summarize(values)
    return {"value": s["mean"], "ci95": s["ci95"], "n": s["n"], "n_undefined": n_undefined,
            "undefined_why": undefined_why if n_undefined else ""}


def utility_verdicts(auprc: dict[str, np.ndarray], prior: np.ndarray, localization: np.ndarray | None = None, *,
                     undefined: dict[str, int] | None = None, alpha: float = ALPHA) -> dict[str, Verdict]:
    """Verdict per method from per-image AUPRCs (NaN = undefined) against the two utility baselines."""
    undefined = undefined or {}
    low = _comparisons(auprc, prior, "average-mask prior", True, alpha, correct=True)
    high = (_comparisons(auprc, localization, "localization network", False, alpha, correct=False)
            if localization is not None else {})
    whys = {"prior": "not above the prior", "localization": "the localization network is better"}
    out = {}
    for m, values in auprc.items():
        v = _base(values, undefined.get(m, int((~np.isfinite(values)).sum())), "blank map or empty mask")
        comps = {"prior": low[m]}
        if m in high:
            comps["localization"] = high[m]
        v.update(
            rule=(f"AUPRC above the average-mask prior ({TEST}, Holm-corrected across methods, p < {alpha})"
                  + (f" and not significantly below the localization network's ({TEST}, uncorrected, p < {alpha})"
                     if m in high else "")),
            plain=("Highlights the lesion better than a fixed map of where lesions usually are"
                   + (", and not clearly worse than a dedicated lesion-finding network" if m in high else "")
                   + "."),
            paper_rule="The paper compared AUPRC with the localization network (U-Net / RetinaNet, significantly "
                       "better for every method) and showed the average-mask prior; it named no test.",
            deviation="" if m in high else "No localization network was given: judged against the prior only.",
            reference=low[m]["reference_mean"], comparisons=comps)
        if v["n"] == 0:
            v.update(passed=None, why="no image could be scored (all maps blank or masks empty)", decided_by="")
        else:
            passed, by, _ = _decide([("prior", low[m], True), ("localization", high.get(m), False)])
            v.update(passed=passed, decided_by=by,
                     why="" if passed else (whys[by] if passed is False else f"no image pair to compare with the {by}"))
        out[m] = Verdict.from_dict(v)
    return out


def randomization_verdict(state_ssim: np.ndarray, chance: np.ndarray, state: str,
                          baseline_pairs: np.ndarray | list, *, n_undefined: int | None = None,
                          margin: float = EQUIVALENCE_MARGIN, n_boot: int = 10000, seed: int = 0,
                          cascade_mean: np.ndarray | None = None) -> Verdict:
    """Verdict from SSIM at ``state`` per replicate and image, ``[R, N]`` (or ``[N]`` for one replicate).

    ``chance``: each image's chance level per replicate, same shape (paired); ``baseline_pairs``: each
    replicate's random-pair SSIMs (``[R, P]`` or a list of arrays), whose mean is the paper's dotted
    line. ``passed`` is the paper's rule (mean over replicates of the mean SSIM below the mean
    baseline); ``evidence`` the bootstrap over images of the replicate-averaged SSIM minus chance (see
    the module docstring). ``cascade_mean``: each replicate's mean SSIM over every state of the
    cascade (the whole-curve summary shown beside the final state).
    """
    s = np.atleast_2d(np.asarray(state_ssim, dtype=np.float64))
    c = np.atleast_2d(np.asarray(chance, dtype=np.float64))
    if s.shape != c.shape:
        raise ValueError(f"state SSIM {s.shape} and chance {c.shape} must pair up per replicate and image")
    pairs = [np.asarray(b, dtype=np.float64).ravel() for b in
             (baseline_pairs if isinstance(baseline_pairs, list) else np.atleast_2d(baseline_pairs))]
    if len(pairs) != s.shape[0]:
        raise ValueError(f"{len(pairs)} baseline sets for {s.shape[0]} replicates")
    with warnings.catch_warnings():  # all-NaN rows are expected (blank maps)
        warnings.simplefilter("ignore", RuntimeWarning)
        per_rep = np.nanmean(s, axis=1)  # each replicate's curve value at this state (the paper's points)
        per_rep_base = np.array([np.nanmean(b) if np.isfinite(b).any() else np.nan for b in pairs])
        per_image = np.nanmean(s, axis=0)  # replicates averaged per image: images are the unit
        # Chance averaged over the same replicates as the SSIM (a replicate blank on an image counts in neither).
        d = per_image - np.nanmean(np.where(np.isfinite(s), c, np.nan), axis=0)
    reps = per_rep[np.isfinite(per_rep)]
    bases = per_rep_base[np.isfinite(per_rep_base)]
    value = float(reps.mean()) if reps.size else None
    reference = float(bases.mean()) if bases.size else None
    diff = summarize(d, n_boot=n_boot, seed=seed)
    img = summarize(per_image, n_boot=n_boot, seed=seed)
    undefined_images = int((~np.isfinite(d)).sum()) if n_undefined is None else int(n_undefined)
    v = {"value": value, "ci95": img["ci95"], "n": diff["n"], "n_undefined": undefined_images,
         "undefined_why": "blank map at this state or in the trained model" if undefined_images else ""}
    lo, hi = diff["ci95"]
    if diff["n"] == 0:
        evidence = None
    elif lo > 0.0:
        evidence = "fail"
    elif hi <= margin:
        evidence = "pass"
    else:
        evidence = "inconclusive"
    cascade = None
    if cascade_mean is not None:
        cm = np.asarray(cascade_mean, dtype=np.float64).ravel()
        cascade = {"against": "the whole cascade", "mean_ssim_over_states": float(np.nanmean(cm))
                   if np.isfinite(cm).any() else None,
                   "per_replicate": [float(x) for x in cm],
                   "meaning": "mean over the randomized states of the mean SSIM to the trained map (area under "
                              "the curve per state); 1 = never changed"}
    v.update(
        state=state,
        rule=(f"mean over {s.shape[0]} replicate(s) of mean SSIM(randomized map, trained map) at state {state} "
              "below the mean SSIM between trained maps of different images (the paper's rule)"),
        plain=(f"After the network's weights are randomized (down to {state}), the map no longer looks like the "
               "trained map: no more alike than maps of two different images."),
        paper_rule="The paper: the curve (mean of 3 replicates, +- SD band) falls below its baseline, the mean SSIM "
                   "between maps of different images.",
        deviation="" if s.shape[0] == 3 else (f"{s.shape[0]} randomized replicate(s); the paper averaged 3."),
        reference=reference,
        evidence=evidence,
        evidence_rule=(f"bootstrap over images (replicates averaged per image, n = images) of SSIM minus the image's "
                       f"chance: fail when the 95 % CI's lower bound is above 0, pass when its upper bound is at most "
                       f"{margin} (equivalence margin, SSIM units), inconclusive otherwise"),
        comparisons={"chance": {"against": "maps of different images", "test": "bootstrap over images of the mean "
                                "difference (replicates averaged per image)", "difference": diff["mean"],
                                "difference_ci95": diff["ci95"], "reference_mean": reference,
                                "n_pairs": diff["n"], "margin": margin},
                     "replicates": {"against": "replicate curves", "n_replicates": int(s.shape[0]),
                                    "means": [float(x) for x in per_rep],
                                    "sd": float(reps.std(ddof=1)) if reps.size > 1 else None,
                                    "baseline_means": [float(x) for x in per_rep_base]}})
    if cascade is not None:
        v["comparisons"]["cascade"] = cascade
    if value is None or reference is None:
        v.update(passed=None, why="no image with a defined SSIM at this state", decided_by="")
    else:
        v["passed"] = bool(value < reference)
        v["decided_by"] = "" if v["passed"] else "chance"
        v["why"] = "" if v["passed"] else "randomized maps stay more alike to the trained maps than chance"
    return Verdict.from_dict(v)


def agreement_verdicts(ssim_values: dict[str, np.ndarray], chance: dict[str, np.ndarray],
                       localization: np.ndarray | None, criterion: str, *, threshold: float = 0.5,
                       undefined: dict[str, int] | None = None, alpha: float = ALPHA) -> dict[str, Verdict]:
    """Repeatability or reproducibility verdict per method (per-image SSIM, chance and localization paired)."""
    if criterion not in ("repeatability", "reproducibility"):
        raise ValueError(f"criterion must be repeatability or reproducibility, got {criterion!r}")
    undefined = undefined or {}
    who = "two trainings of the same network" if criterion == "repeatability" else "two different networks"
    above_chance = _comparisons(ssim_values, chance, "chance (maps of different images)", True, alpha, correct=True)
    below_loc = (_comparisons(ssim_values, localization, "localization-network replicates", False, alpha,
                              correct=False) if localization is not None else {})
    whys = {"chance": "not above chance", "localization": "localization networks agree better"}
    out = {}
    for m, values in ssim_values.items():
        v = _base(values, undefined.get(m, int((~np.isfinite(values)).sum())), "blank map in either model")
        comps = {"chance": above_chance[m]}
        if m in below_loc:
            comps["localization"] = below_loc[m]
        v.update(
            rule=(f"SSIM above chance ({TEST}, Holm-corrected across methods, p < {alpha})"
                  + (f" and not significantly below the localization networks' replicate SSIM ({TEST}, uncorrected, "
                     f"p < {alpha})" if m in below_loc else "")),
            plain=(f"Maps from {who} agree with each other more than chance"
                   + (" and about as well as two lesion-finding networks agree" if m in below_loc else "") + "."),
            paper_rule=("The paper compared with the SSIM between two localization-network replicates "
                        "(U-Net / RetinaNet); its 0.5 line is a reference line."),
            deviation="" if m in below_loc else "No localization-network replicates: judged against chance only.",
            reference=below_loc[m]["reference_mean"] if m in below_loc else above_chance[m]["reference_mean"],
            threshold=threshold, threshold_role="reference line only (the paper's 0.5)",
            comparisons=comps)
        if v["n"] == 0:
            v.update(passed=None, why="no image with a defined SSIM", decided_by="")
        else:
            passed, by, _ = _decide([("chance", above_chance[m], True), ("localization", below_loc.get(m), False)])
            v.update(passed=passed, decided_by=by,
                     why="" if passed else (whys[by] if passed is False else f"no image pair to compare with {by}"))
        out[m] = Verdict.from_dict(v)
    return out


def not_run(why: str) -> Verdict:
    """A verdict for a criterion that was not computed."""
    return Verdict(passed=None, why=why, rule="not run", plain=why)


__all__ = ["ALPHA", "EQUIVALENCE_MARGIN", "EVIDENCE", "agreement_verdicts", "bootstrap_ci", "not_run",
           "randomization_verdict", "utility_verdicts"]
