"""Everything the SaliencyTrust module does, without Qt: checks, export, the bundle process, results in the scene.

Works on any MRML scene passed in (the application's ``slicer.mrmlScene`` inside Slicer, a
scene of the ``slicer-core`` wheel in tests). The flow is

    check_input_volume(node)              -> InputVolumeError with a message for the user
    prepare(scene, node, score_node, dir) -> the input (and mask) written with their geometry
    BundleProcess(request).start()        -> the bundle's inference workflow, out of process
    load_results(scene, node, out_dir)    -> one overlay volume per method + a metrics table

Nothing is added to the scene before the bundle has finished successfully, and a failure while
loading removes what was added, so a failed run leaves the scene as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SaliencyTrustLib import deps

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
METHODS = ("grad", "sg", "ig", "sig", "gradcam", "gbp", "ggcam", "xrai")
#: The methods by the names a reader knows them by.
METHOD_NAMES = {"grad": "Gradient", "sg": "SmoothGrad", "ig": "Integrated Gradients", "sig": "SmoothGrad-IG",
                "gradcam": "Grad-CAM", "gbp": "Guided Backprop", "ggcam": "Guided Grad-CAM", "xrai": "XRAI"}
#: The presets the bundle offers (``saliency_trust.saliency.presets``), with what each is for.
PRESETS = {"quick": "quick (fewer steps and samples; a CPU finishes in seconds)",
           "paper": "paper (the study's recipe; use a GPU)"}
#: Criterion titles in words, the direction that is good being "pass" (as ``saliency_trust.results``).
CRITERION_TITLES = {
    "utility": "Points at the lesion",
    "randomization": "Changes when weights are randomized",
    "repeatability": "Agrees with a retrained copy",
    "reproducibility": "Agrees with a second model",
}
CRITERION_HELP = {
    "utility": "Good: pass. Over the assessment's images, the map highlights the lesion better than a fixed map of "
               "where lesions usually are (AUPRC against the average-mask prior).",
    "randomization": "Good: pass. When the network's weights are replaced by random ones the map changes as much "
                     "as maps of different images differ: it depends on what the network learned.",
    "repeatability": "Good: pass. A second copy of the network, trained the same way from another seed, gives "
                     "maps that agree with these beyond chance (SSIM).",
    "reproducibility": "Good: pass. A network of another architecture trained on the same data gives maps that "
                       "agree with these beyond chance (SSIM).",
}
TABLE_COLUMNS = ("method", "trust", *CRITERIA, "repeatability_here_ssim", "randomization_here_ssim", "auprc_here",
                 "details")
COLUMN_TITLES = {
    "method": "Method", "trust": "Trust on the assessment data", **CRITERION_TITLES,
    "repeatability_here_ssim": "This image: agrees with the other copy (SSIM, higher is better)",
    "randomization_here_ssim": "This image: like a random network's map (SSIM, lower is better)",
    "auprc_here": "This image: points at your region (AUPRC, higher is better)",
    "details": "Numbers behind the verdicts",
}
COLUMN_HELP = {
    "method": "The saliency method that made the map.",
    "trust": "Fails: the method failed at least one criterion on the assessment data. Passes all four: every "
             "criterion was judged and passed. Not fully judged: some criterion could not be judged (n/a); n/a "
             "never counts as a pass.",
    **CRITERION_HELP,
    "repeatability_here_ssim": "SSIM between this map and the map of the other trained copy on this image "
                               "(1 = identical).",
    "randomization_here_ssim": "SSIM between this map and the map of the fully randomized network on this image; "
                               "a trustworthy map should not look like it.",
    "auprc_here": "How well the map ranks the pixels of the segmentation or ROI you chose (1 = perfectly; the "
                  "region's share of the image is chance).",
    "details": "Each criterion's value, its reference and the number of images it came from.",
}
RESEARCH_ONLY = "Research use only - not for diagnosis."
#: Map values below this are transparent in the overlay: the radiograph stays visible where the map is low.
OVERLAY_FLOOR = 0.1
#: Control points of matplotlib's "inferno" (perceptually uniform); interpolated to 256 entries.
INFERNO = ((0.0, (0.001, 0.000, 0.014)), (0.125, (0.155, 0.044, 0.318)), (0.25, (0.341, 0.062, 0.429)),
           (0.375, (0.520, 0.129, 0.419)), (0.5, (0.735, 0.216, 0.330)), (0.625, (0.898, 0.353, 0.206)),
           (0.75, (0.978, 0.557, 0.035)), (0.875, (0.975, 0.788, 0.188)), (1.0, (0.988, 0.998, 0.645)))
COLOR_NODE_NAME = "SaliencyTrust Inferno"


class SaliencyTrustError(Exception):
    """A problem to show the user as it is (one clear sentence)."""


class InputVolumeError(SaliencyTrustError):
    """The input volume cannot be explained (missing, not 2-D, empty, wrong type)."""


class BundleError(SaliencyTrustError):
    """The bundle process failed or was cancelled."""


class CancelledError(BundleError):
    """The user cancelled the run: not an error to show, nothing was added to the scene."""

    def __init__(self, message: str = "Cancelled: nothing was added to the scene.") -> None:
        super().__init__(message)


def _slicer():
    import slicer

    return slicer


# --------------------------------------------------------------------------------------------
# Input


def check_input_volume(node) -> None:
    """Raise :class:`InputVolumeError` unless ``node`` is a non-empty single-slice grayscale scalar volume,
    or an RGB(A) vector volume (a picture of a radiograph: the bundle reads grey content as luminance and
    refuses real colour)."""
    if node is None:
        raise InputVolumeError("Select an input volume (a chest X-ray loaded from DICOM or a file).")
    name = node.GetName() if hasattr(node, "GetName") else str(node)
    cls = node.GetClassName()
    if cls not in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"):
        kind = {"vtkMRMLLabelMapVolumeNode": "a label map"}.get(cls, f"a {cls}")
        raise InputVolumeError(f"'{name}' is {kind}; SaliencyTrust explains a grayscale scalar volume.")
    image = node.GetImageData()
    if image is None:
        raise InputVolumeError(f"'{name}' has no image data (empty volume).")
    dims = image.GetDimensions()
    if min(dims) == 0 or image.GetNumberOfPoints() == 0:
        raise InputVolumeError(f"'{name}' is empty (dimensions {dims}).")
    components = image.GetNumberOfScalarComponents()
    if cls == "vtkMRMLScalarVolumeNode" and components != 1:
        raise InputVolumeError(f"'{name}' has {components} components per voxel; a radiograph has one.")
    if cls == "vtkMRMLVectorVolumeNode" and components not in (3, 4):
        raise InputVolumeError(f"'{name}' has {components} components per voxel; SaliencyTrust reads a grey "
                               "radiograph or an RGB(A) picture of one.")
    planes = [d for d in dims if d > 1]
    if len(planes) != 2 or dims[2] != 1:
        raise InputVolumeError(f"'{name}' is not a 2-D image (dimensions {dims[0]} x {dims[1]} x {dims[2]}); "
                               "SaliencyTrust explains one radiograph, a single slice.")


def write_volume(node, path: str | Path) -> Path:
    """Write a volume node to NRRD with its geometry (Slicer's own storage node; RAS -> LPS on disk)."""
    slicer = _slicer()
    path = Path(path)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        raise SaliencyTrustError(f"Could not write '{node.GetName()}' to {path}.")
    return path


def mask_from_roi(volume, roi, rows_per_block: int = 256) -> np.ndarray:
    """Boolean ``[K, J, I]`` mask of the voxels of ``volume`` whose centres lie inside a markups ROI.

    Built a block of rows at a time from the affine map voxel -> ROI frame, so a 3000 x 2500
    radiograph needs a few tens of MB (not the gigabytes of a full coordinate grid) on the GUI thread.
    """
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    # Into the ROI's own frame (origin at its centre, axes along its sides; it may be rotated).
    o = roi.GetObjectToWorldMatrix()
    world_to_object = np.linalg.inv(np.array([[o.GetElement(r, c) for c in range(4)] for r in range(4)]))
    a = (world_to_object @ ijk_to_ras)[:3]  # local = a[:, :3] @ (i, j, k) + a[:, 3]
    half = np.array(roi.GetSize()) / 2.0 + 1e-6
    ni, nj, nk = volume.GetImageData().GetDimensions()
    mask = np.zeros((nk, nj, ni), dtype=bool)
    i = np.arange(ni, dtype=np.float64)[None, :]
    for k in range(nk):
        for j0 in range(0, nj, rows_per_block):
            j = np.arange(j0, min(nj, j0 + rows_per_block), dtype=np.float64)[:, None]
            inside = np.ones((j.shape[0], ni), dtype=bool)
            for c in range(3):
                inside &= np.abs(a[c, 0] * i + (a[c, 1] * j + (a[c, 2] * k + a[c, 3]))) <= half[c]
            mask[k, j0:j0 + j.shape[0]] = inside
    return mask


def mask_from_segmentation(volume, segmentation) -> np.ndarray:
    """Boolean ``[K, J, I]`` mask: union of all segments, resampled onto ``volume``'s grid.

    Exported through a temporary label map node (Segmentations logic), removed again afterwards.
    """
    import vtk

    slicer = _slicer()
    seg = segmentation.GetSegmentation()
    ids = vtk.vtkStringArray()
    for n in range(seg.GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetNthSegmentID(n))
    if ids.GetNumberOfValues() == 0:
        raise SaliencyTrustError(f"Segmentation '{segmentation.GetName()}' has no segments to score against.")
    scene = segmentation.GetScene()
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SaliencyTrust temporary mask")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, label, volume):
            raise SaliencyTrustError(f"Could not rasterize '{segmentation.GetName()}' on the input's grid.")
        return slicer.util.arrayFromVolume(label).copy() > 0
    finally:
        # Everything the export added (label map, its display node, its colour table), except the
        # subject hierarchy singleton, which a Slicer application always has anyway.
        new = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in new:
            if node.GetID() not in existing and node.GetClassName() != "vtkMRMLSubjectHierarchyNode":
                scene.RemoveNode(node)


def score_mask(volume, score_node) -> np.ndarray | None:
    """The ground-truth mask on ``volume``'s grid from a segmentation or a markups ROI (None for None)."""
    if score_node is None:
        return None
    cls = score_node.GetClassName()
    if cls == "vtkMRMLSegmentationNode":
        mask = mask_from_segmentation(volume, score_node)
    elif cls == "vtkMRMLMarkupsROINode":
        mask = mask_from_roi(volume, score_node)
    else:
        raise SaliencyTrustError(f"'{score_node.GetName()}' is a {cls}; score against a segmentation or an ROI.")
    if not mask.any():
        raise SaliencyTrustError(f"'{score_node.GetName()}' covers no pixel of the input image.")
    return mask


def write_mask(volume, mask: np.ndarray, path: str | Path) -> Path:
    """Write ``mask`` as a label map NRRD on ``volume``'s geometry (a detached node; the scene is untouched)."""
    import vtk

    slicer = _slicer()
    label = slicer.vtkMRMLLabelMapVolumeNode()
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    label.SetIJKToRASMatrix(m)
    image = vtk.vtkImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    label.SetAndObserveImageData(image)
    slicer.util.arrayFromVolume(label)[:] = mask.astype(np.uint8)
    return write_volume(label, path)


#: NRRD header key the bundle reads the intensity range of an exported volume from (``"lo hi"``), so it
#: never guesses the bit depth from the brightest pixel (``saliency_trust.data.imageio.INTENSITY_KEY``).
INTENSITY_KEY = "saliency_trust_intensity_range"
#: Volume attribute where a user states a non-DICOM volume's intensity range (``"0 4095"``).
INTENSITY_ATTRIBUTE = "SaliencyTrust.intensityRange"


def source_dicom(volume) -> Path | None:
    """The DICOM file a single-slice ``volume`` was loaded from, while its voxels are still that file's.

    Found through the DICOM database (the ``DICOM.instanceUIDs`` attribute Slicer's DICOM plugin sets,
    and ``slicer.dicomDatabase.fileForInstance``), else the volume's own storage file when that is a
    DICOM file (``loadVolume`` of a ``.dcm``). Used only when the file's pixels (as stored, or through
    its rescale slope and intercept) equal the volume's voxels: a volume changed since, a file that is
    gone or that pydicom cannot decode here gives None, and the volume is exported as it is.
    """
    candidates = []
    uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(_slicer(), "dicomDatabase", None)
    if len(uids) == 1 and database is not None:
        found = database.fileForInstance(uids[0])
        if found:
            candidates.append(Path(found))
    storage = volume.GetStorageNode()
    if storage is not None and storage.GetFileName():
        candidates.append(Path(storage.GetFileName()))
    voxels = None
    for path in candidates:
        try:
            with path.open("rb") as f:
                f.seek(128)
                if f.read(4) != b"DICM":
                    continue
            import pydicom

            ds = pydicom.dcmread(str(path))
            pixels = ds.pixel_array
        except Exception:  # unreadable or undecodable here: export the volume instead
            continue
        if voxels is None:
            voxels = _slicer().util.arrayFromVolume(volume)[0]
        if pixels.shape != voxels.shape:
            continue
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        rescaled = pixels * slope + intercept
        same = np.array_equal(pixels, voxels) or np.array_equal(rescaled, voxels.astype(np.float64))
        if same and _same_geometry(volume, ds):
            return path
    return None


def _same_geometry(volume, ds) -> bool:
    """Whether ``volume`` still lies where the DICOM file puts it (the maps come back on the file's grid):
    no transform above it, the file's pixel spacing, and its position (LPS, as RAS) when the file has one."""
    if volume.GetParentTransformNode() is not None:
        return False
    spacing = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    if spacing is not None:
        row, col = (float(v) for v in spacing)
        sx, sy = volume.GetSpacing()[:2]
        if abs(sx - col) > 1e-3 or abs(sy - row) > 1e-3:
            return False
    position = getattr(ds, "ImagePositionPatient", None)
    if position is not None:
        x, y, z = (float(v) for v in position)
        ox, oy, oz = volume.GetOrigin()
        if max(abs(ox + x), abs(oy + y), abs(oz - z)) > 1e-3:
            return False
    return True


def dicom_header_range(volume) -> tuple[float, float] | None:
    """The stored range of the DICOM file a volume came from, read from its header only (no pixel decoding):
    for a file whose pixels pydicom cannot decode here (JPEG Lossless, common for CR / DX), so the export
    still states the range training read (``BitsStored`` through the rescale), not the scalar type's."""
    uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(_slicer(), "dicomDatabase", None)
    if len(uids) != 1 or database is None:
        return None
    found = database.fileForInstance(uids[0])
    if not found:
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(str(found), stop_before_pixels=True)
        bits = int(ds.BitsStored)
    except Exception:
        return None
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    a, b = lo * slope + intercept, hi * slope + intercept
    return (min(a, b), max(a, b)) if b != a else None


def intensity_range(volume) -> tuple[float, float]:
    """The intensity range a non-DICOM volume's values are in, stated to the bundle with the export.

    The user's, when the volume has the attribute ``SaliencyTrust.intensityRange`` (``"lo hi"``); else,
    for a volume loaded from a DICOM file (one whose pixels could not be decoded here, or that was
    changed since), the file's stored range (:func:`dicom_header_range`); else by its scalar type: the
    type's range for integers (from 0 when no value is negative: 0-255 for 8-bit, 0-65535 for 16-bit,
    as the bundle reads 8- and 16-bit pictures), [0, 1] for floating point values within it, and the
    values' own range for other floating point volumes.
    """
    given = volume.GetAttribute(INTENSITY_ATTRIBUTE)
    if given:
        try:
            lo, hi = (float(v) for v in given.replace(",", " ").split())
        except ValueError:
            lo = hi = 0.0
        if not hi > lo:
            raise InputVolumeError(f"'{volume.GetName()}' has {INTENSITY_ATTRIBUTE} '{given}'; give two numbers "
                                   "'low high' with low < high.")
        return lo, hi
    from_header = dicom_header_range(volume)
    if from_header is not None:
        return from_header
    image = volume.GetImageData()
    lo_data, hi_data = image.GetScalarRange()
    if image.GetScalarTypeAsString() in ("float", "double"):
        return (0.0, 1.0) if lo_data >= 0.0 and hi_data <= 1.0 else (float(lo_data), float(hi_data))
    top = float(image.GetScalarTypeMax())
    return (0.0, top) if lo_data >= 0 else (float(image.GetScalarTypeMin()), top)


def _state_intensity_range(path: Path, lo: float, hi: float) -> None:
    """Add the ``INTENSITY_KEY:=lo hi`` key/value line to the header of the NRRD file ``path``."""
    data = path.read_bytes()
    end = data.find(b"\n\n")
    if not data.startswith(b"NRRD") or end < 0:
        raise SaliencyTrustError(f"{path.name} is not the NRRD file it should be.")
    path.write_bytes(data[:end] + f"\n{INTENSITY_KEY}:={lo!r} {hi!r}".encode() + data[end:])


#: Identifying elements removed from the DICOM copy that leaves the module (to the bundle's process or to a
#: server): the bundle reads pixels and the technical elements only (size, bits, rescale, modality, view).
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
               "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID",
               "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
               "OperatorsName", "AccessionNumber", "StudyID", "DeviceSerialNumber", "StationName")


