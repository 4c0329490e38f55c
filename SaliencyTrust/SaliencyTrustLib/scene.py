"""A finished run into the scene: one overlay per method and a trust table, filed under the input's study.

The overlays use a perceptual colour map whose low values are transparent, with a colour legend per
map; an earlier run's nodes for the same input are replaced only once the new run has loaded, so a
failed load leaves the scene as it was. A map of a CT volume has the CT's grid (the same IJK-to-RAS,
no resampling) and lies over it in all three slice views; :func:`show_volume_rendering` adds an
optional volume rendering of it in the 3-D view, with the overlay's colours and transparent floor.
:func:`render_slice` draws a slice view offscreen through Slicer's own slice logic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SaliencyTrustLib import texts
from SaliencyTrustLib.errors import SaliencyTrustError


def _slicer():
    import slicer

    return slicer


#: Map values below this are transparent in the overlay: the radiograph stays visible where the map is low.
OVERLAY_FLOOR = 0.1

#: Control points of matplotlib's "inferno" (perceptually uniform); interpolated to 256 entries.
INFERNO = ((0.0, (0.001, 0.000, 0.014)), (0.125, (0.155, 0.044, 0.318)), (0.25, (0.341, 0.062, 0.429)),
           (0.375, (0.520, 0.129, 0.419)), (0.5, (0.735, 0.216, 0.330)), (0.625, (0.898, 0.353, 0.206)),
           (0.75, (0.978, 0.557, 0.035)), (0.875, (0.975, 0.788, 0.188)), (1.0, (0.988, 0.998, 0.645)))

COLOR_NODE_NAME = "SaliencyTrust Inferno"


@dataclass
class RunOutput:
    """What one run put in the scene (its ``prediction.json``, the map and table nodes) and what to say about it."""

    prediction: dict
    map_nodes: dict  # method -> vtkMRMLScalarVolumeNode
    table_node: object
    failing: dict  # method -> [criteria it fails]
    output_dir: Path
    folder_item: int = 0  # the subject hierarchy folder holding this run's nodes (0: none)
    training_note: str = ""  # a warning about the model's training data ('' when none)

    def summary(self) -> str:
        """The prediction in one line for the panel, with the task's finding named."""
        return texts.prediction_line(self.prediction)

    def banner(self) -> str:
        """A warning naming every method that fails a dataset-level criterion ('' when none does)."""
        return texts.trust_banner(self.failing, len(self.map_nodes))

    def assessment_line(self) -> str:
        """Where the verdicts come from: n images, which data, synthetic or not, the preset."""
        return texts.assessment_line(self.prediction)


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


def fill_table(table, prediction: dict) -> dict:
    """Fill ``table`` with one row per method, headers in words, read-only; returns ``{method: [failed]}``."""
    import vtk

    methods = prediction["methods"]
    copy = prediction.get("verdicts") or {}
    verdicts = copy.get("methods", {})
    details = copy.get("details", {})
    titles = {**texts.COLUMN_TITLES, **(copy.get("titles") or {})}
    checks = prediction.get("checks", {})
    rep = (checks.get("repeatability") or {}).get("ssim") or {}
    ran = (checks.get("randomization") or {}).get("ssim") or {}
    auc = checks.get("auprc") or {}
    blank = checks.get("blank") or {}  # methods whose map was blank: the check has no value, said in words

    def live(values: dict, check: str, m: str) -> str:
        return "blank map" if m in (blank.get(check) or []) else texts.number(values.get(m))

    word = {True: "pass", False: "FAIL", None: "n/a"}
    names = texts.method_names()
    failing: dict = {}
    data = table.GetTable()
    data.Initialize()
    for col in texts.TABLE_COLUMNS:
        arr = vtk.vtkStringArray()
        arr.SetName(col)
        data.AddColumn(arr)
    for m in methods:
        v = verdicts.get(m)
        trust, fails = texts.trust_word(v)
        if fails:
            failing[m] = fails
        row = [names.get(m, m), trust, *(word[v.get(c)] if v else "unknown" for c in texts.CRITERIA),
               live(rep, "repeatability", m), live(ran, "randomization", m), live(auc, "auprc", m),
               texts.details_text(details.get(m))]
        r = data.InsertNextBlankRow()
        for c, text in enumerate(row):
            data.SetValue(r, c, text)
    for col in texts.TABLE_COLUMNS:
        table.SetColumnTitle(col, titles[col])
        help_text = texts.COLUMN_HELP[col]
        if col in texts.CRITERIA and details:
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
        display = node.GetNthDisplayNode(i)
        helpers.append(display)
        # A volume rendering display node's property nodes are nodes too: those made for this map's rendering
        # (tagged when made) go with it; anything the user attached (a preset, a cropping ROI) stays.
        for getter in ("GetVolumePropertyNode", "GetShaderPropertyNode"):
            extra = getattr(display, getter)() if display is not None and hasattr(display, getter) else None
            if extra is not None and extra.GetAttribute(RENDERING_ATTRIBUTE):
                helpers.append(extra)
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


