"""Generate a corpus of broken and hostile inputs for the readers, ``inference.json`` and the service.

    python tests/corpus/make_corpus.py OUT

Writes ``OUT/images/<case>.<ext>`` (single images, for ``read_input`` and uploads) and
``OUT/datasets/<case>/`` (dataset folders, for ``load_dataset``), and ``OUT/manifest.json`` naming
each case and what must happen: ``refused`` (a DataError naming the input and the problem) or
``read`` (read correctly). Everything is generated here; nothing is downloaded. The huge images
are written as streamed PNGs, so the corpus is a few MB on disk.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from saliency_trust.data.dicom import write_dicom
from saliency_trust.data.synth import generate


def _radiograph(n: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    return ((np.sin(xx / 7.0) + np.cos(yy / 5.0) + 2) / 4 * 4000).astype(np.uint16)


def _dicom(path: Path, **changes) -> Path:
    """A valid 64 px MONOCHROME2 DICOM, then ``changes`` applied to its dataset (None deletes)."""
    write_dicom(path, _radiograph(), sop_uid=generate_uid(), study_uid=generate_uid(), series_uid=generate_uid(),
                patient_id="CORPUS", pixel_spacing=(0.5, 0.5), bits_stored=12)
    if changes:
        ds = pydicom.dcmread(path)
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)
    return path


def _colour_dicom(path: Path, photometric: str) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", 32, 32
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    if photometric == "PALETTE COLOR":
        ds.SamplesPerPixel = 1
        lut = np.arange(256, dtype=np.uint16) * 257
        ds.RedPaletteColorLookupTableDescriptor = ds.GreenPaletteColorLookupTableDescriptor = [256, 0, 16]
        ds.BluePaletteColorLookupTableDescriptor = [256, 0, 16]
        ds.RedPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData = lut.tobytes()
        ds.BluePaletteColorLookupTableData = lut[::-1].tobytes()
        pixels = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds.PhotometricInterpretation = photometric
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _streamed_png(path: Path, width: int, height: int) -> Path:
    """A constant 8-bit grayscale PNG of any size, written row by row (never held in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    row = b"\0" + b"\x80" * width
    parts = []
    for _ in range(height):
        out = comp.compress(row)
        if out:
            parts.append(out)
    parts.append(comp.flush())
    with path.open("wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))
    return path


def _raw_nifti(path: Path, arr: np.ndarray) -> Path:
    """A NIfTI-1 float32 file written byte by byte (ITK's writer would not keep NaN or inf)."""
    arr = np.ascontiguousarray(arr, np.float32)
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, 2, arr.shape[1], arr.shape[0], 1, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<f", h, 112, 1.0)  # scl_slope
    h[344:348] = b"n+1\0"
    path.write_bytes(bytes(h) + b"\0\0\0\0" + arr.tobytes())
    return path


def _volume(path: Path, arr: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path


def make_images(out: Path) -> dict[str, str]:
    """Single-image cases -> expected outcome."""
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, str] = {}

    def add(path: Path, expect: str) -> None:
        cases[path.name] = expect

    good = _dicom(out / "good.dcm")
    add(good, "read")
    data = good.read_bytes()
    (out / "truncated.dcm").write_bytes(data[: len(data) // 2])
    add(out / "truncated.dcm", "refused")
    (out / "zero_length.dcm").write_bytes(b"")
    add(out / "zero_length.dcm", "refused")
    add(_dicom(out / "no_pixel_data.dcm", PixelData=None), "refused")
    add(_dicom(out / "bits_allocated_12.dcm", BitsAllocated=12), "refused")
    add(_dicom(out / "bits_allocated_32.dcm", BitsAllocated=32), "refused")
    add(_dicom(out / "multi_frame.dcm", NumberOfFrames=2, Rows=32), "refused")
    add(_dicom(out / "huge_header.dcm", Rows=20000, Columns=20000), "refused")
    add(_colour_dicom(out / "rgb.dcm", "RGB"), "refused")
    add(_colour_dicom(out / "ybr.dcm", "YBR_FULL"), "refused")
    add(_colour_dicom(out / "palette.dcm", "PALETTE COLOR"), "refused")
    (out / "html.dcm").write_bytes(b"<html><body>not a radiograph</body></html>")
    add(out / "html.dcm", "refused")
    add(_volume(out / "volume_3d.nii.gz", np.zeros((4, 32, 32), np.int16)), "refused")
    nan = np.ones((32, 32), np.float32)
    nan[3, 4] = np.nan
    add(_raw_nifti(out / "nan.nii", nan), "refused")
    inf = np.ones((32, 32), np.float32)
    inf[5, 6] = np.inf
    add(_raw_nifti(out / "inf.nii", inf), "refused")
    add(_volume(out / "one_pixel.nii.gz", np.ones((1, 1), np.uint16)), "refused")
    (out / "zero_length.nrrd").write_bytes(b"")
    add(out / "zero_length.nrrd", "refused")
    with gzip.open(out / "garbage.nii.gz", "wb") as f:
        f.write(b"\0" * 100)
    add(out / "garbage.nii.gz", "refused")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(out / "one_pixel.png")
    add(out / "one_pixel.png", "refused")
    add(_streamed_png(out / "large_10000.png", 10000, 10000), "refused")  # under Pillow's own bomb limit
    add(_streamed_png(out / "huge_20000.png", 20000, 20000), "refused")
    add(_streamed_png(out / "bomb_60000.png", 60000, 60000), "refused")
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(out / "colour.png")
    add(out / "colour.png", "refused")
    Image.fromarray(np.dstack([rgb, np.full((32, 32), 255, np.uint8)])).save(out / "colour_rgba.png")
    add(out / "colour_rgba.png", "refused")
    gray = (_radiograph(32) // 16).astype(np.uint8)
    Image.fromarray(np.dstack([gray] * 3)).save(out / "gray_as_rgb.png")
    add(out / "gray_as_rgb.png", "read")
    Image.fromarray(gray).save(out / "gray.jpg", quality=95)
    add(out / "gray.jpg", "read")
    Image.fromarray(_radiograph(32).astype(np.uint16) * 16).save(out / "sixteen_bit.png")
    add(out / "sixteen_bit.png", "read")
    (out / "text.png").write_text("this is not a picture\n")
    add(out / "text.png", "refused")
    (out / "unknown.bin").write_bytes(b"\x00\x01\x02" * 50)
    add(out / "unknown.bin", "refused")
    return cases


def make_datasets(out: Path) -> dict[str, str]:
    """Dataset-folder cases -> expected outcome (``refused``: a DataError names the file or row)."""
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, str] = {}
    rsna = generate(out / "_rsna", "opacity", n=4, size=64, seed=0, progress=False)
    siim = generate(out / "_siim", "pneumothorax", n=4, size=64, seed=1, progress=False)
    ids = [p.stem for p in sorted((rsna / "stage_2_train_images").glob("*.dcm"))]
    siim_ids = [p.stem for p in sorted(siim.rglob("*.dcm"))]

    def rsna_case(name: str, rows: list[str]) -> None:
        d = out / name
        (d / "stage_2_train_images").mkdir(parents=True)
        for pid in ids:
            (d / "stage_2_train_images" / f"{pid}.dcm").write_bytes((rsna / "stage_2_train_images" / f"{pid}.dcm")
                                                                    .read_bytes())
        (d / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n" + "".join(rows))
        cases[name] = "refused"

    rsna_case("rsna_negative_box", [f"{ids[0]},10,10,-5,20,1\n"])
    rsna_case("rsna_nan_box", [f"{ids[0]},nan,10,5,20,1\n"])
    rsna_case("rsna_box_outside", [f"{ids[0]},500,500,5,5,1\n"])
    rsna_case("rsna_text_box", [f"{ids[0]},ten,10,5,20,1\n"])
    rsna_case("rsna_path_traversal", ["../../../etc/passwd,,,,,0\n"])

    def siim_case(name: str, rle: str, image_id: str | None = None) -> None:
        d = out / name
        d.mkdir(parents=True)
        for p in siim.rglob("*.dcm"):
            (d / p.name).write_bytes(p.read_bytes())
        (d / "train-rle.csv").write_text(f"ImageId, EncodedPixels\n{image_id or siim_ids[0]}, {rle}\n")
        cases[name] = "refused"

    siim_case("siim_rle_beyond_image", "100 50 999999 10")
    siim_case("siim_rle_odd", "100 50 7")
    siim_case("siim_rle_negative", "-5 10")
    siim_case("siim_path_traversal", "-1", image_id="../../outside")

    def generic_case(name: str, csv_text: str | bytes, mask: np.ndarray | None = None) -> None:
        d = out / name
        (d / "images").mkdir(parents=True)
        Image.fromarray((_radiograph(32) // 16).astype(np.uint8)).save(d / "images" / "a.png")
        if mask is not None:
            Image.fromarray(mask).save(d / "m.png")
        labels = d / "labels.csv"
        labels.write_bytes(csv_text if isinstance(csv_text, bytes) else csv_text.encode())
        cases[name] = "refused"

    generic_case("generic_empty_csv", b"")
    generic_case("generic_header_only_csv", "file,x,y,w,h\n")
    generic_case("generic_binary_csv", bytes(range(256)) * 4)
    generic_case("generic_no_file_column", "image,label\nimages/a.png,1\n")
    generic_case("generic_mask_other_size", "file,mask\nimages/a.png,m.png\n", np.ones((8, 8), np.uint8))
    generic_case("generic_path_traversal_file", "file,label\n../../../../etc/hostname,1\n")
    generic_case("generic_path_traversal_mask", "file,mask\nimages/a.png,../../../../etc/hostname\n")
    generic_case("generic_missing_image", "file,label\nimages/nope.png,1\n")
    return cases


def make_corpus(out: str | Path) -> dict[str, dict[str, str]]:
    """Write the corpus under ``out``; returns and saves the manifest."""
    out = Path(out)
    manifest = {"images": make_images(out / "images"), "datasets": make_datasets(out / "datasets")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    m = make_corpus(sys.argv[1] if len(sys.argv) > 1 else "corpus_out")
    print(f"{len(m['images'])} image cases, {len(m['datasets'])} dataset cases")