def deidentified_copy(source: Path, dest: Path) -> Path:
    """Copy the DICOM file ``source`` to ``dest`` without the :data:`IDENTIFYING` elements (pixels untouched)."""
    import pydicom

    ds = pydicom.dcmread(str(source))
    for keyword in IDENTIFYING:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(str(dest))
    return dest


def prepare(volume, score_node, folder: str | Path) -> tuple[Path, Path | None]:
    """Check the input and write it (and the scoring mask, if any) into ``folder``; returns their paths.

    A volume loaded from DICOM goes as its DICOM file (:func:`source_dicom`), without the patient's
    identifying elements (:func:`deidentified_copy`), which the bundle reads as it read its training data
    (through the stored range); any other volume as NRRD whose header states its intensity range
    (:func:`intensity_range`), so the bundle never guesses it from the content.
    """
    check_input_volume(volume)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = score_mask(volume, score_node)
    source = source_dicom(volume)
    if source is not None:
        image_path = folder / "input.dcm"
        deidentified_copy(source, image_path)
    else:
        lo, hi = intensity_range(volume)
        image_path = write_volume(volume, folder / "input.nrrd")
        _state_intensity_range(image_path, lo, hi)
    mask_path = write_mask(volume, mask, folder / "mask.nrrd") if mask is not None else None
    return image_path, mask_path