def load_run_output(scene, input_node, output_dir: str | Path, prefix: str | None = None,
                    run_name: str | None = None) -> RunOutput:
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
        names = texts.method_names()
        color = perceptual_color_node(scene)
        if not had_color:
            added.append(color)
        nodes = {}
        for m, rel in prediction["maps"].items():
            node = _load_map(scene, out / rel, f"{prefix} - {names.get(m, m)}")
            added.append(node)
            _match_geometry(node, input_node)
            if input_node.GetParentTransformNode() is not None:  # where the input is drawn, the map is drawn
                node.SetAndObserveTransformNodeID(input_node.GetParentTransformNode().GetID())
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
    return RunOutput(prediction, nodes, table, failing, out, folder)


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


def show_legend(results: RunOutput | None, method: str | None, color_logic) -> object | None:
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


#: Attribute marking the nodes made for a map's volume rendering (removed with the map).
RENDERING_ATTRIBUTE = "SaliencyTrust.rendering"

#: Volume rendering of a map: opacity at a saliency of 1 (it falls linearly to 0 at OVERLAY_FLOOR), so the CT's
#: own rendering or the slices stay visible through it.
RENDERING_MAX_OPACITY = 0.6


def style_volume_rendering(display) -> None:
    """A map's volume rendering in the overlay's colours (inferno on [0, 1]) and with its transparent floor:
    opacity 0 up to :data:`OVERLAY_FLOOR`, then rising linearly to :data:`RENDERING_MAX_OPACITY` at 1."""
    import vtk

    colors = vtk.vtkColorTransferFunction()
    for x, (r, g, b) in INFERNO:
        colors.AddRGBPoint(x, r, g, b)
    opacity = vtk.vtkPiecewiseFunction()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(OVERLAY_FLOOR, 0.0)
    opacity.AddPoint(1.0, RENDERING_MAX_OPACITY)
    prop = display.GetVolumePropertyNode()
    prop.SetColor(colors)
    prop.SetScalarOpacity(opacity)
    display.SetFollowVolumeDisplayNode(0)  # the slice views' window and threshold must not replace these


def show_volume_rendering(results: RunOutput | None, method: str | None, rendering_logic) -> object | None:
    """Volume-render ``method``'s map in the 3-D views (the other maps' renderings hidden); ``method`` None hides
    them all. Only for a CT volume's maps (a radiograph's map has one slice: nothing to render).

    ``rendering_logic`` is the Volume Rendering module's logic (``slicer.modules.volumerendering.logic()`` in the
    application; a ``vtkSlicerVolumeRenderingLogic`` on the scene in tests), or None where the application has no
    volume rendering (then nothing happens). Returns the shown display node, or None.
    """
    if results is None or rendering_logic is None:
        return None
    shown = None
    for m, node in results.map_nodes.items():
        if node.GetScene() is None or node.GetImageData() is None:
            continue
        display = rendering_logic.GetFirstVolumeRenderingDisplayNode(node)
        if m == method and node.GetImageData().GetDimensions()[2] > 1:
            if display is None:
                display = rendering_logic.CreateDefaultVolumeRenderingNodes(node)
                if display is None:  # no volume rendering display node class in this application
                    return None
                for made in (display.GetVolumePropertyNode(), display.GetShaderPropertyNode()):
                    if made is not None:
                        made.SetAttribute(RENDERING_ATTRIBUTE, node.GetID())
                style_volume_rendering(display)
            display.SetVisibility(True)
            shown = display
        elif display is not None:
            display.SetVisibility(False)
    return shown


def map_peak_ras(map_node) -> tuple[float, float, float]:
    """The RAS position (mm) of the map's highest voxel (the first when several are equally high)."""
    import vtk

    values = _slicer().util.arrayFromVolume(map_node)
    k, j, i = np.unravel_index(int(np.argmax(values)), values.shape)
    m = vtk.vtkMatrix4x4()
    map_node.GetIJKToRASMatrix(m)
    ras = m.MultiplyPoint((float(i), float(j), float(k), 1.0))
    transform = map_node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkGeneralTransform()
        transform.GetTransformToWorld(to_world)
        return tuple(float(v) for v in to_world.TransformPoint(ras[:3]))
    return float(ras[0]), float(ras[1]), float(ras[2])


def jump_to_peak(scene, map_node) -> tuple[float, float, float]:
    """Move every slice view through the map's highest voxel (a CT volume's map: the three views show where the
    map points); returns that RAS position."""
    ras = map_peak_ras(map_node)
    _slicer().vtkMRMLSliceNode.JumpAllSlices(scene, *ras)
    return ras
