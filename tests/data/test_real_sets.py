"""The two real QTIM sample sets in ../shared/data read as they are (skipped when absent)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict

import numpy as np
from PIL import Image
from saliency_trust.data import load_dataset
from saliency_trust.data.groundtruth import resize_mask
from saliency_trust.data.rle import decode_siim_rle

from tests.conftest import shared_set


def _independent_box_mask(boxes, shape):
    """Pixel loop: a pixel is in a box when the box touches it (its span overlaps the pixel)."""
    h, w = shape
    mask = np.zeros(shape, bool)
    for x, y, bw, bh in boxes:
        for r in range(h):
            for c in range(w):
                if c + 1 > x and c < x + bw and r + 1 > y and r < y + bh:
                    mask[r, c] = True
    return mask


def test_rsna_qtim100_boxes():
    root = shared_set("rsna_pneumonia_qtim100")
    ds = load_dataset(root)
    assert not ds.errors and len(ds) == 100 and all(r.label == 1 for r in ds)
    boxes = defaultdict(list)
    with (root / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            boxes[row["file"].split("/")[-1][:-4]].append(tuple(float(row[k]) for k in "xywh"))
    assert sum(map(len, boxes.values())) == 172
    for rec in ds:
        assert rec.image.shape == (320, 320) and rec.mask.shape == (320, 320)
        expected = _independent_box_mask(boxes[rec.id], rec.mask.shape)
        assert rec.mask.sum() == expected.sum() and np.array_equal(rec.mask, expected), rec.id


def test_siim_qtim100_masks():
    root = shared_set("siim_pneumothorax_qtim100")
    ds = load_dataset(root)
    assert not ds.errors and len(ds) == 100 and all(r.label == 1 for r in ds)
    rows = {row["file"].split("/")[-1][:-4]: row for row in csv.DictReader((root / "labels.csv").open())}
    for rec in ds:
        assert rec.mask.sum() == int(rows[rec.id]["mask_area_px"]), rec.id
        png = np.asarray(Image.open(root / rows[rec.id]["mask"])) > 0
        assert np.array_equal(rec.mask, png)


def test_siim_rle_decoder_on_the_official_rows():
    """The 1024 px RLE rows decode to masks that, brought to 320 px, match the shipped masks."""
    root = shared_set("siim_pneumothorax_qtim100")
    rle = defaultdict(list)
    with (root / "rle_1024.csv").open() as f:
        reader = csv.reader(f)
        next(reader)
        for image_id, enc in reader:
            rle[image_id].append(enc)
    ious = []
    for row in csv.DictReader((root / "labels.csv").open()):
        full = np.zeros((1024, 1024), bool)
        for enc in rle[row["ImageId"]]:
            full |= decode_siim_rle(enc, (1024, 1024))
        small = resize_mask(full, (320, 320))
        png = np.asarray(Image.open(root / row["mask"])) > 0
        ious.append((small & png).sum() / max((small | png).sum(), 1))
    assert len(ious) == 100 and min(ious) > 0.6 and np.mean(ious) > 0.9, (min(ious), np.mean(ious))
    assert not any(math.isnan(i) for i in ious)