# --------------------------------------------------------------------------------------------
# The bundle, out of process


def require_supported_python() -> None:
    """Raise :class:`SaliencyTrustError` with one sentence when this Slicer's Python cannot run the bundle
    (Slicer 5.8 and older), before anything is generated, installed or launched."""
    problem = deps.python_problem()
    if problem:
        raise SaliencyTrustError(problem)


def find_bundle(module_dir: str | Path) -> Path:
    """The MONAI bundle the module runs: installed beside it by the extension build
    (``SaliencyTrustBundle``, see CMakeLists.txt), or the ``monai_bundle`` folder of a source checkout
    (the "Additional module paths" route)."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "SaliencyTrustBundle", module_dir.parent / "monai_bundle"):
        if (candidate / "configs" / "inference.json").is_file():
            return candidate
    return module_dir / "SaliencyTrustBundle"


def _modelfolder(bundle_dir: str | Path):
    """The bundle's ``saliency_trust.networks.modelfolder`` (standard library only), loaded by file.

    The panel reads model folders with the bundle's own code, without importing the engine (torch)
    into Slicer's process; one copy per bundle file is kept.
    """
    import importlib.util

    path = Path(bundle_dir) / "saliency_trust" / "networks" / "modelfolder.py"
    if not path.is_file():
        raise BundleError(f"No SaliencyTrust bundle at {bundle_dir} (it has no {path.name}).")
    name = f"_saliency_trust_modelfolder_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up while it loads
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    return sys.modules[name]


def find_models(model_dir: str | Path, bundle_dir: str | Path | None = None) -> dict:
    """The bundle's model listing of ``model_dir``: name -> model folder, or the error that makes one unusable."""
    module = _modelfolder(bundle_dir or find_bundle(Path(__file__).resolve().parents[1]))
    return module.find_models(model_dir)


