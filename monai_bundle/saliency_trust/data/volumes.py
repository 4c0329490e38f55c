"""Volumes (CT): geometry, DICOM series and NIfTI reading and writing, HU windowing, resampling, datasets.

Conventions
-----------
Arrays are ``[D, H, W]`` (slices, rows, columns), as SimpleITK's ``GetArrayFromImage`` gives them. A
:class:`VolumeGeometry` says where they lie in the patient (LPS, mm, as DICOM and ITK): ``spacing`` is
(z, y, x), the array's axes; ``origin`` the (x, y, z) position of voxel ``[0, 0, 0]``; ``direction``
ITK's 3x3 row-major matrix whose columns are the directions of the array's columns, rows and slices.

A DICOM series is read with pydicom and checked the way a careful reader checks it: one series per
folder, every slice a readable single-frame greyscale image of the wanted modality with the same size,
pixel spacing, orientation and frame of reference, slices stacked along their normal at one even step
(geometry from ImagePositionPatient, never SliceThickness; a missing slice shows as a gap of a whole
number of steps). HU = stored value x RescaleSlope + RescaleIntercept, slice by slice.

Resampling to a model's input size keeps the physical extent (spacing x size) and returns the spacing
used. Images: linear interpolation between voxel centres (``align_corners=False``), antialiased when
shrinking by a tent filter widened by the factor, axis by axis: the rule of PIL and of
``torch.nn.functional.interpolate(..., antialias=True)``. Masks: the share of each new voxel the lesion
covers (exact volume overlap) at least one half; a lesion (connected component) that would vanish keeps
the new voxel holding most of its voxel centres, so no lesion is lost.

Dataset layouts (:func:`load_volume_dataset`)
---------------------------------------------
(a) ``msd``: the Medical Segmentation Decathlon's ``imagesTr/<id>.nii.gz`` and ``labelsTr/<id>.nii.gz``
    (non-zero = lesion; ``dataset.json`` beside them is not needed) with ``labels.csv`` (``id,label``);
    without ``labels.csv`` every image of ``imagesTr`` is read and its label is whether its mask has a lesion.
(b) ``dicom``: ``labels.csv`` (``id,label``, optional ``mask``: a NIfTI/NRRD mask on the series' grid,
    relative to the root) and one DICOM series folder per case, ``<root>/<id>/``.

Where there is a ``labels.csv``, the cases are the ones it lists.

An optional ``split.csv`` (``id,split``) assigns train/val/test as for 2-D sets. A bad case becomes a
:class:`DataError` in ``errors`` (naming the file and the problem) and the others load.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom

from saliency_trust.data.dicom import IDENTITY_DIRECTION, decode_pixels
from saliency_trust.data.errors import DataError
from saliency_trust.data.imageio import VOLUME_SUFFIXES, suffix
from saliency_trust.data.readers import Dataset

log = logging.getLogger(__name__)

#: The most voxels a reader decodes (a 512 x 512 x 1024 CT), checked from headers before any pixel is read.
MAX_VOXELS = 2**28
#: The most slice files one series folder may hold.
MAX_SLICES = 4096
#: Windows in HU: lung (display) and soft tissue (volumes.md).
WINDOWS = {"lung": (-1000.0, 400.0), "soft_tissue": (-160.0, 240.0)}
#: Files a series folder may hold beside its slices (skipped); every other file must be a readable DICOM slice.
NOT_SLICES = (*VOLUME_SUFFIXES, ".json", ".csv", ".txt", ".md", ".png", ".jpg", ".jpeg", ".zip")
#: Slices farther from the median step than this share of it are uneven.
STEP_TOLERANCE = 0.01
VOLUME_LAYOUTS = ("msd", "dicom")
LABELS = "labels.csv"


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a ``[D, H, W]`` array lies in the patient (LPS, mm): spacing (z, y, x), origin (x, y, z), direction."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    @classmethod
    def of(cls, image) -> VolumeGeometry:
        """The geometry of a 3-D SimpleITK image."""
        sx, sy, sz = (float(v) for v in image.GetSpacing())
        return cls((sz, sy, sx), tuple(float(v) for v in image.GetOrigin()),
                   tuple(float(v) for v in image.GetDirection()))

    def image(self, array: np.ndarray):
        """A SimpleITK image of ``array`` ``[D, H, W]`` with this geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing(tuple(float(v) for v in self.spacing[::-1]))
        img.SetOrigin(tuple(float(v) for v in self.origin))
        img.SetDirection(tuple(float(v) for v in self.direction))
        return img

    def physical_point(self, index: Sequence[float]) -> np.ndarray:
        """The (x, y, z) position in mm of array index ``(k, j, i)`` (fractional indices allowed)."""
        m = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        step = np.asarray(index, dtype=np.float64)[::-1] * np.asarray(self.spacing, dtype=np.float64)[::-1]
        return np.asarray(self.origin, dtype=np.float64) + m @ step

    def resampled(self, shape: Sequence[int], size: Sequence[int]) -> VolumeGeometry:
        """The geometry of the grid :func:`resample_volume` makes from ``shape`` to ``size``: same extent."""
        shape, size = _triple(shape, "shape"), _triple(size, "size")
        spacing = tuple(s * n / m for s, n, m in zip(self.spacing, shape, size, strict=True))
        # Voxel centres move by half the change of spacing: the first new voxel still starts where the old one did.
        half = [(new - old) / 2 for new, old in zip(spacing, self.spacing, strict=True)]
        m = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        origin = np.asarray(self.origin, dtype=np.float64) + m @ np.asarray(half[::-1])
        return VolumeGeometry(spacing, tuple(float(v) for v in origin), self.direction)


