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


def decode_pixels(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    """``ds.pixel_array``, or a DataError naming ``path``: no decoder for its compression, or truncated/corrupt data."""
    ts = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    try:
        return ds.pixel_array
    except Exception as exc:
        if getattr(ts, "is_compressed", False):
            raise DataError(
                str(path),
                f"compressed transfer syntax {getattr(ts, 'name', ts)} and no working decoder "
                f"({type(exc).__name__}: {exc}); install pylibjpeg / pylibjpeg-libjpeg / "
                "pylibjpeg-openjpeg or GDCM",
            ) from None
        raise DataError(str(path), f"pixel data cannot be decoded, file truncated or corrupt ({exc})") from None


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
    arr = decode_pixels(ds, path)
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


# ---------------------------------------------------------------------------------------------
# CT series (one file per slice)

#: CT Image Storage.
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters, as precise as that allows."""
    from pydicom.valuerep import DSfloat

    return str(DSfloat(float(value), auto_format=True))


def write_ct_series(
    folder: str | Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...] = IDENTITY_DIRECTION,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    sop_uids: list[str],
    rescale: tuple[float, float] = (1.0, -1024.0),
    description: str = "",
) -> Path:
    """Write a CT volume in HU (``[D, H, W]``) as a DICOM series: one CT Image Storage file per slice.

    Geometry as ITK and DICOM (LPS, mm): ``spacing`` is (z, y, x), the array's axes; ``origin`` the (x, y, z)
    position of voxel [0, 0, 0]; ``direction`` the 3x3 row-major matrix whose columns are the directions of
    the array's columns, rows and slices. It must be right-handed: slice ``k`` lies at ``origin + k * spacing_z
    * normal`` with normal = row x column of ImageOrientationPatient, the way readers sort slices. Values are
    stored as int16 with HU = stored * slope + intercept (``rescale``); HU that do not fit are refused.

    The slices are written into a hidden temporary folder beside ``folder`` that is renamed when the series
    is whole, so a crash never leaves a half-written series under ``folder``'s name.
    """
    import os
    import shutil

    from saliency_trust import faults

    folder = Path(folder)
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"{folder}: a CT series needs a [D, H, W] volume, got shape {hu.shape}")
    if len(sop_uids) != hu.shape[0] or len(set(sop_uids)) != hu.shape[0]:
        raise ValueError(f"{folder}: need {hu.shape[0]} distinct SOP instance UIDs, got {len(set(sop_uids))}")
    m = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(m.T @ m, np.eye(3), atol=1e-6) or np.linalg.det(m) < 0:
        raise ValueError(f"{folder}: direction must be a right-handed orthonormal 3x3 matrix, got {direction}")
    slope, intercept = float(rescale[0]), float(rescale[1])
    if not slope > 0:
        raise ValueError(f"{folder}: rescale slope must be positive, got {slope}")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    if not np.isfinite(stored).all() or stored.min() < lo or stored.max() > hi:
        raise ValueError(f"{folder}: HU do not fit int16 with slope {slope} and intercept {intercept}")
    stored = stored.astype(np.int16)
    sz, sy, sx = (float(v) for v in spacing)
    row, col, normal = m[:, 0], m[:, 1], m[:, 2]
    iop = [_ds(v) for v in (*row, *col)]

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for k in range(hu.shape[0]):
            position = np.asarray(origin, dtype=np.float64) + k * sz * normal
            ds = _ct_slice(stored[k], k, sop_uid=sop_uids[k], position=position, iop=iop, pixel_spacing=(sy, sx),
                           thickness=sz, rescale=(slope, intercept), patient_id=patient_id, study_uid=study_uid,
                           series_uid=series_uid, frame_uid=frame_of_reference_uid, description=description)
            save_dicom(ds, tmp / f"CT{k + 1:05d}.dcm")
            faults.point(f"write:{folder.name}/{k}")
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        if folder.exists():
            folder.replace(old)
        tmp.replace(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _remove_dead_temporaries(folder: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` / ``.old`` folders that writers which died left beside ``folder``."""
    import glob
    import os
    import shutil

    for stale in folder.parent.glob(f".{glob.escape(folder.name)}.*.*"):
        pid = stale.name[len(folder.name) + 2 :].split(".")[0]
        if not pid.isdigit() or stale.suffix not in (".tmp", ".old"):
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # that writer is alive
            except ProcessLookupError:
                pass
            except OSError:
                continue
        shutil.rmtree(stale, ignore_errors=True)


def _ct_slice(pixels: np.ndarray, k: int, *, sop_uid: str, position: np.ndarray, iop: list[str],
              pixel_spacing: tuple[float, float], thickness: float, rescale: tuple[float, float],
              patient_id: str, study_uid: str, series_uid: str, frame_uid: str, description: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset(sop_uid, {}, file_meta=meta, preamble=b"\0" * 128)
    today = _dt.date(2020, 1, 1).strftime("%Y%m%d")
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientID = patient_id
    ds.PatientName = "SynthCT^Anonymous"
    ds.PatientSex = "O"
    ds.PatientPosition = "HFS"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.Modality = "CT"
    ds.Manufacturer = "SaliencyTrust SynthCT"
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = iop
    ds.SliceThickness = _ds(thickness)
    ds.SliceLocation = _ds(position[2])
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "-300", "1400"  # the lung window, [-1000, 400] HU
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