def default_python() -> str:
    """Slicer's Python without GUI (``PythonSlicer``) when there is one, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


@dataclass
class Request:
    """What to run: the bundle folder, the model (its folder, its architecture, the replicate), methods and preset.

    ``model_dir`` is one model folder (``model.json``), or an older flat folder where ``arch`` picks
    the architecture; ``arch`` also chooses the server's model by architecture in server mode.
    """

    bundle_dir: str
    model_dir: str
    arch: str = ""
    replicate: int = 0
    methods: Sequence[str] = METHODS
    preset: str = "quick"
    device: str | None = None
    checks: bool = True
    python: str = field(default_factory=default_python)
    accept_any_input: bool = False  # run a DICOM the model was not made for (CT, lateral, multi-frame) anyway

    def command(self, image: str | Path, output_dir: str | Path, mask: str | Path | None = None) -> list[str]:
        """The ``monai.bundle run`` command line for ``configs/inference.json``."""
        configs = Path(self.bundle_dir) / "configs"
        cmd = [self.python, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
               "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(self.bundle_dir),
               "--image", str(image), "--output_dir", str(output_dir), "--model_dir", str(self.model_dir),
               "--replicate", str(int(self.replicate)),
               "--methods", json.dumps(list(self.methods)), "--preset", self.preset,
               "--checks", "True" if self.checks else "False"]
        if self.arch:
            cmd += ["--arch", self.arch]
        if mask is not None:
            cmd += ["--mask", str(mask)]
        if self.device:
            cmd += ["--device", self.device]
        if self.accept_any_input:
            cmd += ["--accept_any_input", "True"]
        return cmd


class ChildProcess:
    """A bundle command in a child process: non-blocking, output collected by a thread, cancellable."""

    what = "The bundle"

    def __init__(self, command: list[str], bundle_dir: str | Path, output_dir: str | Path) -> None:
        self.bundle_dir = str(bundle_dir)
        self.output_dir = Path(output_dir)
        self.command = command
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self.cancelled = False
        self.started_at = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> ChildProcess:
        """Launch the child; returns at once (a Slicer too old for the bundle is told so first)."""
        require_supported_python()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.bundle_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Its own process group (POSIX session / Windows group), so that cancel stops everything it
        # started; no console window pops up on Windows.
        kwargs: dict = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess,
                                                                                        "CREATE_NO_WINDOW", 0)}
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, **kwargs)
        self.started_at = time.time()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def new_lines(self) -> list[str]:
        """Output lines that arrived since the last call (for a progress/log view)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.lines += out
        return out

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cancel(self) -> None:
        """Stop the child and everything it started (its whole process tree, on every platform)."""
        if not self.running:
            return
        self.cancelled = True
        assert self._proc is not None
        kill_tree(self._proc)

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the child ends; returns the output folder or raises :class:`BundleError`."""
        assert self._proc is not None, "start() first"
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise BundleError(f"{self.what} did not finish within {timeout:.0f} s and was stopped.") from None
        return self.result()

    def result(self) -> Path:
        """The output folder of a finished child, or :class:`BundleError` with the reason."""
        assert self._proc is not None and self._proc.poll() is not None
        if self._reader is not None:
            self._reader.join(timeout=30)  # the child's last lines (it has ended: its pipe closes)
        self.new_lines()
        if self.cancelled:
            raise CancelledError()
        if self._proc.returncode != 0:
            raise BundleError(failure_message(self.output_dir, self.lines, self._proc.returncode))
        self.check_output()
        return self.output_dir

    def check_output(self) -> None:
        """Raise :class:`BundleError` when the ended child did not leave what it should have."""


class BundleProcess(ChildProcess):
    """The bundle's inference workflow on one image (``configs/inference.json``)."""

    def __init__(self, request: Request, image: str | Path, output_dir: str | Path,
                 mask: str | Path | None = None) -> None:
        super().__init__(request.command(image, output_dir, mask), request.bundle_dir, output_dir)
        self.request = request

    def check_output(self) -> None:
        if not (self.output_dir / "prediction.json").is_file():
            raise BundleError(f"The bundle finished but wrote no prediction.json in {self.output_dir}.")


#: The demo's tasks a first run can train models for (SynthCXR, generated locally).
DEMO_TASKS = {"opacity": "lung opacity (RSNA-like, boxes)", "pneumothorax": "pneumothorax (SIIM-like, masks)"}


#: What the demo trains per task (``saliency_trust.workflows.demo``: two DenseNet121 and one InceptionV3
#: classifiers, two U-Net localizers), and the share of the time its trust assessment takes after them.
DEMO_TRAININGS = 5
ASSESSMENT_SHARE = 0.35


@dataclass
class TrainingOutcome:
    """A finished training: the new model folder, and what to tell the user beside success."""

    model_dir: Path
    note: str = ""


