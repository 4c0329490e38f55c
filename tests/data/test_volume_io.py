"""Volumes: DICOM series and NIfTI round trips, bad series refused by name, windowing and resampling against
independent computations (SimpleITK, scipy, torch, scikit-image, hand values)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from saliency_trust.data import DataError, load_volume_dataset
from saliency_trust.data.dicom import write_ct_series, write_dicom
from saliency_trust.data.synth import stable_uid
from saliency_trust.data.synthct import generate_ct, render_ct
from saliency_trust.data.volumes import (
    VolumeGeometry,
    read_dicom_series,
    read_volume,
    read_volume_file,
    resample_mask,
    resample_volume,
    window_hu,
    write_volume,
)
from scipy import ndimage
from skimage.measure import block_reduce

from tests.conftest import REPO
from tests.extras import SLICER_510, extra

SMALL = (16, 32, 32)


def _rotation(about_z: float, about_x: float) -> tuple[float, ...]:
    cz, sz, cx, sx = np.cos(about_z), np.sin(about_z), np.cos(about_x), np.sin(about_x)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return tuple((rz @ rx).ravel())


OBLIQUE = VolumeGeometry((2.5, 0.7, 0.9), (-12.3, 45.6, 78.9), _rotation(np.deg2rad(30), np.deg2rad(10)))


def _series(folder, hu, geometry=OBLIQUE, rescale=(1.0, -1024.0), name="s"):
    uids = [stable_uid("test", name, k) for k in range(hu.shape[0])]
    return write_ct_series(folder, hu, spacing=geometry.spacing, origin=geometry.origin,
                           direction=geometry.direction, patient_id="p", study_uid=stable_uid("test", name, "study"),
                           series_uid=stable_uid("test", name, "series"), frame_of_reference_uid=stable_uid(
                               "test", name, "frame"), sop_uids=uids, rescale=rescale)


def _hu(shape=(5, 16, 18), seed=0):
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.float64)


@pytest.fixture(scope="module")
def ct_set(tmp_path_factory):
    return generate_ct(tmp_path_factory.mktemp("ctio") / "ct", 5, size=SMALL, seed=7, progress=False)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_dicom_series_round_trip_keeps_geometry_slice_order_and_hu(tmp_path):
    hu = np.random.default_rng(1).uniform(-1000, 1500, size=(7, 20, 24))
    folder = _series(tmp_path / "s", hu, rescale=(0.5, -1024.0))
    # File names say nothing of the order: shuffle them, the reader must sort by position along the normal.
    files = sorted(folder.iterdir())
    for f, new in zip(files, np.random.default_rng(2).permutation(len(files)), strict=True):
        f.rename(folder / f"x{new:03d}.tmpname")
    for f in folder.iterdir():
        f.rename(f.with_suffix(".dcm"))
    vol, geo = read_dicom_series(folder)
    assert vol.dtype == np.float32 and vol.shape == hu.shape
    assert np.array_equal(vol, (np.rint((hu + 1024) / 0.5) * 0.5 - 1024).astype(np.float32))
    assert np.abs(vol - hu).max() <= 0.25 + 1e-4  # within half the rescale slope
    assert geo.spacing == pytest.approx(OBLIQUE.spacing, rel=1e-9)
    assert geo.origin == pytest.approx(OBLIQUE.origin, abs=1e-9)
    assert geo.direction == pytest.approx(OBLIQUE.direction, abs=1e-12)
    # The independent reader: SimpleITK / GDCM sorts and measures the same series.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    np.testing.assert_allclose(vol, sitk.GetArrayFromImage(ref), atol=1e-4)
    assert geo.spacing[::-1] == pytest.approx(ref.GetSpacing(), rel=1e-6)
    assert geo.origin == pytest.approx(ref.GetOrigin(), abs=1e-6)
    assert geo.direction == pytest.approx(ref.GetDirection(), abs=1e-6)
    for idx in [(0, 0, 0), (6, 19, 23), (3, 7, 11)]:
        assert geo.physical_point(idx) == pytest.approx(ref.TransformIndexToPhysicalPoint(idx[::-1]), abs=1e-6)


_PYDICOM_SIDE = """
import hashlib, json, sys
from pathlib import Path
import numpy as np, pydicom
from saliency_trust.data.dicom import write_ct_series
from saliency_trust.data.volumes import read_dicom_series
out = Path(sys.argv[1])
hu = np.arange(4 * 16 * 18).reshape(4, 16, 18) % 3000 - 1024
write_ct_series(out, hu, spacing=(2.5, 0.7, 0.9), origin=(1.0, 2.0, 3.0), patient_id="p", study_uid="1.2.3",
                series_uid="1.2.4", frame_of_reference_uid="1.2.5", sop_uids=[f"1.2.6.{k}" for k in range(4)])
