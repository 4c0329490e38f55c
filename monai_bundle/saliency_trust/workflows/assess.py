"""The four-criteria assessment behind ``configs/trust.json``: plan -> maps -> scores -> :class:`Results`.

* :func:`plan_assessment` reads the data at the size the models were trained at, chooses the
  images (``split``), builds the average-mask prior and the resume key;
* :func:`compute_maps` explains every model (trained, untrained, each randomization state) and runs
  the localization networks, each step saved atomically under ``<output_dir>/.steps/`` with the
  resume key (a rerun with the same inputs loads finished steps and computes only what is missing);
* :func:`score` turns the maps into per-image values (blank maps undefined, counted), summaries
  and verdicts: a :class:`~saliency_trust.results.Results`;
* :func:`write_outputs` writes ``results.json`` (strict JSON), ``per_image.csv``, ``figures/*.png``
  and ``report.html``, each through a temporary file and a rename.

Under ``torchrun`` (``configs/multi_gpu_trust.json``) every map computation is sharded: each
process explains fixed blocks of images, the blocks are gathered, and every process then computes
the same metrics on the whole set; only rank 0 writes. Noise is seeded by image content and
model weights, and the maps of a batch equal the maps of its images one by one, so the results
equal a single-process run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_trust import faults
from saliency_trust.criteria import (
    TARGETS,
    agreement_verdicts,
    average_mask_prior,
    blank,
    leave_one_out_priors,
    map_agreement,
    not_run,
    output_agreement,
    per_image_chance,
    random_pair_ssim,
    randomization_curves,
    randomization_verdict,
    summarize,
    utility_scores,
    utility_verdicts,
)
from saliency_trust.data import load_dataset
from saliency_trust.data.imageio import atomic_write_bytes, remove_stale_temporaries
from saliency_trust.data.split import split_of
from saliency_trust.networks import ManifestError, ModelFolder, replicate_seed
from saliency_trust.networks.modelfolder import LEGACY_FILE
from saliency_trust.provenance import code_fingerprint, versions
from saliency_trust.results import CRITERIA, Results, Verdict
from saliency_trust.saliency import METHODS, SegmentCache, explain, get_recipe, predict

log = logging.getLogger(__name__)
#: The class index of the finding (lesion) in the bundle's own two-class classifiers (a model folder says its own).
FINDING_CLASS = 1
EXPLAIN_CLASSES = ("predicted", "finding")


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded(fn: Callable[[slice], dict[str, torch.Tensor]], n: int, block: int = 16) -> dict[str, torch.Tensor]:
    """``fn`` over fixed blocks of ``range(n)``; under ``torchrun`` each process takes a contiguous run
    of blocks and the results are gathered in order on every process.

    The blocks are the same whatever the number of processes, so every map is computed in the same
    batch as in a single-process run and the results are bitwise the same on one kind of device.
    """
    blocks = [slice(i, min(i + block, n)) for i in range(0, n, block)]
    rank, world = _world()
    bounds = [round(i * len(blocks) / world) for i in range(world + 1)]
    parts = [{k: v.cpu() for k, v in fn(b).items()} for b in blocks[bounds[rank] : bounds[rank + 1]]]
    mine = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
    if world == 1:
        return mine
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    done = [g for g in gathered if g is not None]
    return {k: torch.cat([g[k] for g in done]) for k in done[0]}


class Steps:
    """Named, keyed, atomically saved intermediate results (the resume mechanism)."""

    def __init__(self, folder: Path, key: str, write: bool = True) -> None:
        self.folder = folder
        self.key = key
        self.write = write
        folder.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Load step ``name`` if it was finished with the same key, else compute and save it."""
        path = self.folder / f"{name}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == self.key:
                log.info("step %s: resumed from %s", name, path)
                return saved["value"]
        value = fn()
        if self.write:
            buf = io.BytesIO()
            torch.save({"key": self.key, "value": value}, buf)
            atomic_write_bytes(path, buf.getvalue())
        return value


# ---------------------------------------------------------------------------------------------------
# Plan


@dataclass
class Plan:
    """Everything decided before any model runs: data, models, settings, the resume key."""

    out_dir: Path
    ids: list[str]
    images01: np.ndarray  # [N, H, W] in [0, 1], for figures
    images: torch.Tensor  # [N, H, W] in [0, 1], on the device (each model maps it to its own input)
    masks: torch.Tensor  # [N, H, W] bool, on the device
    prior: torch.Tensor  # [H, W] or [N, H, W] (leave-one-out) float64, on the device
    data: dict
    models: list[dict]  # {"arch", "path", "sha256", "replicate", "folder"}: one model state per entry
    folders: list[ModelFolder]  # per entry of models
    randomized: list[int]  # indices into models
    not_run: dict[str, str]  # baseline / criterion -> why it was not run (e.g. a TorchScript model)
    facts: dict  # what deviations() reads: Grad-CAM grids, pretraining, normalizations, ground truth kind
    replicate_pair: tuple[int, int] | None
    second_arch: int | None
    localizers: list[dict]
    localizer_folders: list[ModelFolder]
    finding_class: int
    dropped: dict[str, str]  # methods left out, with the reason
    methods: list[str]
    preset: str
    overrides: dict
    seed: int
    data_range: float
    pairs_per_image: int
    threshold: float
    explain_class: str
    randomization_target: str
    full_cascade: bool
    block: int
    device: torch.device
    config: dict
    key: str
    example: int


def _trained_on(entries: Sequence[tuple[ModelFolder, int]], dataset_dir: Path) -> list[str]:
    """The models (``name #replicate``) whose training record names ``dataset_dir`` as their data."""
    here = dataset_dir.resolve()
    out = []
    for f, k in entries:
        d = f.record(k).get("dataset_dir")
        if d and Path(d).resolve() == here:
            out.append(f"{f.name} #{k}")
    return out


