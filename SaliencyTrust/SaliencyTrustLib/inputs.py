"""The scene's input, checked and written for the bundle: the volume and the mask to score against.

Two kinds of input: a radiograph (one slice, for a 2-D model) and a CT volume (a scalar volume of
several slices, for a 3-D model). A radiograph loaded from DICOM goes as its own DICOM file without
the patient's identifying elements; any other radiograph as NRRD whose header states its intensity
range, so the bundle never guesses it. A CT volume goes as NRRD with its geometry (Slicer's own
storage node: IJK-to-RAS written as LPS) and its values as they are in the scene (HU for a CT loaded
from DICOM: Slicer applies the rescale slope and intercept); the bundle windows them as the model
says. The scoring mask (a segmentation or a markups ROI) goes as a label map on the input's grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from SaliencyTrustLib import texts
from SaliencyTrustLib.errors import InputVolumeError, SaliencyTrustError


def _slicer():
    import slicer

    return slicer


def check_input_volume(node) -> int:
    """The input's dimension, 2 (a radiograph: one slice) or 3 (a CT volume: several slices), or
    :class:`InputVolumeError` in one sentence: a volume must be a non-empty grayscale scalar volume (one
    slice or several), or a single-slice RGB(A) vector volume (a picture of a radiograph: the bundle reads
    grey content as luminance and refuses real colour)."""
    if node is None:
        raise InputVolumeError("Select an input volume (a chest X-ray or a CT loaded from DICOM or a file).")
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
        raise InputVolumeError(f"'{name}' has {components} components per voxel; a radiograph or a CT has one.")
    if cls == "vtkMRMLVectorVolumeNode" and components not in (3, 4):
        raise InputVolumeError(f"'{name}' has {components} components per voxel; SaliencyTrust reads a grey "
                               "radiograph or an RGB(A) picture of one.")
    if dims[0] < 2 or dims[1] < 2:
        raise InputVolumeError(f"'{name}' is not an image (dimensions {dims[0]} x {dims[1]} x {dims[2]}); "
                               "SaliencyTrust explains a radiograph (one slice) or a CT volume (several slices).")
    if dims[2] == 1:
        return 2
    if cls == "vtkMRMLVectorVolumeNode":
        raise InputVolumeError(f"'{name}' is a colour volume of {dims[2]} slices; SaliencyTrust explains a grey "
                               "radiograph (one slice) or a grayscale CT volume.")
    return 3


def check_model_fits(volume, model_dimension: int, model_name: str) -> int:
    """:func:`check_input_volume`, then :class:`InputVolumeError` in one sentence when the model is of the other
    kind (a 2-D model and a CT volume, or a 3-D model and a radiograph); returns the input's dimension."""
    dimension = check_input_volume(volume)
    if int(model_dimension) != dimension:
        raise InputVolumeError(texts.dimension_mismatch(volume.GetName(), volume.GetImageData().GetDimensions(),
                                                        model_name, int(model_dimension)))
    return dimension


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
    A volume under a linear transform is placed where the views draw it (the ROI lies in world
    coordinates); under a non-linear one the mask is refused in one sentence.
    """
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    transform = volume.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        if not _slicer().vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(transform, None, to_world):
            raise SaliencyTrustError(f"'{volume.GetName()}' is under a non-linear transform: harden or remove it "
                                     f"before scoring against the ROI '{roi.GetName()}'.")
        ijk_to_ras = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ijk_to_ras
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
        what = "voxel of the input volume" if mask.shape[0] > 1 else "pixel of the input image"
        raise SaliencyTrustError(f"'{score_node.GetName()}' covers no {what}.")
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

    A radiograph loaded from DICOM goes as its DICOM file (:func:`source_dicom`), without the patient's
    identifying elements (:func:`deidentified_copy`), which the bundle reads as it read its training data
    (through the stored range); any other radiograph as NRRD whose header states its intensity range
    (:func:`intensity_range`), so the bundle never guesses it from the content. A CT volume goes as NRRD
    with its geometry and values (HU); the bundle windows it as the model says.
    """
    dimension = check_input_volume(volume)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = score_mask(volume, score_node)
    source = source_dicom(volume) if dimension == 2 else None
    if source is not None:
        image_path = folder / "input.dcm"
        deidentified_copy(source, image_path)
    elif dimension == 3:
        image_path = write_volume(volume, folder / "input.nrrd")
    else:
        lo, hi = intensity_range(volume)
        image_path = write_volume(volume, folder / "input.nrrd")
        _state_intensity_range(image_path, lo, hi)
    mask_path = write_mask(volume, mask, folder / "mask.nrrd") if mask is not None else None
    return image_path, mask_path


def dicom_series_uid(path: str | Path) -> str:
    """The SeriesInstanceUID of a DICOM file (pydicom ships with Slicer)."""
    import pydicom

    return str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)
