"""Image I/O, in one place: sniffing file types, reading radiographs and masks, writing maps, atomic writes.

Every reader raises :class:`~saliency_trust.data.errors.DataError` naming the file and the problem.
Pillow and SimpleITK are imported where they are used, so the data package imports without them
(Slicer's sample study needs neither).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from saliency_trust import faults
from saliency_trust.data.dicom import MAX_PIXELS, read_dicom
from saliency_trust.data.errors import DataError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
MAP_FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}  # keys: saliency_trust.settings.MAP_FORMATS
#: Sizes a radiograph may have: at least MIN_SIDE px a side, at most MAX_PIXELS (64 Mpx, from dicom.py).
#: Checked from the header before any pixel is decoded, so a hostile header cannot make a reader allocate.
MIN_SIDE = 16
#: The file suffix for each sniffed type (what an upload is saved as).
SUFFIX = {"dicom": ".dcm", "png": ".png", "nrrd": ".nrrd", "nifti": ".nii", "nifti_gz": ".nii.gz"}
#: NRRD key (``key:=value`` in the header) giving the intensity range of the pixels, ``"lo hi"``: the
#: Slicer module writes it on a volume it exports, so the bundle never guesses the bit depth.
INTENSITY_KEY = "saliency_trust_intensity_range"
#: Colour in a picture: a pixel whose channels differ by more than this share of the full scale
#: (32 of 255) is coloured; JPEG chroma noise stays far below it.
COLOURED_PIXEL = 32 / 255
#: A picture whose coloured pixels are at most this share is a grey radiograph with a burned-in
#: annotation (an arrow, a label) and is read as luminance; more is colour content, refused.
ANNOTATION_SHARE = 0.02
#: Modalities a radiograph model explains (CR, DX, RG; OT and none for secondary captures).
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG", "OT", "")
#: View positions of a lateral (or decubitus lateral) view.
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")


# ---------------------------------------------------------------------------------------------
# Types


def sniff(head: bytes) -> str | None:
    """The file type from its first bytes: ``dicom``, ``png``, ``nifti``, ``nifti_gz``, ``nrrd`` or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head[:2] == b"\x1f\x8b":
        try:
            inner = gzip.GzipFile(fileobj=io.BytesIO(head)).read(352)
        except (OSError, EOFError):
            inner = b""
        return "nifti_gz" if _is_nifti(inner) else None
    return "nifti" if _is_nifti(head) else None


def _is_nifti(h: bytes) -> bool:
    if len(h) < 348:
        return False
    size_le, size_be = int.from_bytes(h[:4], "little"), int.from_bytes(h[:4], "big")
    return (348 in (size_le, size_be) and h[344:347] in (b"n+1", b"ni1")) or 540 in (size_le, size_be)


def is_dicom(path: Path) -> bool:
    """Whether ``path`` starts with a DICOM preamble (``DICM`` at byte 128)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def suffix(path: Path) -> str:
    """The file's type suffix, lower case (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def check_size(rows: int, cols: int, path: Path, *, frames: int = 1, min_side: int = MIN_SIDE) -> None:
    """Refuse an image too small to be a radiograph or too large to read safely (from its header)."""
    if min(rows, cols) < min_side:
        raise DataError(str(path), f"image is {cols}x{rows}; a radiograph needs at least {min_side} px a side")
    if rows * cols * max(frames, 1) > MAX_PIXELS:
        raise DataError(str(path), f"image is {cols}x{rows}" + (f"x{frames}" if frames > 1 else "")
                        + f", over the {MAX_PIXELS // 2**20} Mpx limit; downsample it before assessment")


# ---------------------------------------------------------------------------------------------
# Pixels


def read_pixels(path: Path, what: str, min_side: int = MIN_SIDE) -> np.ndarray:
    """The pixel array of a PNG/JPEG/TIFF file, or a DataError naming it and ``what`` it should be."""
    try:
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            check_size(im.size[1], im.size[0], path, min_side=min_side)
            return np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(str(path), f"not a readable {what} ({type(exc).__name__}: {exc})") from None


def _sitk_read(path: Path, radiograph: bool = True):
    """Read a volume file; a radiograph's size is checked from its header first (a mask's against its image)."""
    import SimpleITK as sitk

    try:
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        info.ReadImageInformation()  # header only: refuse a huge image before allocating it
        size = list(info.GetSize()) + [1, 1]
        frames = size[2] * info.GetNumberOfComponents()
        check_size(size[1], size[0], path, frames=frames, min_side=MIN_SIDE if radiograph else 1)
        _check_nifti_finite(path)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(str(path), f"not a readable image ({first})") from None


