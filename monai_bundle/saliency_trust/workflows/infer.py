"""One image through the bundle (``configs/inference.json``): prediction, maps on the input grid, live checks.

Input for a 2-D model: a DICOM file or a folder holding one DICOM image, NIfTI, NRRD/NHDR, MHA, or
PNG/JPEG/TIFF. Input for a 3-D model (``model.json`` ``input.size`` ``[D, H, W]``): a CT volume, as
NIfTI, NRRD or MHA, a DICOM series folder or a zipped DICOM series
(:func:`~saliency_trust.data.volumes.read_volume`: HU and geometry). A volume is resampled to the
model's size in HU keeping its extent, then windowed by the model's ``input.window_hu`` (the order
training used: :func:`~saliency_trust.data.volumes.load_volume_dataset`); its maps are resampled back
to the input's grid and written with its size, spacing, origin and direction. A 2-D model given a
volume, or a 3-D model given a 2-D image, is refused in one sentence naming the file, decided from
the folder listing or the file's header before anything is decoded.
Outputs under ``output_dir`` (each written atomically):

* ``prediction.json``: class probabilities, the explained class, the model (file hash), the
  live checks for this image and, when a trust ``results.json`` sits beside the weights, the
  model's dataset-level verdicts;
* ``maps/<method>.<nrrd|nii.gz>``: one float map per method in [0, 1] on exactly the input's
  grid (size, spacing, origin, direction copied from the input image).

Live checks, scored by the study's own functions (a blank map is "blank", never a number):
*repeatability here* (SSIM between this replicate's map and another replicate's, same
architecture, at the network's resolution), *randomization here* (SSIM between the trained map
and the map of the model randomized down to its verdict block, cascading, explaining its own
prediction as the paper's pipeline did, or the trained class when the assessment beside the model
did so, from the random weights the assessment drew for this replicate), and, when ``mask`` is
given, *AUPRC* of each map against it on the input grid. The SSIM data range, the explained class
(``explain_class``) and the randomization target are the assessment's (``results.json`` beside
the model), else the preset's, and are written into ``prediction.json``.

Intensities: DICOM through the stored range (as training reads it), PNG through its bit depth,
volumes (NIfTI/NRRD/MHA) of an unsigned integer type through the smallest of 8/10/12/14/16 bits
that holds their maximum (what a 12-bit radiograph exported by a viewer becomes), other volumes
by their min-max; ``intensity_range`` overrides all of these.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_trust.data.errors import DataError
from saliency_trust.data.groundtruth import resize_image
from saliency_trust.data.imageio import (
    MAP_FORMATS,
    VOLUME_SUFFIXES,
    atomic_write_bytes,
    is_dicom,
    read_input,
    read_mask,
    suffix,
    write_map,
)
from saliency_trust.data.readers import finding_name
from saliency_trust.explainer import Explainer
from saliency_trust.networks import ModelFolder, randomization_states
from saliency_trust.results import load_results
from saliency_trust.saliency import predict
from saliency_trust.settings import InferenceRequest, default_data_range, default_target

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
#: Grad-CAM upsampling for maps shown on a patient's image (the study preset keeps the paper's legacy mode).
DISPLAY_CAM_RESIZE = "half_pixel"
#: Loaded networks and their file hashes by (weights file, size, mtime, device): one instance per
#: worker process; a replaced weights file (new size or mtime) is loaded and hashed again.
_NETWORKS: dict[tuple, tuple[torch.nn.Module, str]] = {}


def _network(folder: ModelFolder, replicate: int, dev: torch.device, cache: bool) -> tuple[torch.nn.Module, str]:
    """The network and the SHA-256 of its weights file (read once per file version when cached)."""
    if not cache:
        return folder.load(replicate, dev), folder.sha256(replicate)
    path = folder.weights(replicate)
    st = path.stat()
    key = (str(path.resolve()), folder.network_label, st.st_size, st.st_mtime_ns, str(dev))
    if key not in _NETWORKS:
        _NETWORKS[key] = (folder.load(replicate, dev), folder.sha256(replicate))
    return _NETWORKS[key]


def _task(folder: ModelFolder, replicate: int) -> str | None:
    """The finding the model predicts: its manifest's, else its training record's (older: its dataset's layout)."""
    if folder.manifest.get("task") or not folder.implied:
        return folder.task
    record = folder.record(replicate)
    if record.get("task"):
        return str(record["task"])
    try:
        return finding_name(record["dataset_dir"]) if record.get("dataset_dir") else None
    except DataError:
        return None


def input_kind(path: str | Path) -> tuple[str, str]:
    """``("volume", what)`` for a CT volume (a DICOM series folder, a zip, a NIfTI / NRRD / MHA file of several
    slices), else ``("image", what)``; ``what`` says it in words. Decided from the folder listing or the file's
    header only: nothing is decoded (the readers then read it, and refuse what is broken, by name)."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                 and (suffix(p) == ".dcm" or is_dicom(p))]
        return ("volume", f"a DICOM series folder of {len(files)} files") if len(files) > 1 else \
            ("image", "a folder of one DICOM image")
    if suffix(path) == ".zip":
        return "volume", "a zip (a DICOM series)"
    if suffix(path) in VOLUME_SUFFIXES and path.is_file():
        import SimpleITK as sitk

        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = list(reader.GetSize())
        except RuntimeError:
            return "image", "an image file"  # unreadable: the image reader says why
        if len(size) >= 3 and size[2] > 1 and all(s == 1 for s in size[3:]):
            return "volume", "a volume of " + " x ".join(str(s) for s in size[:3]) + " voxels"
        return "image", "a 2-D image"
    return "image", "a 2-D image"


def _check_input_kind(path: Path, folder: ModelFolder) -> str:
    """The input's kind (``image`` or ``volume``), or a DataError naming the file when the model is of the other
    kind: a 2-D model given a volume, a 3-D model given a 2-D image."""
    kind, what = input_kind(path)
    if kind == "volume" and not folder.is_volume:
        raise DataError(str(path), f"{what}, but the model {folder.name} is a 2-D model that explains one "
                                   "radiograph; give it a radiograph, or use a 3-D model (model.json input.size "
                                   "[D, H, W])")
    if kind == "image" and folder.is_volume:
        raise DataError(str(path), f"{what}, but the model {folder.name} is a 3-D model that explains a CT volume; "
                                   "give it a NIfTI, NRRD or MHA volume, a DICOM series folder or a zipped series")
    return kind


def _image_size(folder: ModelFolder, image_size: int | None) -> int:
    trained = folder.image_size
    if image_size and trained and int(image_size) != trained:
        raise ValueError(f"image_size {image_size} differs from the {trained} px {folder.name} was trained at")
    return int(image_size or trained or 320)  # 320: the paper's input size


def _assessment_beside(folder: ModelFolder, methods: list[str], weights_sha: str) -> tuple[Any, dict | None]:
    """The ``results.json`` beside the model (None when absent) and the verdict copy prediction.json carries."""
    results_file = folder.assessment_file
    if not results_file.is_file():
        return None, None
    try:
        assessed = load_results(results_file)
    except ValueError as exc:  # an outdated or broken file: say so beside the maps, do not fail the image
        return None, {"file": results_file.name, "error": str(exc), "methods": {}}
    shas = {c.get("sha256") for c in assessed.provenance.get("config", {}).get("classifiers", [])}
    # The verdicts are about the weights the assessment explained; say whether these are among them.
    return assessed, {"file": results_file.name, "these_weights_assessed": weights_sha in shas,
                      **assessed.verdict_copy(methods)}


def _scored(values: dict[str, torch.Tensor]) -> tuple[dict[str, float | None], list[str]]:
    """Per-method scores of one image (NaN = a blank map: no value) and the methods whose map was blank."""
    out, blank_maps = {}, []
    for m, v in values.items():
        x = float(v.reshape(-1)[0])
        out[m] = x if np.isfinite(x) else None
        if not np.isfinite(x):
            blank_maps.append(m)
    return out, blank_maps


@dataclass(frozen=True, kw_only=True)
class _Explained:
    """One image explained by one model: what every live check needs."""

    request: InferenceRequest
    folder: ModelFolder
    net: torch.nn.Module
    replicate: int
    x: torch.Tensor  # the network's input [1, C, S, S]
    maps: dict  # method -> [1, S, S]
    target: torch.Tensor  # the explained class [1]
    methods: list[str]
    settings: dict  # explain settings (Grad-CAM layer, IG baseline, resize)
    device: torch.device
    explain_class: str  # "predicted" or "finding": the assessment's rule
    weights_sha: str  # seeds the randomization as the assessment seeded this replicate


def _live_checks(e: _Explained, auprc: dict, gt: np.ndarray | None, assessed: Any, *, full: bool) -> dict:
    """This image's checks, scored as the study scores them.

    The same functions as the assessment: SSIM through :func:`~saliency_trust.criteria.defined_ssim` and
    AUPRC through :func:`~saliency_trust.criteria.utility_scores`, so a blank map is "blank", never
    "agrees 1.000" or an AUPRC of about 0.5; the SSIM data range of the ``results.json`` beside the model
    (else the preset's: 2.0 for ``paper``, 1.0 otherwise); randomization at the model's verdict block,
    each randomized state explaining its own prediction when the assessment did (``own``, the paper's
    pipeline) or the trained class (``trained``). ``full`` False: the AUPRC against ``gt`` only. ``auprc`` holds
    each map's :func:`_auprc` against ``gt`` on the input grid (scored as each map was written, so a CT's maps
    need not all be held on its grid at once).
    """
    cfg = assessed.provenance.get("config", {}) if assessed is not None else {}
    if cfg.get("data_range") is not None:
        data_range, source = float(cfg["data_range"]), "the results.json beside the model"
    else:
        data_range, source = default_data_range(e.request.preset), f"the {e.request.preset} preset's default"
    rule = cfg.get("randomization_target") or default_target(e.request.preset)
    live: dict = {"data_range": data_range, "data_range_source": source, "blank": {}}
    if full:
        live["repeatability"] = _repeatability_here(e, data_range, live["blank"])
        study_seed = int(cfg.get("seed", e.request.seed))
        live["randomization"] = _randomization_here(e, data_range, rule, live["blank"], study_seed)
    if gt is not None and not gt.any():
        live["auprc"] = {m: None for m in e.methods}
        live["auprc_why"] = "the mask is empty: nothing to point at"
        live["mask_pixels"] = 0
    elif gt is not None:
        live["auprc"], live["blank"]["auprc"] = _scored({m: auprc[m] for m in e.methods})
        live["mask_pixels"] = int(gt.sum())
    return live


def _auprc(grid_map: np.ndarray, gt: np.ndarray) -> torch.Tensor:
    """AUPRC of one map on the input grid against the mask, per pixel or voxel (the study's utility_scores)."""
    from saliency_trust.criteria import utility_scores

    return utility_scores(torch.from_numpy(grid_map)[None].double(), torch.from_numpy(gt)[None])["auprc"]


def _repeatability_here(e: _Explained, data_range: float, blank: dict) -> dict:
    """SSIM between this replicate's maps and another replicate's on this image."""
    from saliency_trust.criteria import defined_ssim

    others = [k for k in e.folder.replicates if k != e.replicate]
    if not others:
        return {"against": None, "ssim": None, "why": "the model folder has no other replicate"}
    other, _ = _network(e.folder, others[0], e.device, e.request.cache_networks)
    # As in the study, each replicate explains its own prediction (or the finding class when it did).
    t = e.target if e.explain_class == "finding" else predict(other, e.x).argmax(1)
    om = Explainer(e.folder, other).explain_input(e.x, e.methods, target=t, preset=e.request.preset,
                                                  seed=e.request.seed, cam_resize=DISPLAY_CAM_RESIZE)
    values, blank["repeatability"] = _scored({m: defined_ssim(e.maps[m], om[m], data_range) for m in e.methods})
    return {"against": e.folder.weights(others[0]).name, "replicate": others[0], "explained_class": int(t[0]),
            "ssim": values}


def _randomization_here(e: _Explained, data_range: float, rule: str, blank: dict, study_seed: int) -> dict:
    """SSIM between the trained maps and the maps of the model randomized down to its verdict block."""
    from saliency_trust.criteria import defined_ssim
    from saliency_trust.networks import UnchangedError, replicate_seed

    if e.folder.format == "torchscript":
        return {"state": None, "ssim": None,
                "why": "a TorchScript model's layers cannot be re-initialized (no reset_parameters)"}
    verdict = e.folder.verdict_block(e.net)
    blocks = e.folder.randomization_blocks(e.net)
    # The random weights the assessment drew for this replicate (its seed and these weights' fingerprint).
    init = replicate_seed(study_seed, e.weights_sha)
    try:
        state = next(s for name, s in randomization_states(e.net, blocks, mode="cascading", seed=init)
                     if name == verdict)
    except UnchangedError as exc:
        return {"state": verdict, "ssim": None, "why": str(exc)}
    # The study: a finding-class assessment explains that class in every state, else the rule decides.
    t = predict(state, e.x).argmax(1) if rule == "own" and e.explain_class != "finding" else e.target
    rm = Explainer(e.folder, state).explain_input(e.x, e.methods, target=t, preset=e.request.preset,
                                                  seed=e.request.seed, cam_resize=DISPLAY_CAM_RESIZE)
    values, blank["randomization"] = _scored({m: defined_ssim(e.maps[m], rm[m], data_range) for m in e.methods})
    return {"state": verdict, "mode": "cascading", "target": "trained" if e.explain_class == "finding" else rule,
            "explained_class": int(t[0]), "init_seed": init, "ssim": values}


def run_inference(request: InferenceRequest | str | Path, *args: Any, **options: Any) -> dict:
    """Explain one image with one trained replicate; returns what ``prediction.json`` holds.

    ``request`` is an :class:`~saliency_trust.settings.InferenceRequest` (what ``configs/inference.json``
    builds; every option is documented there), or the older call form ``run_inference(image,
    output_dir, model_dir, **options)``. Methods the model cannot give (guided backprop without ReLUs)
    are refused when asked for and left out, with the reason in ``prediction.json``, when ``methods``
    is None. A DICOM the model was not made for (CT, a lateral view, a multi-frame image) is refused
    unless ``accept_any_input``; what the reader decided about the input (luminance of a grey RGB
    picture, a header's intensity range) is in ``prediction.json``'s ``input.notes``. A refused input
    leaves ``error.json`` (the file and the problem) in the output folder.
    """
    t0 = time.time()
    r = request if isinstance(request, InferenceRequest) else _request(request, *args, **options)
    r.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(r, t0)
    except (DataError, ValueError, FileNotFoundError) as exc:
        source, problem = (exc.source, exc.problem) if isinstance(exc, DataError) else ("", str(exc))
        atomic_write_bytes(r.output_dir / "error.json", json.dumps({"source": source, "problem": problem,
                                                                    "type": type(exc).__name__}).encode())
        raise


def _request(image: str | Path, output_dir: str | Path, model_dir: str | Path, **options: Any) -> InferenceRequest:
    """An :class:`InferenceRequest` from the older call form; unknown options are refused by name."""
    known = {f.name for f in fields(InferenceRequest)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"unknown inference option(s) {bad}; known: {sorted(known)}")
    return InferenceRequest(image=image, output_dir=output_dir, model_dir=model_dir, **options)


@dataclass
class _Input:
    """One input read and mapped for the network: what the rest of the run needs, for an image or a volume."""

    x: torch.Tensor  # the network's input [1, C, S, S] or [1, C, D, H, W] (on the CPU)
    gt: np.ndarray | None  # the mask on the input's grid
    shape: tuple[int, ...]  # the input's grid ([H, W] or [D, H, W])
    info: dict  # prediction.json's "input"
    size: Any  # the network's input size (an int, or [D, H, W])
    write: Any  # (path, map on the input grid) -> None
    suffix: str  # the map files' suffix


def _image_input(r: InferenceRequest, folder: ModelFolder, notes: list[str]) -> _Input:
    """A 2-D image read as training reads it, resized to the network's size; maps go back on its grid."""
    img, ref = read_input(r.image, r.intensity_range, accept_any=r.accept_any_input, notes=notes)
    gt = read_mask(r.mask, img.shape) if r.mask else None
    size = _image_size(folder, r.image_size)
    x = folder.to_input(torch.from_numpy(resize_image(img, (size, size)))[None])
    info = {"kind": "image", "shape": list(img.shape), "spacing": list(ref.GetSpacing()),
            "origin": list(ref.GetOrigin()), "direction": list(ref.GetDirection()), "notes": notes}
    return _Input(x, gt, tuple(img.shape), info, size, lambda path, values: write_map(path, values, ref),
                  MAP_FORMATS[r.map_format])


#: A volume whose lowest value is above this has no air in it: said in the notes (its values may not be HU).
NO_AIR_HU = -500.0
#: The share by which the spacing the network sees may differ from the spacing it was trained at before a note says so.
SPACING_NOTE_SHARE = 0.2


def _volume_input(r: InferenceRequest, folder: ModelFolder, notes: list[str]) -> _Input:
    """A CT volume in HU (and its geometry), resampled to the model's ``[D, H, W]`` keeping its extent, then
    windowed by the model's ``window_hu``: the order training used. Maps go back on its own grid and geometry."""
    from saliency_trust.data.volumes import read_volume, read_volume_mask, resample_volume, window_hu, write_volume

    if r.image_size is not None:
        raise ValueError(f"image_size is for 2-D models; {folder.name} is a 3-D model of input size "
                         f"{list(folder.input_size)} (model.json)")
    hu, geo = read_volume(r.image)
    gt = read_volume_mask(r.mask, hu.shape, geo) if r.mask else None
    size = tuple(folder.input_size)
    resampled, spacing = resample_volume(hu, size, geo.spacing)
    window = folder.window_hu
    x = folder.to_input(torch.from_numpy(window_hu(resampled, window))[None])
    if float(hu.min()) > NO_AIR_HU:  # a CT has air (about -1000 HU) around the body
        notes.append(f"the volume has no value below {NO_AIR_HU:g} (its lowest is {float(hu.min()):g}): a CT in HU "
                     "has air at about -1000 HU, so these values may not be HU and the model's window may not fit")
    trained = folder.spacing_mm
    if trained is not None and any(abs(a - b) > SPACING_NOTE_SHARE * b for a, b in zip(spacing, trained, strict=True)):
        notes.append("the network saw voxels of " + " x ".join(f"{v:.3g}" for v in spacing) + " mm (z, y, x); it was "
                     "trained at " + " x ".join(f"{v:.3g}" for v in trained) + " mm")
    info = {"kind": "volume", "shape": list(hu.shape), "spacing": list(geo.spacing), "origin": list(geo.origin),
            "direction": list(geo.direction), "axes": "[D, H, W] = (z, y, x); spacing (z, y, x) mm, origin and "
            "direction LPS as ITK",
            "window_hu": list(window), "hu_range": [float(hu.min()), float(hu.max())],
            "resampled": {"from": list(hu.shape), "to": list(size), "spacing": list(spacing),
                          "rule": "extent kept; linear between voxel centres, antialiased when shrinking; HU "
                                  "resampled, then windowed; maps resampled back to the input grid the same way"},
            "model_spacing_mm": list(trained) if trained is not None else None, "notes": notes}
    return _Input(x, gt, tuple(hu.shape), info, list(size),
                  lambda path, values: write_volume(path, values.astype(np.float32), geo), MAP_FORMATS[r.map_format])


def _on_grid(m: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """One map ``[1, ...]`` from the network's grid onto the input's, clipped to [0, 1]."""
    values = m[0].float().cpu().numpy()
    if len(shape) == 3:
        from saliency_trust.data.volumes import resample_volume

        return np.clip(resample_volume(values, shape)[0], 0.0, 1.0)
    return np.clip(resize_image(values, shape), 0.0, 1.0)


def _run(r: InferenceRequest, t0: float) -> dict:
    out = r.output_dir
    folder = ModelFolder.open(r.model_dir, r.arch)
    if folder.kind != "classifier":
        raise ValueError(f"{r.model_dir}: a {folder.kind}, not a classifier to explain")
    _check_input_kind(r.image, folder)  # a volume for a 2-D model, or an image for a 3-D one: one sentence
    replicate = next(iter(folder.replicates)) if r.replicate is None else r.replicate
    weights = folder.weights(replicate)
    notes: list[str] = []
    given = (_volume_input if folder.is_volume else _image_input)(r, folder, notes)
    gt = given.gt
    dev = torch.device(r.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = given.x.to(dev)
    net, weights_sha = _network(folder, replicate, dev, r.cache_networks)
    bound = Explainer(folder, net, replicate)  # the folder's explain settings, checked against the network
    unavailable = bound.unavailable
    methods = bound.methods(r.methods)  # a method the network cannot give is refused with the reason
    with torch.no_grad():
        probs = torch.softmax(predict(net, x).float(), 1)[0].cpu()
    assessed, verdicts = _assessment_beside(folder, methods, weights_sha)
    # The class the assessment explained (its explain_class; the paper's: the predicted one).
    explain_class = (assessed.provenance.get("config", {}).get("explain_class") if assessed is not None
                     else None) or "predicted"
    target = torch.tensor([folder.finding_class if explain_class == "finding" else int(probs.argmax())], device=dev)
    # Drawn on a patient's image: Grad-CAM with half-pixel centres (the geometrically correct resize).
    settings = {**bound.settings, "cam_resize": DISPLAY_CAM_RESIZE}
    maps = bound.explain_input(x, methods, target=target, preset=r.preset, seed=r.seed, cam_resize=DISPLAY_CAM_RESIZE)

    (out / "maps").mkdir(exist_ok=True)
    files = {}
    auprc = {}
    for m in methods:
        grid_map = _on_grid(maps[m], given.shape)
        files[m] = f"maps/{m}{given.suffix}"
        given.write(out / files[m], grid_map)
        if gt is not None and gt.any():
            auprc[m] = _auprc(grid_map, gt)

    explained = _Explained(request=r, folder=folder, net=net, replicate=replicate, x=x, maps=maps, target=target,
                           methods=methods, settings=settings, device=dev, explain_class=explain_class,
                           weights_sha=weights_sha)
    live = _live_checks(explained, auprc, gt, assessed, full=r.checks) if r.checks or gt is not None else {}
    result = {
        "schema_version": SCHEMA_VERSION,
        "input": given.info,
        "model": {"arch": folder.network_label, "name": folder.name, "replicate": replicate, "file": weights.name,
                  "sha256": weights_sha, "image_size": given.size, "spatial_dims": 3 if folder.is_volume else 2,
                  "classes": folder.classes, "finding_class": folder.finding_class,
                  "implied_manifest": folder.implied},
        "task": _task(folder, replicate),
        "preset": r.preset, "cam_resize": DISPLAY_CAM_RESIZE, "methods": methods, "device": str(dev),
        "probabilities": [float(p) for p in probs], "predicted_class": int(probs.argmax()),
        "explained_class": int(target[0]), "explain_class": explain_class, "maps": files, "checks": live,
        "verdicts": verdicts,
        "methods_left_out": {m: why for m, why in unavailable.items() if m not in methods},
        "method_notes": {m: why for m, why in folder.method_notes(net).items() if m in methods},
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_bytes(out / "prediction.json", json.dumps(result, indent=2).encode())
    stale = out / "error.json"
    if stale.exists():
        stale.unlink()
    return result
