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
    RandomizationCurve,
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
from saliency_trust.explainer import Explainer
from saliency_trust.networks import ManifestError, ModelFolder, replicate_seed
from saliency_trust.networks.modelfolder import LEGACY_FILE
from saliency_trust.provenance import code_fingerprint, versions
from saliency_trust.results import CRITERIA, Results, Verdict
from saliency_trust.saliency import METHODS, SegmentCache, get_recipe, predict
from saliency_trust.settings import EXPLAIN_CLASSES, AssessmentSettings

log = logging.getLogger(__name__)
#: The class index of the finding (lesion) in the bundle's own two-class classifiers (a model folder says its own).
FINDING_CLASS = 1


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


@dataclass(frozen=True, kw_only=True)
class ModelState:
    """One model state to explain: a replicate of a model folder, with its weights' fingerprint.

    ``folder`` is the :class:`ModelFolder` (``None`` where a test fabricates maps and scores them
    without any model); ``arch`` the network label the results use.
    """

    folder: Any
    replicate: int
    sha256: str
    path: str
    arch: str

    @classmethod
    def of(cls, folder: ModelFolder, replicate: int) -> ModelState:
        """The state of ``folder``'s ``replicate`` (its weights hashed once)."""
        return cls(folder=folder, replicate=int(replicate), sha256=folder.sha256(replicate),
                   path=str(folder.weights(replicate)), arch=folder.network_label)

    def record(self) -> dict[str, Any]:
        """What the provenance records of it."""
        folder = str(self.folder.folder) if self.folder is not None else ""
        return {"arch": self.arch, "path": self.path, "sha256": self.sha256, "replicate": self.replicate,
                "folder": folder}


@dataclass(kw_only=True)
class Cohort:
    """The assessed images: ids, pixels, ground truth and the average-mask prior (tensors on the device)."""

    ids: list[str]
    images01: np.ndarray  # [N, H, W] in [0, 1], for figures (volumes: [N, D, H, W], windowed; likewise below)
    images: torch.Tensor  # [N, H, W] in [0, 1] (each model maps it to its own input)
    masks: torch.Tensor  # [N, H, W] bool
    prior: torch.Tensor  # [H, W] or [N, H, W] (leave-one-out) float64
    example: int  # the image the report draws (the largest lesion: the clearest figure)
    spacing: tuple[float, float, float] | None = None  # volumes: voxel spacing (z, y, x) mm on the assessed grid


@dataclass(frozen=True, kw_only=True)
class Roles:
    """Which model states serve which criterion (indices into :attr:`Plan.models`)."""

    randomized: tuple[int, ...] = ()
    replicate_pair: tuple[int, int] | None = None
    second_arch: int | None = None


@dataclass(kw_only=True)
class Plan:
    """Everything decided before any model runs: settings, images, model states and their roles, the resume key.

    ``facts`` holds what :func:`deviations` reads (Grad-CAM grids, pretraining, normalizations, the
    ground truth kind, the finding class); ``not_run`` a baseline or criterion that cannot run and why.
    """

    settings: AssessmentSettings
    device: torch.device
    cohort: Cohort
    models: list[ModelState]
    localizers: list[ModelState]
    roles: Roles
    methods: list[str]
    not_run: dict[str, str]
    facts: dict
    data: dict
    config: dict
    key: str

    @property
    def ids(self) -> list[str]:
        return self.cohort.ids

    @property
    def out_dir(self) -> Path:
        return self.settings.output_dir

    @property
    def randomized(self) -> tuple[int, ...]:
        return self.roles.randomized

    @property
    def finding_class(self) -> int:
        return int(self.facts.get("finding_class", FINDING_CLASS))

    @property
    def dropped(self) -> dict[str, str]:
        """Methods left out, with the reason."""
        return dict(self.data.get("methods_left_out", {}))


def _trained_on(entries: Sequence[tuple[ModelFolder, int]], dataset_dir: Path) -> list[str]:
    """The models (``name #replicate``) whose training record names ``dataset_dir`` as their data."""
    here = dataset_dir.resolve()
    out = []
    for f, k in entries:
        d = f.record(k).get("dataset_dir")
        if d and Path(d).resolve() == here:
            out.append(f"{f.name} #{k}")
    return out


def _listed(path: Path, positives: list, dataset_dir: Path, trained: str, allow_training: bool) -> tuple[list, str]:
    """The lesion-positive records listed (by id) in the file ``path``, refused where training images are listed."""
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
    if trained and seen and not allow_training:
        raise ValueError(f"{path}: {len(seen)} listed id(s) are training or validation images of the models "
                         f"({trained} trained on {dataset_dir}), e.g. {seen[:3]}; list test images only, or set "
                         "include_training_images")
    return chosen, f"the ids listed in {path}" + (" (including training images)" if seen and trained else "")


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
    if split not in ("auto", "test", "all"):
        path = Path(split)
        if not path.is_file():
            raise ValueError(f"{path}: split must be 'auto', 'test', 'all' or a file of image ids; no such file")
        return _listed(path, positives, dataset_dir, trained, include_training_images)
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
    else:
        if trained_on and not include_training_images:
            raise ValueError(f"{dataset_dir}: split 'all' would assess images the models were trained on ({trained} "
                             "trained on this folder); use split 'auto' or 'test', or set include_training_images "
                             "to assess them anyway")
        how = "every image" + (" including the models' training images (include_training_images)" if trained_on
                               else "")
    if split == "test":
        positives = [r for r in positives if split_of(r.id, r.split) == "test"]
    return sorted(positives, key=lambda r: r.id), how