_NIFTI_FLOATS = {16: np.float32, 64: np.float64}


def _check_nifti_finite(path: Path) -> None:
    """Refuse a float NIfTI with NaN or inf values (NIfTI readers silently turn them into 0)."""
    if suffix(path) not in (".nii", ".nii.gz"):
        return
    opener = gzip.open if suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        head = f.read(352)
        if len(head) < 348:
            return
        order = "<" if int.from_bytes(head[:4], "little") == 348 else ">"
        datatype = int(np.frombuffer(head[70:72], order + "i2")[0])
        if datatype not in _NIFTI_FLOATS:
            return
        offset = int(np.frombuffer(head[108:112], order + "f4")[0])
        f.seek(max(offset, 352))
        dtype = np.dtype(_NIFTI_FLOATS[datatype]).newbyteorder(order)
        bad = 0
        while chunk := f.read(2**22 - 2**22 % dtype.itemsize):
            bad += int((~np.isfinite(np.frombuffer(chunk, dtype))).sum())
    if bad:
        raise DataError(str(path), f"image has {bad} NaN or infinite values")


def _plane(arr: np.ndarray, path: Path, radiograph: bool = True) -> np.ndarray:
    """The one 2-D plane of ``arr`` (``[H, W]`` or ``[1, H, W]``), or a DataError naming ``path``."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(str(path), f"expected one 2-D radiograph, got an image of shape {arr.shape} (3-D or colour)")
    check_size(arr.shape[0], arr.shape[1], path, min_side=MIN_SIDE if radiograph else 1)
    return arr


def _normalize_volume(arr: np.ndarray, path: Path, intensity_range: Sequence[float] | None) -> np.ndarray:
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(str(path), "image has NaN or infinite values")
    if intensity_range is not None:
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
    elif arr.dtype.kind == "u" or (arr.dtype.kind == "i" and a.min() >= 0):
        bits = next((b for b in (8, 10, 12, 14, 16) if a.max() <= 2**b - 1), None)
        if bits is None:
            raise DataError(str(path), f"integer values up to {a.max():.0f} exceed 16 bits; pass intensity_range")
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        raise DataError(str(path), f"constant image or empty intensity range [{lo}, {hi}]")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def grey_from_colour(arr: np.ndarray, path: Path, notes: list[str] | None = None) -> np.ndarray:
    """The grey picture inside an RGB(A) or LA array ``[H, W, C]``: the channel itself when the channels are
    equal, the luminance (ITU-R BT.601) when the colour is only compression noise or a small burned-in
    annotation (what is found is added to ``notes``), else a DataError: colour content is no radiograph."""
    if arr.shape[2] in (1, 2):  # L or LA: the alpha channel is not the image
        return arr[..., 0]
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    full = 255.0 if arr.dtype == np.uint8 else float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "iu" else 1.0
    chroma = (rgb.max(axis=2).astype(np.float64) - rgb.min(axis=2)) / full
    coloured = float((chroma > COLOURED_PIXEL).mean())
    if coloured > ANNOTATION_SHARE:
        raise DataError(str(path), f"colour image ({100 * coloured:.1f}% of its pixels are in colour); a radiograph "
                                   "must be grayscale")
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if notes is not None:
        what = (f"a coloured annotation on {100 * coloured:.2f}% of the pixels" if coloured else
                f"colour noise of at most {chroma.max() * 255:.0f} of 255 grey levels")
        notes.append(f"{'RGBA' if arr.shape[2] == 4 else 'RGB'} picture of a grey radiograph with {what}: read as "
                     "luminance")
    if arr.dtype.kind in "iu":
        return np.clip(np.rint(grey), 0, np.iinfo(arr.dtype).max).astype(arr.dtype)
    return grey.astype(arr.dtype)


def read_image(path: str | Path, notes: list[str] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a DICOM or an 8/16-bit PNG/JPEG/TIFF as float32 in [0, 1]; returns image and spacing.

    A grey radiograph stored as RGB(A) is read as its luminance (:func:`grey_from_colour`; what was
    found goes to ``notes``); a picture whose content is in colour is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "image file is missing")
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom(path):
        img, geo = read_dicom(path)
        check_size(img.shape[0], img.shape[1], path)
        return img, geo["spacing"]
    arr = read_pixels(path, "image")
    if arr.ndim == 3:
        arr = grey_from_colour(arr, path, notes)
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(str(path), f"expected a 2-D grayscale image, got shape {arr.shape}")
    check_size(arr.shape[0], arr.shape[1], path)
    if arr.dtype == np.uint8:
        img = arr.astype(np.float32) / 255.0
    elif arr.dtype.kind in "iu":
        img = arr.astype(np.float32) / 65535.0
    else:
        img = np.clip(arr.astype(np.float32), 0, 1)
    return img, (1.0, 1.0)


def check_radiograph(geometry: dict, path: Path, accept_any: bool = False, notes: list[str] | None = None) -> None:
    """Refuse, in one sentence, a DICOM a chest radiograph model was not made for: another modality (CT, MR,
    ...), a lateral view, a multi-frame image. ``accept_any`` runs it anyway (the first frame), noted."""
    problems = []
    if geometry.get("modality", "") not in RADIOGRAPH_MODALITIES:
        problems.append(f"modality {geometry['modality']}")
    if geometry.get("view_position", "") in LATERAL_VIEWS:
        problems.append(f"a lateral view (ViewPosition {geometry['view_position']})")
    if geometry.get("frames", 1) > 1:
        problems.append(f"a multi-frame image ({geometry['frames']} frames)")
    if not problems:
        return
    if not accept_any:
        raise DataError(str(path), f"{' and '.join(problems)}: the model explains one frontal chest radiograph; "
                                   "set accept_any_input to run it anyway")
    if notes is not None:
        first = " (its first frame explained)" if geometry.get("frames", 1) > 1 else ""
        notes.append(f"run on request (accept_any_input) although the input is {' and '.join(problems)}{first}")


def header_intensity_range(ref, path: Path) -> tuple[float, float] | None:
    """The intensity range a volume's header states (:data:`INTENSITY_KEY`, written by the Slicer module), or None."""
    if not ref.HasMetaDataKey(INTENSITY_KEY):
        return None
    try:
        lo, hi = (float(v) for v in ref.GetMetaData(INTENSITY_KEY).replace(",", " ").split())
    except ValueError:
        raise DataError(str(path), f"the header's {INTENSITY_KEY} is not two numbers 'lo hi'") from None
    if not (np.isfinite([lo, hi]).all() and hi > lo):
        raise DataError(str(path), f"the header's {INTENSITY_KEY} [{lo}, {hi}] is empty")
    return lo, hi


