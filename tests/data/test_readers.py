"""Readers: SynthCXR round trips, DICOM decoding rules, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from saliency_trust.data import DataError, detect_layout, load_dataset
from saliency_trust.data.dicom import read_dicom, write_dicom
from saliency_trust.data.rle import decode_siim_rle, encode_siim_rle
from saliency_trust.data.synth import render


def _cases(root, task):
    meta = json.loads((root / "synthcxr.json").read_text())
    return [render(task, i, meta["size"], meta["seed"]) for i in range(meta["n"])]


def test_rsna_round_trip_masks_equal_generator_boxes(rsna_synth):
    ds = load_dataset(rsna_synth)
    assert ds.layout == "rsna" and not ds.errors and len(ds) == 24
    cases = _cases(rsna_synth, "opacity")
    by_id = {r.id: r for r in ds}
    order = [r["id"] for r in csv.DictReader((rsna_synth / "split.csv").open())]
    assert any(c.label for c in cases) and any(not c.label for c in cases)
    for i, pid in enumerate(order):
        rec, case = by_id[pid], cases[i]
        assert rec.label == case.label and rec.split == case.split
        assert rec.image.dtype == np.float32 and rec.image.shape == (96, 96)
        assert np.allclose(rec.image, case.pixels / 4095.0, atol=1e-6)
        if case.label:
            assert np.array_equal(rec.mask, case.box_mask())
        else:
            assert rec.mask is None


def test_siim_round_trip_masks_equal_generator_masks(siim_synth):
    ds = load_dataset(siim_synth)
    assert ds.layout == "siim" and not ds.errors and len(ds) == 24
    cases = _cases(siim_synth, "pneumothorax")
    order = [r["id"] for r in csv.DictReader((siim_synth / "split.csv").open())]
    by_id = {r.id: r for r in ds}
    for i, image_id in enumerate(order):
        rec, case = by_id[image_id], cases[i]
        assert rec.label == case.label
        if case.label:
            assert np.array_equal(rec.mask, case.mask)
        else:
            assert rec.mask is None


def _reference_rle_decode(rle: str, width: int, height: int) -> np.ndarray:
    """SIIM's published decoding, written out the slow way: relative starts, column-major."""
    mask = np.zeros(width * height, dtype=np.uint8)
    if rle.strip() != "-1":
        nums = [int(t) for t in rle.split()]
        pos = 0
        for start, length in zip(nums[0::2], nums[1::2], strict=True):
            pos += start
            mask[pos : pos + length] = 1
            pos += length
    return mask.reshape(width, height).T.astype(bool)


def test_rle_matches_reference_decoder_and_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(5, 40, size=2)
        m = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        rle = encode_siim_rle(m)
        assert np.array_equal(decode_siim_rle(rle, (h, w)), m)
        assert np.array_equal(_reference_rle_decode(rle, w, h), m)
    assert encode_siim_rle(np.zeros((4, 4), bool)) == "-1"


@pytest.mark.parametrize("bad", ["1 2 3", "a b", "5 -2", "0 0", "10 100"])
def test_malformed_rle_raises_naming_the_source(bad):
    with pytest.raises(DataError, match="train-rle.csv:7"):
        decode_siim_rle(bad, (8, 8), source="train-rle.csv:7")


