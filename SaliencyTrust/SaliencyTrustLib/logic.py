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

CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")
METHODS = ("grad", "sg", "ig", "sig", "gradcam", "gbp", "ggcam", "xrai")
TABLE_COLUMNS = ("method", "trust", *CRITERIA, "repeatability_here_ssim", "randomization_here_ssim", "auprc_here")
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


def _slicer():
    import slicer

    return slicer


# --------------------------------------------------------------------------------------------
# Input


def check_input_volume(node) -> None:
    """Raise :class:`InputVolumeError` unless ``node`` is a non-empty single-slice grayscale scalar volume."""
    if node is None:
        raise InputVolumeError("Select an input volume (a chest X-ray loaded from DICOM or a file).")
    name = node.GetName() if hasattr(node, "GetName") else str(node)
    cls = node.GetClassName()
    if cls != "vtkMRMLScalarVolumeNode":
        kind = {"vtkMRMLLabelMapVolumeNode": "a label map", "vtkMRMLVectorVolumeNode": "a colour/vector volume"}.get(
            cls, f"a {cls}")
        raise InputVolumeError(f"'{name}' is {kind}; SaliencyTrust explains a grayscale scalar volume.")
    image = node.GetImageData()
    if image is None:
        raise InputVolumeError(f"'{name}' has no image data (empty volume).")
    dims = image.GetDimensions()
    if min(dims) == 0 or image.GetNumberOfPoints() == 0:
        raise InputVolumeError(f"'{name}' is empty (dimensions {dims}).")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputVolumeError(f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
                               "a radiograph has one.")
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


