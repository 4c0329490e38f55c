"""What the panel says: method and criterion names, column titles and help, the sentences of a run.

The saliency methods' keys and names are the bundle's own table (``saliency_trust/methods.py``,
loaded by file path: :func:`~SaliencyTrustLib.bundle.methods_module`), read when first asked for as
``METHODS`` and ``METHOD_NAMES``; a bundle without it raises
:class:`~SaliencyTrustLib.errors.BundleError` with one sentence saying so.
"""

from __future__ import annotations

from pathlib import Path

from SaliencyTrustLib import bundle

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")

#: The presets the bundle offers (``saliency_trust.saliency.presets``), with what each is for.
PRESETS = {"quick": "quick (fewer steps and samples; a CPU finishes in seconds)",
           "paper": "paper (the study's recipe; use a GPU)"}

#: Criterion titles in words, the direction that is good being "pass" (as ``saliency_trust.results``).
CRITERION_TITLES = {
    "utility": "Points at the lesion",
    "randomization": "Changes when weights are randomized",
    "repeatability": "Agrees with a retrained copy",
    "reproducibility": "Agrees with a second model",
}

CRITERION_HELP = {
    "utility": "Good: pass. Over the assessment's images, the map highlights the lesion better than a fixed map of "
               "where lesions usually are (AUPRC against the average-mask prior).",
    "randomization": "Good: pass. When the network's weights are replaced by random ones the map changes as much "
                     "as maps of different images differ: it depends on what the network learned.",
    "repeatability": "Good: pass. A second copy of the network, trained the same way from another seed, gives "
                     "maps that agree with these beyond chance (SSIM).",
    "reproducibility": "Good: pass. A network of another architecture trained on the same data gives maps that "
                       "agree with these beyond chance (SSIM).",
}

TABLE_COLUMNS = ("method", "trust", *CRITERIA, "repeatability_here_ssim", "randomization_here_ssim", "auprc_here",
                 "details")

COLUMN_TITLES = {
    "method": "Method", "trust": "Trust on the assessment data", **CRITERION_TITLES,
    "repeatability_here_ssim": "This image: agrees with the other copy (SSIM, higher is better)",
    "randomization_here_ssim": "This image: like a random network's map (SSIM, lower is better)",
    "auprc_here": "This image: points at your region (AUPRC, higher is better)",
    "details": "Numbers behind the verdicts",
}

COLUMN_HELP = {
    "method": "The saliency method that made the map.",
    "trust": "Fails: the method failed at least one criterion on the assessment data. Passes all four: every "
             "criterion was judged and passed. Not fully judged: some criterion could not be judged (n/a); n/a "
             "never counts as a pass.",
    **CRITERION_HELP,
    "repeatability_here_ssim": "SSIM between this map and the map of the other trained copy on this image "
                               "(1 = identical).",
    "randomization_here_ssim": "SSIM between this map and the map of the fully randomized network on this image; "
                               "a trustworthy map should not look like it.",
    "auprc_here": "How well the map ranks the pixels (a CT's voxels) of the segmentation or ROI you chose "
                  "(1 = perfectly; the region's share of the image is chance).",
    "details": "Each criterion's value, its reference and the number of images it came from.",
}

RESEARCH_ONLY = "Research use only - not for diagnosis."

SYNTHETIC_TRAINING_NOTE = ("This model was trained on synthetic SynthCXR images, not on patients' radiographs: "
                           "its prediction and maps say nothing clinical about this image.")
SYNTHETIC_CT_TRAINING_NOTE = ("This model was trained on synthetic SynthCT volumes, not on patients' CT scans: its "
                              "prediction and maps say nothing clinical about this volume.")


def training_note(record: dict, dimension: int = 2) -> str:
    """A warning when a model's training record says it learnt from synthetic images: its own ``synthetic``
    flag (written at training, so it survives moving the model or deleting the data), else the SynthCXR or
    SynthCT marker still lying in the training data folder (records written before the flag). ``dimension`` 3:
    a CT model (the SynthCT sentence)."""
    data = Path(record["dataset_dir"]) if record.get("dataset_dir") else None
    ct = dimension == 3 or (data is not None and (data / "synthct.json").is_file())
    note = SYNTHETIC_CT_TRAINING_NOTE if ct else SYNTHETIC_TRAINING_NOTE
    if record.get("synthetic") is not None:
        return note if record["synthetic"] else ""
    if data is not None and ((data / "synthcxr.json").is_file() or (data / "synthct.json").is_file()):
        return note
    return ""


def dimension_mismatch(input_name: str, dims, model_name: str, model_dimension: int) -> str:
    """Why a model cannot explain this input, in one sentence: a 2-D model and a CT volume, or a 3-D model and a
    radiograph. ``dims`` are the input's (I, J, K) dimensions."""
    size = " x ".join(str(int(d)) for d in dims)
    if model_dimension == 2:
        return (f"'{input_name}' is a CT volume ({size} voxels) and the model '{model_name}' is a 2-D model that "
                "explains one radiograph: choose a 3-D model, or a radiograph.")
    return (f"'{input_name}' is a 2-D image (one slice, {size}) and the model '{model_name}' is a 3-D model that "
            "explains a CT volume: choose a 2-D model, or a CT volume.")