def _select(ds, split: str, dataset_dir: Path, trained_on: Sequence[str] = (),
            include_training_images: bool = False) -> tuple[list, str]:
    """The lesion-positive records to assess and a sentence saying which rule chose them.

    Images a model was trained on are never assessed by default: with no split file, ``auto`` on a
    dataset that a model's training record names means the hash split's test part (the part its
    training held out); ``all`` (or a list of ids reaching into training images) on such a dataset
    needs ``include_training_images``.
    """
    positives = [r for r in ds if r.label == 1]
    has_split_file = any(r.split for r in ds)
    trained = ", ".join(trained_on)
    if split == "auto":
        if has_split_file:
            split, how = "test", "auto: the split file's test set"
        elif trained_on:
            split, how = "test", (f"auto: the hash split's test part, the images training held out ({trained} "
                                  "trained on this folder, which has no split file)")
        else:
            split, how = "all", "auto: every image (no split file, and no model's training record names this dataset)"
    elif split == "test":
        how = "the split file's test set" if has_split_file else "the training's hash split (no split file), test part"
    elif split == "all":
        if trained_on and not include_training_images:
            raise ValueError(f"{dataset_dir}: split 'all' would assess images the models were trained on ({trained} "
                             "trained on this folder); use split 'auto' or 'test', or set include_training_images "
                             "to assess them anyway")
        how = "every image" + (" including the models' training images (include_training_images)" if trained_on
                               else "")
    else:
        path = Path(split)
        if not path.is_file():
            raise ValueError(f"{path}: split must be 'auto', 'test', 'all' or a file of image ids; no such file")
        wanted = [line.strip().split(",")[0] for line in path.read_text().splitlines() if line.strip()]
        if wanted and wanted[0] == "id":
            wanted = wanted[1:]
        known = {r.id for r in positives}
        missing = [w for w in wanted if w not in known]
        if missing:
            raise ValueError(f"{path}: {len(missing)} listed id(s) are not lesion-positive images of {dataset_dir}, "
                             f"e.g. {missing[:3]}")
        keep = set(wanted)
        chosen = sorted((r for r in positives if r.id in keep), key=lambda r: r.id)
        seen = [r.id for r in chosen if split_of(r.id, r.split) != "test"]
        if trained_on and seen and not include_training_images:
            raise ValueError(f"{path}: {len(seen)} listed id(s) are training or validation images of the models "
                             f"({trained} trained on {dataset_dir}), e.g. {seen[:3]}; list test images only, or set "
                             "include_training_images")
        return chosen, f"the ids listed in {path}" + (" (including training images)" if seen and trained_on else "")
    if split == "test":
        positives = [r for r in positives if split_of(r.id, r.split) == "test"]
    return sorted(positives, key=lambda r: r.id), how


def _image_size(folders: Sequence[ModelFolder], image_size: int | None) -> tuple[int | None, str]:
    """The size the classifiers were trained at (manifest or training record), checked against ``image_size``."""
    recorded = {str(f.folder if not f.implied else f.weights()): f.image_size for f in folders}
    sizes = {s for s in recorded.values() if s}
    if len(sizes) > 1:
        raise ValueError(f"the classifiers were trained at different image sizes {recorded}; assess them separately")
    if sizes:
        size = sizes.pop()
        if image_size is not None and int(image_size) != size:
            raise ValueError(f"image_size {image_size} differs from the {size} px the models were trained at "
                             "(their model.json or .metrics.json); leave image_size unset or set it to that size")
        return size, ("the models' training records" if all(f.implied for f in folders)
                      else "the models' manifests (model.json)")
    if image_size is not None:
        return int(image_size), "given (no training record beside the weights)"
    return None, "the images' own grid (no training record and no image_size given)"


def model_entries(models: Sequence[Any], kind: str = "classifier") -> list[tuple[ModelFolder, int]]:
    """``(model folder, replicate)`` per model state to explain, in order.

    An entry is a model folder (a path or a :class:`ModelFolder`: the first entry gives its first
    three replicates -- the first two for repeatability, all three for cascading randomization, the
    paper's 3 -- the others their first; localizers their first two),
    ``{"model": folder, "replicates": [k, ...]}``, or one weights file: a path or the older
    ``{"arch": name, "path": "<arch>_seed<k>.pt"}``.
    """
    out: list[tuple[ModelFolder, int]] = []
    for i, c in enumerate(models):
        wanted = None
        if isinstance(c, dict) and "model" in c:
            folder, wanted = c["model"], c.get("replicates")
        elif isinstance(c, dict):
            folder = ModelFolder.open(c["path"], c.get("arch"))
        elif kind == "localizer" and isinstance(c, str | Path) and Path(c).is_file():
            folder = ModelFolder.open(c, None if LEGACY_FILE.match(Path(c).name) else "unet")  # the bundle's U-Net
        else:
            folder = c
        if not isinstance(folder, ModelFolder):
            folder = ModelFolder.open(folder)
        if folder.kind != kind:
            raise ManifestError(f"{folder.folder}: a {folder.kind} where a {kind} was expected")
        reps = list(folder.replicates)
        if wanted is None:
            wanted = reps[:3] if i == 0 and kind == "classifier" else reps[:2] if kind == "localizer" else reps[:1]
        for k in wanted:
            folder.weights(k)  # an unknown replicate is refused here
            out.append((folder, int(k)))
    return out


def same_model(a: ModelFolder, b: ModelFolder) -> bool:
    """Whether two entries are replicates of one model (same folder and network)."""
    return (a.folder.resolve(), a.arch, a.network_label) == (b.folder.resolve(), b.arch, b.network_label)


def _architecture(net: torch.nn.Module) -> tuple:
    """What makes two networks the same architecture whatever their manifests call them: every tensor's
    name and shape (a registry ``densenet121`` and ``torchvision.models.densenet121`` are one)."""
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def _cam_grid(folder: ModelFolder, net: torch.nn.Module, size: int | tuple[int, int]) -> list[int] | None:
    """The Grad-CAM layer's spatial grid at ``size`` px (one forward pass on a blank image)."""
    layer = folder.explain_settings(net).get("cam_layer") if folder.format != "torchscript" else None
    if not layer:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    seen: list = []
    handle = net.get_submodule(layer).register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape[-2:])))
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, folder.channels, h, w))
    finally:
        handle.remove()
    return list(seen[-1]) if seen else None


def _ground_truth_kind(ds) -> str:
    """``boxes`` (a detection dataset, like RSNA) or ``masks`` (a segmentation dataset, like SIIM)."""
    if ds.layout == "rsna":
        return "boxes"
    if ds.layout == "siim":
        return "masks"
    labels = Path(ds.root) / "labels.csv"
    try:
        header = labels.read_text(encoding="utf-8", errors="replace").splitlines()[0].lower().split(",")
    except (OSError, IndexError):
        return "masks"
    return "boxes" if "x" in [h.strip() for h in header] else "masks"


def _is_imagenet(norm: dict, channels: int) -> bool:
    """Whether explicit mean/std are ImageNet's (as MONAI and torchvision users often write them out)."""
    from saliency_trust.networks.modelfolder import IMAGENET

    mean, std = IMAGENET.get(channels, IMAGENET[3])
    given_mean, given_std = list(norm.get("mean") or []), list(norm.get("std") or [])
    close = [abs(a - b) < 5e-4 for a, b in zip(given_mean + given_std, list(mean) + list(std), strict=False)]
    return len(given_mean) == len(mean) and len(given_std) == len(std) and all(close)


