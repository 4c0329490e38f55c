"""SynthCXR: determinism, the lesion as the only label signal, the shortcut, real DICOM output."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from saliency_trust.data.synth import TASKS, render


@pytest.mark.parametrize("task", TASKS)
def test_render_is_deterministic_per_seed(task):
    a, b = render(task, 5, 96, seed=1), render(task, 5, 96, seed=1)
    c = render(task, 5, 96, seed=2)
    assert np.array_equal(a.pixels, b.pixels) and a.label == b.label and a.split == b.split
    assert not np.array_equal(a.pixels, c.pixels)


@pytest.mark.parametrize("task", TASKS)
def test_lesion_is_the_only_difference_between_classes(task):
    for i in range(6):
        pos = render(task, i, 128, seed=0, positive=True)
        neg = render(task, i, 128, seed=0, positive=False)
        assert pos.label == 1 and neg.label == 0 and pos.lesion_masks and not neg.lesion_masks
        differs = pos.pixels != neg.pixels
        assert differs.any()
        # Every changed pixel lies where the lesion was painted; nothing else moves.
        assert not (differs & ~pos.support).any()
        assert pos.mask[pos.support].mean() > 0.2  # the labelled mask is the heart of the support


@pytest.mark.parametrize("task", TASKS)
def test_classes_are_balanced_and_lesion_counts_in_range(task):
    cases = [render(task, i, 64, seed=0) for i in range(60)]
    pos = [c for c in cases if c.label]
    assert 0.3 < len(pos) / len(cases) < 0.7
    assert all(1 <= len(c.lesion_masks) <= 3 and c.mask.any() for c in pos)
    assert all(not c.mask.any() for c in cases if not c.label)


def test_shortcut_marks_training_positives_only():
    cases = [render("opacity", i, 96, seed=0, shortcut=True) for i in range(40)]
    marked = [c for c in cases if c.shortcut]
    assert marked and all(c.split == "train" and c.label == 1 for c in marked)
    assert all(c.shortcut for c in cases if c.split == "train" and c.label == 1)
    plain = render("opacity", marked[0].index, 96, seed=0)
    assert (marked[0].pixels != plain.pixels).any()
    diff = marked[0].pixels != plain.pixels
    ys, xs = np.nonzero(diff)
    assert ys.max() < 96 // 3 and xs.max() < 96 // 3  # the marker sits in the top-left corner


def test_rsna_layout_files_are_real_dicom(rsna_synth):
    rows = list(csv.DictReader((rsna_synth / "stage_2_train_labels.csv").open()))
    assert list(rows[0]) == ["patientId", "x", "y", "width", "height", "Target"]
    files = sorted((rsna_synth / "stage_2_train_images").glob("*.dcm"))
    assert len(files) == 24 and {r["patientId"] for r in rows} == {f.stem for f in files}
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.Rows == ds.Columns == 96 and float(ds.PixelSpacing[0]) == pytest.approx(430 / 96, rel=1e-5)
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID):
        assert UID(uid).is_valid
    assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() <= 4095
    split = list(csv.DictReader((rsna_synth / "split.csv").open()))
    assert {r["split"] for r in split} <= {"train", "val", "test"} and len(split) == 24


def test_siim_layout_has_relative_rle_and_uid_tree(siim_synth):
    text = (siim_synth / "train-rle.csv").read_text().splitlines()
    assert text[0] == "ImageId, EncodedPixels"
    files = list((siim_synth / "dicom-images-train").glob("*/*/*.dcm"))
    assert len(files) == 24
    ids = {line.split(",")[0] for line in text[1:]}
    assert ids == {f.stem for f in files}
    assert any(line.endswith("-1") for line in text[1:])


def test_command_line(tmp_path):
    from saliency_trust.data.synth import main

    assert main(["--out", str(tmp_path / "o"), "--task", "opacity", "--n", "3", "--size", "64", "--seed", "2"]) == 0
    assert len(list((tmp_path / "o" / "stage_2_train_images").glob("*.dcm"))) == 3
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "p"), "--task", "fracture", "--n", "3"])