def _volume_input(folders: Sequence[ModelFolder], localizers: Sequence[ModelFolder],
                  image_size: int | None) -> tuple[tuple[int, int, int], tuple[float, float], str]:
    """Volume models: the ``[D, H, W]`` grid and HU window every model (classifiers and localizers) was trained
    at, from their manifests; the volumes are read once, on that grid and through that window, so models that
    differ in either are refused (assess them separately)."""
    flat = [f for f in [*folders, *localizers] if not f.is_volume]
    if flat:
        raise ValueError(f"{flat[0].folder}: a 2-D model beside 3-D (volume) models; assess them separately")
    if image_size is not None:
        raise ValueError(f"image_size is for 2-D models; the models are 3-D (input.size {list(folders[0].input_size)} "
                         "in their model.json): leave image_size unset")
    grids = {str(f.folder): f.input_size for f in [*folders, *localizers]}
    windows = {str(f.folder): f.window_hu for f in [*folders, *localizers]}
    if len(set(grids.values())) > 1:
        raise ValueError(f"the models were trained on different volume grids {grids}; the volumes are read once, on "
                         "one grid: assess them separately")
    if len(set(windows.values())) > 1:
        raise ValueError(f"the models window the CT differently {windows} (input.window_hu); the volumes are read "
                         "once, through one window: assess them separately")
    return folders[0].input_size, folders[0].window_hu, "the models' manifests (model.json)"


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


def _cam_grid(folder: ModelFolder, net: torch.nn.Module, size: int | tuple[int, ...]) -> list[int] | None:
    """The Grad-CAM layer's spatial grid at ``size`` px, or voxels ``(D, H, W)`` (one forward pass on a blank
    image or volume)."""
    layer = folder.explain_settings(net).get("cam_layer") if folder.format != "torchscript" else None
    if not layer:
        return None
    grid = (size, size) if isinstance(size, int) else tuple(size)
    seen: list = []
    handle = net.get_submodule(layer).register_forward_hook(
        lambda _m, _i, o: seen.append(tuple(o.shape[-len(grid):])))
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, folder.channels, *grid))
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


@dataclass
class _Probe:
    """What building each distinct classifier once tells: explain settings, verdict-block sources, the methods it
    cannot give or gives with a caveat, and the network itself (for the Grad-CAM grid)."""

    nets: dict[str, tuple[ModelFolder, torch.nn.Module]] = field(default_factory=dict)
    explain: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _distinct(entries: Sequence[tuple[ModelFolder, int]]) -> list[ModelFolder]:
    """Each model folder once, in order."""
    folders: list[ModelFolder] = []
    for f, _ in entries:
        if not any(same_model(f, g) for g in folders):
            folders.append(f)
    return folders


def _probe(folders: Sequence[ModelFolder]) -> _Probe:
    """Build every classifier once; two folders of one architecture are refused (reproducibility needs two)."""
    out = _Probe()
    architectures: dict[tuple, ModelFolder] = {}
    for f in folders:
        net = f.build() if f.format != "torchscript" else f.load()
        twin = architectures.setdefault(_architecture(net), f)
        if twin is not f:
            raise ValueError(f"{f.folder}: the same network ({f.network_label}, {type(net).__name__} with the same "
                             f"layers) as {twin.folder}; reproducibility needs a different architecture: put these "
                             "weights in the first folder as another replicate, or give a classifier of another "
                             "architecture")
        out.explain[f.network_label] = {k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in f.explain_settings(net).items()}
        if f.format != "torchscript":
            out.sources[f.network_label] = f.verdict_block_source(net)
        for m, why in f.unavailable(net).items():
            out.unavailable.setdefault(m, why)
        for m, why in f.method_notes(net).items():
            out.notes.setdefault(m, why)
        out.nets[f.network_label] = (f, net)
    return out


def _methods(asked: Sequence[str] | None, probe: _Probe) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The methods to compute, those left out (with the reason) and the caveats of those kept."""
    if asked is not None:
        refused = [m for m in asked if m in probe.unavailable]
        if refused:
            raise ValueError(f"method(s) {refused} cannot be computed for these models: "
                             f"{probe.unavailable[refused[0]]}; leave them out of methods")
        methods = list(asked)
    else:
        methods = [m for m in METHODS if m not in probe.unavailable]
    dropped = {m: why for m, why in probe.unavailable.items() if m not in methods}
    notes = {m: why for m, why in probe.notes.items() if m in methods}
    for m, why in dropped.items():
        log.warning("method %s left out: %s", m, why)
    for m, why in notes.items():
        log.warning("method %s: %s", m, why)
    return methods, dropped, notes


def _device(device: str | None) -> torch.device:
    """The device given, else this process's GPU (one per process under ``torchrun``), else the CPU."""
    rank, world = _world()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{rank % torch.cuda.device_count()}" if world > 1 else "cuda"
    return torch.device(device or "cpu")


def _read(s: AssessmentSettings, size: int | tuple[int, int, int] | None,
          window_hu: tuple[float, float] | None) -> tuple[Any, Callable[[Any], np.ndarray]]:
    """The dataset at ``size`` and how to take a record's ``[H, W]`` image (or ``[D, H, W]`` volume) in [0, 1]:
    a 2-D layout through :func:`~saliency_trust.data.load_dataset`, volumes (``size`` a ``(D, H, W)`` grid)
    through :func:`~saliency_trust.data.load_volume_dataset`, resampled to the grid and windowed to [0, 1]."""
    if isinstance(size, tuple) and len(size) == 3:
        from saliency_trust.data import DataError, load_volume_dataset

        try:
            ds = load_volume_dataset(s.dataset_dir, size=size, window_hu=window_hu)
        except DataError as err:  # not a volume layout: say so with the folder's name
            raise ValueError(f"{err} (the models are 3-D: the dataset must hold volumes)") from None
        return ds, lambda r: r.image[0]
    return load_dataset(s.dataset_dir, image_size=size), lambda r: r.image


