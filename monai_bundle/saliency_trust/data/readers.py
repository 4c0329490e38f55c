"""Readers for the RSNA, SIIM and a generic layout; each gives the same records.

Layouts, recognized in this order:

(a) RSNA Pneumonia: ``stage_2_train_labels.csv`` (or ``stage_1_...``) with
    ``patientId,x,y,width,height,Target`` and DICOMs in ``stage_2_train_images/<patientId>.dcm``.
(b) SIIM-ACR Pneumothorax: ``train-rle.csv`` (``ImageId, EncodedPixels``; ``-1`` for
    negatives; one row per lesion) and DICOMs named ``<ImageId>.dcm`` anywhere below the root.
(c) Generic: ``images/`` plus ``labels.csv`` with ``file`` and either ``x,y,w,h`` (boxes, one row
    per box; empty coordinates mean a negative) or ``mask`` (a mask image, nonzero = lesion).
    An optional ``label`` column overrides the label.

An optional ``split.csv`` (``id,split``) beside the labels assigns train/val/test.

Bad files never stop a load: each becomes a :class:`DataError` (naming the file or row and
the problem) in ``Dataset.errors`` and is logged, and the other files load as usual.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saliency_trust.data.errors import DataError
from saliency_trust.data.groundtruth import rasterize_boxes, resize_image, resize_mask
from saliency_trust.data.imageio import read_image, read_mask
from saliency_trust.data.rle import decode_siim_rle

log = logging.getLogger(__name__)

RSNA_LABELS = ("stage_2_train_labels.csv", "stage_1_train_labels.csv")
RSNA_IMAGES = ("stage_2_train_images", "stage_1_train_images")
SIIM_LABELS = "train-rle.csv"
GENERIC_LABELS = "labels.csv"


@dataclass
class Record:
    """One image: pixels in [0, 1], the lesion mask on the same grid (None for negatives)."""

    id: str
    image: np.ndarray  # float32, H x W, in [0, 1]
    mask: np.ndarray | None  # bool, H x W
    label: int
    path: str
    split: str | None = None
    spacing: tuple[float, float] = (1.0, 1.0)  # mm per pixel on this grid (row, col)


@dataclass
class Dataset:
    """The records that loaded, the errors of those that did not, and the layout seen."""

    root: Path
    layout: str
    records: list[Record] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def split(self, name: str) -> list[Record]:
        """Records of one split (``train``, ``val`` or ``test``)."""
        return [r for r in self.records if r.split == name]


def detect_layout(root: str | Path) -> str:
    """Return ``"rsna"``, ``"siim"`` or ``"generic"`` for a dataset folder, or raise DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "dataset folder does not exist")
    if any((root / n).is_file() for n in RSNA_LABELS):
        return "rsna"
    if (root / SIIM_LABELS).is_file():
        return "siim"
    if (root / GENERIC_LABELS).is_file():
        return "generic"
    raise DataError(
        str(root),
        f"no known layout: expected {RSNA_LABELS[0]} (RSNA), {SIIM_LABELS} (SIIM) or images/ + {GENERIC_LABELS}",
    )


#: The finding each layout's lesion class stands for (what a prediction is about, in words).
FINDINGS = {"rsna": "lung opacity", "siim": "pneumothorax", "generic": "finding"}


def finding_name(root: str | Path) -> str:
    """The finding a dataset's positive class means ("lung opacity", "pneumothorax"), from its layout."""
    return FINDINGS[detect_layout(root)]


def load_dataset(root: str | Path, image_size: int | None = None, layout: str | None = None) -> Dataset:
    """Load every image of an RSNA, SIIM or generic dataset folder.

    ``image_size`` resizes images (antialiased bilinear) and ground truth (boxes by the
    paper's rule, masks bilinear + 0.5 threshold) to a square grid; ``None`` keeps the native
    grid. Files that fail land in ``Dataset.errors``; the rest load.
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    readers = {"rsna": _read_rsna, "siim": _read_siim, "generic": _read_generic}
    if layout not in readers:
        raise ValueError(f"unknown layout {layout!r}")
    ds = Dataset(root=root, layout=layout)
    splits = _read_splits(root)  # an unreadable split file stops the load: the splits would be wrong
    try:
        for item in readers[layout](root, image_size):
            if isinstance(item, DataError):
                log.warning("skipped: %s", item)
                ds.errors.append(item)
            else:
                item.split = splits.get(item.id)
                ds.records.append(item)
    except DataError as err:  # the labels file itself is unreadable: nothing more can load
        log.warning("skipped: %s", err)
        ds.errors.append(err)
    return ds


def _read_splits(root: Path) -> dict[str, str]:
    path = root / "split.csv"
    if not path.is_file():
        return {}
    rows = _csv_rows(path)
    if rows and not {"id", "split"} <= rows[0].keys():
        raise DataError(str(path), "split.csv needs 'id' and 'split' columns")
    return {row["id"]: row["split"] for row in rows}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (header names and values stripped), or a DataError naming it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [n.strip() for n in (reader.fieldnames or [])]
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(path), f"not a readable UTF-8 CSV file ({type(exc).__name__}: {exc})") from None


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, or a DataError when the name leaves the dataset folder (``..``, absolute).

    Judged on the name, not on where symbolic links lead: a dataset whose images folder is a link
    to shared storage still loads.
    """
    norm = os.path.normpath(relative)
    if os.path.isabs(norm) or Path(relative).drive or norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(where, f"file name {relative!r} points outside the dataset folder; refused")
    return root / norm


