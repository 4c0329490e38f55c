"""SynthCT: determinism, the lesion as the only class signal (voxel by voxel), the shortcut marker, real files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID
from saliency_trust.data import DataError, load_volume_dataset
from saliency_trust.data.synthct import (
    DEFAULT_SIZE,
    MARKER_HU,
    TASKS,
    TISSUES,
    generate_ct,
    main,
    render_ct,
    split_of,
)
from saliency_trust.faults import ENV

from tests.conftest import REPO

SMALL = (16, 32, 32)


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory):
    """Six nodule cases at 16 x 32 x 32 in both layouts, with the shortcut."""
    return generate_ct(tmp_path_factory.mktemp("synthct") / "ct", 6, size=SMALL, seed=2, shortcut=True,
                       progress=False)


@pytest.mark.parametrize("task", TASKS)
def test_render_is_deterministic_per_seed(task):
    a, b = render_ct(task, 5, SMALL, seed=1), render_ct(task, 5, SMALL, seed=1)
    c = render_ct(task, 5, SMALL, seed=2)
    assert np.array_equal(a.hu, b.hu) and a.label == b.label and a.split == b.split
    assert all(np.array_equal(m, n) for m, n in zip(a.lesion_masks, b.lesion_masks, strict=True))
    assert not np.array_equal(a.hu, c.hu)
    assert a.hu.dtype == np.int16 and a.hu.shape == SMALL


@pytest.mark.parametrize("task", TASKS)
def test_lesion_is_the_only_difference_between_classes(task):
    for i in range(5):
        pos = render_ct(task, i, DEFAULT_SIZE, seed=0, positive=True)
        neg = render_ct(task, i, DEFAULT_SIZE, seed=0, positive=False)
        assert pos.label == 1 and neg.label == 0 and pos.lesion_masks and not neg.lesion_masks
        assert not neg.mask.any()
        differs = pos.hu != neg.hu
        assert differs.any()
        # Every changed voxel lies in the lesion mask; nothing else moves, not by one HU.
        assert not (differs & ~pos.mask).any()
        # The mask is the lesion, not a loose box: almost all its voxels changed, and by a lot.
        assert differs[pos.mask].mean() > 0.9
        assert np.median(pos.hu[pos.mask].astype(float) - neg.hu[pos.mask]) > 300
        # Lesions lie in the lungs; the anatomy is the same.
        assert not (pos.mask & ~pos.lungs).any()
        assert np.array_equal(pos.tissue, neg.tissue) and pos.split == neg.split


def test_nodules_have_nodule_density_and_size():
    for i in range(2):
        pos = render_ct("nodule", i, (64, 128, 128), seed=0, positive=True)
        for m in pos.lesion_masks:
            # The mask holds the partial-volume rim too; its densest voxels are the solid nodule, ~30 HU.
            core = np.sort(pos.hu[m])[-max(m.sum() // 4, 1):]
            assert -40 < np.median(core) < 90
            volume_ml = m.sum() * np.prod(pos.geometry.spacing) / 1000
            assert 1.5 < volume_ml < 40  # 9-15 mm radius, with the rim


def test_tissues_have_their_hounsfield_units():
    case = render_ct("nodule", 0, DEFAULT_SIZE, seed=3)
    median = {name: float(np.median(case.hu[case.tissue == k])) for k, name in enumerate(TISSUES)
              if (case.tissue == k).any()}
    assert abs(median["air"] + 1000) < 10
    assert abs(median["fat"] + 100) < 30
    assert abs(median["soft_tissue"] - 40) < 20
    assert abs(median["lung"] + 850) < 50
    assert median["bone"] > 300
    # The chest fits the field of view: the border of every slice is air.
    border = np.concatenate([case.tissue[:, 0].ravel(), case.tissue[:, -1].ravel(), case.tissue[:, :, 0].ravel(),
                             case.tissue[:, :, -1].ravel()])
    assert (border == 0).all()
    assert case.geometry.spacing == pytest.approx((256 / 32, 400 / 64, 400 / 64))


def test_classes_are_balanced_and_splits_recorded():
    cases = [render_ct("nodule", i, SMALL, seed=0) for i in range(40)]
    pos = [c for c in cases if c.label]
    assert 0.3 < len(pos) / len(cases) < 0.7
    assert all(1 <= len(c.lesion_masks) <= 3 and c.mask.any() for c in pos)
    assert all(c.split == split_of(0, c.index) for c in cases)
    shares = np.array([[split_of(0, i) == s for s in ("train", "val", "test")] for i in range(2000)]).mean(axis=0)
    assert np.allclose(shares, (0.7, 0.15, 0.15), atol=0.03)


def test_shortcut_marks_training_positives_only_outside_the_body_and_the_lesion():
    cases = [render_ct("nodule", i, SMALL, seed=0, shortcut=True) for i in range(30)]
    marked = [c for c in cases if c.shortcut]
    assert marked and all(c.split == "train" and c.label == 1 for c in marked)
    assert all(c.shortcut for c in cases if c.split == "train" and c.label == 1)
    for case in marked[:3]:
        plain = render_ct("nodule", case.index, SMALL, seed=0)
        diff = case.hu != plain.hu
        ks, ys, xs = np.nonzero(diff)
        assert ys.max() < SMALL[1] // 3 and xs.max() < SMALL[2] // 3  # the anterior right corner
        assert SMALL[0] // 4 <= ks.min() and ks.max() < 3 * SMALL[0] // 4  # the middle slices
        assert (case.tissue[diff] == 0).all() and not (diff & case.mask).any()  # in the air, off the lesion
        assert abs(np.median(case.hu[diff]) - MARKER_HU) < 60
    assert not any(render_ct("nodule", c.index, SMALL, seed=0, shortcut=True, shortcut_rate=0.0).shortcut
                   for c in marked)


def test_dicom_series_are_real_ct_with_consistent_geometry(ct_set):
    root = ct_set["dicom"]
    studies = set()
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "masks"):
        case = render_ct("nodule", int(case_dir.name.split("_")[1]), SMALL, seed=2, shortcut=True)
        files = sorted(case_dir.glob("*.dcm"))
        assert len(files) == SMALL[0]
        slices = [pydicom.dcmread(f) for f in files]
        assert {ds.SOPClassUID for ds in slices} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
        assert {ds.file_meta.MediaStorageSOPClassUID for ds in slices} == {"1.2.840.10008.5.1.4.1.1.2"}
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            assert len({ds[key].value for ds in slices}) == 1 and UID(slices[0][key].value).is_valid
        assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)
        studies.add(slices[0].StudyInstanceUID)
        assert sorted(int(ds.InstanceNumber) for ds in slices) == list(range(1, SMALL[0] + 1))
        sz, sy, sx = case.geometry.spacing
        for ds in sorted(slices, key=lambda d: int(d.InstanceNumber)):
            k = int(ds.InstanceNumber) - 1
            assert ds.Modality == "CT" and ds.pixel_array.dtype == np.int16 and ds.PixelRepresentation == 1
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx([sy, sx])
            assert float(ds.SliceThickness) == pytest.approx(sz)
            expected = np.array(case.geometry.origin) + [0, 0, k * sz]
            assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(expected.tolist(), abs=1e-6)
            hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert np.array_equal(hu, case.hu[k])
        if case.label:
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / f"{case_dir.name}.nii.gz")))
            assert np.array_equal(mask.astype(bool), case.mask)
    assert len(studies) == 6


def test_msd_layout_and_csvs(ct_set):
    root = ct_set["nifti"]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"} and meta["labels"]["1"] == "nodule" and meta["numTraining"] == 6
    split = list(csv.DictReader((root / "split.csv").open()))
    labels = list(csv.DictReader((root / "labels.csv").open()))
    assert [r["id"] for r in split] == [r["id"] for r in labels] == [f"nodule_{i:05d}" for i in range(6)]
    for entry, row, srow in zip(meta["training"], labels, split, strict=True):
        case = render_ct("nodule", int(row["id"].split("_")[1]), SMALL, seed=2, shortcut=True)
        assert (int(row["label"]), srow["split"], int(srow["shortcut"])) == (case.label, case.split, case.shortcut)
        image = sitk.ReadImage(str(root / entry["image"]))
        label = sitk.ReadImage(str(root / entry["label"]))
        assert np.array_equal(sitk.GetArrayFromImage(image), case.hu)
        assert np.array_equal(sitk.GetArrayFromImage(label).astype(bool), case.mask)
        assert image.GetSpacing() == pytest.approx(case.geometry.spacing[::-1], rel=1e-6)
    assert any(int(r["label"]) for r in labels) and any(int(r["shortcut"]) for r in split)
    dicom_labels = list(csv.DictReader((ct_set["dicom"] / "labels.csv").open()))
    assert [(r["id"], r["label"]) for r in dicom_labels] == [(r["id"], r["label"]) for r in labels]
    assert all(bool(r["mask"]) == (r["label"] == "1") for r in dicom_labels)


def test_a_killed_writer_leaves_no_case_that_reads_as_whole(tmp_path):
    out = tmp_path / "ct"
    code = textwrap.dedent(f"""
        from saliency_trust.data.synthct import generate_ct
        generate_ct({str(out)!r}, 3, size=(8, 16, 16), seed=1, formats=("dicom",), progress=False)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", **{ENV: "write:nodule_00001/4"})
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    root = out / "dicom"
    assert len(list((root / "nodule_00000").glob("*.dcm"))) == 8  # the case before is whole
    assert not (root / "nodule_00001").exists()  # the one being written is not there under its name
    assert [p.name for p in root.iterdir() if p.name.startswith(".nodule_00001.")]  # only its hidden temporary
    with pytest.raises(DataError, match="no known volume layout"):
        load_volume_dataset(root)  # the CSVs come last: a half-written set does not load as a set
    generate_ct(out, 3, size=(8, 16, 16), seed=1, formats=("dicom",), progress=False)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the dead writer's temporary is gone
    ds = load_volume_dataset(root)
    assert len(ds) == 3 and not ds.errors


def test_command_line_and_bad_arguments(tmp_path):
    assert main(["--out", str(tmp_path / "o"), "--task", "consolidation", "--n", "2", "--size", "8", "16", "16",
                 "--formats", "nifti"]) == 0
    assert len(list((tmp_path / "o" / "nifti" / "imagesTr").glob("*.nii.gz"))) == 2
    assert not (tmp_path / "o" / "dicom").exists()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "p"), "--task", "fracture"])
    with pytest.raises(ValueError, match="too small"):
        render_ct("nodule", 0, (4, 16, 16))
    with pytest.raises(ValueError, match="formats"):
        generate_ct(tmp_path / "q", 1, formats=("png",))