def _spacing(records: Sequence[Any]) -> tuple[float, float, float] | None:
    """The voxel spacing (z, y, x) mm the assessed volumes share on the assessed grid (None: they differ)."""
    spacings = {tuple(round(float(v), 6) for v in r.spacing) for r in records}
    return spacings.pop() if len(spacings) == 1 else None


def _cohort(s: AssessmentSettings, size: int | tuple[int, int, int] | None, trained_on: list[str], dev: torch.device,
            window_hu: tuple[float, float] | None = None) -> tuple[Cohort, Any, dict]:
    """Read the dataset at ``size`` (volumes: a ``(D, H, W)`` grid through ``window_hu``), choose the images
    (``split``), build the prior; returns the cohort, the dataset and what ``results.json``'s ``data`` says of
    the choice."""
    ds, pixels = _read(s, size, window_hu)
    volumes = isinstance(size, tuple) and len(size) == 3
    chosen, how = _select(ds, s.split, s.dataset_dir, trained_on, s.include_training_images)
    skipped = [{"id": r.id, "why": "lesion-positive but has no ground-truth mask or box"}
               for r in chosen if r.mask is None or not r.mask.any()]
    for sk in skipped:
        log.warning("skipped %s: %s", sk["id"], sk["why"])
    positives = [r for r in chosen if r.mask is not None and r.mask.any()][: s.n_images]
    if len(positives) < 2:
        raise ValueError(f"{s.dataset_dir}: need at least two lesion-positive images with ground truth to assess, "
                         f"found {len(positives)} ({how}; {len(skipped)} without ground truth)")
    shapes = {pixels(r).shape for r in positives}
    if len(shapes) > 1:
        raise ValueError(f"{s.dataset_dir}: images come in several sizes {sorted(shapes)}; give image_size")
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
    images01 = np.stack([pixels(r) for r in positives])
    cohort = Cohort(ids=[r.id for r in positives], images01=images01, images=torch.tensor(images01).to(dev),
                    masks=masks.to(dev), prior=prior.to(dev),
                    example=int(np.argmax([r.mask.sum() for r in positives])),
                    spacing=_spacing(positives) if volumes else None)
    data = {"dataset_dir": str(s.dataset_dir.resolve()), "layout": ds.layout, "split_rule": s.split, "split": how,
            "trained_on_this_dataset": trained_on, "include_training_images": bool(s.include_training_images),
            "n_positive_found": len(chosen), "n_images": len(positives), "n_requested": s.n_images,
            "ids": cohort.ids, "skipped": skipped,
            "load_errors": [{"source": e.source, "problem": e.problem} for e in ds.errors],
            "grid": list(images01.shape[1:]), "ground_truth": "masks" if volumes else _ground_truth_kind(ds),
            "synthetic": (s.dataset_dir / ("synthct.json" if volumes else "synthcxr.json")).is_file(),
            "prior": prior_source}
    if volumes:
        data.update(spatial_dims=3, window_hu=list(window_hu) if window_hu else None,
                    spacing_mm=list(cohort.spacing) if cohort.spacing else None,
                    generator="SynthCT" if data["synthetic"] else None)
    return cohort, ds, data


def _roles(s: AssessmentSettings, models: list[ModelState]) -> tuple[Roles, dict[str, str]]:
    """Which states are randomized, which pair gives repeatability and which reproducibility; what cannot run."""
    primary = models[0].folder
    same = [i for i, m in enumerate(models) if same_model(m.folder, primary)]
    others = [i for i, m in enumerate(models) if not same_model(m.folder, primary)]
    not_run: dict[str, str] = {}
    randomized: list[int] = []
    if primary.format == "torchscript":
        why = (f"{primary.name} is a TorchScript model: it has no untrained form to build and its layers cannot be "
               "re-initialized (no reset_parameters)")
        not_run = {"untrained": why, "randomization": why}
    else:
        randomized = same[: s.randomize]
        if s.randomize == 0:
            not_run["randomization"] = "cascading randomization was not run (randomize=0)"
    return Roles(randomized=tuple(randomized), replicate_pair=(same[0], same[1]) if len(same) >= 2 else None,
                 second_arch=others[0] if others else None), not_run


#: Config entries that change no map a step computes (verdict settings; what was asked where the config also holds
#: what it resolved to; how many replicates are randomized, each replicate's cascade being its own step): left out
#: of the resume key, so changing one recomputes no map.
NOT_IN_RESUME_KEY = frozenset({"equivalence_margin", "agreement_threshold", "n_requested", "methods_asked",
                               "randomize", "randomized_replicates"})


def _settings(settings: AssessmentSettings | str | Path, args: tuple, options: dict) -> AssessmentSettings:
    """The settings object given, or one built from the older call form; options beside an object are refused."""
    if isinstance(settings, AssessmentSettings):
        if args or options:
            raise TypeError(f"options {sorted(options) or list(args)} given beside an AssessmentSettings: set them on "
                            "it (dataclasses.replace(settings, ...)) instead")
        return settings
    return AssessmentSettings.from_options(settings, *args, **options)