def _finish(rid: str, path: Path, img: np.ndarray, spacing, mask, *, label: int, image_size) -> Record:
    if image_size is not None:
        size = (int(image_size), int(image_size))
        spacing = (spacing[0] * img.shape[0] / size[0], spacing[1] * img.shape[1] / size[1])
        img = resize_image(img, size)
        mask = resize_mask(mask, size) if mask is not None else None
    return Record(id=rid, image=img, mask=mask, label=label, path=str(path), spacing=spacing)


def _read_rsna(root: Path, image_size: int | None) -> Iterator[Record | DataError]:
    labels = next(root / n for n in RSNA_LABELS if (root / n).is_file())
    img_dir = next((root / n for n in RSNA_IMAGES if (root / n).is_dir()), root)
    boxes: dict[str, list[tuple[int, tuple[float, float, float, float]]]] = {}
    targets: dict[str, int] = {}
    bad: dict[str, DataError] = {}
    rows = _csv_rows(labels)  # unreadable: load_dataset reports it
    for lineno, row in enumerate(rows, start=2):
        pid = row.get("patientId", "")
        where = f"{labels}:{lineno} (patientId {pid})"
        try:
            target = int(float(row.get("Target", "1") or 0))
            coords = [row.get(k, "") for k in ("x", "y", "width", "height")]
            if target and all(coords):
                box = tuple(float(c) for c in coords)
                boxes.setdefault(pid, []).append((lineno, box))
            elif target:
                raise DataError(where, "Target=1 but the box coordinates are empty")
        except ValueError as exc:
            bad.setdefault(pid, DataError(where, f"malformed row ({exc})"))
            continue
        targets[pid] = max(targets.get(pid, 0), target)
    for pid in dict.fromkeys([*targets, *bad]):
        if pid in bad:
            yield bad[pid]
            continue
        try:
            path = _inside(img_dir, f"{pid}.dcm", f"{labels} (patientId {pid})")
            img, spacing = read_image(path)
            dst = (int(image_size), int(image_size)) if image_size is not None else None
            mask = None
            if targets[pid]:
                # Boxes go through the paper's rule straight onto the target grid.
                mask = np.zeros(dst or img.shape, bool)
                for lineno, box in boxes.get(pid, []):
                    mask |= rasterize_boxes([box], img.shape, dst, f"{labels}:{lineno} (patientId {pid})")
            rec = _finish(pid, path, img, spacing, None, label=targets[pid], image_size=image_size)
            rec.mask = mask
            yield rec
        except DataError as err:
            yield err


def _read_siim(root: Path, image_size: int | None) -> Iterator[Record | DataError]:
    labels = root / SIIM_LABELS
    rles: dict[str, list[tuple[int, str]]] = {}
    rows = _csv_rows(labels)  # unreadable: load_dataset reports it
    for lineno, row in enumerate(rows, start=2):
        rles.setdefault(row.get("ImageId", ""), []).append((lineno, row.get("EncodedPixels", "")))
    files = {p.stem: p for p in root.rglob("*.dcm")}
    for image_id, rows in rles.items():
        try:
            path = files.get(image_id) or _inside(root, f"{image_id}.dcm", f"{labels} (ImageId {image_id})")
            img, spacing = read_image(path)
            mask = np.zeros(img.shape, bool)
            for lineno, rle in rows:
                mask |= decode_siim_rle(rle, img.shape, source=f"{labels}:{lineno} (ImageId {image_id})")
            positive = any(r.strip() != "-1" for _, r in rows)
            yield _finish(image_id, path, img, spacing, mask if positive else None, label=int(positive),
                          image_size=image_size)
        except DataError as err:
            yield err


def _read_generic(root: Path, image_size: int | None) -> Iterator[Record | DataError]:
    labels = root / GENERIC_LABELS
    groups: dict[str, list[tuple[int, dict[str, str]]]] = {}
    rows = _csv_rows(labels)  # unreadable: load_dataset reports it
    if not rows or "file" not in rows[0]:
        yield DataError(str(labels), "a generic labels.csv needs a 'file' column")
        return
    mode = "mask" if "mask" in rows[0] else ("box" if {"x", "y", "w", "h"} <= rows[0].keys() else "label")
    for lineno, row in enumerate(rows, start=2):
        groups.setdefault(row["file"], []).append((lineno, row))
    for rel, items in groups.items():
        rid = Path(rel).stem
        path = root / rel
        try:
            path = _inside(root, rel, f"{labels}:{items[0][0]}")
            img, spacing = read_image(path)
            mask = None
            if mode == "mask":
                mask = np.zeros(img.shape, bool)
                for lineno, row in items:
                    if row.get("mask"):
                        where = f"{labels}:{lineno}"
                        mask |= read_mask(_inside(root, row["mask"], where), img.shape, where)
            elif mode == "box":
                boxes = []
                for lineno, row in items:
                    coords = [row.get(k, "") for k in ("x", "y", "w", "h")]
                    if any(coords):
                        try:
                            boxes.append((lineno, tuple(float(c) for c in coords)))
                        except ValueError:
                            raise DataError(f"{labels}:{lineno}", f"malformed box {coords}") from None
                if boxes:
                    dst = (int(image_size), int(image_size)) if image_size is not None else None
                    mask = np.zeros(dst or img.shape, bool)
                    for lineno, box in boxes:
                        mask |= rasterize_boxes([box], img.shape, dst, source=f"{labels}:{lineno} ({rel})")
            label_txt = items[0][1].get("label", "")
            label = int(float(label_txt)) if label_txt else int(mask is not None and bool(mask.any()))
            if mask is not None and not mask.any():
                mask = None
            # Box masks are already on the target grid; mask images are resized with the image.
            rec = _finish(rid, path, img, spacing, mask if mode == "mask" else None, label=label, image_size=image_size)
            if mode == "box":
                rec.mask = mask
            yield rec
        except DataError as err:
            yield err
