"""Reading and writing single-frame radiograph DICOM files."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from saliency_trust.data.errors import DataError

#: Digital X-Ray Image Storage - For Presentation.
#: The most pixels (rows x columns x frames x samples) any reader decodes: 64 Mpx, 8192 x 8192.
MAX_PIXELS = 8192 * 8192
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
#: Computed Radiography Image Storage.
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
IMPLEMENTATION_UID = "2.25.167930441383373474155623452166541234517"
#: Our own (pydicom would write its version here, so files would differ between pydicom 2 and 3).
IMPLEMENTATION_VERSION = "SALIENCYTRUST_1"


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    pixel_spacing: tuple[float, float],
    bits_stored: int = 12,
    modality: str = "DX",
    description: str = "",
) -> Path:
    """Write a MONOCHROME2 radiograph (uint16 or uint8 ``pixels``) as an uncompressed DICOM file.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"{path}: pixels must be 2-D, got shape {pixels.shape}")
    sop_class = DX_STORAGE if modality == "DX" else CR_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    today = _dt.date(2020, 1, 1).strftime("%Y%m%d")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = "SynthCXR^Anonymous"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "SaliencyTrust SynthCXR"
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["DERIVED", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.PixelSpacing = [f"{pixel_spacing[0]:.6g}", f"{pixel_spacing[1]:.6g}"]
    ds.ImagerPixelSpacing = ds.PixelSpacing
    if pixels.dtype == np.uint8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    else:
        pixels = pixels.astype(np.uint16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    top = 2**ds.BitsStored - 1
    ds.WindowCenter = f"{top / 2:.1f}"
    ds.WindowWidth = f"{top:.1f}"
    ds.PixelData = pixels.tobytes()
    tmp = path.with_name(path.name + ".partial")
    save_dicom(ds, tmp)
    tmp.replace(path)
    return path


def save_dicom(ds: FileDataset, path: str | Path) -> None:
    """Write ``ds`` as a standard DICOM file (preamble, file meta) with pydicom 2.4 (Slicer 5.8 / 5.10) or 3.

    pydicom 3 spells this ``enforce_file_format=True``; 2.x spells it ``write_like_original=False``
    (deprecated in 3); each version is called with its own keyword, so neither warns nor fails. 2.x
    also encodes by the dataset's ``is_implicit_VR`` / ``is_little_endian`` (a new dataset says
    implicit VR), so they are set from the file meta's transfer syntax there (3 reads it itself).
    """
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:
        syntax = ds.file_meta.TransferSyntaxUID
        ds.is_implicit_VR, ds.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
        pydicom.dcmwrite(path, ds, write_like_original=False)


def read_dicom(path: str | Path, frame: int | None = None,
               notes: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Read a single-frame grayscale DICOM into float32 in [0, 1] (MONOCHROME2 sense).

    The modality LUT (rescale slope/intercept) is applied, MONOCHROME1 is inverted, and the
    stored range (``BitsStored``, signed or not) maps to [0, 1] through the same rescale, so no
    per-image normalization depends on the content. Returns the image and a small geometry dict
    (``spacing`` in mm as (row, col), ``photometric``, ``bits_stored``, and what says whether it is a
    frontal radiograph: ``modality``, ``view_position``, ``frames``). ``frame`` reads that frame of a
    multi-frame image (which is refused otherwise). An RGB image of a grey radiograph (colour only as
    noise or a small annotation) is read as its luminance, said in ``notes``
    (:func:`saliency_trust.data.imageio.grey_from_colour`); real colour is refused.

    Raises :class:`DataError` naming the file for: unreadable or truncated files, DICOM without
    pixel data, compressed transfer syntaxes without an installed decoder, colour or multi-frame
    images.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(str(path), f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", "unknown")
        name = getattr(sop, "name", str(sop))
        raise DataError(str(path), f"DICOM has no pixel data (SOP class {name}); not an image")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if rows * cols * frames > MAX_PIXELS:  # from the header, before any pixel is decoded
        raise DataError(str(path), f"image is {cols}x{rows}x{frames}, over the {MAX_PIXELS // 2**20} Mpx "
                                   "limit; downsample it before assessment")
    ts = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        if getattr(ts, "is_compressed", False):
            raise DataError(
                str(path),
                f"compressed transfer syntax {getattr(ts, 'name', ts)} and no working decoder "
                f"({type(exc).__name__}: {exc}); install pylibjpeg / pylibjpeg-libjpeg / "
                "pylibjpeg-openjpeg or GDCM",
            ) from None
        raise DataError(str(path), f"pixel data cannot be decoded, file truncated or corrupt ({exc})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip()
    single = int(getattr(ds, "NumberOfFrames", 1) or 1) == 1
    if photometric == "RGB" and single and arr.ndim == 3 and arr.shape[-1] == 3:
        from saliency_trust.data.imageio import grey_from_colour

        arr, photometric = grey_from_colour(arr, path, notes), "MONOCHROME2"
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(str(path), f"photometric interpretation {photometric} is not a grayscale radiograph")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frame is not None and n_frames > 1 and arr.ndim == 3 and 0 <= frame < arr.shape[0]:
        arr = arr[frame]
    if arr.ndim != 2:
        raise DataError(str(path), f"expected one 2-D frame, got pixel array of shape {arr.shape}")
    bits = int(getattr(ds, "BitsStored", 16))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    vals = arr.astype(np.float64) * slope + intercept
    v_lo, v_hi = sorted((lo * slope + intercept, hi * slope + intercept))
    img = np.clip((vals - v_lo) / (v_hi - v_lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None) or (1.0, 1.0)
    geometry = {
        "spacing": (float(spacing[0]), float(spacing[1])),
        "photometric": photometric,
        "bits_stored": bits,
        "sop_instance_uid": str(getattr(ds, "SOPInstanceUID", "")),
        "modality": str(getattr(ds, "Modality", "") or "").strip().upper(),
        "view_position": str(getattr(ds, "ViewPosition", "") or "").strip().upper(),
        "frames": n_frames,
    }
    return img.astype(np.float32), geometry