def plan_assessment(settings: AssessmentSettings | str | Path, *args: Any, **options: Any) -> Plan:
    """Read and choose the data, describe the models and settings; nothing runs a model yet.

    ``settings`` is an :class:`~saliency_trust.settings.AssessmentSettings`, or the older call form
    ``plan_assessment(dataset_dir, output_dir, classifiers, localizers, **options)``.
    """
    s = _settings(settings, args, options)
    entries = model_entries(s.classifiers)
    loc_entries = model_entries(s.localizers, "localizer")
    folders = _distinct(entries)
    window = None
    if any(f.is_volume for f in folders) or any(f.is_volume for f, _ in loc_entries):
        size, window, size_source = _volume_input(folders, _distinct(loc_entries), s.image_size)
    else:
        size, size_source = _image_size(folders, s.image_size)
    for f, _ in loc_entries:
        if size and not f.is_volume and f.image_size and f.image_size != size:
            raise ValueError(f"{f.folder}: the localization network was trained at {f.image_size} px and the "
                             f"classifiers at {size} px; give a localizer trained at {size} px")
    probe = _probe(folders)
    methods, dropped, notes = _methods(s.methods, probe)
    dev = _device(s.device)
    trained_on = _trained_on(list(entries) + list(loc_entries), s.dataset_dir)
    cohort, ds, data = _cohort(s, size, trained_on, dev, window)
    recorded_size = list(size) if isinstance(size, tuple) else size
    data.update(image_size=recorded_size, image_size_source=size_source, methods_left_out=dropped, method_notes=notes)
    models = [ModelState.of(f, k) for f, k in entries]
    localizers = [ModelState.of(f, k) for f, k in loc_entries]
    roles, not_run = _roles(s, models)
    records = {f"{f.name} #{k}": f.record(k) for f, k in entries}
    facts = {
        "cam_grids": {label: _cam_grid(f, net, tuple(data["grid"])) for label, (f, net) in probe.nets.items()},
        "ground_truth": data["ground_truth"],
        "pretrained": {name: (r.get("pretrained") if "pretrained" in r else "not recorded")
                       for name, r in records.items()},
        "normalization": {f.network_label: _normalization(f) for f in folders},
        "ig_baseline": {f.network_label: f.black() for f in folders},
        "primary": models[0].arch,
        "second": models[roles.second_arch].arch if roles.second_arch is not None else None,
        "localizers": sorted({m.arch for m in localizers}),
        "finding_class": models[0].folder.finding_class,
        "trained_on": trained_on,
        "training_images_included": bool(trained_on and s.include_training_images
                                         and (s.split == "all" or "including training images" in data["split"])),
        "randomize": s.randomize,
        "method_notes": notes, "verdict_block_source": probe.sources,
    }
    if isinstance(size, tuple):  # volumes: the networks as model.json builds them (the deviations name them)
        facts["networks"] = {f.network_label: f.network for f in folders}
    config = {**s.to_config(), "image_size": recorded_size, "n_images": len(cohort.ids), "ids": cohort.ids,
              "methods": methods, "randomized_replicates": len(roles.randomized),
              "classifiers": [{k: str(v) for k, v in m.record().items()} for m in models],
              "localizers": [{**m.record(), "network": m.arch} for m in localizers],
              "models": {str(f.folder): f.describe() for f in folders}, "explain_settings": probe.explain,
              "code": code_fingerprint()}
    key = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in NOT_IN_RESUME_KEY},
                                    sort_keys=True).encode()).hexdigest()
    return Plan(settings=s, device=dev, cohort=cohort, models=models, localizers=localizers, roles=roles,
                methods=methods, not_run=not_run, facts=facts, data=data, config=config, key=key)


# ---------------------------------------------------------------------------------------------------
# Maps


@dataclass(kw_only=True)
class Maps:
    """Every model output the scores need (CPU tensors)."""

    trained: list[dict[str, torch.Tensor]]  # per classifier state: method -> [N, H, W]
    probs: list[torch.Tensor]  # per classifier state: [N, classes]
    targets: list[torch.Tensor]  # per classifier state: explained class [N]
    untrained: dict[str, torch.Tensor] | None  # None: not run (plan.not_run says why)
    localizers: list[torch.Tensor]  # per localizer: [N, H, W] in [0, 1]
    randomization: list[RandomizationCurve] = field(default_factory=list)  # per randomized replicate


def _unet_output(state: ModelState, images01: torch.Tensor) -> torch.Tensor:
    net = state.folder.load(state.replicate, images01.device)
    x = state.folder.to_input(images01)
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(x[i : i + 16]))[:, 0] for i in range(0, len(x), 16)])