def _normalization(folder: ModelFolder) -> str:
    """The model's input normalization in words: ``[-1, 1]``, ``ImageNet mean/std``, ``mean/std ...``."""
    norm = folder.input.get("normalization", {"range": [-1.0, 1.0]})
    if "range" in norm:
        lo, hi = norm["range"]
        text = f"[{lo:g}, {hi:g}]"
    elif norm.get("preset") == "imagenet" or _is_imagenet(norm, folder.channels):
        text = "ImageNet mean/std"
    else:
        text = f"mean {norm.get('mean')} / std {norm.get('std')}"
    return text + (f" after window {norm['window']}" if "window" in norm else "")


def plan_assessment(
    dataset_dir: str | Path,
    output_dir: str | Path,
    classifiers: Sequence[Any],
    localizers: Sequence[Any] | str | Path = (),
    *,
    methods: Sequence[str] | None = None,
    preset: str = "paper",
    n_images: int = 100,
    image_size: int | None = None,
    split: str = "auto",
    include_training_images: bool = False,
    seed: int = 0,
    data_range: float | None = None,
    pairs_per_image: int = 50,
    agreement_threshold: float = 0.5,
    device: str | None = None,
    randomize: int | None = None,
    recipe_overrides: dict | None = None,
    explain_class: str = "predicted",
    randomization_target: str | None = None,
    full_cascade: bool = False,
    block: int = 16,
) -> Plan:
    """Read and choose the data, describe the models and settings; nothing runs a model yet."""
    if not classifiers:
        raise ValueError("no classifiers to assess")
    if explain_class not in EXPLAIN_CLASSES:
        raise ValueError(f"explain_class must be one of {EXPLAIN_CLASSES}, got {explain_class!r}")
    randomization_target = randomization_target or ("own" if preset == "paper" else "trained")
    if randomization_target not in TARGETS:
        raise ValueError(f"randomization_target must be one of {TARGETS}, got {randomization_target!r}")
    overrides = dict(recipe_overrides or {})
    get_recipe(preset, **overrides)  # unknown settings fail here, before any work
    entries = model_entries(classifiers)
    if isinstance(localizers, str | Path | ModelFolder):
        localizers = [localizers]
    loc_entries = model_entries(list(localizers), "localizer")
    folders: list[ModelFolder] = []
    for f, _ in entries:
        if not any(same_model(f, g) for g in folders):
            folders.append(f)
    size, size_source = _image_size(folders, image_size)
    for f, _ in loc_entries:
        if size and f.image_size and f.image_size != size:
            raise ValueError(f"{f.folder}: the localization network was trained at {f.image_size} px and the "
                             f"classifiers at {size} px; give a localizer trained at {size} px")
    unavailable: dict[str, str] = {}
    notes: dict[str, str] = {}
    probes: dict[str, tuple[ModelFolder, torch.nn.Module]] = {}
    explain: dict[str, dict] = {}  # each model's explain settings, for the provenance
    sources: dict[str, str] = {}  # where each model's randomization verdict block comes from
    architectures: dict[tuple, ModelFolder] = {}
    for f in folders:
        probe = f.build() if f.format != "torchscript" else f.load()
        twin = architectures.setdefault(_architecture(probe), f)
        if twin is not f:
            raise ValueError(f"{f.folder}: the same network ({f.network_label}, {type(probe).__name__} with the same "
                             f"layers) as {twin.folder}; reproducibility needs a different architecture: put these "
                             "weights in the first folder as another replicate, or give a classifier of another "
                             "architecture")
        explain[f.network_label] = {k: (list(v) if isinstance(v, tuple) else v)
                                    for k, v in f.explain_settings(probe).items()}
        if f.format != "torchscript":
            sources[f.network_label] = f.verdict_block_source(probe)
        for m, why in f.unavailable(probe).items():
            unavailable.setdefault(m, why)
        for m, why in f.method_notes(probe).items():
            notes.setdefault(m, why)
        probes[f.network_label] = (f, probe)
    if methods is not None:
        asked = list(methods)
        refused = [m for m in asked if m in unavailable]
        if refused:
            raise ValueError(f"method(s) {refused} cannot be computed for these models: {unavailable[refused[0]]}; "
                             "leave them out of methods")
        methods = asked
    else:
        methods = [m for m in METHODS if m not in unavailable]
    dropped = {m: why for m, why in unavailable.items() if m not in methods}
    notes = {m: why for m, why in notes.items() if m in methods}
    for m, why in dropped.items():
        log.warning("method %s left out: %s", m, why)
    for m, why in notes.items():
        log.warning("method %s: %s", m, why)
    rank, world = _world()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{rank % torch.cuda.device_count()}" if world > 1 else "cuda"
    dev = torch.device(device or "cpu")
    data_range = data_range if data_range is not None else (2.0 if preset == "paper" else 1.0)
    dataset_dir = Path(dataset_dir)
    ds = load_dataset(dataset_dir, image_size=size)
    trained_on = _trained_on(list(entries) + list(loc_entries), dataset_dir)
    chosen, how = _select(ds, split, dataset_dir, trained_on, include_training_images)
    skipped = [{"id": r.id, "why": "lesion-positive but has no ground-truth mask or box"}
               for r in chosen if r.mask is None or not r.mask.any()]
    for s in skipped:
        log.warning("skipped %s: %s", s["id"], s["why"])
    usable = [r for r in chosen if r.mask is not None and r.mask.any()]
    positives = usable[:n_images]
    if len(positives) < 2:
        raise ValueError(f"{dataset_dir}: need at least two lesion-positive images with ground truth to assess, "
                         f"found {len(positives)} ({how}; {len(skipped)} without ground truth)")
    shapes = {r.image.shape for r in positives}
    if len(shapes) > 1:
        raise ValueError(f"{dataset_dir}: images come in several sizes {sorted(shapes)}; give image_size")
    grid = positives[0].image.shape  # the Grad-CAM grid each classifier gives at the size assessed
    grids = {label: _cam_grid(f, probe, grid) for label, (f, probe) in probes.items()}
    assessed = {r.id for r in positives}
    pool = [r.mask for r in ds if r.label == 1 and r.mask is not None and r.mask.any() and r.id not in assessed
            and split_of(r.id, r.split) in ("train", "val") and r.mask.shape == positives[0].mask.shape]
    masks = torch.tensor(np.stack([r.mask for r in positives]))
    if pool:
        prior = average_mask_prior(torch.tensor(np.stack(pool)))
        prior_source = f"mean of {len(pool)} training/validation masks"
    else:
        prior = leave_one_out_priors(masks)
        prior_source = "leave-one-out mean of the other assessed images' masks (no training masks in the dataset)"

    models = [{"arch": f.network_label, "path": str(f.weights(k)), "sha256": f.sha256(k), "replicate": k,
               "folder": str(f.folder)} for f, k in entries]
    locs = [{"path": str(f.weights(k)), "sha256": f.sha256(k), "replicate": k, "folder": str(f.folder),
             "network": f.network_label} for f, k in loc_entries]
    primary = entries[0][0]
    same = [i for i, (f, _) in enumerate(entries) if same_model(f, primary)]
    not_run: dict[str, str] = {}
    if primary.format == "torchscript":
        why = (f"{primary.name} is a TorchScript model: it has no untrained form to build and its layers cannot be "
               "re-initialized (no reset_parameters)")
        not_run = {"untrained": why, "randomization": why}
        randomized: list[int] = []
    else:
        randomized = same[: randomize if randomize is not None else None]
        if randomize == 0:
            not_run["randomization"] = "cascading randomization was not run (randomize=0)"
    others = [i for i, (f, _) in enumerate(entries) if not same_model(f, primary)]
    records = {f"{f.name} #{k}": f.record(k) for f, k in entries}
    facts = {
        "cam_grids": grids, "ground_truth": _ground_truth_kind(ds),
        "pretrained": {name: (r.get("pretrained") if "pretrained" in r else "not recorded")
                       for name, r in records.items()},
        "normalization": {f.network_label: _normalization(f) for f in folders},
        "ig_baseline": {f.network_label: f.black() for f in folders},
        "primary": primary.network_label,
        "second": entries[others[0]][0].network_label if others else None,
        "localizers": sorted({f.network_label for f, _ in loc_entries}),
        "trained_on": trained_on,
        "training_images_included": bool(trained_on and include_training_images
                                         and (split == "all" or "including training images" in how)),
        "randomize": randomize,
        "method_notes": notes, "verdict_block_source": sources,
    }
    data = {"dataset_dir": str(dataset_dir.resolve()), "layout": ds.layout, "split_rule": split, "split": how,
            "trained_on_this_dataset": trained_on, "include_training_images": bool(include_training_images),
            "n_positive_found": len(chosen), "n_images": len(positives), "n_requested": n_images,
            "ids": [r.id for r in positives], "skipped": skipped,
            "load_errors": [{"source": e.source, "problem": e.problem} for e in ds.errors],
            "image_size": size, "image_size_source": size_source, "grid": list(positives[0].image.shape),
            "ground_truth": facts["ground_truth"],
            "synthetic": (dataset_dir / "synthcxr.json").is_file(), "prior": prior_source,
            "methods_left_out": dropped, "method_notes": notes}
    config = {"dataset_dir": data["dataset_dir"], "image_size": size, "split": split,
              "include_training_images": bool(include_training_images), "n_images": len(positives),
              "ids": data["ids"], "methods": methods, "preset": preset, "seed": seed, "data_range": data_range,
              "pairs_per_image": pairs_per_image, "agreement_threshold": agreement_threshold,
              "recipe_overrides": overrides, "randomized_replicates": len(randomized), "block": block,
              "explain_class": explain_class, "randomization_target": randomization_target,
              "full_cascade": bool(full_cascade),
              "classifiers": [{k: str(v) for k, v in m.items()} for m in models], "localizers": locs,
              "models": {str(f.folder): f.describe() for f in folders}, "explain_settings": explain,
              "code": code_fingerprint()}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return Plan(
        out_dir=Path(output_dir), ids=data["ids"], images01=np.stack([r.image for r in positives]),
        images=torch.tensor(np.stack([r.image for r in positives])).to(dev),
        masks=masks.to(dev), prior=prior.to(dev), data=data, models=models, folders=[f for f, _ in entries],
        randomized=randomized, not_run=not_run, facts=facts,
        replicate_pair=(same[0], same[1]) if len(same) >= 2 else None,
        second_arch=others[0] if others else None, localizers=locs, localizer_folders=[f for f, _ in loc_entries],
        finding_class=primary.finding_class, dropped=dropped,
        methods=methods, preset=preset, overrides=overrides, seed=seed, data_range=data_range,
        pairs_per_image=pairs_per_image, threshold=agreement_threshold, explain_class=explain_class,
        randomization_target=randomization_target, full_cascade=full_cascade, block=block, device=dev,
        config=config, key=key,
        example=int(np.argmax([r.mask.sum() for r in positives])))  # the largest lesion: the clearest figure