vol, geo = read_dicom_series(out)
print(json.dumps({"pydicom": pydicom.__version__, "same": bool(np.array_equal(vol, hu)), "spacing": geo.spacing,
                  "sha": hashlib.sha256(b"".join(f.read_bytes() for f in sorted(out.iterdir()))).hexdigest()}))
"""


def test_series_writer_and_reader_give_the_same_files_on_pydicom_2_4_and_3(tmp_path):
    """Slicer 5.8 / 5.10 ship pydicom 2.4.4: the series written there is byte for byte the one written on 3."""
    pins = extra(SLICER_510)
    runs = []
    for name, path in (("pins", str(pins)), ("venv", "")):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (path, str(
            REPO / "monai_bundle")) if p))
        r = subprocess.run([sys.executable, "-c", _PYDICOM_SIDE, str(tmp_path / name)], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[0]["pydicom"] == "2.4.4" and runs[1]["pydicom"].startswith("3.")
    assert runs[0]["same"] and runs[1]["same"] and runs[0]["spacing"] == runs[1]["spacing"] == [2.5, 0.7, 0.9]
    assert runs[0]["sha"] == runs[1]["sha"]


def test_synthct_series_and_nifti_read_back_the_generated_volume(ct_set):
    for i in range(5):
        case = render_ct("nodule", i, SMALL, seed=7)
        vol, geo = read_volume(ct_set["dicom"] / case.id)
        assert np.array_equal(vol, case.hu) and geo == case.geometry
        vol, geo = read_volume(ct_set["nifti"] / "imagesTr" / f"{case.id}.nii.gz")
        assert np.array_equal(vol, case.hu)
        assert geo.spacing == pytest.approx(case.geometry.spacing) and geo.origin == pytest.approx(case.geometry.origin)


def test_nifti_round_trip_keeps_values_and_oblique_geometry(tmp_path):
    hu = _hu().astype(np.int16)
    path = write_volume(tmp_path / "v.nii.gz", hu, OBLIQUE)
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]  # no temporary left
    vol, geo = read_volume_file(path)
    assert np.array_equal(vol, hu)
    assert geo.spacing == pytest.approx(OBLIQUE.spacing, rel=1e-6)
    assert geo.origin == pytest.approx(OBLIQUE.origin, abs=1e-4)
    assert geo.direction == pytest.approx(OBLIQUE.direction, abs=1e-5)


def test_both_layouts_load_the_same_records(ct_set):
    by_layout = {}
    for fmt in ("dicom", "nifti"):
        ds = load_volume_dataset(ct_set[fmt])
        assert not ds.errors and len(ds) == 5
        by_layout[ds.layout] = ds
    for a, b in zip(by_layout["dicom"], by_layout["msd"], strict=True):
        case = render_ct("nodule", int(a.id.split("_")[1]), SMALL, seed=7)
        assert a.id == b.id == case.id and a.label == b.label == case.label and a.split == b.split == case.split
        assert a.image.shape == (1, *SMALL) and np.array_equal(a.image[0], case.hu) and np.array_equal(b.image[0],
                                                                                                         case.hu)
        if case.label:
            assert np.array_equal(a.mask, case.mask) and np.array_equal(b.mask, case.mask)
        else:
            assert a.mask is None and b.mask is None
        assert a.spacing == pytest.approx(case.geometry.spacing) and b.spacing == pytest.approx(a.spacing)


def test_load_with_size_and_window_resamples_and_records_the_spacing(ct_set):
    ds = load_volume_dataset(ct_set["nifti"], size=(8, 20, 24), window_hu="lung")
    plain = load_volume_dataset(ct_set["nifti"])
    for rec, ref in zip(ds, plain, strict=True):
        assert rec.image.shape == (1, 8, 20, 24) and rec.image.min() >= 0 and rec.image.max() <= 1
        expected, spacing = resample_volume(ref.image[0], (8, 20, 24), ref.spacing)
        np.testing.assert_allclose(rec.image[0], np.clip((expected + 1000) / 1400, 0, 1), atol=1e-6)
        assert rec.spacing == pytest.approx(spacing)
        assert rec.spacing == pytest.approx((256 / 16 * 16 / 8, 400 / 20, 400 / 24))
        assert rec.geometry == ref.geometry.resampled(SMALL, (8, 20, 24))
        if ref.mask is not None:
            assert np.array_equal(rec.mask, resample_mask(ref.mask, (8, 20, 24))) and rec.mask.any()


def test_zipped_series_reads_as_its_folder_and_names_the_member(tmp_path, ct_set):
    case_dir = ct_set["dicom"] / "nodule_00001"
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(case_dir.iterdir()):
            zf.write(f, f"DICOM/SE1/{f.name}")
    vol, geo = read_volume(archive)
    ref_vol, ref_geo = read_dicom_series(case_dir)
    assert np.array_equal(vol, ref_vol) and geo == ref_geo
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for f in sorted(case_dir.iterdir()):
            data = f.read_bytes()
            zf.writestr(f"DICOM/{f.name}", data[:300] if f.name == "CT00003.dcm" else data)
    with pytest.raises(DataError, match=r"bad\.zip!DICOM/CT00003\.dcm"):
        read_volume(bad)


# ---------------------------------------------------------------------------------------------
# Bad series


def _truncate(folder):
    f = folder / "CT00003.dcm"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 200])
    return "CT00003.dcm", "truncated or corrupt|not a readable"


def _garbage(folder):
    (folder / "CT00002.dcm").write_bytes(bytes(range(256)) * 3)
    return "CT00002.dcm", "not a readable DICOM"


def _no_pixels(folder):
    (folder / "CT00002.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 3)
    return "CT00002.dcm", "no pixel data"


def _missing(folder):
    (folder / "CT00003.dcm").unlink()
    return "s", "missing slice: 1 slice.*CT00002.dcm and CT00004.dcm"


def _uneven(folder):
    normal = np.asarray(OBLIQUE.direction).reshape(3, 3)[:, 2]
    _edit(folder / "CT00004.dcm", ImagePositionPatient=lambda v: [f"{float(a) + b:.6f}" for a, b in zip(
        v, 1.0 * normal, strict=True)])
    return "s", "uneven slice positions: CT00003.dcm and CT00004.dcm are 3.5 mm apart where slices are 2.5 mm"


def _tilted(folder):
    _edit(folder / "CT00004.dcm", ImagePositionPatient=lambda v: [float(v[0]) + 1.0, float(v[1]), float(v[2])])
    return "CT00004.dcm", r"shifted by 0\.996\d mm across the slice normal.*do not stack"


def _two_series(folder):
    other = _series(folder.parent / "other", _hu(seed=5), geometry=VolumeGeometry((2.5, 0.7, 0.9)), name="o")
    shutil.copy(other / "CT00001.dcm", folder / "zz_other.dcm")
    return "s", "mixed series: 2 series"


def _spacing(folder):
    _edit(folder / "CT00002.dcm", PixelSpacing=lambda v: ["0.75", "0.9"])
    return "CT00002.dcm", "inconsistent spacing: PixelSpacing"


def _orientation(folder):
    _edit(folder / "CT00005.dcm", ImageOrientationPatient=lambda v: ["1", "0", "0", "0", "1", "0"])
    return "CT00005.dcm", "ImageOrientationPatient .* differs"


def _duplicate(folder):
    shutil.copy(folder / "CT00002.dcm", folder / "CT00002b.dcm")
    _edit(folder / "CT00002b.dcm", SOPInstanceUID=lambda v: stable_uid("dup"))
    return "s", "two slices at one position"


def _not_ct(folder):
    _edit(folder / "CT00001.dcm", Modality=lambda v: "MR")
    return "CT00001.dcm", "modality MR; a CT volume is needed"


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, fn in changes.items():
        setattr(ds, key, fn(getattr(ds, key)))
    ds.save_as(path)


@pytest.mark.parametrize("spoil", [_truncate, _garbage, _no_pixels, _missing, _uneven, _tilted, _two_series, _spacing,
                                   _orientation, _duplicate, _not_ct], ids=lambda f: f.__name__.strip("_"))
def test_a_bad_series_is_refused_naming_the_file_and_the_problem(tmp_path, spoil):
    folder = _series(tmp_path / "s", _hu())
    read_dicom_series(folder)  # whole, it reads
    name, problem = spoil(folder)
    with pytest.raises(DataError, match=problem) as err:
        read_dicom_series(folder)
    assert err.value.source.endswith(name)


def test_2d_input_is_refused_where_a_volume_is_needed(tmp_path):
    one = _series(tmp_path / "one", _hu((1, 16, 16)))
    with pytest.raises(DataError, match="only slice in its folder: a 2-D image"):
        read_dicom_series(one)
    dx = tmp_path / "dx"
    write_dicom(dx / "a.dcm", np.zeros((16, 16), np.uint16), patient_id="p", study_uid="1.2.3", series_uid="1.2.4",
                sop_uid="1.2.5", pixel_spacing=(1, 1))
    with pytest.raises(DataError, match=r"a\.dcm: modality DX"):
        read_dicom_series(dx)
    plane = sitk.GetImageFromArray(np.zeros((16, 16), np.int16))
    sitk.WriteImage(plane, str(tmp_path / "plane.nii.gz"))
    with pytest.raises(DataError, match=r"plane\.nii\.gz: a 2-D image"):
        read_volume(tmp_path / "plane.nii.gz")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(_empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no slices here")
    return tmp_path / "empty"


def test_a_volume_with_nan_is_refused(tmp_path):
    a = np.zeros((4, 16, 16), np.float32)
    a[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: volume has 1 NaN"):
        read_volume_file(tmp_path / "nan.nii.gz")


def test_a_bad_case_is_reported_and_the_others_load(ct_set, tmp_path):
    dicom = shutil.copytree(ct_set["dicom"], tmp_path / "dicom")
    _truncate(dicom / "nodule_00001")
    shutil.rmtree(dicom / "nodule_00003")
    nifti = shutil.copytree(ct_set["nifti"], tmp_path / "nifti")
    (nifti / "imagesTr" / "nodule_00002.nii.gz").write_bytes(b"not a volume")
    moved = VolumeGeometry((16.0, 12.5, 12.5), (0.0, 0.0, 0.0))
    write_volume(nifti / "labelsTr" / "nodule_00004.nii.gz", np.zeros(SMALL, np.uint8), moved)
    ds = load_volume_dataset(dicom)
    messages = sorted(str(e) for e in ds.errors)
    assert len(ds) == 3 and len(messages) == 2
    assert "nodule_00001/CT00003.dcm" in messages[0]
    assert "nodule_00003" in messages[1] and "series folder is missing" in messages[1] and "labels.csv:5" in messages[1]
    ds = load_volume_dataset(nifti)
    messages = sorted(str(e) for e in ds.errors)
    assert len(ds) == 3 and len(messages) == 2
    assert "imagesTr/nodule_00002.nii.gz: not a readable image" in messages[0]
    assert "labelsTr/nodule_00004.nii.gz: mask geometry" in messages[1] and "labels.csv:6" in messages[1]


def test_dataset_label_and_path_errors_are_named(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "labels.csv").write_text("id,label\n../outside,1\ncase,2\n")
    ds = load_volume_dataset(root)
    assert ds.layout == "dicom" and not ds.records
    text = " | ".join(map(str, ds.errors))
    assert "labels.csv:2" in text and "outside the dataset folder" in text
    assert "labels.csv:3" in text and "label '2' is not 0 or 1" in text
    with pytest.raises(DataError, match="no known volume layout"):
        load_volume_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Windowing and resampling


def test_window_hu_by_hand():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 1000.0, -650.0])
    want = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 0.25])
    assert np.array_equal(window_hu(hu, (-1000, 400)), want.astype(np.float32))
    assert np.array_equal(window_hu(hu, "lung"), want.astype(np.float32))
    assert window_hu(np.array([-160.0, 40.0, 240.0]), "soft_tissue").tolist() == [0.0, 0.5, 1.0]
    for bad in [(400, -1000), (0, 0), (0, np.nan), "bone", (1, 2, 3)]:
        with pytest.raises(ValueError):
            window_hu(hu, bad)


def _torch_antialiased(vol: np.ndarray, size) -> np.ndarray:
    """PyTorch's 2-D antialiased bilinear resize applied to (H, W), then to (D, W') with W' kept."""
    t = torch.from_numpy(vol)[None]  # [1, D, H, W]: D as channels
    t = F.interpolate(t, size=size[1:], mode="bilinear", antialias=True, align_corners=False)
    t = t.permute(0, 2, 1, 3)  # [1, H', D, W']
    t = F.interpolate(t, size=(size[0], size[2]), mode="bilinear", antialias=True, align_corners=False)
    return t.permute(0, 2, 1, 3)[0].numpy()