class TrainProgress:
    """Determinate progress of the demo from its own output: each ``monai.bundle`` run's input summary
    (architecture, seed, epoch cap) and the training helper's ``epoch k:`` lines."""

    def __init__(self, trainings: int = DEMO_TRAININGS, assessment: bool = True) -> None:
        self.trainings, self.assessment = trainings, assessment
        self.started = 0  # trainings begun
        self.finished = 0  # trainings that wrote their best weights
        self.arch, self.seed, self.cap, self.epoch = "U-Net", 0, 1, 0

    def feed(self, lines: Sequence[str]) -> None:
        import re

        for line in lines:
            line = line.split("\r")[-1]
            if "input summary of monai.bundle.scripts.run" in line:
                self.started += 1
                self.arch, self.seed, self.cap, self.epoch = "U-Net", 0, 1, 0
            elif (m := re.search(r"> arch: '([\w.-]+)'", line)) is not None:
                self.arch = m.group(1)
            elif (m := re.search(r"> seed: (\d+)", line)) is not None:
                self.seed = int(m.group(1))
            elif (m := re.search(r"> max_epochs: (\d+)", line)) is not None:
                self.cap = max(1, int(m.group(1)))
            elif (m := re.search(r"\bepoch (\d+): val_", line)) is not None:
                self.epoch = int(m.group(1))
            elif re.search(r"best val_\w+ .* -> ", line):
                self.finished = self.started

    def fraction(self) -> float:
        """0 to 1 (1 only when the process has ended)."""
        train_share = 1.0 - (ASSESSMENT_SHARE if self.assessment else 0.0)
        running = 0.0 if self.finished >= self.started else min(1.0, self.epoch / self.cap)
        done = min(self.trainings, self.finished + running) / self.trainings
        return min(0.99, done * train_share)

    def text(self) -> str:
        """What is being done now, in words."""
        if self.started == 0:
            return "Making the SynthCXR images..."
        if self.finished >= self.trainings and self.assessment:
            return "Assessing the maps' trust on the validation images..."
        n = min(self.started, self.trainings)
        return (f"Training {self.arch} copy {self.seed} ({n} of {self.trainings}), "
                f"epoch {self.epoch} of at most {self.cap}...")


class TrainProcess(ChildProcess):
    """The demo's models for one task, trained in the background: SynthCXR data, the bundle's
    ``train.json`` for each classifier and baseline, then the trust assessment (``trust.json``),
    so the panel has models and verdicts. About 10 minutes on a laptop CPU."""

    what = "Training"

    def progress(self) -> tuple[float, str]:
        """(fraction done, what is being done) from the lines read so far."""
        if not hasattr(self, "_progress"):
            self._progress = TrainProgress(assessment="--skip-assessment" not in self.command)
            self._fed = 0
        self._progress.feed(self.lines[self._fed:])
        self._fed = len(self.lines)
        return self._progress.fraction(), self._progress.text()

    def outcome(self) -> TrainingOutcome:
        """Success when classifiers were written, with a note when the run also reported a problem
        (a validation AUC below the demo's bar, or a failure after the models were saved)."""
        try:
            self.result()
            note = ""
        except CancelledError:
            raise
        except BundleError as exc:
            if not self._classifiers():
                raise
            note = str(exc)
        warnings = [ln.strip() for ln in self.lines if ln.strip().startswith(("WARNING:", "NOTE:"))]
        if warnings:
            note = (note + " " if note else "") + warnings[-1]
        if note:
            note = "Note: " + note
        return TrainingOutcome(self.model_dir, note)

    def _classifiers(self) -> list:
        """The classifiers this run wrote (a replicate saved since it started); older ones do not count."""
        if not self.model_dir.is_dir():
            return []
        out = []
        for f in find_models(self.model_dir, self.bundle_dir).values():
            if isinstance(f, Exception) or f.kind != "classifier":
                continue
            if any(p.is_file() and p.stat().st_mtime >= self.started - 1.0 for p in f.replicates.values()):
                out.append(f)
        return out

    def __init__(self, bundle_dir: str | Path, out_dir: str | Path, task: str = "opacity",
                 python: str | None = None, extra_args: Sequence[str] = ()) -> None:
        if task not in DEMO_TASKS:
            raise SaliencyTrustError(f"Unknown task '{task}'; choose one of {', '.join(DEMO_TASKS)}.")
        cmd = [python or default_python(), "-m", "saliency_trust.workflows.demo", "--out", str(out_dir),
               "--tasks", task, "--no-shortcut", *extra_args]
        self.started = time.time()  # models written before this run do not count as its success
        super().__init__(cmd, bundle_dir, out_dir)
        self.task = task

    @property
    def model_dir(self) -> Path:
        """Where the trained models (and their results.json) are."""
        return self.output_dir / "models" / self.task

    def check_output(self) -> None:
        if not self._classifiers():
            raise BundleError(f"Training finished but left no model in {self.model_dir}.")


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and its descendants: SIGTERM to its process group on POSIX (SIGKILL after
    ``grace`` s), ``taskkill /T /F`` on Windows (``terminate`` alone would leave DataLoader workers)."""
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    else:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0), check=False)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def failure_message(output_dir: Path, lines: Sequence[str], returncode: int) -> str:
    """One readable sentence for a failed bundle run: its ``error.json`` or the last error line."""
    err = Path(output_dir) / "error.json"
    if err.is_file():
        e = json.loads(err.read_text())
        where = f"{Path(e['source']).name}: " if e.get("source") else ""
        return f"The bundle could not explain this image - {where}{e['problem']}"
    tail = [ln for ln in lines if ln.strip()]
    errors = [ln for ln in tail if "Error" in ln.split(":")[0] or ln.startswith(("Error", "error"))]
    last = (errors or tail or ["no output"])[-1].strip()
    return f"The bundle process failed (exit code {returncode}): {last}"


def _bundle_command(bundle_dir: str | Path, args: list[str], python: str | None = None,
                    timeout: float = 600.0) -> str:
    """Run ``python -m <args>`` with the bundle importable; its stdout, or BundleError with the reason."""
    require_supported_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bundle_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = 0 if os.name == "posix" else getattr(subprocess, "CREATE_NO_WINDOW", 0)
    try:
        r = subprocess.run([python or default_python(), "-m", *args], capture_output=True, text=True, env=env,
                           timeout=timeout, creationflags=flags, check=False)
    except subprocess.TimeoutExpired:
        raise BundleError(f"'{args[0]}' did not finish within {timeout:.0f} s.") from None
    if r.returncode != 0:
        raise BundleError(failure_message(Path("."), (r.stdout + r.stderr).splitlines(), r.returncode))
    return r.stdout


def make_sample_study(bundle_dir: str | Path, out_dir: str | Path, python: str | None = None,
                      timeout: float = 300.0, seed: int | None = None) -> Path:
    """A lesion-positive 320 px SynthCXR DICOM study made by the bundle under ``out_dir``; returns the file."""
    args = ["saliency_trust.workflows.sample", "--study", str(out_dir)]
    if seed is not None:
        args += ["--seed", str(seed)]
    out = _bundle_command(bundle_dir, args, python, timeout)
    path = Path(out.strip().splitlines()[-1])
    if not path.is_file():
        raise BundleError(f"The bundle did not write the sample study in {out_dir}.")
    return path


def make_fixture_models(bundle_dir: str | Path, out_dir: str | Path, python: str | None = None,
                        timeout: float = 300.0) -> Path:
    """A model folder of two untrained 64 px DenseNet121 replicates (seconds, no training) for the module's
    self-test; returns that folder."""
    out = _bundle_command(bundle_dir, ["saliency_trust.workflows.sample", "--fixture-models", str(out_dir)], python,
                          timeout)
    return Path(out.strip().splitlines()[-1])


def dicom_series_uid(path: str | Path) -> str:
    """The SeriesInstanceUID of a DICOM file (pydicom ships with Slicer)."""
    import pydicom

    return str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)


def run_bundle(request: Request, image: str | Path, output_dir: str | Path, mask: str | Path | None = None,
               timeout: float | None = None) -> Path:
    """Blocking convenience: run the bundle and return its output folder."""
    return BundleProcess(request, image, output_dir, mask).start().wait(timeout)


# --------------------------------------------------------------------------------------------
# Results into the scene


@dataclass
class Results:
    """What one run put in the scene."""

    prediction: dict
    map_nodes: dict  # method -> vtkMRMLScalarVolumeNode
    table_node: object
    failing: dict  # method -> [criteria it fails]
    output_dir: Path
    folder_item: int = 0  # the subject hierarchy folder holding this run's nodes (0: none)
    training_note: str = ""  # a warning about the model's training data ('' when none)

    def summary(self) -> str:
        """The prediction in one line for the panel, with the task's finding named."""
        p = self.prediction["probabilities"]
        c = self.prediction["predicted_class"]
        finding = self.prediction.get("task") or "finding"
        said = "present" if c == 1 else "absent"
        explained = self.prediction.get("explained_class", c)
        maps = "" if explained == c else f"; the maps explain class {explained}"
        # What the reader decided about the input (a grey RGB picture read as luminance, an override): said too.
        notes = (self.prediction.get("input") or {}).get("notes") or []
        said_input = "".join(f" Input: {note}." for note in notes)
        return (f"{finding[:1].upper() + finding[1:]}: predicted {said} (p = {p[c]:.3f}){maps}. "
                f"{self.prediction['model']['arch']} replicate {self.prediction['model']['replicate']}, "
                f"{self.prediction['preset']} preset.{said_input}")

    def banner(self) -> str:
        """A warning naming every method that fails a dataset-level criterion ('' when none does)."""
        if not self.failing:
            return ""
        if len(self.failing) == 1:
            (m, cs), = self.failing.items()
            what = ", ".join(CRITERION_TITLES[c].lower() for c in cs)
            return (f"Do not trust the {METHOD_NAMES.get(m, m)} map: it fails on the assessment data ({what}: "
                    "no); see the table.")
        names = [METHOD_NAMES.get(m, m) for m in self.failing]
        every = " (every method shown)" if len(names) == len(self.map_nodes) else ""
        return (f"Do not trust these maps{every}: {', '.join(names)} fail at least one trust criterion on the "
                "assessment data; see the table.")

    def assessment_line(self) -> str:
        """Where the verdicts come from: n images, which data, synthetic or not, the preset."""
        return assessment_line(self.prediction)