# ---------------------------------------------------------------------------------------------------
# Maps


@dataclass
class Maps:
    """Every model output the scores need (CPU tensors)."""

    trained: list[dict[str, torch.Tensor]]  # per classifier: method -> [N, H, W]
    probs: list[torch.Tensor]  # per classifier: [N, classes]
    targets: list[torch.Tensor]  # per classifier: explained class [N]
    untrained: dict[str, torch.Tensor] | None  # None: not run (plan.not_run says why)
    localizers: list[torch.Tensor]  # per localizer: [N, H, W] in [0, 1]
    randomization: list[dict] = field(default_factory=list)  # per randomized replicate


def _unet_output(folder: ModelFolder, replicate: int, images01: torch.Tensor) -> torch.Tensor:
    net = folder.load(replicate, images01.device)
    x = folder.to_input(images01)
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(x[i : i + 16]))[:, 0] for i in range(0, len(x), 16)])


def compute_maps(plan: Plan, progress: bool = True) -> Maps:
    """All maps and outputs, resumable step by step (see the module docstring)."""
    rank, _ = _world()
    steps = Steps(plan.out_dir / ".steps", plan.key, write=rank == 0)
    cache = SegmentCache()
    n = len(plan.ids)
    images = plan.images

    calls = iter(range(1 << 30))

    def explainer(folder: ModelFolder, x: torch.Tensor) -> Callable[[torch.nn.Module, torch.Tensor], dict]:
        def explain_sharded(net: torch.nn.Module, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            # One call per model state: the trained replicates, the untrained network, each randomized state.
            faults.point(f"explain:{next(calls)}")
            settings = {**folder.explain_settings(net), **plan.overrides}  # the user's overrides win

            def part(s: slice) -> dict[str, torch.Tensor]:
                maps = explain(net, x[s], plan.methods, targets=targets[s], preset=plan.preset, segment_cache=cache,
                               seed=plan.seed, **settings)
                return {k: v.cpu() for k, v in maps.items()}

            return sharded(part, n, plan.block)

        return explain_sharded

    def classes(probs: torch.Tensor, folder: ModelFolder) -> torch.Tensor:
        if plan.explain_class == "finding":  # each model's own finding class (its model.json says which)
            return torch.full((probs.shape[0],), folder.finding_class, dtype=torch.long)
        return probs.argmax(1)

    def run_model(folder: ModelFolder, net: torch.nn.Module) -> dict:
        x = folder.to_input(images)
        probs = torch.softmax(predict(net, x).double(), 1).cpu()
        targets = classes(probs, folder)
        return {"maps": explainer(folder, x)(net, targets.to(images.device)), "probs": probs, "targets": targets}

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.models) + (0 if "untrained" in plan.not_run else 1) + len(plan.randomized),
                   desc="assessment", unit="model")

    def counted(value: Any) -> Any:
        if bar is not None:
            bar.update()
        return value

    primary = plan.folders[0]

    def untrained_net() -> torch.nn.Module:
        torch.manual_seed(plan.seed)
        return primary.build().to(plan.device).eval()

    runs = [counted(steps.run(f"maps_{i}", lambda i=i, f=f: run_model(f, f.load(plan.models[i]["replicate"],
                                                                                plan.device))))
            for i, f in enumerate(plan.folders)]
    untrained = (None if "untrained" in plan.not_run else
                 counted(steps.run("maps_untrained", lambda: run_model(primary, untrained_net()))))
    locs = [steps.run(f"localizer_{i}", lambda f=f, p=p: _unet_output(f, p["replicate"], images).cpu())
            for i, (f, p) in enumerate(zip(plan.localizer_folders, plan.localizers, strict=True))]

    def curves(i: int) -> dict:
        folder = plan.folders[i]
        net = folder.load(plan.models[i]["replicate"], plan.device)
        x = folder.to_input(images)
        c = randomization_curves(
            net, folder.randomization_blocks(net), x, plan.methods, preset=plan.preset, seed=plan.seed,
            data_range=plan.data_range, verdict_block=folder.verdict_block(net),
            pairs_per_image=plan.pairs_per_image, segment_cache=cache, explain_fn=explainer(folder, x),
            init_seed=replicate_seed(plan.seed, plan.models[i]["sha256"]),  # each replicate its own random weights
            full_cascade=plan.full_cascade,  # default: stop where the paper's cascade stopped
            examples=[plan.example], progress=bar is not None,
            # Explaining the finding class: every state explains it, whatever it predicts.
            target="trained" if plan.explain_class == "finding" else plan.randomization_target,
            trained_maps=runs[i]["maps"], trained_targets=runs[i]["targets"].to(images.device))
        return {"states": c["states"], "verdict_state": c["verdict_state"], "class_changed": c["class_changed"],
                "ssim": {k: v.cpu() for k, v in c["ssim"].items()},
                "spearman": {k: v.cpu() for k, v in c["spearman"].items()},
                "undefined": c["undefined"], "spearman_undefined": c["spearman_undefined"],
                "baseline": {k: v.cpu() for k, v in c["baseline"].items()}, "cascade_mean": c["cascade_mean"],
                "examples": {k: v[:, 0].cpu() for k, v in c["examples"].items()}}

    rand = [counted(steps.run(f"randomization_{i}", lambda i=i: curves(i))) for i in plan.randomized]
    if bar is not None:
        bar.close()
    return Maps(trained=[r["maps"] for r in runs], probs=[r["probs"] for r in runs],
                targets=[r["targets"] for r in runs], untrained=untrained["maps"] if untrained else None,
                localizers=locs, randomization=rand)