# ---------------------------------------------------------------------------------------------
# Reading


def read_dicom_series(folder: str | Path, modalities: Sequence[str] = ("CT",)) -> tuple[np.ndarray, VolumeGeometry]:
    """Read the DICOM series in ``folder`` (one file per slice) as HU ``[D, H, W]`` float32 and its geometry.

    Slices are sorted along the slice normal (row x column of ImageOrientationPatient); the geometry comes from
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing. Hidden files, DICOMDIR and files with the
    suffixes of :data:`NOT_SLICES` are skipped. Raises :class:`DataError` naming the file or folder and the problem: an
    unreadable or corrupt file, a file without pixel data, another modality than ``modalities``, a multi-frame
    or colour image, more than one series in the folder, a single slice (a 2-D image), slices that differ in
    size, pixel spacing, orientation or frame of reference, a missing slice or uneven slice positions, two
    slices at one position, slices that do not stack along their normal, or a series over :data:`MAX_VOXELS`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "DICOM series folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and suffix(p) not in NOT_SLICES and p.name.upper() != "DICOMDIR")
    if not files:
        raise DataError(str(folder), "no DICOM files in the series folder")
    if len(files) > MAX_SLICES:
        raise DataError(str(folder), f"{len(files)} files, over the limit of {MAX_SLICES} slices for one series")
    slices = [_slice_header(p, modalities) for p in files]
    _one_series(folder, files, slices)
    if len(files) == 1:
        raise DataError(str(files[0]), "the only slice in its folder: a 2-D image where a volume is needed")
    rows = _agreed(files, slices, "size", lambda ds: (int(ds.Rows), int(ds.Columns)), _equal)
    pixel_spacing = _agreed(files, slices, "PixelSpacing", lambda ds: tuple(float(v) for v in ds.PixelSpacing),
                            lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6))
    iop = _agreed(files, slices, "ImageOrientationPatient",
                  lambda ds: tuple(float(v) for v in ds.ImageOrientationPatient),
                  lambda a, b: np.allclose(a, b, atol=1e-4))
    _agreed(files, slices, "FrameOfReferenceUID", lambda ds: str(ds.get("FrameOfReferenceUID", "")), _equal)
    if rows[0] * rows[1] * len(files) > MAX_VOXELS:
        raise DataError(str(folder), f"{rows[1]}x{rows[0]}x{len(files)} voxels, over the limit of "
                                     f"{MAX_VOXELS // 2**20} M voxels; downsample the series before assessment")
    if min(pixel_spacing) <= 0 or not np.isfinite(pixel_spacing).all():
        raise DataError(str(files[0]), f"PixelSpacing {pixel_spacing} is not positive")
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DataError(str(files[0]), f"ImageOrientationPatient {iop} is not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    order, step = _slice_order(folder, files, positions, normal, min(pixel_spacing))
    volume = np.empty((len(files), *rows), dtype=np.float32)
    for k, n in enumerate(order):
        arr = decode_pixels(slices[n], files[n])
        if arr.shape != rows:
            raise DataError(str(files[n]), f"pixel data of shape {arr.shape} where Rows x Columns is {rows}")
        slope = float(slices[n].get("RescaleSlope", 1.0) or 1.0)
        intercept = float(slices[n].get("RescaleIntercept", 0.0) or 0.0)
        if not np.isfinite([slope, intercept]).all():
            raise DataError(str(files[n]), f"RescaleSlope {slope} / RescaleIntercept {intercept} is not finite")
        volume[k] = arr.astype(np.float64) * slope + intercept
    direction = tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())
    geometry = VolumeGeometry((step, pixel_spacing[0], pixel_spacing[1]),
                              tuple(float(v) for v in positions[order[0]]), direction)
    return volume, geometry


def _slice_header(path: Path, modalities: Sequence[str]) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(str(path), f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID", "unknown")
        raise DataError(str(path), f"DICOM has no pixel data (SOP class {getattr(sop, 'name', sop)}); not a slice")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in [m.upper() for m in modalities]:
        raise DataError(str(path), f"modality {modality or 'missing'}; a {'/'.join(modalities)} volume is needed")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(str(path), f"a multi-frame image ({frames} frames); a series of one file per slice is needed")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(str(path), f"photometric interpretation {photometric or 'missing'}; a slice must be greyscale")
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
               if k not in ds]
    if missing:
        raise DataError(str(path), f"no {', '.join(missing)}: the slice's place in the volume is unknown")
    try:
        ok = len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6 and len(ds.PixelSpacing) == 2
        values = [float(v) for v in (*ds.ImagePositionPatient, *ds.ImageOrientationPatient, *ds.PixelSpacing)]
    except (TypeError, ValueError):
        ok, values = False, []
    if not ok or not np.isfinite(values).all():
        raise DataError(str(path), "ImagePositionPatient / ImageOrientationPatient / PixelSpacing are malformed")
    return ds


def _one_series(folder: Path, files: list[Path], slices: list[pydicom.Dataset]) -> None:
    series: dict[str, list[Path]] = {}
    for path, ds in zip(files, slices, strict=True):
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or "(none)"), []).append(path)
    if len(series) > 1:
        parts = "; ".join(f"{uid}: {len(p)} file(s), e.g. {p[0].name}" for uid, p in series.items())
        raise DataError(str(folder), f"mixed series: {len(series)} series in one folder ({parts}); "
                                     "put each series in its own folder")


def _equal(a, b) -> bool:
    return a == b


def _agreed(files: list[Path], slices: list[pydicom.Dataset], name: str, get, same):
    """The value most slices have; a DataError naming the first slice that differs from it."""
    values = [get(ds) for ds in slices]
    ref = Counter(values).most_common(1)[0][0]  # exact repeats are the rule; the tolerance is for the others
    for path, v in zip(files, values, strict=True):
        if not same(v, ref):
            what = "inconsistent spacing: " if name == "PixelSpacing" else ""
            raise DataError(str(path), f"{what}{name} {v} differs from the series' {ref}")
    return ref


def _slice_order(folder: Path, files: list[Path], positions: np.ndarray, normal: np.ndarray,
                 pixel: float) -> tuple[np.ndarray, float]:
    """Slice order along the normal and the step between slices, or a DataError for a bad stack."""
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    across = positions[order] - along[order, None] * normal[None, :]
    shift = np.linalg.norm(across - across[0], axis=1)
    if shift.max() > max(1e-2, 1e-2 * pixel):
        bad = order[int(np.argmax(shift))]
        raise DataError(str(files[bad]), f"slice is shifted by {shift.max():.4g} mm across the slice normal from "
                                         f"{files[order[0]].name}: the slices do not stack (gantry tilt?)")
    steps = np.diff(along[order])
    names = [files[n].name for n in order]
    if steps.min() <= 1e-3:
        i = int(np.argmin(steps))
        raise DataError(str(folder), f"two slices at one position ({along[order[i]]:.4g} mm along the normal): "
                                     f"{names[i]} and {names[i + 1]}; duplicate slices or two acquisitions")
    nominal = float(np.median(steps))
    off = np.abs(steps - nominal) > STEP_TOLERANCE * nominal
    if off.any():
        i = int(np.argmax(off))
        ratio = steps[i] / nominal
        if round(ratio) >= 2 and abs(ratio - round(ratio)) <= 0.1:
            raise DataError(str(folder), f"missing slice: {round(ratio) - 1} slice(s) missing between {names[i]} and "
                                         f"{names[i + 1]} ({steps[i]:.4g} mm apart where slices are {nominal:.4g} "
                                         "mm apart)")
        raise DataError(str(folder), f"uneven slice positions: {names[i]} and {names[i + 1]} are {steps[i]:.4g} mm "
                                     f"apart where slices are {nominal:.4g} mm apart")
    return order, float((along[order[-1]] - along[order[0]]) / (len(order) - 1))


def read_volume_file(path: str | Path) -> tuple[np.ndarray, VolumeGeometry]:
    """A NIfTI / NRRD / MHA volume as float32 ``[D, H, W]`` (its values, e.g. HU) and its geometry.

    A 4-D file with one volume is read as that volume. Raises :class:`DataError` naming the file for an
    unreadable file, a 2-D image, several volumes or channels, NaN or infinite values, or over :data:`MAX_VOXELS`.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "volume file is missing")
    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()  # header only: refuse a huge or odd image before allocating it
        size, comps = list(info.GetSize()), info.GetNumberOfComponents()
    except RuntimeError as exc:
        raise DataError(str(path), f"not a readable image ({_last_line(exc)})") from None
    if comps != 1:
        raise DataError(str(path), f"{comps}-component image; a volume must have one greyscale channel")
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) < 3 or size[2] == 1:
        raise DataError(str(path), f"a 2-D image ({'x'.join(map(str, size))}) where a volume is needed")
    if len(size) > 3:
        raise DataError(str(path), f"a {len(size)}-D image ({'x'.join(map(str, size))}); one 3-D volume is needed")
    if int(np.prod(size)) > MAX_VOXELS:
        raise DataError(str(path), f"{'x'.join(map(str, size))} voxels, over the limit of {MAX_VOXELS // 2**20} M")
    bad = _nifti_non_finite(path)
    if bad:
        raise DataError(str(path), f"volume has {bad} NaN or infinite values")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(str(path), f"not a readable image ({_last_line(exc)})") from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(str(path), f"volume has {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr, VolumeGeometry.of(img)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_non_finite(path: Path) -> int:
    """How many NaN / inf values a float NIfTI file holds (ITK's reader silently reads them as 0)."""
    if suffix(path) not in (".nii", ".nii.gz"):
        return 0
    with (gzip.open if suffix(path) == ".nii.gz" else open)(path, "rb") as f:
        head = f.read(352)
        if len(head) < 348:
            return 0
        order = "<" if int.from_bytes(head[:4], "little") == 348 else ">"
        code = int(np.frombuffer(head[70:72], order + "i2")[0])
        if code not in _NIFTI_FLOATS:
            return 0
        f.seek(max(int(np.frombuffer(head[108:112], order + "f4")[0]), 352))
        dtype = np.dtype(order + _NIFTI_FLOATS[code])
        bad = 0
        while chunk := f.read(2**22 - 2**22 % dtype.itemsize):
            bad += int((~np.isfinite(np.frombuffer(chunk, dtype))).sum())
    return bad


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def read_volume(path: str | Path, modalities: Sequence[str] = ("CT",)) -> tuple[np.ndarray, VolumeGeometry]:
    """A volume and its geometry from a DICOM series folder, a zipped DICOM series, or a NIfTI/NRRD/MHA file."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, modalities)
    if not path.is_file():
        raise DataError(str(path), "volume file or folder is missing")
    if suffix(path) == ".zip":
        return _read_zipped_series(path, modalities)
    if suffix(path) in VOLUME_SUFFIXES:
        return read_volume_file(path)
    raise DataError(str(path), f"unsupported volume {suffix(path) or 'file'}: use a DICOM series folder or zip, "
                               "NIfTI, NRRD or MHA")


def _read_zipped_series(path: Path, modalities: Sequence[str]) -> tuple[np.ndarray, VolumeGeometry]:
    """A zipped DICOM series: its files (any folders inside the zip) are read as one series folder."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(str(path), f"not a readable zip file ({exc})") from None
    with zf, tempfile.TemporaryDirectory(prefix="saliency_trust_series_") as tmp:
        members = [m for m in zf.infolist() if not m.is_dir() and "__MACOSX/" not in m.filename
                   and not PurePosixPath(m.filename).name.startswith(".")]
        total = sum(m.file_size for m in members)
        if total > 4 * MAX_VOXELS:
            raise DataError(str(path), f"unpacks to {total / 2**30:.1f} GiB, over the limit for one series")
        names: dict[str, str] = {}
        for m in members:
            name = PurePosixPath(m.filename.replace("\\", "/")).name
            if name in names:
                raise DataError(str(path), f"two files named {name} ({names[name]}, {m.filename}); zip one series")
            names[name] = m.filename
            try:
                with zf.open(m) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise DataError(f"{path}!{m.filename}", f"cannot be unpacked ({exc})") from None
        try:
            return read_dicom_series(tmp, modalities)
        except DataError as err:
            source = err.source
            for name, member in names.items():
                source = source.replace(os.path.join(tmp, name), f"{path}!{member}")
            raise DataError(source.replace(tmp, str(path)), err.problem) from None


def read_volume_mask(path: str | Path, shape: Sequence[int], geometry: VolumeGeometry,
                     where: str | None = None) -> np.ndarray:
    """A lesion mask (non-zero = lesion) as bool ``[D, H, W]``; it must lie on its image's grid.

    ``where`` names what pointed here (a labels CSV row). Raises :class:`DataError` naming the mask when it is
    missing, unreadable, or its size, spacing, origin or direction differ from the image's.
    """
    path = Path(path)
    named = f" (named in {where})" if where else ""
    if not path.is_file():
        raise DataError(str(path), f"mask file is missing{named}")
    arr, geo = read_volume_file(path)
    if arr.shape != tuple(shape):
        raise DataError(str(path), f"mask is {arr.shape} (D, H, W) but its image is {tuple(shape)}{named}")
    tol = 1e-2 * min(geometry.spacing)
    if not (np.allclose(geo.spacing, geometry.spacing, rtol=1e-3)
            and np.allclose(geo.origin, geometry.origin, atol=tol)
            and np.allclose(geo.direction, geometry.direction, atol=1e-3)):
        raise DataError(str(path), f"mask geometry (spacing {_fmt(geo.spacing)}, origin {_fmt(geo.origin)}) differs "
                                   f"from its image's (spacing {_fmt(geometry.spacing)}, origin "
                                   f"{_fmt(geometry.origin)}){named}")
    return arr != 0


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


# ---------------------------------------------------------------------------------------------
# Writing


def write_volume(path: str | Path, array: np.ndarray, geometry: VolumeGeometry) -> Path:
    """Write ``array`` ``[D, H, W]`` (its dtype kept) with ``geometry`` as NIfTI / NRRD / MHA, atomically."""
    import SimpleITK as sitk

    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: a volume must be [D, H, W], got shape {array.shape}")
    if suffix(path) not in VOLUME_SUFFIXES:
        raise ValueError(f"{path}: write a volume as one of {VOLUME_SUFFIXES}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix(path)}")
    try:
        sitk.WriteImage(geometry.image(array), str(tmp), useCompression=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Windowing and resampling


def _window(window: Sequence[float] | str) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; name one of {sorted(WINDOWS)} or give [lo, hi] in HU")
        return WINDOWS[window]
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"a HU window is [lo, hi], got {window!r}") from None
    if not (np.isfinite([lo, hi]).all() and hi > lo):
        raise ValueError(f"a HU window needs finite lo < hi, got [{lo}, {hi}]")
    return lo, hi


def window_hu(volume_hu: np.ndarray, window: Sequence[float] | str) -> np.ndarray:
    """HU mapped to [0, 1] float32 through ``window`` ([lo, hi] in HU, or ``"lung"`` / ``"soft_tissue"``).

    ``lo`` and below -> 0, ``hi`` and above -> 1, linear between (what model.json's ``input.window_hu`` means).
    """
    return _windowed(volume_hu, _window(window))


def _windowed(volume_hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    v = np.asarray(volume_hu, dtype=np.float64)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _triple(size: int | Sequence[int], what: str) -> tuple[int, int, int]:
    t = (int(size),) * 3 if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{what} must be three positive sizes (D, H, W), got {size!r}")
    return t  # type: ignore[return-value]


def _tent_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` linear-interpolation weights, widened by the factor when shrinking (antialiased)."""
    scale = n_in / n_out
    centre = (np.arange(n_out) + 0.5) * scale
    w = np.clip(1.0 - np.abs(np.arange(n_in)[None, :] + 0.5 - centre[:, None]) / max(scale, 1.0), 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _overlap_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]``: the share of each new voxel that each old voxel covers (exact overlap)."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(lo + scale, j + 1) - np.maximum(lo, j), 0.0, None) / scale


def _separable(volume: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Apply one ``[out, in]`` matrix per axis, shrinking axes first (same result, less work)."""
    out = np.asarray(volume, dtype=np.float64)
    for axis in sorted(range(3), key=lambda a: mats[a].shape[0] / mats[a].shape[1]):
        if mats[axis].shape[0] == mats[axis].shape[1] and np.array_equal(mats[axis], np.eye(mats[axis].shape[0])):
            continue
        out = np.moveaxis(np.tensordot(mats[axis], out, axes=(1, axis)), 0, axis)
    return out


def resample_volume(volume: np.ndarray, size: int | Sequence[int],
                    spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``volume`` ``[D, H, W]`` to ``size`` keeping its extent; returns it (float32) and its spacing.

    The rule is in the module docstring: linear between voxel centres, antialiased when shrinking (per axis as
    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)`` does in 2-D).
    ``spacing`` (z, y, x) in mm is that of ``volume``; the spacing returned is ``spacing * shape / size``.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a volume must be [D, H, W], got shape {volume.shape}")
    size = _triple(size, "size")
    new_spacing = tuple(float(s) * n / m for s, n, m in zip(_spacing3(spacing), volume.shape, size, strict=True))
    if volume.shape == size:
        return volume.astype(np.float32, copy=True), new_spacing
    mats = [_tent_weights(n, m) for n, m in zip(volume.shape, size, strict=True)]
    return _separable(volume, mats).astype(np.float32), new_spacing


def _spacing3(spacing: Sequence[float]) -> tuple[float, float, float]:
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(np.isfinite(s)) or min(s) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return s  # type: ignore[return-value]


def resample_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Resample a lesion mask ``[D, H, W]`` to ``size``: new voxels at least half covered, no lesion lost.

    Coverage is the exact volume overlap of each new voxel with the lesion (so integer enlargement is
    nearest-neighbour and integer shrinking a block mean). A connected lesion (26-neighbourhood) none of whose
    voxel centres falls in a kept new voxel gets the new voxel that holds most of its voxel centres.
    """
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"a mask must be [D, H, W], got shape {mask.shape}")
    size = _triple(size, "size")
    if mask.shape == size:
        return mask.copy()
    mats = [_overlap_weights(n, m) for n, m in zip(mask.shape, size, strict=True)]
    out = np.ascontiguousarray(_separable(mask, mats) >= 0.5 - 1e-9)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n:
        where = np.nonzero(mask)
        comp = labels[where]
        # The new voxel holding each old voxel's centre, in integers: floor((2 i + 1) m / (2 s)).
        cell = np.ravel_multi_index(tuple((2 * i + 1) * m // (2 * s) for i, s, m in zip(where, mask.shape, size,
                                                                                         strict=True)), size)
        alive = np.zeros(n + 1, dtype=bool)
        alive[comp[out.ravel()[cell]]] = True
        lost = ~alive[comp]
        if lost.any():  # each lost lesion gets the new voxel that holds most of its voxel centres
            pairs, counts = np.unique(np.stack([comp[lost], cell[lost]]), axis=1, return_counts=True)
            order = np.lexsort((-counts, pairs[0]))
            first = order[np.r_[True, pairs[0][order][1:] != pairs[0][order][:-1]]]
            out.ravel()[pairs[1][first]] = True
    return out


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class VolumeRecord:
    """One volume: ``image`` ``[1, D, H, W]`` float32 (HU, or [0, 1] when windowed), its lesion mask on the same grid
    (None when it has no lesion), label, the spacing (z, y, x) in mm and the geometry of this grid."""

    id: str
    image: np.ndarray
    mask: np.ndarray | None
    label: int
    path: str
    split: str | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    geometry: VolumeGeometry | None = None


@dataclass
class VolumeDataset(Dataset):
    """The volume records that loaded, the errors of those that did not, and the layout seen."""

    records: list[VolumeRecord] = field(default_factory=list)  # type: ignore[assignment]


def detect_volume_layout(root: str | Path) -> str:
    """``"msd"`` (imagesTr/) or ``"dicom"`` (labels.csv + one series folder per case), or a DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "dataset folder does not exist")
    if (root / "imagesTr").is_dir():
        return "msd"
    if (root / LABELS).is_file():
        return "dicom"
    raise DataError(str(root), f"no known volume layout: expected imagesTr/ (+ labelsTr/, {LABELS}; the Medical "
                               f"Segmentation Decathlon's) or {LABELS} with one DICOM series folder per case")


def load_volume_dataset(root: str | Path, size: int | Sequence[int] | None = None,
                        window_hu: Sequence[float] | str | None = None, layout: str | None = None) -> VolumeDataset:
    """Load every case of an MSD or DICOM-series dataset folder (layouts in the module docstring).

    ``size`` (D, H, W) resamples images and masks (:func:`resample_volume`, :func:`resample_mask`) and records
    the spacing used; ``window_hu`` maps HU to [0, 1] after resampling (:func:`window_hu`); without it images
    stay in HU. Cases that fail land in ``errors``, each naming its file; the rest load.
    """
    root = Path(root)
    layout = layout or detect_volume_layout(root)
    readers = {"msd": _read_msd, "dicom": _read_dicom_layout}
    if layout not in readers:
        raise ValueError(f"unknown volume layout {layout!r}; choose one of {VOLUME_LAYOUTS}")
    target = _triple(size, "size") if size is not None else None
    window = _window(window_hu) if window_hu is not None else None
    ds = VolumeDataset(root=root, layout=layout)
    splits = _read_splits(root)
    try:
        for item in readers[layout](root):
            if isinstance(item, DataError):
                log.warning("skipped: %s", item)
                ds.errors.append(item)
                continue
            rid, hu, geo, mask, label, path = item
            if target is not None and hu.shape != target:
                hu, geo = resample_volume(hu, target, geo.spacing)[0], geo.resampled(hu.shape, target)
                mask = resample_mask(mask, target) if mask is not None else None
            image = _windowed(hu, window) if window is not None else hu.astype(np.float32)
            ds.records.append(VolumeRecord(id=rid, image=image[None], mask=mask, label=label, path=str(path),
                                           split=splits.get(rid), spacing=geo.spacing, geometry=geo))
    except DataError as err:  # the labels file itself is unreadable: nothing more can load
        log.warning("skipped: %s", err)
        ds.errors.append(err)
    return ds


_Case = tuple[str, np.ndarray, VolumeGeometry, np.ndarray | None, int, Path]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (header names and values stripped), or a DataError naming it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [n.strip() for n in (reader.fieldnames or [])]
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(path), f"not a readable UTF-8 CSV file ({type(exc).__name__}: {exc})") from None


def _read_splits(root: Path) -> dict[str, str]:
    path = root / "split.csv"
    if not path.is_file():
        return {}
    rows = _csv_rows(path)
    if rows and not {"id", "split"} <= rows[0].keys():
        raise DataError(str(path), "split.csv needs 'id' and 'split' columns")
    return {row["id"]: row["split"] for row in rows}


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, or a DataError when the name leaves the dataset folder (``..``, absolute)."""
    norm = os.path.normpath(relative)
    if os.path.isabs(norm) or Path(relative).drive or norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(where, f"file name {relative!r} points outside the dataset folder; refused")
    return root / norm


def _labels(root: Path) -> list[tuple[str, str, dict[str, str]]] | None:
    """``(where, id, row)`` per labels.csv row, or None without the file; a bad header is a DataError."""
    path = root / LABELS
    if not path.is_file():
        return None
    rows = _csv_rows(path)
    if rows and not {"id", "label"} <= rows[0].keys():
        raise DataError(str(path), f"{LABELS} needs 'id' and 'label' columns, has {sorted(rows[0])}")
    return [(f"{path}:{n} (id {row['id']})", row["id"], row) for n, row in enumerate(rows, start=2)]


def _label(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise DataError(where, f"label {text!r} is not 0 or 1")
    return int(value)


def _cases(root: Path, entries, read) -> Iterator[_Case | DataError]:
    seen: set[str] = set()
    for where, rid, row in entries:
        try:
            if not rid:
                raise DataError(where, "empty id")
            if rid in seen:
                raise DataError(where, f"id {rid} appears twice")
            seen.add(rid)
            yield read(where, rid, row)
        except DataError as err:
            yield err


def _read_msd(root: Path) -> Iterator[_Case | DataError]:
    images, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images.is_dir():
        yield DataError(str(images), "the Medical Segmentation Decathlon layout needs an imagesTr folder")
        return
    entries = _labels(root)
    if entries is None:
        names = sorted(p.name for p in images.iterdir() if suffix(p) in (".nii.gz", ".nii") and p.name[0] != ".")
        entries = [(str(images / n), n.removesuffix(".gz").removesuffix(".nii"), None) for n in names]

    def read(where: str, rid: str, row: dict[str, str] | None) -> _Case:
        name = f"{rid}.nii.gz" if (images / f"{rid}.nii.gz").is_file() or not (images / f"{rid}.nii").is_file() \
            else f"{rid}.nii"
        path = _inside(images, name, where)
        if not path.is_file():
            raise DataError(str(path), f"image file is missing (named in {where})")
        hu, geo = read_volume_file(path)
        label_path = _inside(labels_dir, name, where)
        mask = read_volume_mask(label_path, hu.shape, geo, where) if label_path.is_file() else None
        label = _label(row["label"], where) if row is not None else int(mask is not None and bool(mask.any()))
        return rid, hu, geo, mask if mask is not None and mask.any() else None, label, path

    yield from _cases(root, entries, read)


def _read_dicom_layout(root: Path) -> Iterator[_Case | DataError]:
    entries = _labels(root) or []

    def read(where: str, rid: str, row: dict[str, str]) -> _Case:
        label = _label(row["label"], where)
        folder = _inside(root, rid, where)
        if not folder.is_dir():
            raise DataError(str(folder), f"DICOM series folder is missing (named in {where})")
        hu, geo = read_dicom_series(folder)
        mask = None
        if row.get("mask"):
            mask = read_volume_mask(_inside(root, row["mask"], where), hu.shape, geo, where)
        return rid, hu, geo, mask if mask is not None and mask.any() else None, label, folder

    yield from _cases(root, entries, read)


__all__ = ["LABELS", "MAX_SLICES", "MAX_VOXELS", "NOT_SLICES", "VOLUME_LAYOUTS", "WINDOWS", "VolumeDataset",
           "VolumeGeometry", "VolumeRecord", "detect_volume_layout", "load_volume_dataset", "read_dicom_series",
           "read_volume", "read_volume_file", "read_volume_mask", "resample_mask", "resample_volume", "window_hu",
           "write_volume"]