def assessment_line(prediction: dict) -> str:
    """One sentence on the assessment behind the verdicts (or why there are none)."""
    v = prediction.get("verdicts")
    if not v:
        return ("No trust assessment lies beside this model (results.json): the verdicts are unknown; run the "
                "bundle's trust.json on validation data to get them.")
    if v.get("error"):
        return f"The trust assessment beside this model could not be read: {v['error']}"
    data = Path(str(v.get("dataset") or "unknown data")).name
    kind = "synthetic SynthCXR images, not patients" if v.get("synthetic") else "radiographs"
    return (f"Verdicts from an assessment of {v.get('n_images', '?')} lesion-positive images of '{data}' "
            f"({kind}) with the {v.get('preset', '?')} preset.")


SYNTHETIC_TRAINING_NOTE = ("This model was trained on synthetic SynthCXR images, not on patients' radiographs: "
                           "its prediction and maps say nothing clinical about this image.")


def training_note(record: dict) -> str:
    """A warning when a model's training record says it learnt from synthetic (SynthCXR) images: its own
    ``synthetic`` flag (written at training, so it survives moving the model or deleting the data), else
    the SynthCXR marker still lying in the training data folder (records written before the flag)."""
    if record.get("synthetic") is not None:
        return SYNTHETIC_TRAINING_NOTE if record["synthetic"] else ""
    data = record.get("dataset_dir")
    if data and (Path(data) / "synthcxr.json").is_file():
        return SYNTHETIC_TRAINING_NOTE
    return ""


def trust_word(verdict: dict | None) -> tuple[str, list[str]]:
    """The trust column's text and the criteria failed; n/a never counts as a pass."""
    if not verdict:
        return "Unknown (no assessment)", []
    fails = [c for c in CRITERIA if verdict.get(c) is False]
    if fails:
        return "Fails: " + ", ".join(CRITERION_TITLES[c].lower() for c in fails), fails
    if all(verdict.get(c) is True for c in CRITERIA):
        return "Passes all four", []
    missing = [CRITERION_TITLES[c].lower() for c in CRITERIA if verdict.get(c) is not True]
    return "Not fully judged (n/a: " + ", ".join(missing) + ")", []


#: The comparison that decided a FAIL (a verdict's ``decided_by``), in words.
LEGS = {"prior": "the average-mask prior", "localization": "the localization network", "chance": "chance"}


def _details(details: dict | None) -> str:
    """The numbers behind one method's verdicts, short."""
    if not details:
        return ""
    parts = []
    for c in CRITERIA:
        d = details.get(c) or {}
        if d.get("rule") == "not run":
            parts.append(f"{c}: not run")
            continue
        value, ref, n = d.get("value"), d.get("reference"), d.get("n", 0)
        text = f"{c}: {_fmt(value) or 'n/a'}"
        if ref is not None:
            text += f" vs {_fmt(ref)}"
        text += f" (n = {n} images"
        if d.get("n_undefined"):
            text += f", {d['n_undefined']} undefined"
        if d.get("passed") is False and d.get("decided_by"):
            text += f"; failed vs {LEGS.get(d['decided_by'], d['decided_by'])}"
        if d.get("evidence"):
            text += f"; evidence {d['evidence']}"
        parts.append(text + ")")
    return "; ".join(parts)