class _Explainer:
    """Explains the cohort for one model folder: every state of it (trained, untrained, randomized) goes through
    :meth:`__call__`, sharded across processes by blocks of images."""

    def __init__(self, plan: Plan, folder: ModelFolder, x: torch.Tensor, cache: SegmentCache,
                 calls: Any) -> None:
        self.plan, self.folder, self.x, self.cache, self.calls = plan, folder, x, cache, calls

    def __call__(self, net: torch.nn.Module, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        faults.point(f"explain:{next(self.calls)}")
        s = self.plan.settings
        bound = Explainer(self.folder, net)  # the folder's explain settings; the user's overrides win

        def part(block: slice) -> dict[str, torch.Tensor]:
            maps = bound.explain_input(self.x[block], self.plan.methods, target=targets[block], preset=s.preset,
                                       segment_cache=self.cache, seed=s.seed, **s.overrides)
            return {k: v.cpu() for k, v in maps.items()}

        return sharded(part, len(self.plan.ids), s.block)


class _Run:
    """The model runs of one assessment, each a resumable step."""

    def __init__(self, plan: Plan, progress: bool) -> None:
        rank, _ = _world()
        self.plan = plan
        self.steps = Steps(plan.out_dir / ".steps", plan.key, write=rank == 0)
        self.cache = SegmentCache()
        self.calls = iter(range(1 << 30))
        self.bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            total = len(plan.models) + (0 if "untrained" in plan.not_run else 1) + len(plan.randomized)
            self.bar = tqdm(total=total, desc="assessment", unit="model")

    def counted(self, value: Any) -> Any:
        if self.bar is not None:
            self.bar.update()
        return value

    def explainer(self, folder: ModelFolder, x: torch.Tensor) -> _Explainer:
        return _Explainer(self.plan, folder, x, self.cache, self.calls)

    def classes(self, probs: torch.Tensor, folder: ModelFolder) -> torch.Tensor:
        """The classes explained: each model's own finding class (its model.json says which), or its prediction."""
        if self.plan.settings.explain_class == "finding":
            return torch.full((probs.shape[0],), folder.finding_class, dtype=torch.long)
        return probs.argmax(1)

    def model(self, folder: ModelFolder, net: torch.nn.Module) -> dict:
        x = folder.to_input(self.plan.cohort.images)
        probs = torch.softmax(predict(net, x).double(), 1).cpu()
        targets = self.classes(probs, folder)
        maps = self.explainer(folder, x)(net, targets.to(self.plan.cohort.images.device))
        return {"maps": maps, "probs": probs, "targets": targets}

    def untrained(self) -> torch.nn.Module:
        torch.manual_seed(self.plan.settings.seed)
        return self.plan.models[0].folder.build().to(self.plan.device).eval()

    def curve(self, i: int, trained: dict) -> RandomizationCurve:
        plan, s, state = self.plan, self.plan.settings, self.plan.models[i]
        folder = state.folder
        net = folder.load(state.replicate, plan.device)
        x = folder.to_input(plan.cohort.images)
        c = randomization_curves(
            net, folder.randomization_blocks(net), x, plan.methods, preset=s.preset, seed=s.seed,
            data_range=s.ssim_data_range, verdict_block=folder.verdict_block(net),
            pairs_per_image=s.pairs_per_image, segment_cache=self.cache, explain_fn=self.explainer(folder, x),
            init_seed=replicate_seed(s.seed, state.sha256),  # each replicate its own random weights
            full_cascade=s.full_cascade,  # default: stop where the paper's cascade stopped
            examples=[plan.cohort.example], progress=self.bar is not None,
            target=s.target_rule,  # explaining the finding class: every state explains it, whatever it predicts
            trained_maps=trained["maps"], trained_targets=trained["targets"].to(x.device))
        c.examples = {k: v[:, 0] for k, v in c.examples.items()}
        return c


def compute_maps(plan: Plan, progress: bool = True) -> Maps:
    """All maps and outputs, resumable step by step (see the module docstring)."""
    run = _Run(plan, progress)
    steps = run.steps
    runs = [run.counted(steps.run(f"maps_{i}", lambda m=m: run.model(m.folder, m.folder.load(m.replicate,
                                                                                                plan.device))))
            for i, m in enumerate(plan.models)]
    untrained = (None if "untrained" in plan.not_run else
                 run.counted(steps.run("maps_untrained", lambda: run.model(plan.models[0].folder, run.untrained()))))
    locs = [steps.run(f"localizer_{i}", lambda m=m: _unet_output(m, plan.cohort.images).cpu())
            for i, m in enumerate(plan.localizers)]
    rand = [RandomizationCurve.from_state(run.counted(steps.run(f"randomization_{i}",
                                                                  lambda i=i: run.curve(i, runs[i]).to_state())))
            for i in plan.randomized]
    if run.bar is not None:
        run.bar.close()
    return Maps(trained=[r["maps"] for r in runs], probs=[r["probs"] for r in runs],
                targets=[r["targets"] for r in runs], untrained=untrained["maps"] if untrained else None,
                localizers=locs, randomization=rand)


# ---------------------------------------------------------------------------------------------------
# Scores


@dataclass(kw_only=True)
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
    s = plan.settings
    ssim_v = {m: v.numpy() for m, v in map_agreement(maps_a, maps_b, s.ssim_data_range).items()}
    n = len(plan.ids)
    chance = {m: per_image_chance(random_pair_ssim(maps_a[m], s.pairs_per_image, data_range=s.ssim_data_range,
                                                   seed=s.seed,
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
    return (_recipe_deviations(plan) + _volume_deviations(plan) + _randomization_deviations(plan)
            + _model_deviations(plan) + _data_deviations(plan))


def _is_volume(plan: Plan) -> bool:
    return len(plan.data["grid"]) == 3


def _recipe_deviations(plan: Plan) -> list[str]:
    """The saliency recipe, the image size and Grad-CAM grid, the metrics' settings."""
    s, f, out = plan.settings, plan.facts, []
    recipe = get_recipe(s.preset, **s.overrides)
    if s.preset != "paper" or s.overrides:
        out.append(f"Saliency recipe '{s.preset}'" + (f" with overrides {s.overrides}" if s.overrides else "")
                   + ": fewer integration steps / noise samples than the paper's; a demonstration, not its numbers.")
    if _is_volume(plan):
        pass  # the grid, Grad-CAM's and XRAI's volume forms: _volume_deviations
    elif tuple(plan.data["grid"]) != (PAPER["image_size"], PAPER["image_size"]):
        h, w = plan.data["grid"]
        grids = "; ".join(f"{name} {g[0]} x {g[1]}" for name, g in f["cam_grids"].items() if g)
        out.append(f"Images at {h if h == w else f'{h} x {w}'} px; the paper used 320 px"
                   + (f". Grad-CAM grid at this size: {grids} (InceptionV3 at 320 px: 8 x 8)" if grids else "") + ".")
    if recipe.cam_resize != "tf1_legacy" and not _is_volume(plan):
        out.append("Grad-CAM upsampled with half-pixel centres; the paper's TF1 code used the legacy resize "
                   "(about half a feature cell up and left).")
    if s.ssim_data_range != PAPER["data_range"]:
        out.append(f"SSIM data_range {s.ssim_data_range}; the paper's scikit-image silently used 2.0 for float maps.")
    if len(plan.localizers) >= 2:
        out.append(f"Localization-network agreement SSIM on their [0, 1] probability maps with data_range "
                   f"{s.ssim_data_range}; the paper's U-Net maps were 8-bit PNGs (scikit-image's dtype range, 255) and "
                   "its RetinaNet maps min-max normalized floats (2.0).")
    out.append("SmoothGrad / SmoothGrad-IG noise is drawn per (image, model weights, seed): reproducible; "
               "the paper drew fresh noise per call. Either way no two models share noise.")
    out.append("XRAI maps: absolute value before the paper's 99th-percentile clip (the paper's own grayscale "
               "helper crashes on XRAI's 2-D output, so its exact post-processing is unknown).")
    return out


def _volume_deviations(plan: Plan) -> list[str]:
    """Volumes: the study itself (3-D CT, not the paper's 2-D radiographs), the grid and window, Grad-CAM's and
    XRAI's volume forms, the 3-D networks, the metrics on voxels, synthetic CT. Nothing for 2-D images."""
    if not _is_volume(plan):
        return []
    s, f, d = plan.settings, plan.facts, plan.data
    out = []
    size = " x ".join(str(n) for n in d["grid"])
    spacing = f" at {' x '.join(f'{v:g}' for v in d['spacing_mm'])} mm (z, y, x)" if d.get("spacing_mm") else ""
    window = f", CT windowed to {d['window_hu']} HU (model.json's input.window_hu)" if d.get("window_hu") else ""
    grids = "; ".join(f"{name} {' x '.join(str(n) for n in g)}" for name, g in f["cam_grids"].items() if g)
    out.append(f"Volumes of {size} voxels{spacing}{window}; the paper's study was 2-D chest radiographs at 320 px"
               + (f". Grad-CAM grid at this size: {grids} (InceptionV3 at 320 px: 8 x 8)" if grids else "") + ".")
    from saliency_trust.saliency.explain import volume_deviations

    out += volume_deviations(get_recipe(s.preset, **s.overrides), plan.methods)
    nets = "; ".join(f"{name} ({', '.join(f'{k} {v}' for k, v in spec.items() if k != '_target_')})"
                     if isinstance(spec, dict) else str(spec) for name, spec in f.get("networks", {}).items())
    out.append(f"3-D networks: {nets}; the paper's classifiers (InceptionV3, DenseNet121) were 2-D.")
    out.append("On volumes SSIM uses a 7 x 7 x 7 uniform window (scikit-image's default on 3-D arrays), AUPRC ranks "
               "every voxel and the average-mask prior is per voxel; the paper's were per pixel with a 7 x 7 window.")
    if d.get("synthetic"):
        out.append(f"Assessed on {d.get('generator') or 'synthetic'} volumes: generated chest CT whose only class "
                   "signal is the lesion (voxel masks exact); the paper assessed real radiographs (RSNA pneumonia, "
                   "SIIM-ACR pneumothorax).")
    return out


def _randomization_deviations(plan: Plan) -> list[str]:
    """The randomization scheme, the replicates and the classes explained."""
    s, out = plan.settings, []
    if "randomization" not in plan.not_run:
        out.append("Randomization re-initializes each block as freshly constructed PyTorch layers, each replicate "
                   "with its own seed; the paper did not state its scheme.")
        if len(plan.randomized) != PAPER["randomized_replicates"]:
            out.append(f"{len(plan.randomized)} randomized replicate(s); the paper averaged the cascading "
                       "randomization curves of 3 InceptionV3 replicates (mean +- SD).")
    if s.own_target == "trained":
        out.append("Randomized models explain the trained model's class; the paper's pipeline explained each "
                   "model's own prediction.")
    if s.explain_class == "finding":
        out.append("Maps explain each model's finding (lesion) class; the paper explained the predicted class.")
    return out


def _model_deviations(plan: Plan) -> list[str]:
    """The architectures, their input scales and IG baselines, pretraining, the localization networks."""
    f, out = plan.facts, []
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
    return out


def _data_deviations(plan: Plan) -> list[str]:
    """Methods left out or caveated, baselines not run, the images assessed, the statistics, the prior."""
    f, out = plan.facts, []
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


@dataclass
class _Agreements:
    """Repeatability and reproducibility SSIM per method and image, their chance levels and undefined counts,
    and the localization networks' own agreement (each empty where the criterion has no pair)."""

    repeat: dict = field(default_factory=dict)
    repeat_chance: dict = field(default_factory=dict)
    repeat_undefined: dict = field(default_factory=dict)
    reprod: dict = field(default_factory=dict)
    reprod_chance: dict = field(default_factory=dict)
    reprod_undefined: dict = field(default_factory=dict)
    localizers: np.ndarray | None = None


def _agreements(plan: Plan, maps: Maps) -> _Agreements:
    out = _Agreements()
    roles = plan.roles
    if roles.replicate_pair:
        a, b = roles.replicate_pair
        out.repeat, out.repeat_chance, out.repeat_undefined = _agreement(maps.trained[a], maps.trained[b], plan)
    if roles.second_arch is not None:
        out.reprod, out.reprod_chance, out.reprod_undefined = _agreement(maps.trained[0],
                                                                         maps.trained[roles.second_arch], plan)
    if len(maps.localizers) >= 2:
        out.localizers = output_agreement(maps.localizers[0], maps.localizers[1],
                                          plan.settings.ssim_data_range).numpy()
    return out


def _utility(plan: Plan, maps: Maps) -> tuple[dict, dict, dict, dict | None]:
    """AUPRC per method and image of the primary model's maps, the untrained network's, the prior's and the
    first localization network's."""
    methods, masks, n = plan.methods, plan.cohort.masks.cpu(), len(plan.ids)
    util = {m: utility_scores(maps.trained[0][m], masks) for m in methods}
    if maps.untrained is not None:
        untrained = {m: utility_scores(maps.untrained[m], masks) for m in methods}
    else:  # not run (a TorchScript model has no untrained form): undefined, with the reason in the baselines
        untrained = {m: {"auprc": torch.full((n,), torch.nan, dtype=torch.float64), "constant_map": 0}
                     for m in methods}
    prior = plan.cohort.prior.cpu()
    prior_maps = prior.expand_as(masks).contiguous() if prior.ndim == masks.ndim - 1 else prior
    return util, untrained, utility_scores(prior_maps, masks), (utility_scores(maps.localizers[0], masks)
                                                               if maps.localizers else None)


def _randomization(plan: Plan, curves: list[RandomizationCurve], m: str) -> tuple[Verdict, dict]:
    """Method ``m``'s randomization verdict over the replicates, and its per-image values (replicates averaged)."""
    n = len(plan.ids)
    # [replicates, images]: the verdict averages replicates per image (images are the unit, n = images).
    final = np.stack([c.ssim[m][c.verdict_index].numpy() for c in curves])
    chance = np.stack([per_image_chance(c.baseline[m], n).numpy() for c in curves])
    v = randomization_verdict(final, chance, curves[0].verdict_state, [c.baseline[m].numpy() for c in curves],
                              margin=plan.settings.equivalence_margin,
                              cascade_mean=np.array([c.cascade_mean[m] for c in curves], dtype=np.float64))
    per_image = {"ssim": _nanmean0(final), "chance": _nanmean0(chance),
                 "spearman": _nanmean0(np.stack([c.spearman[m][c.verdict_index].numpy() for c in curves]))}
    return v, per_image


def _curve_record(plan: Plan, c: RandomizationCurve, i: int) -> dict:
    """What ``results.json`` says of one randomized replicate's cascade."""
    state, methods = plan.models[i], plan.methods
    return {
        "model": state.path, "replicate": state.replicate,
        "init_seed": replicate_seed(plan.settings.seed, state.sha256),
        "states": c.states, "verdict_state": c.verdict_state,
        "verdict_state_source": plan.facts["verdict_block_source"].get(state.arch),
        "cascade_mean": {m: c.cascade_mean[m] for m in methods},
        "beyond_paper": c.states[c.verdict_index + 1 :], "class_changed": c.class_changed,
        "target": plan.settings.target_rule,
        "ssim": {m: [summarize(row.numpy()) for row in c.ssim[m]] for m in methods},
        "ssim_undefined": {m: list(c.undefined[m]) for m in methods},
        "spearman": {m: [summarize(row.numpy()) for row in c.spearman[m]] for m in methods},
        "spearman_undefined": {m: list(c.spearman_undefined[m]) for m in methods},
        "baseline": {m: summarize(c.baseline[m].numpy()) for m in methods}}


def _provenance(plan: Plan, seconds: float) -> dict:
    _, world = _world()
    dev, s = plan.device, plan.settings
    return {"versions": versions(), "config": plan.config, "device": str(dev), "processes": world,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "recipe": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in get_recipe(s.preset, **s.overrides).__dict__.items()},
            "seconds": round(seconds, 1)}


def score(plan: Plan, maps: Maps, seconds: float = 0.0) -> tuple[Results, Scores]:
    """Per-image values, summaries and verdicts from the maps (no model runs here: a test can fabricate both)."""
    methods = plan.methods
    util, util_untrained, util_prior, util_loc = _utility(plan, maps)
    ag = _agreements(plan, maps)
    threshold = plan.settings.agreement_threshold
    uv = utility_verdicts({m: util[m]["auprc"].numpy() for m in methods}, util_prior["auprc"].numpy(),
                          util_loc["auprc"].numpy() if util_loc else None,
                          undefined={m: util[m]["constant_map"] + util[m]["empty_mask"] for m in methods})
    rv = agreement_verdicts(ag.repeat, ag.repeat_chance, ag.localizers, "repeatability", threshold=threshold,
                            undefined=ag.repeat_undefined) if ag.repeat else {}
    pv = agreement_verdicts(ag.reprod, ag.reprod_chance, ag.localizers, "reproducibility", threshold=threshold,
                            undefined=ag.reprod_undefined) if ag.reprod else {}
    never = not_run(plan.not_run.get("randomization", "cascading randomization was not run"))
    verdicts: dict[str, dict[str, Verdict]] = {m: {} for m in methods}
    state: dict[str, dict[str, np.ndarray]] = {"ssim": {}, "spearman": {}, "chance": {}}
    for m in methods:
        verdicts[m]["utility"] = uv[m]
        verdicts[m]["randomization"] = never
        if maps.randomization:
            verdicts[m]["randomization"], per_image = _randomization(plan, maps.randomization, m)
            for k, v in per_image.items():
                state[k][m] = v
        verdicts[m]["repeatability"] = rv.get(m) or not_run("needs two replicates of one architecture")
        verdicts[m]["reproducibility"] = pv.get(m) or not_run("needs a second architecture")
    used = {c: [verdicts[m][c].n for m in methods] for c in CRITERIA}
    data = {**plan.data, "images_used": {c: {"min": min(v), "max": max(v), "unit": "images"}
                                         for c, v in used.items()}}

    def agreement_summary(values: dict, undefined: dict, chance: dict) -> dict:
        return {m: _summary(v, undefined=undefined[m], chance_mean=summarize(chance[m])["mean"])
                for m, v in values.items()}

    results = Results(
        methods=methods, data=data,
        utility={m: _summary(util[m]["auprc"].numpy(), empty_mask=util[m]["empty_mask"],
                             blank_map=util[m]["constant_map"]) for m in methods},
        randomization=[_curve_record(plan, c, i) for c, i in zip(maps.randomization, plan.randomized, strict=True)],
        repeatability=agreement_summary(ag.repeat, ag.repeat_undefined, ag.repeat_chance),
        reproducibility=agreement_summary(ag.reprod, ag.reprod_undefined, ag.reprod_chance),
        baselines={"utility_prior": summarize(util_prior["auprc"].numpy()),
                   "not_run": dict(plan.not_run),
                   "utility_localization": summarize(util_loc["auprc"].numpy()) if util_loc else None,
                   "utility_untrained": {m: _summary(util_untrained[m]["auprc"].numpy(),
                                                     blank_map=util_untrained[m]["constant_map"]) for m in methods},
                   "agreement_localization": summarize(ag.localizers) if ag.localizers is not None else None,
                   "reference_line": threshold},
        verdicts=verdicts, provenance=_provenance(plan, seconds), deviations=deviations(plan))
    scores = Scores(
        auprc={m: util[m]["auprc"].numpy() for m in methods},
        auprc_untrained={m: util_untrained[m]["auprc"].numpy() for m in methods},
        auprc_prior=util_prior["auprc"].numpy(), auprc_localization=util_loc["auprc"].numpy() if util_loc else None,
        blank={m: blank(maps.trained[0][m]).numpy() for m in methods}, repeat=ag.repeat,
        repeat_chance=ag.repeat_chance, reprod=ag.reprod, reprod_chance=ag.reprod_chance,
        loc_agreement=ag.localizers, state_ssim=state["ssim"], state_spearman=state["spearman"],
        state_chance=state["chance"])
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


def write_outputs(plan: Plan, maps: Maps, scores: Scores, results: Results, *, report: bool = True) -> None:
    """``results.json``, ``per_image.csv`` and (optionally) the report, each atomically."""
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "per_image.csv", per_image_csv(plan, maps, scores, results).encode())
    if report:
        from saliency_trust.report import ReportInputs, write_report

        e, methods, cohort = plan.cohort.example, plan.methods, plan.cohort
        first = maps.randomization[0] if maps.randomization else None
        columns = {f"{m.arch} #{m.replicate}": maps.trained[i] for i, m in enumerate(plan.models)}
        inputs = ReportInputs(
            ids=plan.ids, images=cohort.images01, masks=cohort.masks.cpu().numpy().astype(bool), methods=methods,
            spacing=cohort.spacing,
            auprc=scores.auprc, auprc_untrained=scores.auprc_untrained, auprc_prior=scores.auprc_prior,
            auprc_localization=scores.auprc_localization,
            trained_maps={m: maps.trained[0][m].numpy() for m in methods},
            states=first.states if first else [], verdict_state=first.verdict_state if first else None,
            state_ssim={m: first.ssim[m].numpy() for m in methods} if first else {},
            # The verdict's reference: the mean over the randomized replicates of each one's random-pair SSIM.
            state_baseline={m: float(np.nanmean([r.baseline[m].nanmean().item() for r in maps.randomization]))
                            for m in methods} if first else {},
            state_examples={m: first.examples[m].numpy() for m in methods} if first else {},
            repeat=scores.repeat, reprod=scores.reprod, agreement_baseline=scores.loc_agreement,
            repeat_chance=scores.repeat_chance, reprod_chance=scores.reprod_chance,
            agreement_examples={name: {m: mp[m][e].numpy() for m in methods} for name, mp in columns.items()},
            threshold=plan.settings.agreement_threshold, example=e,
            state_replicates={m: np.stack([_nanmean0(r.ssim[m].numpy().T) for r in maps.randomization])
                              for m in methods} if first else {})
        path = write_report(out, results, inputs)
        log.info("report: %s", path)
    # Last: a results.json on disk means everything beside it is complete.
    atomic_write_bytes(out / "results.json", results.to_json().encode())


def run_assessment(settings: AssessmentSettings | str | Path, *args: Any, **options: Any) -> Results:
    """Score every method on the four criteria; returns the :class:`Results` written to ``results.json``.

    ``settings`` is an :class:`~saliency_trust.settings.AssessmentSettings` (what ``configs/trust.json``
    builds; every option and its default is documented there), or the older call form
    ``run_assessment(dataset_dir, output_dir, classifiers, localizers, **options)``. Under ``torchrun``
    the map computations are sharded across processes by blocks of ``block`` images and only rank 0
    writes.
    """
    t0 = time.time()
    s = _settings(settings, args, options)
    plan = plan_assessment(s)
    if _world()[0] == 0:
        for folder in (plan.out_dir, plan.out_dir / ".steps", plan.out_dir / "figures"):
            remove_stale_temporaries(folder)  # left by a run that was killed mid-write
    maps = compute_maps(plan, progress=s.progress)
    results, scores = score(plan, maps, seconds=time.time() - t0)
    if _world()[0] == 0:
        write_outputs(plan, maps, scores, results, report=s.report)
        for line in results.usage_lines():
            log.info("%s", line)
    return results


__all__ = ["CRITERIA", "CSV_COLUMNS", "EXPLAIN_CLASSES", "FINDING_CLASS", "AssessmentSettings", "Cohort", "Maps",
           "ModelState", "Plan", "Roles", "Scores",
           "compute_maps", "deviations", "per_image_csv", "plan_assessment", "run_assessment", "score",
           "sharded", "write_outputs"]