@pytest.mark.parametrize("size", [(6, 16, 13), (4, 30, 9), (10, 24, 30), (17, 11, 45)])
def test_resample_volume_equals_torch_antialiased_linear(size):
    vol = np.random.default_rng(3).normal(size=(10, 24, 30))
    out, spacing = resample_volume(vol, size, (2.0, 0.8, 0.8))
    assert out.dtype == np.float32 and out.shape == size
    np.testing.assert_allclose(out, _torch_antialiased(vol, size), atol=1e-5)
    assert spacing == pytest.approx((2.0 * 10 / size[0], 0.8 * 24 / size[1], 0.8 * 30 / size[2]))


def test_resample_volume_enlarging_equals_scipy_zoom():
    vol = np.random.default_rng(4).normal(size=(5, 7, 6))
    size = (11, 14, 15)
    out, _ = resample_volume(vol, size)
    ref = ndimage.zoom(vol, np.divide(size, vol.shape), order=1, grid_mode=True, mode="nearest")
    assert ref.shape == size
    np.testing.assert_allclose(out, ref, atol=1e-5)
    same, spacing = resample_volume(vol, vol.shape, (1.5, 2.0, 2.5))
    assert np.array_equal(same, vol.astype(np.float32)) and spacing == (1.5, 2.0, 2.5)