def perceptual_color_node(scene):
    """Slicer's Inferno colour table when the application has it, else our own (added once)."""
    node = scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt")
    if node is not None:
        return node
    found = node_by_name(scene, COLOR_NODE_NAME)
    if found is not None:
        return found
    slicer = _slicer()
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetHideFromEditors(False)
    xs = np.array([p for p, _ in INFERNO])
    rgb = np.array([c for _, c in INFERNO])
    for i in range(256):
        t = i / 255.0
        r, g, b = (float(np.interp(t, xs, rgb[:, k])) for k in range(3))
        node.SetColor(i, f"{i}", r, g, b, 1.0)
    node.SetAttribute("Category", "SaliencyTrust")
    scene.AddNode(node)
    return node


def _load_map(scene, path: Path, name: str):
    slicer = _slicer()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    ok = storage.ReadData(node)
    if not ok:
        scene.RemoveNode(node)
        raise SaliencyTrustError(f"Could not read the map {path.name} written by the bundle.")
    return node


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def fill_table(table, prediction: dict) -> dict:
    """Fill ``table`` with one row per method, headers in words, read-only; returns ``{method: [failed]}``."""
    import vtk

    methods = prediction["methods"]
    copy = prediction.get("verdicts") or {}
    verdicts = copy.get("methods", {})
    details = copy.get("details", {})
    titles = {**COLUMN_TITLES, **(copy.get("titles") or {})}
    checks = prediction.get("checks", {})
    rep = (checks.get("repeatability") or {}).get("ssim") or {}
    ran = (checks.get("randomization") or {}).get("ssim") or {}
    auc = checks.get("auprc") or {}
    blank = checks.get("blank") or {}  # methods whose map was blank: the check has no value, said in words

    def live(values: dict, check: str, m: str) -> str:
        return "blank map" if m in (blank.get(check) or []) else _fmt(values.get(m))

    word = {True: "pass", False: "FAIL", None: "n/a"}
    failing: dict = {}
    data = table.GetTable()
    data.Initialize()
    for col in TABLE_COLUMNS:
        arr = vtk.vtkStringArray()
        arr.SetName(col)
        data.AddColumn(arr)
    for m in methods:
        v = verdicts.get(m)
        trust, fails = trust_word(v)
        if fails:
            failing[m] = fails
        row = [METHOD_NAMES.get(m, m), trust, *(word[v.get(c)] if v else "unknown" for c in CRITERIA),
               live(rep, "repeatability", m), live(ran, "randomization", m), live(auc, "auprc", m),
               _details(details.get(m))]
        r = data.InsertNextBlankRow()
        for c, text in enumerate(row):
            data.SetValue(r, c, text)
    for col in TABLE_COLUMNS:
        table.SetColumnTitle(col, titles[col])
        help_text = COLUMN_HELP[col]
        if col in CRITERIA and details:
            first = next(iter(details.values())).get(col) or {}
            if first.get("plain"):
                help_text += " Rule: " + first["plain"]
        table.SetColumnDescription(col, help_text)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetLocked(True)  # the view is read-only: these are results, not inputs
    table.Modified()
    return failing


def nodes_by_class(scene, class_name: str) -> list:
    """The scene's nodes of ``class_name`` (and subclasses), without a collection to leak."""
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def node_by_name(scene, name: str):
    """The first node called ``name``, or None (no collection to leak)."""
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetName() == name:
            return node
    return None


#: The node reference from each map and table to the volume it was computed on. A reference (not an ID
#: kept as text) follows the volume when a saved scene is imported and its IDs are renumbered.
INPUT_REFERENCE = "SaliencyTrust.input"


def run_nodes(scene, input_node) -> list:
    """Every node an earlier run put in the scene for ``input_node`` (maps and tables)."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return [n for n in nodes if n.GetNodeReference(INPUT_REFERENCE) is input_node]


def map_input(scene, map_node):
    """The volume ``map_node`` was computed on (referenced by the map node since it was loaded), or None."""
    node = map_node.GetNodeReference(INPUT_REFERENCE) if map_node is not None else None
    return node if node is not None and scene.IsNodePresent(node) else None


def _subject_hierarchy(scene):
    slicer = _slicer()
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def _remove_run(scene, nodes: list) -> None:
    """Remove an earlier run's nodes, their subject hierarchy items and its folder once empty.

    Items are removed explicitly before their nodes: the application's subject hierarchy plugin
    logic would drop an item with its node, a bare scene (``slicer-core``) does not.
    """
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")  # the existing one: removing creates nothing
    folders = set()
    for node in nodes:
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:
            parent = sh.GetItemParent(item)
            if parent and sh.GetItemAttribute(parent, "SaliencyTrust.run"):
                folders.add(parent)
            sh.RemoveItem(item, False, False)
        if scene.IsNodePresent(node):
            _remove_with_helpers(scene, node)
    for folder in folders:
        if sh.GetNumberOfItemChildren(folder) == 0:  # keep what the user put into it
            sh.RemoveItem(folder, False, False)


def _remove_with_helpers(scene, node) -> None:
    """Remove ``node`` and the display / storage nodes only it used (colour legends included)."""
    helpers = []
    for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
        helpers.append(node.GetNthDisplayNode(i))
    if hasattr(node, "GetStorageNode"):
        helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def _file_under_input(scene, input_node, nodes: list, name: str) -> int:
    """A subject hierarchy folder for this run under the input's own parent (its study); returns its item."""
    sh = _subject_hierarchy(scene)
    if sh is None:
        return 0
    input_item = sh.GetItemByDataNode(input_node)
    parent = sh.GetItemParent(input_item) if input_item else sh.GetSceneItemID()
    folder = sh.CreateFolderItem(parent or sh.GetSceneItemID(), name)
    sh.SetItemAttribute(folder, "SaliencyTrust.run", "1")
    for node in nodes:
        # In the application the Subject Hierarchy logic has made an item for each new node; in a
        # bare scene (slicer-core) it has not, so make it here.
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, folder)
        else:
            sh.CreateItem(folder, node)
    return folder