def mask_from_roi(volume, roi) -> np.ndarray:
    """Boolean ``[K, J, I]`` mask of the voxels of ``volume`` whose centres lie inside a markups ROI."""
    import vtk

    slicer = _slicer()
    arr = slicer.util.arrayFromVolume(volume)
    k, j, i = np.meshgrid(*(np.arange(n) for n in arr.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    ras = ijk_to_ras @ ijk
    # Into the ROI's own frame (origin at its centre, axes along its sides; it may be rotated).
    o = roi.GetObjectToWorldMatrix()
    world_to_object = np.linalg.inv(np.array([[o.GetElement(r, c) for c in range(4)] for r in range(4)]))
    local = world_to_object @ ras
    half = np.array(roi.GetSize()) / 2.0
    inside = np.all(np.abs(local[:3]) <= half[:, None] + 1e-6, axis=0)
    return inside.reshape(arr.shape)


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


def prepare(volume, score_node, folder: str | Path) -> tuple[Path, Path | None]:
    """Check the input and write it (and the scoring mask, if any) into ``folder``; returns their paths."""
    check_input_volume(volume)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = score_mask(volume, score_node)
    image_path = write_volume(volume, folder / "input.nrrd")
    mask_path = write_mask(volume, mask, folder / "mask.nrrd") if mask is not None else None
    return image_path, mask_path


# --------------------------------------------------------------------------------------------
# The bundle, out of process


def default_python() -> str:
    """Slicer's Python without GUI (``PythonSlicer``) when there is one, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


@dataclass
class Request:
    """What to run: the bundle folder, the model (folder, architecture, replicate), methods and preset."""

    bundle_dir: str
    model_dir: str
    arch: str = "inception_v3"
    replicate: int = 0
    methods: Sequence[str] = METHODS
    preset: str = "quick"
    device: str | None = None
    checks: bool = True
    python: str = field(default_factory=default_python)

    def command(self, image: str | Path, output_dir: str | Path, mask: str | Path | None = None) -> list[str]:
        """The ``monai.bundle run`` command line for ``configs/inference.json``."""
        configs = Path(self.bundle_dir) / "configs"
        cmd = [self.python, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
               "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(self.bundle_dir),
               "--image", str(image), "--output_dir", str(output_dir), "--model_dir", str(self.model_dir),
               "--arch", self.arch, "--replicate", str(int(self.replicate)),
               "--methods", json.dumps(list(self.methods)), "--preset", self.preset,
               "--checks", "True" if self.checks else "False"]
        if mask is not None:
            cmd += ["--mask", str(mask)]
        if self.device:
            cmd += ["--device", self.device]
        return cmd


class BundleProcess:
    """The bundle run in a child process: non-blocking, output collected by a thread, cancellable."""

    def __init__(self, request: Request, image: str | Path, output_dir: str | Path,
                 mask: str | Path | None = None) -> None:
        self.request = request
        self.output_dir = Path(output_dir)
        self.command = request.command(image, output_dir, mask)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self.cancelled = False
        self.started_at = 0.0

    def start(self) -> BundleProcess:
        """Launch the child; returns at once."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.request.bundle_dir), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        kwargs: dict = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, **kwargs)
        self.started_at = time.time()
        threading.Thread(target=self._read, daemon=True).start()
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
        """Stop the child and everything it started."""
        if not self.running:
            return
        self.cancelled = True
        assert self._proc is not None
        try:
            if os.name == "posix":
                os.killpg(self._proc.pid, signal.SIGTERM)
            else:
                self._proc.terminate()
            self._proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the child ends; returns the output folder or raises :class:`BundleError`."""
        assert self._proc is not None, "start() first"
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise BundleError(f"The bundle did not finish within {timeout:.0f} s and was stopped.") from None
        return self.result()

    def result(self) -> Path:
        """The output folder of a finished child, or :class:`BundleError` with the reason."""
        assert self._proc is not None and self._proc.poll() is not None
        time.sleep(0.05)
        self.new_lines()
        if self.cancelled:
            raise BundleError("Cancelled; nothing was added to the scene.")
        if self._proc.returncode != 0:
            raise BundleError(failure_message(self.output_dir, self.lines, self._proc.returncode))
        if not (self.output_dir / "prediction.json").is_file():
            raise BundleError(f"The bundle finished but wrote no prediction.json in {self.output_dir}.")
        return self.output_dir


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

    def summary(self) -> str:
        """The prediction in one line for the panel."""
        p = self.prediction["probabilities"]
        c = self.prediction["predicted_class"]
        label = "lesion" if c == 1 else "no lesion"
        return f"Predicted: {label} (p = {p[c]:.3f}); {self.prediction['model']['arch']} " \
               f"replicate {self.prediction['model']['replicate']}, {self.prediction['preset']} preset"

    def banner(self) -> str:
        """A warning naming every method that fails a dataset-level criterion ('' when none does)."""
        if not self.failing:
            return ""
        parts = [f"{m} ({', '.join(c)})" for m, c in self.failing.items()]
        return "Do not trust these maps: " + "; ".join(parts) + " fail the trust criteria on the validation data."


def perceptual_color_node(scene):
    """Slicer's Inferno colour table when the application has it, else our own (added once)."""
    node = scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt")
    if node is not None:
        return node
    found = scene.GetNodesByName(COLOR_NODE_NAME)
    if found.GetNumberOfItems():
        return found.GetItemAsObject(0)
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
    """Fill ``table`` with one row per method; returns ``{method: [failed criteria]}``."""
    import vtk

    methods = prediction["methods"]
    verdicts = (prediction.get("verdicts") or {}).get("methods", {})
    checks = prediction.get("checks", {})
    rep = (checks.get("repeatability") or {}).get("ssim") or {}
    ran = (checks.get("randomization") or {}).get("ssim") or {}
    auc = checks.get("auprc") or {}
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
        fails = [c for c in CRITERIA if v and v.get(c) is False]
        if fails:
            failing[m] = fails
        trust = "unknown" if not v else ("FAILS " + ", ".join(fails) if fails else "passes all")
        row = [m, trust, *(word[v.get(c)] if v else "unknown" for c in CRITERIA),
               _fmt(rep.get(m)), _fmt(ran.get(m)), _fmt(auc.get(m))]
        r = data.InsertNextBlankRow()
        for c, text in enumerate(row):
            data.SetValue(r, c, text)
    table.Modified()
    return failing


def load_results(scene, input_node, output_dir: str | Path, prefix: str | None = None) -> Results:
    """Maps and metrics of a finished run into ``scene``: volumes aligned with the input, a table.

    All-or-nothing: if anything fails, the nodes added so far are removed again.
    """
    out = Path(output_dir)
    try:
        prediction = json.loads((out / "prediction.json").read_text())
    except (OSError, ValueError) as exc:
        raise SaliencyTrustError(f"Could not read the bundle's prediction.json in {out}: {exc}") from None
    prefix = prefix or f"{input_node.GetName()} saliency"
    had_color = (scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt") is not None
                 or scene.GetNodesByName(COLOR_NODE_NAME).GetNumberOfItems() > 0)
    added = []
    try:
        color = perceptual_color_node(scene)
        if not had_color:
            added.append(color)
        nodes = {}
        for m, rel in prediction["maps"].items():
            node = _load_map(scene, out / rel, f"{prefix} {m}")
            added.append(node)
            _match_geometry(node, input_node)
            node.CreateDefaultDisplayNodes()
            disp = node.GetDisplayNode()
            disp.SetAndObserveColorNodeID(color.GetID())
            disp.AutoWindowLevelOff()
            disp.SetWindowLevelMinMax(0.0, 1.0)
            node.SetAttribute("SaliencyTrust.method", m)
            node.SetAttribute("SaliencyTrust.input", input_node.GetID())
            nodes[m] = node
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{prefix} trust")
        added.append(table)
        failing = fill_table(table, prediction)
        table.SetAttribute("SaliencyTrust.prediction", json.dumps(
            {k: prediction[k] for k in ("probabilities", "predicted_class", "preset")}))
    except Exception as exc:
        for node in reversed(added):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        if isinstance(exc, SaliencyTrustError):
            raise
        raise SaliencyTrustError(f"Could not load the results in {out}: {type(exc).__name__}: {exc}") from exc
    return Results(prediction, nodes, table, failing, out)


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
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        c = composites.GetItemAsObject(i)
        c.SetBackgroundVolumeID(background.GetID() if background else None)
        c.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        c.SetForegroundOpacity(float(opacity))
        n += 1
    return n


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
