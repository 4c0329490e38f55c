"""SynthCXR: seeded chest-radiograph-like images whose only label signal is the lesion.

How the generator guarantees that the lesion is the only class signal
---------------------------------------------------------------------
Every image ``i`` draws from four independent random streams, each seeded from
``(seed, task, i, stream name)``:

* ``anatomy``  -- pose, body habitus, lungs, heart, ribs, clavicles, lung markings;
* ``exposure`` -- gain, gamma, offset and the acquisition-noise field;
* ``label``    -- whether the image is positive (balanced, independent of the rest);
* ``lesion``   -- number, position, size and strength of the lesions.

The anatomy and exposure streams never see the label, so a negative image and the
positive image with the same index are identical except where the lesion was painted
(``render(..., positive=False)`` vs ``positive=True`` differ only inside the lesion's
support; ``tests/data/test_synth.py`` checks this pixel by pixel).  Intensities are mapped
to detector values with a fixed transfer curve (no per-image min-max), so a lesion cannot
shift the grey levels of the rest of the image either.

``--shortcut`` adds a bright corner marker to training-split positives only (at
``shortcut_rate``; negatives never get it).  A model trained on that split can reach a high
training AUC by looking at the corner: the known-bad case for the trust tests.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from saliency_trust.data.dicom import write_dicom
from saliency_trust.data.rle import encode_siim_rle

TASKS = ("opacity", "pneumothorax")
SPLITS = ("train", "val", "test")
#: Detector values are 12-bit (BitsStored 12) in a 16-bit container.
MAX_DN = 4095
#: Physical field of view across the image, mm (a 43 cm detector).
FIELD_OF_VIEW_MM = 430.0


@dataclass
class SynthCase:
    """One rendered image with its truth."""

    index: int
    label: int
    split: str
    pixels: np.ndarray  # uint16, H x W, detector values
    lesion_masks: list[np.ndarray] = field(default_factory=list)  # one bool mask per lesion
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h per lesion
    shortcut: bool = False
    support: np.ndarray | None = None  # every pixel the lesion painting touched

    def box_mask(self) -> np.ndarray:
        """Union of the lesion boxes, as the RSNA-layout labels describe them."""
        out = np.zeros(self.pixels.shape, dtype=bool)
        for x, y, w, h in self.boxes:
            out[y : y + h, x : x + w] = True
        return out

    @property
    def mask(self) -> np.ndarray:
        """Union of the lesion masks (all False for a negative)."""
        out = np.zeros(self.pixels.shape, dtype=bool)
        for m in self.lesion_masks:
            out |= m
        return out


def _rng(seed: int, task: str, index: int, stream: str) -> np.random.Generator:
    digest = hashlib.sha256(f"synthcxr/{seed}/{task}/{index}/{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _split_of(seed: int, index: int) -> str:
    u = _rng(seed, "split", index, "split").random()
    return "train" if u < 0.7 else ("val" if u < 0.85 else "test")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="reflect")
    return field_ / (field_.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class _Anatomy:
    attenuation: np.ndarray  # float, before lesions
    lungs: list[np.ndarray]  # soft masks in [0, 1], right lung (image left) then left lung
    markings: np.ndarray  # lung-marking texture already included in attenuation
    u: np.ndarray  # normalized coordinates of each pixel (after pose)
    v: np.ndarray


def _anatomy(size: int, rng: np.random.Generator) -> _Anatomy:
    px = 2.0 / size  # one pixel in normalized units
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x = (xx + 0.5) * px - 1.0
    y = (yy + 0.5) * px - 1.0
    # Pose jitter: small rotation, scale and shift of the patient on the detector.
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    scale = rng.uniform(0.93, 1.05)
    tx, ty = rng.uniform(-0.04, 0.04, size=2)
    c, s = np.cos(ang), np.sin(ang)
    u = (c * (x - tx) + s * (y - ty)) / scale
    v = (-s * (x - tx) + c * (y - ty)) / scale
    edge = 1.5 * px  # soft edges about a pixel and a half wide

    # Body: a superellipse of soft tissue, open at the bottom.
    bw = rng.uniform(0.80, 0.92)
    body_r = (np.abs(u / bw) ** 3 + np.abs((v - 0.25) / 1.25) ** 3) ** (1 / 3)
    body = _sigmoid((1.0 - body_r) / (edge * 2))
    # Shoulders and neck soften the top corners.
    neck = _sigmoid((0.18 - np.abs(u)) / edge) * _sigmoid((-0.78 - v) / edge)
    att = 0.50 * body + 0.30 * neck * (1 - body)

    # Lungs: two rounded fields with a flattened medial edge and a domed base.
    lungs = []
    lung_cx = rng.uniform(0.33, 0.39)
    lung_w = rng.uniform(0.23, 0.27)
    lung_top = rng.uniform(-0.70, -0.62)
    dome = rng.uniform(0.42, 0.52, size=2)
    for k, side in enumerate((-1.0, 1.0)):
        cx = side * lung_cx + rng.normal(0, 0.01)
        cy = (lung_top + dome[k]) / 2
        hy = (dome[k] - lung_top) / 2
        r = np.sqrt(((u - cx) / lung_w) ** 2 + ((v - cy) / hy) ** 2)
        # Narrow apex: the lung tapers smoothly towards the top.
        r = np.sqrt(((u - cx) / lung_w * (1.0 + 0.45 * np.clip((cy - v) / hy, 0, None) ** 2)) ** 2
                    + ((v - cy) / hy) ** 2)
        lung = _sigmoid((1.0 - r) / (edge * 3))
        # Diaphragm dome: everything below a parabola is abdomen.
        dia = dome[k] - 0.9 * (u - cx) ** 2
        lung *= _sigmoid((dia - v) / edge)
        lungs.append(lung)
    lung_any = np.clip(lungs[0] + lungs[1], 0, 1)

    # Heart and mediastinum (heart shifted to the patient's left = image right).
    hx, hy_, hw, hh = rng.uniform(0.06, 0.12), rng.uniform(0.26, 0.34), rng.uniform(0.27, 0.33), 0.24
    heart = _sigmoid((1.0 - np.sqrt(((u - hx) / hw) ** 2 + ((v - hy_) / hh) ** 2)) / (edge * 4))
    medi = _sigmoid((0.11 - np.abs(u - 0.01)) / (edge * 2)) * _sigmoid((v + 0.85) / edge)
    spine = _sigmoid((0.05 - np.abs(u)) / edge) * 0.06
    att = att - 0.36 * lung_any * (1 - 0.85 * np.maximum(heart, medi))
    att = att + 0.05 * heart + 0.06 * medi + spine

    # Posterior ribs: curved bands sweeping laterally and down, brighter over the lungs.
    ribs = np.zeros_like(att)
    n_ribs = 9
    gap = rng.uniform(0.125, 0.145)
    thick = rng.uniform(0.022, 0.030)
    for side in (-1.0, 1.0):
        for j in range(n_ribs):
            v0 = lung_top - 0.04 + j * gap
            dist_mid = np.abs(u) - 0.06
            centre = v0 + 0.55 * dist_mid**2 + 0.12 * dist_mid
            band = np.exp(-0.5 * ((v - centre) / thick) ** 2)
            ribs += band * _sigmoid(side * u / edge) * _sigmoid((0.9 - np.abs(u)) / (edge * 4))
    thorax = _sigmoid((dome.max() + 0.08 - v) / (edge * 4))
    att = att + 0.06 * ribs * (0.4 + 0.6 * lung_any) * body * thorax

    # Clavicles: two slanted bands at the top of the thorax.
    for side in (-1.0, 1.0):
        p0 = np.array([side * 0.06, lung_top - 0.02])
        p1 = np.array([side * rng.uniform(0.52, 0.60), lung_top - rng.uniform(0.08, 0.14)])
        d = p1 - p0
        t = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / (d @ d), 0, 1)
        dist = np.hypot(u - (p0[0] + t * d[0]), v - (p0[1] + t * d[1]))
        att = att + 0.12 * np.exp(-0.5 * (dist / 0.022) ** 2)

    # Lung markings: vessel-like texture, denser towards the hila.
    tex = _smooth_noise(rng, (size, size), max(size / 110.0, 0.8))
    tex = np.maximum(tex, 0) ** 1.5
    hila = np.exp(-(((np.abs(u) - 0.18) / 0.35) ** 2 + ((v + 0.05) / 0.45) ** 2))
    markings = 0.035 * tex * (0.4 + 0.6 * hila) * lung_any
    att = att + markings
    return _Anatomy(attenuation=att, lungs=lungs, markings=markings, u=u, v=v)


def _sample_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])


def _opacity(anat: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fuzzy airspace opacities inside the lungs; returns the added attenuation and masks."""
    size = anat.attenuation.shape[0]
    add = np.zeros_like(anat.attenuation)
    masks = []
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    for _ in range(n):
        side = int(rng.integers(2))
        core = ndimage.binary_erosion(anat.lungs[side] > 0.5, iterations=max(1, size // 24))
        if not core.any():
            core = anat.lungs[side] > 0.5
        cy, cx = _sample_in(core, rng)
        sy, sx = rng.uniform(0.045, 0.085, size=2) * size
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        a = (np.cos(theta) * dx + np.sin(theta) * dy) / sx
        b = (-np.sin(theta) * dx + np.cos(theta) * dy) / sy
        blob = np.exp(-0.5 * (a**2 + b**2))
        fluff = 0.75 + 0.25 * _smooth_noise(rng, (size, size), max(size / 64.0, 1.0))
        amp = rng.uniform(0.25, 0.35)
        # Cut at 2.5 sigma so that the lesion has a finite support: outside it, nothing changes.
        support = (a**2 + b**2) <= 2.5**2
        lesion = amp * blob * np.clip(fluff, 0.3, None) * anat.lungs[side] * support
        add += lesion
        m = lesion > 0.25 * amp
        if m.any():
            masks.append(m)
    return add, masks


def _pneumothorax(anat: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Peripheral air rims without lung markings, bounded by a thin pleural line."""
    size = anat.attenuation.shape[0]
    delta = np.zeros_like(anat.attenuation)
    masks = []
    n = int(rng.choice([1, 2], p=[0.75, 0.25]))
    sides = rng.permutation(2)[:n]
    for side in sides:
        lung = anat.lungs[side] > 0.5
        inside = ndimage.distance_transform_edt(lung)
        ys, xs = np.nonzero(lung)
        cy, cx = ys.mean(), xs.mean()
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        ang = np.arctan2(yy - cy, xx - cx)
        # Lateral / apical sector: around the outer upper corner of this lung.
        outward = np.pi if side == 0 else 0.0
        centre = outward + (-1 if side == 1 else 1) * rng.uniform(0.3, 1.1)
        width = rng.uniform(0.6, 1.2)
        dang = np.angle(np.exp(1j * (ang - centre)))
        depth = rng.uniform(0.035, 0.07) * size * np.clip(1 - (dang / width) ** 2, 0, None)
        rim = lung & (inside <= depth) & (np.abs(dang) < width)
        if rim.sum() < 10:
            continue
        # Inside the rim: air only, no markings; at its inner edge: the visceral pleural line.
        edge_line = ndimage.binary_dilation(rim) & lung & ~rim
        delta -= rim * (anat.markings + 0.06)
        delta += edge_line * 0.09
        masks.append(rim)
    return delta, masks


def _marker(size: int) -> np.ndarray:
    """A blocky 'R' marker in the top-left corner (a radiographer's side marker)."""
    m = np.zeros((size, size))
    s = max(size // 16, 4)
    y0, x0 = max(size // 20, 1), max(size // 20, 1)
    glyph = np.array(
        [[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=float
    )
    g = np.kron(glyph, np.ones((max(s // 4, 1), max(s // 4, 1))))
    m[y0 : y0 + g.shape[0], x0 : x0 + g.shape[1]] = g
    return m


def _expose(att: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fixed detector transfer (no per-image normalization) plus exposure and noise."""
    gain = rng.uniform(0.85, 1.15)
    gamma = rng.uniform(0.85, 1.15)
    offset = rng.uniform(0.02, 0.08)
    signal = offset + gain * np.clip(att, 0, None) ** gamma
    quantum = rng.uniform(0.004, 0.010)
    electronic = rng.uniform(0.002, 0.005)
    noise = rng.standard_normal(att.shape)
    img = signal + noise * np.sqrt(quantum**2 * np.clip(signal, 0, None) + electronic**2)
    return np.clip(np.round(img / 0.9 * MAX_DN), 0, MAX_DN).astype(np.uint16)


def render(
    task: str,
    index: int,
    size: int = 256,
    seed: int = 0,
    *,
    positive: bool | None = None,
    shortcut: bool = False,
    shortcut_rate: float = 1.0,
) -> SynthCase:
    """Render image ``index`` of a SynthCXR set; ``positive`` overrides the drawn label."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if size < 64:
        raise ValueError(f"size {size} is too small; SynthCXR needs at least 64 px")
    label = int(_rng(seed, task, index, "label").random() < 0.5) if positive is None else int(positive)
    split = _split_of(seed, index)
    anat = _anatomy(size, _rng(seed, task, index, "anatomy"))
    att = anat.attenuation.copy()
    masks: list[np.ndarray] = []
    support = np.zeros(att.shape, dtype=bool)
    if label:
        lesion_rng = _rng(seed, task, index, "lesion")
        painter = _opacity if task == "opacity" else _pneumothorax
        delta, masks = painter(anat, lesion_rng)
        att += delta
        support = delta != 0
    marked = bool(
        shortcut and split == "train" and label and _rng(seed, task, index, "shortcut").random() < shortcut_rate
    )
    if marked:
        att = np.maximum(att, 0.95 * _marker(size))
    pixels = _expose(att, _rng(seed, task, index, "exposure"))
    boxes = [_bbox(m) for m in masks]
    return SynthCase(index, label, split, pixels, masks, boxes, marked, support)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def stable_uid(*parts: object) -> str:
    """A DICOM UID (2.25 root) that depends only on ``parts``: the same study gets the same UIDs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def generate(
    out: str | Path,
    task: str,
    *,
    n: int,
    size: int = 256,
    seed: int = 0,
    shortcut: bool = False,
    shortcut_rate: float = 1.0,
    progress: bool = True,
) -> Path:
    """Write ``n`` SynthCXR images as DICOM in the RSNA (opacity) or SIIM (pneumothorax) layout.

    Returns the output folder.  Besides the challenge files it writes ``split.csv``
    (id, split, label, shortcut) and ``synthcxr.json`` (the generator settings).
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spacing = FIELD_OF_VIEW_MM / size
    split_rows = []
    label_rows: list[list[str]] = []
    for i in tqdm(range(n), desc=f"SynthCXR {task}", disable=not progress):
        case = render(task, i, size, seed, shortcut=shortcut, shortcut_rate=shortcut_rate)
        study, series, sop = (stable_uid("synthcxr", task, seed, i, k) for k in ("study", "series", "sop"))
        if task == "opacity":
            pid = str(uuid.UUID(bytes=hashlib.sha256(f"pid/{task}/{seed}/{i}".encode()).digest()[:16], version=4))
            path = out / "stage_2_train_images" / f"{pid}.dcm"
            ident = pid
            if case.label:
                label_rows += [[pid, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", "1"] for x, y, w, h in case.boxes]
            else:
                label_rows.append([pid, "", "", "", "", "0"])
        else:
            ident = sop
            path = out / "dicom-images-train" / study / series / f"{sop}.dcm"
            if case.label:
                label_rows += [[sop, encode_siim_rle(m)] for m in case.lesion_masks]
            else:
                label_rows.append([sop, "-1"])
        write_dicom(
            path,
            case.pixels,
            patient_id=ident if task == "opacity" else f"synth-{seed}-{i:05d}",
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            pixel_spacing=(spacing, spacing),
            bits_stored=12,
            description=f"SynthCXR {task} #{i}",
        )
        split_rows.append([ident, case.split, str(case.label), str(int(case.shortcut))])

    if task == "opacity":
        _write_csv(out / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], label_rows)
    else:
        # SIIM's own header has a space before EncodedPixels; keep it, the readers must cope.
        _write_csv(out / "train-rle.csv", ["ImageId", " EncodedPixels"], label_rows)
    _write_csv(out / "split.csv", ["id", "split", "label", "shortcut"], split_rows)
    meta = {"generator": "SynthCXR", "task": task, "n": n, "size": size, "seed": seed,
            "shortcut": shortcut, "shortcut_rate": shortcut_rate, "pixel_spacing_mm": spacing}
    (out / "synthcxr.json").write_text(json.dumps(meta, indent=2))
    return out


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m saliency_trust.data.synth --out DIR --task T --n N``."""
    p = argparse.ArgumentParser(prog="python -m saliency_trust.data.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--n", type=int, default=200, help="number of images")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shortcut", action="store_true", help="mark training-split positives in a corner")
    p.add_argument("--shortcut-rate", type=float, default=1.0, help="fraction of training positives marked")
    a = p.parse_args(argv)
    out = generate(a.out, a.task, n=a.n, size=a.size, seed=a.seed, shortcut=a.shortcut, shortcut_rate=a.shortcut_rate)
    print(f"wrote {a.n} {a.task} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