def load_results(scene, input_node, output_dir: str | Path, prefix: str | None = None,
                 run_name: str | None = None) -> Results:
    """Maps and metrics of a finished run into ``scene``: volumes aligned with the input, a table.

    The nodes go into one subject hierarchy folder under the input's patient / study, named by
    the run; an earlier run's nodes for the same input are replaced. All-or-nothing: if anything
    fails, the nodes added so far are removed again and the earlier run stays.
    """
    out = Path(output_dir)
    try:
        prediction = json.loads((out / "prediction.json").read_text())
    except (OSError, ValueError) as exc:
        raise SaliencyTrustError(f"Could not read the bundle's prediction.json in {out}: {exc}") from None
    missing = [k for k in ("maps", "methods") if k not in prediction]
    if missing:
        raise SaliencyTrustError(f"The bundle's prediction.json in {out} lacks {', '.join(missing)}.")
    earlier = run_nodes(scene, input_node)
    prefix = prefix or input_node.GetName()
    model = prediction.get("model") or {}
    run_name = run_name or (f"SaliencyTrust: {prefix}, {model.get('arch', 'model')} replicate "
                            f"{model.get('replicate', '?')}, {prediction.get('preset', '?')} preset")
    had_color = (scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") is not None
                 or node_by_name(scene, COLOR_NODE_NAME) is not None)
    added = []
    try:
        color = perceptual_color_node(scene)
        if not had_color:
            added.append(color)
        nodes = {}
        for m, rel in prediction["maps"].items():
            node = _load_map(scene, out / rel, f"{prefix} - {METHOD_NAMES.get(m, m)}")
            added.append(node)
            _match_geometry(node, input_node)
            node.CreateDefaultDisplayNodes()
            style_overlay(node, color)
            node.SetAttribute("SaliencyTrust.method", m)
            node.SetNodeReferenceID(INPUT_REFERENCE, input_node.GetID())
            nodes[m] = node
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{prefix} - trust")
        added.append(table)
        failing = fill_table(table, prediction)
        table.SetNodeReferenceID(INPUT_REFERENCE, input_node.GetID())
        table.SetAttribute("SaliencyTrust.prediction", json.dumps(
            {k: prediction.get(k) for k in ("probabilities", "predicted_class", "preset", "task")}))
        folder = _file_under_input(scene, input_node, [*nodes.values(), table], run_name)
    except Exception as exc:
        _remove_run(scene, list(reversed(added)))
        if isinstance(exc, SaliencyTrustError):
            raise
        raise SaliencyTrustError(f"Could not load the results in {out}: {type(exc).__name__}: {exc}") from exc
    _remove_run(scene, earlier)  # only now: a failed load keeps the earlier run
    return Results(prediction, nodes, table, failing, out, folder)


def style_overlay(node, color) -> None:
    """Colour a map for overlay: perceptual colours on [0, 1], values below OVERLAY_FLOOR transparent."""
    disp = node.GetDisplayNode()
    disp.SetAndObserveColorNodeID(color.GetID())
    disp.AutoWindowLevelOff()
    disp.SetWindowLevelMinMax(0.0, 1.0)
    # Slicer's threshold makes the voxels outside [lower, upper] transparent in the slice views,
    # so the radiograph is not darkened where the map is (near) zero.
    disp.AutoThresholdOff()
    disp.SetApplyThreshold(True)
    disp.SetThreshold(OVERLAY_FLOOR, 1.0)


def _match_geometry(node, input_node) -> None:
    """Refuse a map whose grid differs from the input's (it would be drawn in the wrong place)."""
    import vtk

    a, b = node.GetImageData().GetDimensions(), input_node.GetImageData().GetDimensions()
    if a != b:
        raise SaliencyTrustError(f"Map {node.GetName()} has dimensions {a}, the input {b}.")
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ma)
    input_node.GetIJKToRASMatrix(mb)
    diff = max(abs(ma.GetElement(r, c) - mb.GetElement(r, c)) for r in range(3) for c in range(4))
    if diff > 1e-3:
        raise SaliencyTrustError(f"Map {node.GetName()} is not on the input's grid (IJK-to-RAS differs by {diff:.3g}).")


def show_overlay(scene, background, foreground, opacity: float = 0.5) -> int:
    """Put ``foreground`` over ``background`` in every slice view of ``scene``; returns the views set."""
    n = 0
    for c in nodes_by_class(scene, "vtkMRMLSliceCompositeNode"):
        c.SetBackgroundVolumeID(background.GetID() if background else None)
        c.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        c.SetForegroundOpacity(float(opacity))
        n += 1
    return n


def show_legend(results: Results | None, method: str | None, color_logic) -> object | None:
    """A colour legend in the slice views for ``method``'s map, the other maps' legends hidden.

    ``color_logic`` is the Colors module logic (``slicer.modules.colors.logic()`` in the
    application; a ``vtkSlicerColorLogic`` on the scene in tests). Returns the legend node.
    """
    if results is None:
        return None
    shown = None
    for m, node in results.map_nodes.items():
        if node.GetScene() is None:
            continue
        legend = color_logic.GetColorLegendDisplayNode(node)
        if m == method:
            if legend is None:
                legend = color_logic.AddDefaultColorLegendDisplayNode(node)
            legend.SetTitleText("Saliency")
            legend.SetLabelFormat("%.1f")
            legend.SetVisibility(True)
            shown = legend
        elif legend is not None:
            legend.SetVisibility(False)
    return shown


def run_local(scene, volume, request: Request, work_dir: str | Path, score_node=None,
              timeout: float | None = None) -> Results:
    """The whole local flow, blocking (the widget drives the same steps without blocking)."""
    work = Path(work_dir)
    image, mask = prepare(volume, score_node, work / "input")
    out = run_bundle(request, image, work / "output", mask, timeout=timeout)
    return load_results(scene, volume, out)


def render_slice(scene, background, foreground, opacity: float = 0.5, size: int = 512) -> np.ndarray:
    """The slice view's blended picture (RGB ``[size, size, 3]`` uint8), offscreen, through Slicer's own
    slice logic: the same reslice, colour mapping and layer blending a slice view shows."""
    slicer = _slicer()
    from vtk.util.numpy_support import vtk_to_numpy

    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLScene(scene)
    for node in (background, foreground):
        if node is not None and node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    if background is not None and not background.GetDisplayNode().GetColorNodeID():
        background.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(scene)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app)
    logic.SetMRMLScene(scene)
    slice_node = logic.AddSliceNode("SaliencyTrustOffscreen")
    try:
        comp = logic.GetSliceCompositeNode()
        comp.SetBackgroundVolumeID(background.GetID() if background else None)
        comp.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        comp.SetForegroundOpacity(float(opacity))
        slice_node.SetOrientationToAxial()
        slice_node.SetDimensions(size, size, 1)
        logic.FitSliceToAll()
        producer = logic.GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(size, size, -1)
        return np.ascontiguousarray(rgba[::-1, :, :3])  # VTK rows run bottom-up
    finally:
        for node in (slice_node, comp):
            if node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)