def _write_raw(path, arr, photometric="MONOCHROME2", bits=16, stored=12, slope=None, intercept=None, signed=False):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_monochrome1_is_inverted_and_bit_depths_scale(tmp_path):
    arr = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    m2, _ = read_dicom(_write_raw(tmp_path / "m2.dcm", arr))
    m1, _ = read_dicom(_write_raw(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    assert np.allclose(m2, arr / 4095.0, atol=1e-7)
    assert np.allclose(m1, 1.0 - arr / 4095.0, atol=1e-7)
    a8 = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    e8, _ = read_dicom(_write_raw(tmp_path / "8.dcm", a8, bits=8, stored=8))
    assert np.allclose(e8, a8 / 255.0, atol=1e-7)


def test_dicom_rescale_slope_intercept_applied(tmp_path):
    arr = np.array([[0, 100], [200, 1023]], dtype=np.uint16)
    img, _ = read_dicom(_write_raw(tmp_path / "r.dcm", arr, stored=10, slope=2.0, intercept=-1024.0))
    # The stored range [0, 1023] maps through the rescale to [-1024, 1022]; values keep their place.
    assert np.allclose(img, (arr * 2.0 - 1024 + 1024) / (1023 * 2.0), atol=1e-7)
    s = np.array([[-2048, 0], [1000, 2047]], dtype=np.int16)
    img, _ = read_dicom(_write_raw(tmp_path / "s.dcm", s, stored=12, signed=True))
    assert np.allclose(img, (s + 2048) / 4095.0, atol=1e-7)


def test_compressed_with_an_installed_decoder_reads(tmp_path):
    arr = (np.arange(48 * 40).reshape(48, 40) % 4096).astype(np.uint16)
    plain = _write_raw(tmp_path / "p.dcm", arr)
    ds = pydicom.dcmread(plain)
    ds.compress(pydicom.uid.RLELossless)  # pydicom's own RLE codec: always installed
    ds.save_as(tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert np.array_equal(read_dicom(tmp_path / "rle.dcm")[0], read_dicom(plain)[0])


def test_compressed_without_decoder_is_a_clear_error(tmp_path):
    path = _write_raw(tmp_path / "c.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51 not a real codestream"])
    ds.save_as(path)
    with pytest.raises(DataError, match=r"c\.dcm.*(compressed|decod)"):
        read_dicom(path)


def _corrupt_rsna(src, dst):
    shutil.copytree(src, dst)
    files = sorted((dst / "stage_2_train_images").glob("*.dcm"))
    truncated, nonimage = files[0], files[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    sr = DicomDataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID
    sr.Modality = "SR"
    sr.save_as(nonimage, enforce_file_format=True)
    outside = files[2].stem
    with (dst / "stage_2_train_labels.csv").open("a") as f:
        f.write(f"{outside},500.0,500.0,20.0,20.0,1\n")
    return truncated, nonimage, outside


def test_bad_rsna_files_are_named_and_the_rest_load(rsna_synth, tmp_path):
    truncated, nonimage, outside = _corrupt_rsna(rsna_synth, tmp_path / "bad")
    ds = load_dataset(tmp_path / "bad")
    messages = [str(e) for e in ds.errors]
    assert len(ds.errors) == 3 and len(ds) == 21
    assert any(truncated.name in m and ("truncated" in m or "readable" in m) for m in messages)
    assert any(nonimage.name in m and "no pixel data" in m for m in messages)
    assert any(outside in m and "outside" in m and "stage_2_train_labels.csv" in m for m in messages)


def test_bad_siim_row_is_named_and_the_rest_load(siim_synth, tmp_path):
    shutil.copytree(siim_synth, tmp_path / "bad")
    labels = tmp_path / "bad" / "train-rle.csv"
    lines = labels.read_text().splitlines()
    victim = next(i for i, line in enumerate(lines) if i and not line.endswith("-1"))
    image_id = lines[victim].split(",")[0]
    lines[victim] = f"{image_id}, 12 5 x 7"
    labels.write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "bad")
    assert len(ds.errors) == 1 and len(ds) == 23
    msg = str(ds.errors[0])
    assert f"train-rle.csv:{victim + 1}" in msg and image_id in msg and "malformed RLE" in msg


def test_generic_layout_boxes_and_masks(tmp_path):
    from PIL import Image

    root = tmp_path / "g"
    (root / "images").mkdir(parents=True)
    img = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(img).save(root / "images" / "a.png")
    Image.fromarray(img).save(root / "images" / "b.png")
    (root / "labels.csv").write_text(
        "file,x,y,w,h\nimages/a.png,10,12,5,6\nimages/a.png,30.5,30,4,4\nimages/b.png,,,,\n")
    ds = load_dataset(root)
    assert ds.layout == "generic" and not ds.errors
    a, b = ds.records
    assert a.label == 1 and b.label == 0 and b.mask is None
    expected = np.zeros((64, 64), bool)
    expected[12:18, 10:15] = True
    expected[30:34, 30:35] = True
    assert np.array_equal(a.mask, expected)
    assert np.allclose(a.image, img / 255.0)
    # Resized: the paper's rule int(T * c / (S - 1)) with inclusive ends.
    small = load_dataset(root, image_size=32).records[0]
    exp32 = np.zeros((32, 32), bool)
    exp32[int(32 * 12 / 63) : int(32 * 18 / 63) + 1, int(32 * 10 / 63) : int(32 * 15 / 63) + 1] = True
    exp32[int(32 * 30 / 63) : int(32 * 34 / 63) + 1, int(32 * 30.5 / 63) : int(32 * 34.5 / 63) + 1] = True
    assert np.array_equal(small.mask, exp32) and small.image.shape == (32, 32)


def test_unknown_layout_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no known layout"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_write_dicom_is_atomic_and_validates(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_dicom(tmp_path / "x.dcm", np.zeros((2, 2, 2), np.uint16), patient_id="p", study_uid="1.2",
                    series_uid="1.3", sop_uid="1.4", pixel_spacing=(1, 1))
    assert not list(tmp_path.iterdir())