def test_resampled_geometry_equals_simpleitk_resampling():
    """A volume linear in patient coordinates, enlarged 2x: ITK's linear resampling onto our new grid, and the
    linear function at our new voxel centres, both equal ours away from the border."""
    shape, size = (6, 8, 10), (12, 16, 20)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    points = np.stack([OBLIQUE.physical_point(ix) for ix in zip(k.ravel(), j.ravel(), i.ravel(), strict=True)])
    coef = np.array([0.3, -1.2, 0.7])
    vol = (points @ coef).reshape(shape)
    out, spacing = resample_volume(vol, size, OBLIQUE.spacing)
    geo = OBLIQUE.resampled(shape, size)
    assert geo.spacing == pytest.approx(spacing)
    ref = sitk.Resample(OBLIQUE.image(vol), geo.image(np.zeros(size)), sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat64)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(out[inner], sitk.GetArrayFromImage(ref)[inner], atol=1e-4)
    for ix in [(1, 1, 1), (5, 9, 13), (10, 14, 18)]:
        assert out[ix] == pytest.approx(geo.physical_point(ix) @ coef, abs=1e-4)
    # The extent is kept: the new grid's first and last voxel edges are the old grid's.
    half_old, half_new = np.array(OBLIQUE.spacing) / 2, np.array(geo.spacing) / 2
    corner = OBLIQUE.physical_point(-half_old / OBLIQUE.spacing)
    assert geo.physical_point(-half_new / geo.spacing) == pytest.approx(corner, abs=1e-9)


