"""SynthCT: seeded chest CT volumes whose only label signal is the lesion, written as DICOM series and NIfTI.

How the generator guarantees that the lesion is the only class signal
---------------------------------------------------------------------
Every case ``i`` draws from independent random streams, each seeded from ``(seed, task, i, stream name)``:

* ``anatomy``  -- body habitus, subcutaneous fat, ribs and spine, lungs (with texture and a dependent-lung
  gradient), heart and mediastinum, trachea and main bronchi, branching pulmonary vessels;
* ``scanner``  -- a calibration offset and the noise field;
* ``label``    -- whether the case is positive (balanced, independent of the rest);
* ``lesion``   -- number, place, size, shape and density of the nodules or of the consolidation;
* ``shortcut`` -- whether a training-split positive gets the marker (at ``shortcut_rate``).

Voxels are composed in HU with fixed tissue values and no per-volume normalization, so a negative and the
positive with the same index are identical except in the voxels a lesion touches: each lesion has a
partial-volume occupancy that is exactly zero beyond a half-voxel rim, and its mask is every voxel where
that occupancy is non-zero (``render_ct(..., positive=True)`` minus ``positive=False`` is zero outside
``mask``; ``tests/data/test_synthct.py`` checks this voxel by voxel). Lesions lie inside the lungs.

``shortcut=True`` adds a dense 3-D "R" skin marker (2000 HU, a metal side marker) in the air at the
anterior right corner of the middle slices of training-split positives only, never touching the body
or the lesion: a model trained on that split can score by the marker, the known-bad case for the trust tests.

Geometry: axial slices, LPS, identity direction; a 400 mm field of view across (x, y) and 256 mm along z
whatever the ``size``, so the spacing is (256 / D, 400 / H, 400 / W) mm and the chest always fits.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from saliency_trust.data.dicom import write_ct_series
from saliency_trust.data.imageio import atomic_write_bytes
from saliency_trust.data.synth import stable_uid
from saliency_trust.data.volumes import LABELS, VolumeGeometry, write_volume

TASKS = ("nodule", "consolidation")
FORMATS = ("dicom", "nifti")
SPLITS = ("train", "val", "test")
DEFAULT_SIZE = (32, 64, 64)
#: Field of view across the slice (x and y) and scan length along z, mm.
FIELD_OF_VIEW_MM = 400.0
SCAN_LENGTH_MM = 256.0
#: Tissue values in HU.
AIR, FAT, SOFT_TISSUE, BONE, LUNG, VESSEL = -1000.0, -100.0, 40.0, 700.0, -850.0, 40.0
NODULE_HU, MARKER_HU = 30.0, 2000.0
#: The stored range of a 12-bit CT, HU; values are stored as int16 with slope 1 and intercept -1024.
HU_RANGE = (-1024, 3071)
RESCALE = (1.0, -1024.0)
#: Codes of ``CTCase.tissue`` (where each tissue covers at least half the voxel, before any lesion).
TISSUES = ("air", "fat", "soft_tissue", "bone", "lung", "vessel", "airway")


@dataclass
class CTCase:
    """One rendered volume with its truth."""

    index: int
    task: str
    label: int
    split: str
    hu: np.ndarray  # int16 [D, H, W], HU
    geometry: VolumeGeometry
    lesion_masks: list[np.ndarray] = field(default_factory=list)  # bool [D, H, W]: every voxel each lesion touched
    shortcut: bool = False
    tissue: np.ndarray | None = None  # uint8 [D, H, W], codes of TISSUES, the anatomy without lesion or marker
    lungs: np.ndarray | None = None  # bool [D, H, W]: voxels with any lung in them

    @property
    def id(self) -> str:
        """The case's name in every layout (file and folder names, CSV ids)."""
        return f"{self.task}_{self.index:05d}"

    @property
    def mask(self) -> np.ndarray:
        """Union of the lesion masks (all False for a negative)."""
        out = np.zeros(self.hu.shape, dtype=bool)
        for m in self.lesion_masks:
            out |= m
        return out