# ---------------------------------------------------------------------------------------------------
# Scores


@dataclass
class Scores:
    """Per-image values behind the verdicts (numpy, NaN = undefined), for the CSV and the figures."""

    auprc: dict[str, np.ndarray]
    auprc_untrained: dict[str, np.ndarray]
    auprc_prior: np.ndarray
    auprc_localization: np.ndarray | None
    blank: dict[str, np.ndarray]  # the primary model's map is blank
    repeat: dict[str, np.ndarray]
    repeat_chance: dict[str, np.ndarray]
    reprod: dict[str, np.ndarray]
    reprod_chance: dict[str, np.ndarray]
    loc_agreement: np.ndarray | None
    state_ssim: dict[str, np.ndarray]  # first randomized replicate, verdict state, [N]
    state_spearman: dict[str, np.ndarray]
    state_chance: dict[str, np.ndarray]


def _agreement(maps_a: dict, maps_b: dict, plan: Plan) -> tuple[dict, dict, dict]:
    ssim_v = {m: v.numpy() for m, v in map_agreement(maps_a, maps_b, plan.data_range).items()}
    n = len(plan.ids)
    chance = {m: per_image_chance(random_pair_ssim(maps_a[m], plan.pairs_per_image, plan.data_range, plan.seed,
                                                   other=maps_b[m]), n).numpy() for m in plan.methods}
    undefined = {m: int((blank(maps_a[m]) | blank(maps_b[m])).sum()) for m in plan.methods}
    return ssim_v, chance, undefined