def _boxes(shape, boxes):
    m = np.zeros(shape, bool)
    for box in boxes:
        m[box] = True
    return m


def test_resample_mask_shrinking_is_the_block_share_and_enlarging_is_nearest():
    m = _boxes((16, 16, 16), [np.s_[2:9, 3:11, 4:12], np.s_[10:15, 10:16, 0:6]])
    out = resample_mask(m, (8, 8, 8))
    assert np.array_equal(out, block_reduce(m, (2, 2, 2), np.mean) >= 0.5)
    small = _boxes((4, 5, 6), [np.s_[1:3, 0:2, 2:5]])
    assert np.array_equal(resample_mask(small, (8, 15, 12)), small.repeat(2, 0).repeat(3, 1).repeat(2, 2))


def test_resample_mask_non_integer_factors_by_exact_overlap():
    m = _boxes((10, 9, 12), [np.s_[1:7, 2:9, 0:8]])
    size = (4, 6, 5)
    # Exact overlap share: cut every voxel into size-many parts, then average in-shape-many groups.
    fine = m.repeat(size[0], 0).repeat(size[1], 1).repeat(size[2], 2).astype(float)
    share = block_reduce(fine, m.shape, np.mean)
    assert np.array_equal(resample_mask(m, size), share >= 0.5 - 1e-9)


def test_resample_mask_keeps_every_lesion():
    m = np.zeros((16, 16, 16), bool)
    m[5, 6, 7] = True  # one voxel: a share of 1/64 of its new voxel
    m[12:14, 1, 1] = True  # two voxels in another corner
    out = resample_mask(m, (4, 4, 4))
    assert out.sum() == 2 and out[1, 1, 1] and out[3, 0, 0]
    row = np.zeros((16, 16, 16), bool)
    row[5, 6, 7:10] = True  # centres in new voxels x = 1, 2, 2: the one holding most of it is kept
    assert np.argwhere(resample_mask(row, (4, 4, 4))).tolist() == [[1, 1, 2]]
    assert not resample_mask(np.zeros((8, 8, 8), bool), (3, 3, 3)).any()
    big = _boxes((16, 16, 16), [np.s_[0:8, 0:8, 0:8]])
    big[15, 15, 15] = True
    out = resample_mask(big, (4, 4, 4))
    assert out[:2, :2, :2].all() and out[3, 3, 3] and out.sum() == 9