def trust_word(verdict: dict | None) -> tuple[str, list[str]]:
    """The trust column's text and the criteria failed; n/a never counts as a pass."""
    if not verdict:
        return "Unknown (no assessment)", []
    fails = [c for c in CRITERIA if verdict.get(c) is False]
    if fails:
        return "Fails: " + ", ".join(CRITERION_TITLES[c].lower() for c in fails), fails
    if all(verdict.get(c) is True for c in CRITERIA):
        return "Passes all four", []
    missing = [CRITERION_TITLES[c].lower() for c in CRITERIA if verdict.get(c) is not True]
    return "Not fully judged (n/a: " + ", ".join(missing) + ")", []


#: The comparison that decided a FAIL (a verdict's ``decided_by``), in words.
LEGS = {"prior": "the average-mask prior", "localization": "the localization network", "chance": "chance"}


def details_text(details: dict | None) -> str:
    """The numbers behind one method's verdicts, short."""
    if not details:
        return ""
    parts = []
    for c in CRITERIA:
        d = details.get(c) or {}
        if d.get("rule") == "not run":
            parts.append(f"{c}: not run")
            continue
        value, ref, n = d.get("value"), d.get("reference"), d.get("n", 0)
        text = f"{c}: {number(value) or 'n/a'}"
        if ref is not None:
            text += f" vs {number(ref)}"
        text += f" (n = {n} images"
        if d.get("n_undefined"):
            text += f", {d['n_undefined']} undefined"
        if d.get("passed") is False and d.get("decided_by"):
            text += f"; failed vs {LEGS.get(d['decided_by'], d['decided_by'])}"
        if d.get("evidence"):
            text += f"; evidence {d['evidence']}"
        parts.append(text + ")")
    return "; ".join(parts)


def number(v) -> str:
    """A value with three decimals ('' for none)."""
    return "" if v is None else f"{v:.3f}"


def assessment_line(prediction: dict) -> str:
    """One sentence on the assessment behind the verdicts (or why there are none)."""
    v = prediction.get("verdicts")
    if not v:
        return ("No trust assessment lies beside this model (results.json): the verdicts are unknown; run the "
                "bundle's trust.json on validation data to get them.")
    if v.get("error"):
        return f"The trust assessment beside this model could not be read: {v['error']}"
    data = Path(str(v.get("dataset") or "unknown data")).name
    if (prediction.get("input") or {}).get("kind") == "volume":
        kind = "synthetic SynthCT volumes, not patients" if v.get("synthetic") else "CT volumes"
        items = "volumes"
    else:
        kind = "synthetic SynthCXR images, not patients" if v.get("synthetic") else "radiographs"
        items = "images"
    return (f"Verdicts from an assessment of {v.get('n_images', '?')} lesion-positive {items} of '{data}' "
            f"({kind}) with the {v.get('preset', '?')} preset.")


def method_names(bundle_dir: str | Path | None = None) -> dict[str, str]:
    """The bundle's saliency methods in its order, key -> the name a reader knows the method by."""
    table = bundle.methods_module(bundle_dir)
    return {key: table.LABELS[key] for key in table.METHODS}


def __getattr__(name: str):
    """``METHODS`` (keys) and ``METHOD_NAMES`` (key -> name), read from the module's own bundle when first used."""
    if name == "METHOD_NAMES":
        return method_names()
    if name == "METHODS":
        return tuple(method_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prediction_line(prediction: dict) -> str:
    """The prediction in one line for the panel, with the task's finding named."""
    p = prediction["probabilities"]
    c = prediction["predicted_class"]
    finding = prediction.get("task") or "finding"
    said = "present" if c == 1 else "absent"
    explained = prediction.get("explained_class", c)
    maps = "" if explained == c else f"; the maps explain class {explained}"
    # What the reader decided about the input (a grey RGB picture read as luminance, an override): said too.
    notes = (prediction.get("input") or {}).get("notes") or []
    said_input = "".join(f" Input: {note}." for note in notes)
    return (f"{finding[:1].upper() + finding[1:]}: predicted {said} (p = {p[c]:.3f}){maps}. "
            f"{prediction['model']['arch']} replicate {prediction['model']['replicate']}, "
            f"{prediction['preset']} preset.{said_input}")


def trust_banner(failing: dict, shown: int) -> str:
    """A warning naming every method that fails a dataset-level criterion ('' when none does); ``failing`` is
    method -> [criteria it fails], ``shown`` the number of maps shown."""
    if not failing:
        return ""
    names = method_names()
    if len(failing) == 1:
        (m, cs), = failing.items()
        what = ", ".join(CRITERION_TITLES[c].lower() for c in cs)
        return (f"Do not trust the {names.get(m, m)} map: it fails on the assessment data ({what}: "
                "no); see the table.")
    chosen = [names.get(m, m) for m in failing]
    every = " (every method shown)" if len(chosen) == shown else ""
    return (f"Do not trust these maps{every}: {', '.join(chosen)} fail at least one trust criterion on the "
            "assessment data; see the table.")