def _nanmean0(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (no warning) where a column has no finite value."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    total = np.where(ok, v, 0.0).sum(0)
    count = ok.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _summary(values: np.ndarray, **counts: int) -> dict:
    return {**summarize(values), **counts}


#: The paper's setting that :func:`deviations` compares a run with.
PAPER = {"image_size": 320, "randomized_replicates": 3, "primary": "inception_v3",
         "primary_normalization": "[-1, 1]", "second_normalization": "ImageNet mean/std", "data_range": 2.0}


def deviations(plan: Plan) -> list[str]:
    """Every way this run differs from the paper's experiment, in sentences, derived from the plan (also in
    the report). Each line appears exactly when its condition holds; ``tests/workflows`` checks both ways."""
    recipe = get_recipe(plan.preset, **plan.overrides)
    f = plan.facts
    out = []
    if plan.preset != "paper" or plan.overrides:
        out.append(f"Saliency recipe '{plan.preset}'" + (f" with overrides {plan.overrides}" if plan.overrides else "")
                   + ": fewer integration steps / noise samples than the paper's; a demonstration, not its numbers.")
    h, w = plan.data["grid"]
    if (h, w) != (PAPER["image_size"], PAPER["image_size"]):
        grids = "; ".join(f"{name} {g[0]} x {g[1]}" for name, g in f["cam_grids"].items() if g)
        out.append(f"Images at {h if h == w else f'{h} x {w}'} px; the paper used 320 px"
                   + (f". Grad-CAM grid at this size: {grids} (InceptionV3 at 320 px: 8 x 8)" if grids else "") + ".")
    if recipe.cam_resize != "tf1_legacy":
        out.append("Grad-CAM upsampled with half-pixel centres; the paper's TF1 code used the legacy resize "
                   "(about half a feature cell up and left).")
    if plan.data_range != PAPER["data_range"]:
        out.append(f"SSIM data_range {plan.data_range}; the paper's scikit-image silently used 2.0 for float maps.")
    if len(plan.localizers) >= 2:
        out.append(f"Localization-network agreement SSIM on their [0, 1] probability maps with data_range "
                   f"{plan.data_range}; the paper's U-Net maps were 8-bit PNGs (scikit-image's dtype range, 255) and "
                   "its RetinaNet maps min-max normalized floats (2.0).")
    out.append("SmoothGrad / SmoothGrad-IG noise is drawn per (image, model weights, seed): reproducible; "
               "the paper drew fresh noise per call. Either way no two models share noise.")
    out.append("XRAI maps: absolute value before the paper's 99th-percentile clip (the paper's own grayscale "
               "helper crashes on XRAI's 2-D output, so its exact post-processing is unknown).")
    if "randomization" not in plan.not_run:
        out.append("Randomization re-initializes each block as freshly constructed PyTorch layers, each replicate "
                   "with its own seed; the paper did not state its scheme.")
        if len(plan.randomized) != PAPER["randomized_replicates"]:
            out.append(f"{len(plan.randomized)} randomized replicate(s); the paper averaged the cascading "
                       "randomization curves of 3 InceptionV3 replicates (mean +- SD).")
    if plan.randomization_target == "trained":
        out.append("Randomized models explain the trained model's class; the paper's pipeline explained each "
                   "model's own prediction.")
    if plan.explain_class == "finding":
        out.append("Maps explain each model's finding (lesion) class; the paper explained the predicted class.")
    if f["primary"] != PAPER["primary"]:
        out.append(f"Primary architecture {f['primary']} (the paper's: InceptionV3).")
    norms = f["normalization"]
    if norms.get(f["primary"]) != PAPER["primary_normalization"]:
        out.append(f"Primary architecture's input is {norms.get(f['primary'])}; the paper's InceptionV3 took [-1, 1].")
    if f["second"] is not None and norms.get(f["second"]) != PAPER["second_normalization"]:
        out.append(f"Second architecture {f['second']} takes {norms.get(f['second'])} input; the paper's DenseNet121 "
                   "took ImageNet mean/std normalization.")
    for name, black in f["ig_baseline"].items():
        if norms.get(name) != PAPER["primary_normalization"]:
            out.append(f"Integrated Gradients baseline for {name}: black in its own input scale "
                       f"({black if not isinstance(black, list | tuple) else [round(v, 4) for v in black]}); the "
                       "paper's was the constant -1 of its [-1, 1] input.")
    scratch = sorted(name for name, v in f["pretrained"].items() if v in (None, False, ""))
    unknown = sorted(name for name, v in f["pretrained"].items() if v == "not recorded")
    if scratch:
        out.append(f"Trained from random initialization, without ImageNet pretraining: {', '.join(scratch)}; the "
                   "paper's classifiers were ImageNet-pretrained.")
    if unknown:
        out.append(f"Pretraining not recorded (no training record with 'pretrained'): {', '.join(unknown)}; the "
                   "paper's classifiers were ImageNet-pretrained.")
    if plan.localizers and f["ground_truth"] == "boxes":
        out.append(f"Localization baseline {', '.join(f['localizers'])} (a network trained on masks) on a detection "
                   "dataset with boxes; the paper used RetinaNet on RSNA (U-Net on SIIM).")
    if len(plan.localizers) == 1:
        out.append("One localization network: utility is judged against it, but agreement (repeatability, "
                   "reproducibility) against chance only; the paper compared with two localization replicates.")
    for m, why in plan.dropped.items():
        out.append(f"{m} not computed: {why}.")
    for m, why in f["method_notes"].items():
        out.append(f"{m}: {why}.")
    for what, why in plan.not_run.items():
        if what == "untrained":
            out.append(f"Untrained-network utility baseline not run: {why}.")
        elif what == "randomization":
            out.append(f"Cascading randomization not run: {why}; the paper ran it on 3 replicates.")
    if f["training_images_included"]:
        out.append(f"Images the models were trained on are assessed (include_training_images; "
                   f"{', '.join(f['trained_on'])} trained on this dataset); the paper assessed held-out test images "
                   "only.")
    out.append("Verdicts use statistical tests the paper did not name (paired one-sided Wilcoxon, Holm-corrected "
               "only where rejection passes a method; bootstrap CIs over images); repeatability / reproducibility "
               "also require agreement above chance.")
    if plan.data["prior"].startswith("leave-one-out"):
        out.append("Average-mask prior built leave-one-out from the assessed images (the dataset has no "
                   "training masks); the paper used the training and validation masks.")
    if not plan.localizers:
        out.append("No localization networks: utility is judged against the prior only, agreement against chance only.")
    return out


def score(plan: Plan, maps: Maps, seconds: float = 0.0) -> tuple[Results, Scores]:
    """Per-image values, summaries and verdicts from the maps."""
    methods, masks = plan.methods, plan.masks.cpu()
    primary = maps.trained[0]
    util = {m: utility_scores(primary[m], masks) for m in methods}
    n = len(plan.ids)
    if maps.untrained is not None:
        util_untrained = {m: utility_scores(maps.untrained[m], masks) for m in methods}
    else:  # not run (a TorchScript model has no untrained form): undefined, with the reason in the baselines
        util_untrained = {m: {"auprc": torch.full((n,), torch.nan, dtype=torch.float64), "constant_map": 0}
                          for m in methods}
    prior_maps = plan.prior.cpu().expand_as(masks).contiguous() if plan.prior.ndim == 2 else plan.prior.cpu()
    util_prior = utility_scores(prior_maps, masks)
    util_loc = utility_scores(maps.localizers[0], masks) if maps.localizers else None
    undefined_u = {m: util[m]["constant_map"] + util[m]["empty_mask"] for m in methods}

    empty: dict = {}
    repeat, repeat_chance, repeat_undef = _agreement(maps.trained[plan.replicate_pair[0]],
                                                     maps.trained[plan.replicate_pair[1]], plan) \
        if plan.replicate_pair else (empty, empty, empty)
    reprod, reprod_chance, reprod_undef = _agreement(primary, maps.trained[plan.second_arch], plan) \
        if plan.second_arch is not None else ({}, {}, {})
    loc_agree = (output_agreement(maps.localizers[0], maps.localizers[1], plan.data_range).numpy()
                 if len(maps.localizers) >= 2 else None)

    verdicts: dict[str, dict[str, Verdict]] = {m: {} for m in methods}
    uv = utility_verdicts({m: util[m]["auprc"].numpy() for m in methods}, util_prior["auprc"].numpy(),
                          util_loc["auprc"].numpy() if util_loc else None, undefined_u)
    rv = agreement_verdicts(repeat, repeat_chance, loc_agree, "repeatability", plan.threshold, repeat_undef) \
        if repeat else {}
    pv = agreement_verdicts(reprod, reprod_chance, loc_agree, "reproducibility", plan.threshold, reprod_undef) \
        if reprod else {}
    state_ssim, state_spearman, state_chance = {}, {}, {}
    for m in methods:
        verdicts[m]["utility"] = Verdict.from_dict(uv[m])
        if maps.randomization:
            rows = [r["states"].index(r["verdict_state"]) for r in maps.randomization]
            # [replicates, images]: the verdict averages replicates per image (images are the unit, n = images).
            final = np.stack([r["ssim"][m][k].numpy() for r, k in zip(maps.randomization, rows, strict=True)])
            chance = np.stack([per_image_chance(r["baseline"][m], n).numpy() for r in maps.randomization])
            pairs = [r["baseline"][m].numpy() for r in maps.randomization]
            cascade = np.array([r["cascade_mean"][m] for r in maps.randomization], dtype=np.float64)
            v = randomization_verdict(final, chance, maps.randomization[0]["verdict_state"], pairs,
                                      cascade_mean=cascade)
            verdicts[m]["randomization"] = Verdict.from_dict(v)
            state_ssim[m] = _nanmean0(final)  # per image, averaged over replicates (the CSV and figures)
            state_spearman[m] = _nanmean0(np.stack([r["spearman"][m][k].numpy()
                                                    for r, k in zip(maps.randomization, rows, strict=True)]))
            state_chance[m] = _nanmean0(chance)
        else:
            why = plan.not_run.get("randomization", "cascading randomization was not run")
            verdicts[m]["randomization"] = Verdict.from_dict(not_run(why))
        verdicts[m]["repeatability"] = Verdict.from_dict(rv[m] if m in rv else not_run("needs two replicates of "
                                                                                       "one architecture"))
        verdicts[m]["reproducibility"] = Verdict.from_dict(pv[m] if m in pv else not_run("needs a second "
                                                                                         "architecture"))

    def spearman_summary(r: dict, m: str) -> list:
        return [summarize(row.numpy()) for row in r["spearman"][m]]

    rand_out = []
    for r, i in zip(maps.randomization, plan.randomized, strict=True):
        k = r["states"].index(r["verdict_state"])
        rand_out.append({
            "model": plan.models[i]["path"], "replicate": plan.models[i]["replicate"],
            "init_seed": replicate_seed(plan.seed, plan.models[i]["sha256"]),
            "states": r["states"], "verdict_state": r["verdict_state"],
            "verdict_state_source": plan.facts["verdict_block_source"].get(plan.models[i]["arch"]),
            "cascade_mean": {m: r["cascade_mean"][m] for m in methods},
            "beyond_paper": r["states"][k + 1 :], "class_changed": r["class_changed"],
            "target": "trained" if plan.explain_class == "finding" else plan.randomization_target,
            "ssim": {m: [summarize(row.numpy()) for row in r["ssim"][m]] for m in methods},
            "ssim_undefined": {m: list(r["undefined"][m]) for m in methods},
            "spearman": {m: spearman_summary(r, m) for m in methods},
            "spearman_undefined": {m: list(r["spearman_undefined"][m]) for m in methods},
            "baseline": {m: summarize(r["baseline"][m].numpy()) for m in methods}})
    rank, world = _world()
    dev = plan.device
    provenance = {"versions": versions(), "config": plan.config, "device": str(dev), "processes": world,
                  "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                  "recipe": {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in get_recipe(plan.preset, **plan.overrides).__dict__.items()},
                  "seconds": round(seconds, 1)}
    used = {c: [verdicts[m][c].n for m in methods] for c in CRITERIA}
    data = {**plan.data, "images_used": {c: {"min": min(v), "max": max(v), "unit": "images"}
                                         for c, v in used.items()}}
    results = Results(
        methods=methods, data=data,
        utility={m: _summary(util[m]["auprc"].numpy(), empty_mask=util[m]["empty_mask"],
                             blank_map=util[m]["constant_map"]) for m in methods},
        randomization=rand_out,
        repeatability={m: _summary(v, undefined=repeat_undef[m], chance_mean=summarize(repeat_chance[m])["mean"])
                       for m, v in repeat.items()},
        reproducibility={m: _summary(v, undefined=reprod_undef[m], chance_mean=summarize(reprod_chance[m])["mean"])
                         for m, v in reprod.items()},
        baselines={"utility_prior": summarize(util_prior["auprc"].numpy()),
                   "not_run": dict(plan.not_run),
                   "utility_localization": summarize(util_loc["auprc"].numpy()) if util_loc else None,
                   "utility_untrained": {m: _summary(util_untrained[m]["auprc"].numpy(),
                                                     blank_map=util_untrained[m]["constant_map"]) for m in methods},
                   "agreement_localization": summarize(loc_agree) if loc_agree is not None else None,
                   "reference_line": plan.threshold},
        verdicts=verdicts, provenance=provenance, deviations=deviations(plan))
    scores = Scores(
        auprc={m: util[m]["auprc"].numpy() for m in methods},
        auprc_untrained={m: util_untrained[m]["auprc"].numpy() for m in methods},
        auprc_prior=util_prior["auprc"].numpy(), auprc_localization=util_loc["auprc"].numpy() if util_loc else None,
        blank={m: blank(primary[m]).numpy() for m in methods}, repeat=repeat, repeat_chance=repeat_chance,
        reprod=reprod, reprod_chance=reprod_chance, loc_agreement=loc_agree, state_ssim=state_ssim,
        state_spearman=state_spearman, state_chance=state_chance)
    return results, scores


# ---------------------------------------------------------------------------------------------------
# Outputs

CSV_COLUMNS = ["id", "method", "predicted_class", "predicted_probability", "finding_probability", "explained_class",
               "map_blank", "auprc", "auprc_untrained", "auprc_prior", "auprc_localization", "repeatability_ssim",
               "repeatability_chance", "reproducibility_ssim", "reproducibility_chance", "randomized_state",
               "randomized_ssim", "randomized_spearman", "randomization_chance"]


def _num(values: np.ndarray | None, i: int) -> str:
    """A CSV cell: the value, or empty when undefined or not computed."""
    if values is None or len(values) == 0:
        return ""
    v = float(values[i])
    return repr(v) if np.isfinite(v) else ""


def per_image_csv(plan: Plan, maps: Maps, scores: Scores, results: Results) -> str:
    """``per_image.csv``: one row per image and method (empty cell = undefined or not computed)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    probs, targets = maps.probs[0].numpy(), maps.targets[0].numpy()
    state = results.randomization[0]["verdict_state"] if results.randomization else ""
    s = scores
    for i, rid in enumerate(plan.ids):
        pred = int(probs[i].argmax())
        for m in plan.methods:
            w.writerow([rid, m, pred, repr(float(probs[i, pred])), repr(float(probs[i, plan.finding_class])),
                        int(targets[i]), int(bool(s.blank[m][i])), _num(s.auprc[m], i), _num(s.auprc_untrained[m], i),
                        _num(s.auprc_prior, i), _num(s.auprc_localization, i), _num(s.repeat.get(m), i),
                        _num(s.repeat_chance.get(m), i), _num(s.reprod.get(m), i), _num(s.reprod_chance.get(m), i),
                        state, _num(s.state_ssim.get(m), i), _num(s.state_spearman.get(m), i),
                        _num(s.state_chance.get(m), i)])
    return buf.getvalue()


def write_outputs(plan: Plan, maps: Maps, scores: Scores, results: Results, report: bool = True) -> None:
    """``results.json``, ``per_image.csv`` and (optionally) the report, each atomically."""
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "per_image.csv", per_image_csv(plan, maps, scores, results).encode())
    if report:
        from saliency_trust.report import ReportInputs, write_report

        e, methods = plan.example, plan.methods
        first = maps.randomization[0] if maps.randomization else None
        columns = {f"{m['arch']} #{m['replicate']}": maps.trained[i] for i, m in enumerate(plan.models)}
        inputs = ReportInputs(
            ids=plan.ids, images=plan.images01, masks=plan.masks.cpu().numpy().astype(bool), methods=methods,
            auprc=scores.auprc, auprc_untrained=scores.auprc_untrained, auprc_prior=scores.auprc_prior,
            auprc_localization=scores.auprc_localization,
            trained_maps={m: maps.trained[0][m].numpy() for m in methods},
            states=first["states"] if first else [], verdict_state=first["verdict_state"] if first else None,
            state_ssim={m: first["ssim"][m].numpy() for m in methods} if first else {},
            # The verdict's reference: the mean over the randomized replicates of each one's random-pair SSIM.
            state_baseline={m: float(np.nanmean([r["baseline"][m].nanmean().item() for r in maps.randomization]))
                            for m in methods} if first else {},
            state_examples={m: first["examples"][m].numpy() for m in methods} if first else {},
            repeat=scores.repeat, reprod=scores.reprod, agreement_baseline=scores.loc_agreement,
            repeat_chance=scores.repeat_chance, reprod_chance=scores.reprod_chance,
            agreement_examples={name: {m: mp[m][e].numpy() for m in methods} for name, mp in columns.items()},
            threshold=plan.threshold, example=e,
            state_replicates={m: np.stack([_nanmean0(r["ssim"][m].numpy().T) for r in maps.randomization])
                              for m in methods} if first else {})
        path = write_report(out, results, inputs)
        log.info("report: %s", path)
    # Last: a results.json on disk means everything beside it is complete.
    atomic_write_bytes(out / "results.json", results.to_json().encode())


def run_assessment(
    dataset_dir: str | Path,
    output_dir: str | Path,
    classifiers: Sequence[Any],
    localizers: Sequence[Any] = (),
    *,
    report: bool = True,
    progress: bool = True,
    **options: Any,
) -> Results:
    """Score every method on the four criteria; returns the :class:`Results` written to ``results.json``.

    ``classifiers`` are model folders (or weight files, see :func:`model_entries`): the first
    folder's first two replicates give repeatability, its first three (the paper's 3) go through
    cascading randomization (``randomize`` limits them), the first classifier of another
    architecture gives reproducibility (a second folder of the same network is refused).
    ``localizers``: the first gives the high utility baseline, the first two the agreement baseline.

    ``options`` are :func:`plan_assessment`'s keywords. Images are read at the size the classifiers
    were trained at. ``split``: ``auto`` (the split file's test set; without one, the hash split's
    test part when a model's training record names this dataset, else every image), ``test``,
    ``all`` (refused on a dataset the models were trained on unless ``include_training_images``) or
    a file of image ids; lesion-positive images without ground truth are skipped and listed.
    ``explain_class``: ``predicted`` (the paper) or ``finding`` (each model's own finding class).
    ``randomization_target``: ``own`` (the paper's pipeline; the default with the ``paper`` preset) or
    ``trained``. ``data_range`` for SSIM defaults to 2.0 with the ``paper`` preset (what scikit-image
    <= 0.19 silently used on the paper's float maps) and to 1.0 otherwise. Under ``torchrun`` the map
    computations are sharded across processes by blocks of ``block`` images and only rank 0 writes.
    """
    t0 = time.time()
    plan = plan_assessment(dataset_dir, output_dir, classifiers, localizers, **options)
    if _world()[0] == 0:
        for folder in (plan.out_dir, plan.out_dir / ".steps", plan.out_dir / "figures"):
            remove_stale_temporaries(folder)  # left by a run that was killed mid-write
    maps = compute_maps(plan, progress=progress)
    results, scores = score(plan, maps, seconds=time.time() - t0)
    rank, _ = _world()
    if rank == 0:
        write_outputs(plan, maps, scores, results, report=report)
        for line in results.usage_lines():
            log.info("%s", line)
    return results


__all__ = ["CRITERIA", "CSV_COLUMNS", "EXPLAIN_CLASSES", "FINDING_CLASS", "Maps", "Plan", "Scores",
           "compute_maps", "deviations", "per_image_csv", "plan_assessment", "run_assessment", "score",
           "sharded", "write_outputs"]