def _rng(seed: int, task: str, index: int, stream: str) -> np.random.Generator:
    digest = hashlib.sha256(f"synthct/{seed}/{task}/{index}/{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def split_of(seed: int, index: int) -> str:
    """Case ``index``'s split (70/15/15), from the seed and index only: the same for every task and size."""
    u = _rng(seed, "split", index, "split").random()
    return "train" if u < 0.7 else ("val" if u < 0.85 else "test")


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # z, y, x
    z: np.ndarray  # [D, 1, 1] mm
    y: np.ndarray  # [1, H, 1]
    x: np.ndarray  # [1, 1, W]
    edge: float  # width of partial-volume ramps, mm

    @property
    def geometry(self) -> VolumeGeometry:
        return VolumeGeometry(self.spacing, (float(self.x.flat[0]), float(self.y.flat[0]), float(self.z.flat[0])))

    def index_of(self, point_mm: np.ndarray) -> np.ndarray:
        """Fractional (k, j, i) of a (z, y, x) point in mm."""
        first = np.array([self.z.flat[0], self.y.flat[0], self.x.flat[0]])
        return (np.asarray(point_mm) - first) / np.asarray(self.spacing)


def _grid(size: tuple[int, int, int]) -> _Grid:
    d, h, w = size
    spacing = (SCAN_LENGTH_MM / d, FIELD_OF_VIEW_MM / h, FIELD_OF_VIEW_MM / w)
    z = ((np.arange(d) + 0.5) * spacing[0] - SCAN_LENGTH_MM / 2)[:, None, None]
    y = ((np.arange(h) + 0.5) * spacing[1] - FIELD_OF_VIEW_MM / 2)[None, :, None]
    x = ((np.arange(w) + 0.5) * spacing[2] - FIELD_OF_VIEW_MM / 2)[None, None, :]
    return _Grid(size, spacing, z, y, x, edge=max(spacing))


def _ramp(signed_mm: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (positive inside): 0 beyond ``width / 2`` outside, exactly."""
    return np.clip(signed_mm / width + 0.5, 0.0, 1.0)


def _sd(offsets: Sequence[np.ndarray], axes: Sequence, p: float = 2.0) -> np.ndarray:
    """Signed distance (mm, first order) to a superellipsoid surface ``sum |d/a|^p = 1``, positive inside."""
    terms = [np.abs(d / a) for d, a in zip(offsets, axes, strict=True)]
    r = sum(t**p for t in terms) ** (1.0 / p)
    grad = np.sqrt(sum((t ** (p - 1) / a) ** 2 for t, a in zip(terms, axes, strict=True)))
    grad = grad * np.maximum(r, 1e-9) ** (1.0 - p)
    return (1.0 - r) / np.maximum(grad, 1e-9)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return f / (f.std() + 1e-12)


def _capsule(g: _Grid, p0: np.ndarray, p1: np.ndarray, radius: float, out: np.ndarray) -> None:
    """Union (max) into ``out`` of a tube of ``radius`` mm from ``p0`` to ``p1`` ((z, y, x) mm), in its box only."""
    reach = radius + g.edge
    lo = np.floor(g.index_of(np.minimum(p0, p1) - reach)).astype(int)
    hi = np.ceil(g.index_of(np.maximum(p0, p1) + reach)).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, g.shape)
    if (hi <= lo).any():
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    pz, py, px = g.z[box[0]], g.y[:, box[1]], g.x[:, :, box[2]]
    d = p1 - p0
    t = np.clip(((pz - p0[0]) * d[0] + (py - p0[1]) * d[1] + (px - p0[2]) * d[2]) / max(d @ d, 1e-9), 0, 1)
    dist = np.sqrt((pz - p0[0] - t * d[0]) ** 2 + (py - p0[1] - t * d[1]) ** 2 + (px - p0[2] - t * d[2]) ** 2)
    np.maximum(out[box], _ramp(radius - dist, g.edge), out=out[box])


@dataclass
class _Anatomy:
    hu: np.ndarray  # float64, before lesion, marker and noise
    lungs: list[np.ndarray]  # occupancy of the right (x < 0) and left lung
    lung: np.ndarray  # occupancy of both
    tissue: np.ndarray  # uint8 codes of TISSUES


def _blend(hu: np.ndarray, value, occupancy: np.ndarray) -> np.ndarray:
    return hu + occupancy * (value - hu)


def _anatomy(g: _Grid, rng: np.random.Generator) -> _Anatomy:
    x, y, z, e = g.x, g.y, g.z, g.edge
    cx, cy = rng.uniform(-8, 8), rng.uniform(-6, 6)
    a, b = rng.uniform(140, 165), rng.uniform(100, 118)
    taper = 1.0 - 0.12 * np.clip((z - 40.0) / 90.0, 0, 1)  # narrower towards the neck
    fat = rng.uniform(8, 18)
    dx, dy = x - cx, y - cy
    body = _ramp(_sd([dx, dy], [a * taper, b * taper], 2.6), e)
    muscle = _ramp(_sd([dx, dy], [(a - fat) * taper, (b - fat) * taper], 2.6), e)
    hu = AIR + body * (FAT - AIR) + muscle * (SOFT_TISSUE - FAT)
    hu = hu + 6.0 * _smooth_noise(rng, g.shape, 1.0) * muscle
    tissue = np.where(body >= 0.5, 1, 0) + (muscle >= 0.5)

    # Ribs: a bony ring inside the muscle, cut into bands that slope down towards the front; and the spine.
    a_in, b_in = a - fat - 18, b - fat - 18
    ring = _ramp(3.5 - np.abs(_sd([dx, dy], [(a_in + 8) * taper, (b_in + 8) * taper], 2.6)), e)
    period, phase = rng.uniform(24, 30), rng.uniform(0, 2 * np.pi)
    bands = 0.5 + 0.5 * np.cos(2 * np.pi * (z + 25.0 * dy / b) / period + phase)
    z_apex = rng.uniform(105, 125)
    z_base = rng.uniform(-100, -80, size=2)  # top of each diaphragm dome
    thorax_z = _ramp(z_apex + 15 - z, e) * _ramp(z - z_base.min() + 45, e)
    sternum_gap = 1 - _ramp(22 - np.abs(dx), e) * (dy < 0)
    ribs = ring * np.clip((bands - 0.45) / 0.2, 0, 1) * thorax_z * sternum_gap
    spine_r = rng.uniform(15, 19)
    spine_y = cy + b_in - 6
    spine = _ramp(_sd([dx, y - spine_y], [spine_r, spine_r * 0.9]), e) * body
    bone = np.maximum(ribs, spine)
    hu = _blend(hu, BONE, bone)
    tissue[bone >= 0.5] = 3

    # Lungs: inside the ribs, above a domed diaphragm, apart from the mediastinum, heart and spine.
    inner = _ramp(_sd([dx, dy], [a_in * taper, b_in * taper], 2.6), e)
    w_med = rng.uniform(18, 26)
    mediastinum = _ramp(w_med - np.abs(dx), e)
    hz = z_base.mean() + 40
    heart = _ramp(_sd([dx - rng.uniform(15, 30), dy + 0.25 * b_in, z - hz],
                      [rng.uniform(50, 62), rng.uniform(42, 52), rng.uniform(45, 55)]), e)
    spine_zone = _ramp(_sd([dx, y - spine_y], [spine_r + 10, spine_r + 10]), e)
    keep = inner * (1 - mediastinum) * (1 - heart) * (1 - spine_zone)
    lungs = []
    for side, sgn in enumerate((-1.0, 1.0)):
        lx, ly, ax, ay = sgn * (w_med + 0.48 * a_in), 0.05 * b_in, 0.55 * a_in, 1.0 * b_in
        top = z_apex - 60.0
        shrink = np.sqrt(np.clip(1 - np.clip((z - top) / 60.0, 0, None) ** 2, 1e-4, 1))
        shape = _ramp(_sd([dx - lx, dy - ly], [ax * shrink, ay * shrink]), e)
        dome = z_base[side] - 30 * ((dx - lx) / ax) ** 2 - 15 * ((dy - ly) / ay) ** 2
        lungs.append(shape * _ramp(z - dome, e) * _ramp(z_apex - z, e) * keep)
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    texture = _smooth_noise(rng, g.shape, 0.8)
    lung_hu = LUNG + 25.0 * texture + 35.0 * np.clip(dy / b_in, -1, 1)  # dependent (posterior) lung is denser
    hu = _blend(hu, lung_hu, lung)
    tissue[lung >= 0.5] = 4

    # Pulmonary vessels: a branching tree from each hilum, seen only inside the lungs.
    vessels = np.zeros(g.shape)
    hilum_z = z_base.mean() + 0.5 * (z_apex - z_base.mean())
    hila = []
    for sgn in (-1.0, 1.0):
        hilum = np.array([hilum_z, cy, cx + sgn * (w_med + 10)])
        hila.append(hilum)
        stack = [(hilum, _unit(np.array([uz, rng.normal(0, 0.3), sgn])), 4.5, rng.uniform(30, 40), 0)
                 for uz in (0.9, 0.1, -0.8)]
        while stack:
            p0, d, r, length, gen = stack.pop()
            p1 = p0 + d * length
            _capsule(g, p0, p1, r, vessels)
            if gen < 3:
                stack += [(p1, _unit(d + rng.normal(0, 0.6, 3)), r * 0.7, length * 0.8, gen + 1) for _ in range(2)]
    vessels *= lung
    hu = _blend(hu, VESSEL, vessels)
    tissue[vessels >= 0.5] = 5

    # Trachea down to the carina, main bronchi to the hila: air.
    airway = np.zeros(g.shape)
    rt = rng.uniform(8, 10)
    ty = cy + 0.1 * b_in
    carina = np.array([hilum_z + 25, ty, cx])
    _capsule(g, np.array([SCAN_LENGTH_MM, ty, cx]), carina, rt, airway)
    for hilum in hila:
        _capsule(g, carina, hilum, 0.65 * rt, airway)
    hu = _blend(hu, AIR, airway)
    tissue[airway >= 0.5] = 6
    return _Anatomy(hu=hu, lungs=lungs, lung=lung, tissue=tissue.astype(np.uint8))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _place(core: np.ndarray, g: _Grid, need_mm: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A random voxel centre (z, y, x) mm at least ``need_mm`` inside ``core``, or the deepest place and its depth."""
    depth = ndimage.distance_transform_edt(core, sampling=g.spacing)
    ok = depth >= need_mm
    if not ok.any():
        ok = depth >= depth.max()
    ks, js, is_ = np.nonzero(ok)
    n = int(rng.integers(len(ks)))
    k, j, i = int(ks[n]), int(js[n]), int(is_[n])
    return np.array([g.z.flat[k], g.y.flat[j], g.x.flat[i]]), float(depth[k, j, i])


def _nodules(anat: _Anatomy, g: _Grid, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Solid nodules (ellipsoids of ~30 HU) wholly inside the lungs: (occupancy, HU inside) per nodule."""
    core = anat.lung >= 0.999
    texture = _smooth_noise(rng, g.shape, 1.0)
    out = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))):
        axes = rng.uniform(9, 15) * rng.uniform(0.85, 1.15, size=3)
        centre, depth = _place(core, g, axes.max() + g.edge, rng)
        axes = np.minimum(axes, max(depth - g.edge, 0.5 * min(g.spacing)))  # a small lung: a smaller nodule
        theta = rng.uniform(0, np.pi)
        dx, dy = g.x - centre[2], g.y - centre[1]
        u, v = np.cos(theta) * dx + np.sin(theta) * dy, -np.sin(theta) * dx + np.cos(theta) * dy
        occupancy = _ramp(_sd([g.z - centre[0], v, u], axes), g.edge)
        out.append((occupancy, NODULE_HU + 12.0 * texture))
    return out


def _consolidation(anat: _Anatomy, g: _Grid, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Airspace consolidation: an irregular region of one lung filled to soft-tissue density."""
    texture = _smooth_noise(rng, g.shape, 1.0)
    out = []
    for _ in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
        side = int(rng.integers(2))
        centre, _ = _place(anat.lungs[side] >= 0.999, g, 10.0, rng)
        axes = rng.uniform(22, 40, size=3)
        bumps = _smooth_noise(rng, g.shape, 2.0)
        sd = _sd([g.z - centre[0], g.y - centre[1], g.x - centre[2]], axes) + 0.25 * axes.min() * bumps
        occupancy = _ramp(sd, g.edge) * anat.lungs[side]
        out.append((occupancy, rng.uniform(-10, 40) + 15.0 * texture))
    return out


def _marker(shape: tuple[int, int, int]) -> np.ndarray:
    """A blocky 'R' (a radiographer's side marker) in the top-left (anterior right) corner of the middle slices."""
    d, h, w = shape
    m = np.zeros(shape, dtype=bool)
    s = max(min(h, w) // 16, 4)
    y0, x0 = max(h // 20, 1), max(w // 20, 1)
    glyph = np.array([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=bool)
    g = np.kron(glyph, np.ones((max(s // 4, 1), max(s // 4, 1)), dtype=bool))
    half = max(d // 8, 1)
    m[d // 2 - half : d // 2 + half, y0 : y0 + g.shape[0], x0 : x0 + g.shape[1]] = g
    return m


def _size(size: int | Sequence[int]) -> tuple[int, int, int]:
    t = (int(size),) * 3 if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(t) != 3:
        raise ValueError(f"size must be (D, H, W) or one int, got {size!r}")
    if t[0] < 8 or min(t[1:]) < 16:
        raise ValueError(f"size {t} is too small; SynthCT needs at least 8 slices of 16 x 16")
    if int(np.prod(t)) > 2**25:
        raise ValueError(f"size {t} is over 32 M voxels; SynthCT is meant to be small")
    return t  # type: ignore[return-value]


def render_ct(
    task: str,
    index: int,
    size: int | Sequence[int] = DEFAULT_SIZE,
    seed: int = 0,
    *,
    positive: bool | None = None,
    shortcut: bool = False,
    shortcut_rate: float = 1.0,
) -> CTCase:
    """Render volume ``index`` of a SynthCT set (``size`` (D, H, W), or one int for a cube);
    ``positive`` overrides the drawn label."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    g = _grid(_size(size))
    label = int(_rng(seed, task, index, "label").random() < 0.5) if positive is None else int(positive)
    split = split_of(seed, index)
    anat = _anatomy(g, _rng(seed, task, index, "anatomy"))
    hu = anat.hu.copy()
    masks: list[np.ndarray] = []
    if label:
        painter = _nodules if task == "nodule" else _consolidation
        for occupancy, inside in painter(anat, g, _rng(seed, task, index, "lesion")):
            hu = _blend(hu, inside, occupancy)
            masks.append(occupancy > 0)
    marked = bool(shortcut and split == "train" and label
                  and _rng(seed, task, index, "shortcut").random() < shortcut_rate)
    if marked:
        hu = np.where(_marker(g.shape), MARKER_HU, hu)
    scanner = _rng(seed, task, index, "scanner")
    offset, sigma = scanner.uniform(-4, 4), scanner.uniform(8, 20)
    noise = ndimage.gaussian_filter(scanner.standard_normal(g.shape), 0.6)
    hu = hu + offset + noise * (sigma / noise.std())
    stored = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    return CTCase(index, task, label, split, stored, g.geometry, masks, marked, anat.tissue, anat.lung > 0)


# ---------------------------------------------------------------------------------------------
# Writing


def generate_ct(
    out: str | Path,
    n: int,
    *,
    task: str = "nodule",
    size: int | Sequence[int] = DEFAULT_SIZE,
    seed: int = 0,
    shortcut: bool = False,
    shortcut_rate: float = 1.0,
    formats: Sequence[str] = FORMATS,
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``n`` SynthCT cases under ``out``, one dataset folder per format; returns ``{format: folder}``.

    ``out/nifti``: the Medical Segmentation Decathlon layout (``imagesTr/<id>.nii.gz`` int16 HU,
    ``labelsTr/<id>.nii.gz`` uint8 lesion mask, all-zero for negatives, ``dataset.json``).
    ``out/dicom``: one CT series folder per case (``<id>/CT00001.dcm`` ..., HU = stored - 1024) and
    ``masks/<id>.nii.gz`` for positives, named in ``labels.csv``'s ``mask`` column.
    Each folder has ``labels.csv`` (``id,label`` [``,mask``]), ``split.csv`` (``id,split,label,shortcut``) and
    ``synthct.json`` (the settings). Every file and series is written atomically and the CSVs last, so a
    crash leaves no case that reads as whole.
    """
    from tqdm import tqdm

    size = _size(size)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"formats must be some of {FORMATS}, got {formats!r}")
    roots = {f: Path(out) / f for f in FORMATS if f in formats}
    rate = shortcut_rate if shortcut else 0.0
    split_rows, label_rows, mask_names = [], [], []
    for i in tqdm(range(n), desc=f"SynthCT {task}", disable=not progress):
        case = render_ct(task, i, size, seed, shortcut=shortcut, shortcut_rate=shortcut_rate)
        cid, geo, mask = case.id, case.geometry, case.mask
        if "nifti" in roots:
            write_volume(roots["nifti"] / "imagesTr" / f"{cid}.nii.gz", case.hu, geo)
            write_volume(roots["nifti"] / "labelsTr" / f"{cid}.nii.gz", mask.astype(np.uint8), geo)
        mask_name = ""
        if "dicom" in roots:
            def uid(*kind: object, i: int = i) -> str:
                return stable_uid("synthct", task, seed, "x".join(map(str, size)), rate, i, *kind)

            if case.label:
                mask_name = f"masks/{cid}.nii.gz"
                write_volume(roots["dicom"] / mask_name, mask.astype(np.uint8), geo)
            write_ct_series(roots["dicom"] / cid, case.hu, spacing=geo.spacing, origin=geo.origin,
                            direction=geo.direction, patient_id=f"synthct-{seed}-{i:05d}", study_uid=uid("study"),
                            series_uid=uid("series"), frame_of_reference_uid=uid("frame"),
                            sop_uids=[uid("sop", k) for k in range(size[0])], rescale=RESCALE,
                            description=f"SynthCT {task} #{i}")
        split_rows.append([cid, case.split, str(case.label), str(int(case.shortcut))])
        label_rows.append([cid, str(case.label)])
        mask_names.append(mask_name)

    meta = {"generator": "SynthCT", "task": task, "n": n, "size": list(size), "seed": seed, "shortcut": shortcut,
            "shortcut_rate": shortcut_rate, "spacing_mm": list(_grid(size).spacing), "axes": "z, y, x",
            "field_of_view_mm": FIELD_OF_VIEW_MM, "scan_length_mm": SCAN_LENGTH_MM, "rescale": list(RESCALE)}
    for fmt, root in roots.items():
        root.mkdir(parents=True, exist_ok=True)
        if fmt == "nifti":
            _write_json(root / "dataset.json", {
                "name": f"SynthCT-{task}", "description": f"SynthCT synthetic chest CT, {task} vs none",
                "reference": "SaliencyTrust SynthCT (synthetic)", "licence": "CC0-1.0", "release": "1.0",
                "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": task},
                "numTraining": n, "numTest": 0, "test": [],
                "training": [{"image": f"./imagesTr/{r[0]}.nii.gz", "label": f"./labelsTr/{r[0]}.nii.gz"}
                             for r in label_rows]})
            _write_csv(root / LABELS, ["id", "label"], label_rows)
        else:
            _write_csv(root / LABELS, ["id", "label", "mask"], [[*r, m] for r, m in zip(label_rows, mask_names,
                                                                                    strict=True)])
        _write_csv(root / "split.csv", ["id", "split", "label", "shortcut"], split_rows)
        _write_json(root / "synthct.json", {**meta, "format": fmt})
    return roots


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m saliency_trust.data.synthct --out DIR --task T --n N``."""
    p = argparse.ArgumentParser(prog="python -m saliency_trust.data.synthct", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (one dataset folder per format inside)")
    p.add_argument("--task", choices=TASKS, default="nodule")
    p.add_argument("--n", type=int, default=100, help="number of volumes")
    p.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SIZE), metavar=("D", "H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", action="store_true", help="mark training-split positives with a corner marker")
    p.add_argument("--shortcut-rate", type=float, default=1.0, help="fraction of training positives marked")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    a = p.parse_args(argv)
    roots = generate_ct(a.out, a.n, task=a.task, size=a.size, seed=a.seed, shortcut=a.shortcut,
                        shortcut_rate=a.shortcut_rate, formats=a.formats)
    for fmt, root in roots.items():
        print(f"wrote {a.n} {a.task} volumes as {fmt} to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