def read_input(path: str | Path, intensity_range: Sequence[float] | None = None, *, accept_any: bool = False,
               notes: list[str] | None = None):
    """``(image in [0, 1] [H, W] float32, reference SimpleITK image with the input's geometry)``.

    DICOM (a file or a folder holding one), NIfTI, NRRD, MHA or PNG/JPEG/TIFF. DICOM goes through
    the training reader (stored range, MONOCHROME1 inverted) and must be a single-frame frontal
    radiograph (:func:`check_radiograph`, unless ``accept_any``); volumes through ``intensity_range``,
    else the range their header states (the Slicer module's export), else unsigned ones through the
    smallest of 8/10/12/14/16 bits that holds their maximum; a grey picture stored as RGB(A) is read
    as luminance. What the reader decided beyond the plain case is added to ``notes``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (is_dicom(p) or p.suffix.lower() == ".dcm"))
        if len(files) != 1:
            raise DataError(str(path), f"a DICOM folder must hold exactly one radiograph; found {len(files)} files")
        path = files[0]
    if not path.is_file():
        raise DataError(str(path), "input image is missing")
    kind = suffix(path)
    if kind in VOLUME_SUFFIXES:
        ref = _sitk_read(path)
        components = ref.GetNumberOfComponentsPerPixel()
        if components not in (1, 3, 4):
            raise DataError(str(path), f"{components}-component image; expected grayscale")
        stated = header_intensity_range(ref, path) if intensity_range is None else None
        arr = sitk.GetArrayFromImage(ref)
        if components > 1:  # an RGB(A) volume (a colour picture loaded in Slicer): grey content as luminance
            arr = grey_from_colour(arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr, path, notes)
            ref = sitk.VectorIndexSelectionCast(ref, 0)
        arr = _plane(arr, path)
        if intensity_range is None:
            intensity_range = stated
            if intensity_range is not None and notes is not None:
                notes.append(f"intensity range [{intensity_range[0]:g}, {intensity_range[1]:g}] from the file's "
                             "header")
        return _normalize_volume(arr, path, intensity_range), ref
    if kind in PICTURE_SUFFIXES:
        img, _ = read_image(path, notes)
        ref = sitk.GetImageFromArray(np.zeros(img.shape, np.float32))
        return img, ref
    if kind in DICOM_SUFFIXES or is_dicom(path):
        img, geometry = read_dicom(path, frame=0, notes=notes)
        check_radiograph(geometry, path, accept_any, notes)
        check_size(img.shape[0], img.shape[1], path)
        ref = _sitk_read(path)
        if ref.GetDimension() == 3 and ref.GetSize()[2] > 1:  # a multi-frame image run on request: frame 0
            ref = ref[:, :, 0]
        if ref.GetNumberOfComponentsPerPixel() > 1:  # an RGB radiograph read as luminance: its geometry only
            ref = sitk.VectorIndexSelectionCast(ref, 0)
        if _plane(sitk.GetArrayFromImage(ref), path).shape != img.shape:
            raise DataError(str(path), "DICOM pixel data and geometry disagree in size")
        if intensity_range is not None:
            raw = sitk.GetArrayFromImage(ref).reshape(img.shape)
            img = _normalize_volume(raw, path, intensity_range)
        return img, ref
    raise DataError(str(path), f"unsupported file type {kind!r}; use DICOM, NIfTI, NRRD, MHA or PNG")


def read_mask(path: str | Path, shape: tuple[int, ...], where: str | None = None) -> np.ndarray:
    """A ground-truth mask on an image's grid (``shape``): boolean, lesion where any colour is non-zero.

    One rule for every caller: NIfTI/NRRD/MHA volumes (one plane) and PNG/JPEG/TIFF pictures; in a
    picture, an alpha channel is ignored and a pixel is lesion when any colour channel is non-zero
    (a mask drawn in any colour counts). ``where`` names the file that pointed here (a labels CSV).
    """
    import SimpleITK as sitk

    path = Path(path)
    named = f" (named in {where})" if where else ""
    if not path.is_file():
        raise DataError(str(path), f"mask file is missing{named}")
    if suffix(path) in VOLUME_SUFFIXES:
        arr = _plane(sitk.GetArrayFromImage(_sitk_read(path, radiograph=False)), path, radiograph=False)
    elif suffix(path) in PICTURE_SUFFIXES:
        arr = read_pixels(path, "mask image", min_side=1)
        if arr.ndim == 3:
            colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]  # RGB(A) or L(A): drop alpha
            arr = (colour != 0).any(axis=2)
        arr = _plane(arr, path, radiograph=False)
    else:
        raise DataError(str(path), f"mask must be NIfTI, NRRD, MHA or PNG{named}")
    if arr.shape != tuple(shape):
        raise DataError(str(path), f"mask is {arr.shape[1]}x{arr.shape[0]} but the image is "
                                   f"{shape[1]}x{shape[0]}; it must share the grid{named}")
    return arr != 0


# ---------------------------------------------------------------------------------------------
# Writing


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        faults.point(f"write:{path.name}")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries (``.<name>.<pid>.tmp...``) of writers that died; returns what went.

    A temporary whose process is still alive is left alone (another writer may be at work).
    """
    gone = []
    for f in Path(folder).glob(".*.tmp*") if Path(folder).is_dir() else []:
        parts = f.name.split(".")
        pids = [int(p) for p in parts if p.isdigit()]
        if pids and _alive(pids[-1]):
            continue
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (PermissionError), or not checkable here
        return True
    return True


def write_map(path: Path, values: np.ndarray, ref) -> None:
    """Write a float32 map with the geometry of ``ref`` (a SimpleITK image), atomically."""
    import SimpleITK as sitk

    arr = values.astype(np.float32)
    if ref.GetDimension() == 3:
        arr = arr[None]
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix(path)}")
    try:
        sitk.WriteImage(img, str(tmp), useCompression=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["DICOM_SUFFIXES", "INTENSITY_KEY", "MAP_FORMATS", "MAX_PIXELS", "MIN_SIDE", "PICTURE_SUFFIXES", "SUFFIX",
           "VOLUME_SUFFIXES", "atomic_write_bytes", "check_radiograph", "check_size", "grey_from_colour",
           "header_intensity_range", "is_dicom", "read_image", "read_input", "read_mask", "read_pixels",
           "remove_stale_temporaries", "sniff", "suffix", "write_map"]
