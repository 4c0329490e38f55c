"""A CT volume in the Slicer Lib (real MRML nodes, slicer-core wheel), no network needed: the input's kind and
the model's, the export with its geometry, 3-D scoring masks, the maps over the CT in all three slice views,
the volume rendering of a map (Slicer's own volume rendering logic) and a run's removal leaving nothing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import REPO

MODULE_DIR = REPO / "SaliencyTrust"
slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(MODULE_DIR))

from SaliencyTrustLib import client, inputs, scene  # noqa: E402
from SaliencyTrustLib.errors import InputVolumeError, SaliencyTrustError  # noqa: E402

#: Oblique in-plane direction (rows and columns swapped, one flipped), so a transposed or mirrored grid shows.
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
ORIGIN = (-100.0, 50.0, 20.0)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    """A 16 x 32 x 32 SynthCT nodule case as a DICOM series (one file per slice), with its HU and lesion mask."""
    from saliency_trust.data.dicom import write_ct_series
    from saliency_trust.data.synthct import render_ct

    case = render_ct("nodule", 0, (16, 32, 32), positive=True)
    folder = write_ct_series(tmp_path_factory.mktemp("ct") / "series", case.hu, spacing=case.geometry.spacing,
                             origin=ORIGIN, direction=DIRECTION, patient_id="p", study_uid="2.25.71",
                             series_uid="2.25.72", frame_of_reference_uid="2.25.73",
                             sop_uids=[f"2.25.74{k}" for k in range(16)])
    return {"folder": folder, "hu": case.hu, "mask": case.mask}


@pytest.fixture
def views():
    """A scene with the application's three slice views (Red axial, Yellow sagittal, Green coronal)."""
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(s)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = s.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetOrientation(orientation)
        s.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    yield s
    s.Clear(1)


def load_series(s, folder):
    """The series as Slicer loads it: its archetype storage node reads the whole series (ITK / GDCM)."""
    node = s.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(sorted(folder.iterdir())[0]))
    storage.SetSingleFile(False)
    assert storage.ReadData(node)
    return node


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_a_ct_volume_is_a_3d_input_and_a_model_of_the_other_kind_is_said_in_one_sentence(views, ct_series):
    ct = load_series(views, ct_series["folder"])
    radiograph = slicer.util.addVolumeFromArray(np.zeros((1, 40, 30), np.int16), name="cxr")
    colour = slicer.util.addVolumeFromArray(np.zeros((5, 16, 16, 3), np.uint8), name="colour stack",
                                            nodeClassName="vtkMRMLVectorVolumeNode")
    line = slicer.util.addVolumeFromArray(np.zeros((4, 1, 16), np.int16), name="line")
    assert inputs.check_input_volume(ct) == 3 and inputs.check_input_volume(radiograph) == 2
    assert inputs.check_model_fits(ct, 3, "ct3d") == 3
    with pytest.raises(InputVolumeError) as err:
        inputs.check_model_fits(ct, 2, "densenet121")
    assert str(err.value) == ("'CT' is a CT volume (32 x 32 x 16 voxels) and the model 'densenet121' is a 2-D model "
                              "that explains one radiograph: choose a 3-D model, or a radiograph.")
    with pytest.raises(InputVolumeError, match=r"^'cxr' is a 2-D image \(one slice, 30 x 40 x 1\) and the model "
                                               r"'ct3d' is a 3-D model that explains a CT volume"):
        inputs.check_model_fits(radiograph, 3, "ct3d")
    with pytest.raises(InputVolumeError, match="colour volume of 5 slices"):
        inputs.check_input_volume(colour)
    with pytest.raises(InputVolumeError, match=r"not an image \(dimensions 16 x 1 x 4\)"):
        inputs.check_input_volume(line)


def test_the_export_keeps_the_cts_hu_and_geometry_as_the_bundle_reads_them(views, ct_series, tmp_path):
    from saliency_trust.data.volumes import read_volume

    ct = load_series(views, ct_series["folder"])
    image, mask = inputs.prepare(ct, None, tmp_path / "in")
    assert image.name == "input.nrrd" and mask is None
    assert "saliency_trust_intensity_range" not in image.read_bytes()[:2000].decode("latin-1")  # HU: no range
    exported, geometry = read_volume(image)
    original, original_geometry = read_volume(ct_series["folder"])
    np.testing.assert_array_equal(exported, ct_series["hu"])
    np.testing.assert_array_equal(exported, original)
    np.testing.assert_allclose(geometry.spacing, original_geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(geometry.origin, original_geometry.origin, atol=1e-4)
    np.testing.assert_allclose(geometry.direction, original_geometry.direction, atol=1e-6)


def test_roi_and_segmentation_become_voxel_masks_on_the_ct_grid(views, ct_series, tmp_path):
    from saliency_trust.data.volumes import read_volume, read_volume_mask

    ct = load_series(views, ct_series["folder"])
    shape = slicer.util.arrayFromVolume(ct).shape
    # A rotated ROI: every voxel centre is tested in the ROI's own frame, against a full-grid computation.
    roi = views.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    m = ijk_to_ras(ct)
    centre = (m @ np.array([14.0, 17.0, 8.0, 1.0]))[:3]
    roi.SetSize(90.0, 60.0, 70.0)
    import vtk

    turn = vtk.vtkTransform()  # turned about an oblique axis through its centre: no side along a grid axis
    turn.Translate(*centre)
    turn.RotateWXYZ(35.0, 1.0, 0.5, 0.8)
    roi.SetAndObserveObjectToNodeMatrix(turn.GetMatrix())
    roi.SetCenter(*centre)
    axis = [0.0, 0.0, 0.0]
    roi.GetZAxisWorld(axis)
    assert abs(axis[2]) < 0.99  # it is turned out of the slice plane
    got = inputs.mask_from_roi(ct, roi, rows_per_block=5)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    ras = np.einsum("rc,cn->rn", m, np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))
    o = roi.GetObjectToWorldMatrix()
    w2o = np.linalg.inv(np.array([[o.GetElement(r, c) for c in range(4)] for r in range(4)]))
    local = (w2o @ ras)[:3]
    want = (np.abs(local) <= (np.array(roi.GetSize()) / 2 + 1e-6)[:, None]).all(0).reshape(shape)
    assert want.any() and (~want).any() and len(set(np.nonzero(want)[0])) > 1  # several slices, not all voxels
    np.testing.assert_array_equal(got, want)
    # A segmentation of the lesion (imported from a label map on the CT grid) comes back voxel for voxel.
    label = slicer.util.addVolumeFromArray(ct_series["mask"].astype(np.uint8), name="truth",
                                           nodeClassName="vtkMRMLLabelMapVolumeNode")
    label.SetIJKToRASMatrix(_vtk_matrix(m))
    seg = views.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodule")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    assert np.array_equal(inputs.mask_from_segmentation(ct, seg), ct_series["mask"])
    # What the bundle gets: the label map on the CT's own geometry, read by its volume mask reader.
    image, mask_path = inputs.prepare(ct, seg, tmp_path / "in")
    hu, geometry = read_volume(image)
    np.testing.assert_array_equal(read_volume_mask(mask_path, hu.shape, geometry), ct_series["mask"])
    # The CT moved by a transform: the ROI (in world coordinates) covers the voxels the views draw inside it,
    # as the segmentation route does (Slicer's export resamples through the transform).
    transform = views.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    transform.SetMatrixTransformToParent(_vtk_matrix(np.array([[1, 0, 0, 25.0], [0, 1, 0, -12.5], [0, 0, 1, 32.0],
                                                               [0, 0, 0, 1]])))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    moved = views.AddNewNodeByClass("vtkMRMLMarkupsROINode", "moved box")
    moved.SetAndObserveObjectToNodeMatrix(turn.GetMatrix())
    moved.SetCenter(*(centre + np.array([25.0, -12.5, 32.0])))
    moved.SetSize(90.0, 60.0, 70.0)
    np.testing.assert_array_equal(inputs.mask_from_roi(ct, moved), want)
    bent = views.AddNewNodeByClass("vtkMRMLGridTransformNode", "bent")
    transform.SetAndObserveTransformNodeID(bent.GetID())
    bent_grid = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(2, 2, 2)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    bent_grid.SetDisplacementGridData(field)
    bent.SetAndObserveTransformToParent(bent_grid)
    with pytest.raises(SaliencyTrustError, match="'CT' is under a non-linear transform"):
        inputs.mask_from_roi(ct, moved)
    ct.SetAndObserveTransformNodeID(None)
    # An ROI outside the volume says "voxel", not "pixel".
    far = views.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    far.SetCenter(5000.0, 5000.0, 5000.0)
    far.SetSize(10.0, 10.0, 10.0)
    with pytest.raises(SaliencyTrustError, match="'far' covers no voxel of the input volume"):
        inputs.score_mask(ct, far)


def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _fake_run(ct, hu: np.ndarray, folder, geometry, methods=("grad", "gradcam")) -> None:
    """A run's output folder as the bundle writes it for a volume: maps on the CT's grid, prediction.json."""
    from saliency_trust.data.volumes import write_volume

    (folder / "maps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    maps = {}
    for n, m in enumerate(methods):
        values = rng.random(hu.shape).astype(np.float32) * 0.5
        values[3 + n, 20, 7] = 1.0  # one peak per map
        write_volume(folder / "maps" / f"{m}.nii.gz", values, geometry)
        maps[m] = f"maps/{m}.nii.gz"
    prediction = {"methods": list(methods), "maps": maps, "probabilities": [0.3, 0.7], "predicted_class": 1,
                  "explained_class": 1, "preset": "quick", "task": "nodule", "model": {"arch": "ct3d", "replicate": 0},
                  "checks": {"auprc": {"grad": 0.5, "gradcam": 0.25}, "blank": {}}, "verdicts": None,
                  "input": {"kind": "volume", "notes": []}}
    (folder / "prediction.json").write_text(json.dumps(prediction))


def test_maps_lie_over_the_ct_in_all_three_views_and_render_in_3d(views, ct_series, tmp_path):
    from saliency_trust.data.volumes import read_volume

    ct = load_series(views, ct_series["folder"])
    hu, geometry = read_volume(ct_series["folder"])
    _fake_run(ct, hu, tmp_path / "out", geometry)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(views)
    transform = views.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    shift = _vtk_matrix(np.array([[1, 0, 0, 7.0], [0, 1, 0, -3.0], [0, 0, 1, 11.0], [0, 0, 0, 1]]))
    transform.SetMatrixTransformToParent(shift)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    before = views.GetNumberOfNodes()
    run = scene.load_run_output(views, ct, tmp_path / "out")
    node = run.map_nodes["gradcam"]
    # The CT's own grid: same dimensions and IJK-to-RAS (no resampling), under the CT's transform.
    assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions() == (32, 32, 16)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(ct), atol=1e-4)
    assert node.GetParentTransformNode() is transform
    assert scene.show_overlay(views, ct, node, 0.6) == 3
    for c in scene.nodes_by_class(views, "vtkMRMLSliceCompositeNode"):
        assert (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) == (ct.GetID(), node.GetID())
    display = node.GetDisplayNode()  # the same transparent floor and colours as a radiograph's overlay
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(scene.OVERLAY_FLOOR)
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    legend = scene.show_legend(run, "gradcam", colors)
    assert legend is not None and legend.GetVisibility() and legend.GetTitleText() == "Saliency"
    # The three views jump through the map's peak (voxel i=7, j=20, k=4), transform included.
    ras = scene.jump_to_peak(views, node)
    want = ijk_to_ras(ct) @ np.array([7.0, 20.0, 4.0, 1.0]) + np.array([7.0, -3.0, 11.0, 0.0])
    np.testing.assert_allclose(ras, want[:3], atol=1e-6)
    offsets = {}
    for n in scene.nodes_by_class(views, "vtkMRMLSliceNode"):
        m = n.GetSliceToRAS()
        normal = np.array([m.GetElement(r, 2) for r in range(3)])
        offsets[n.GetName()] = float(normal @ np.array([m.GetElement(r, 3) for r in range(3)]))
        assert offsets[n.GetName()] == pytest.approx(float(normal @ want[:3]), abs=1e-6), n.GetName()
    assert len(offsets) == 3
    # Volume rendering with Slicer's own logic: the map's colours and floor, one map shown at a time.
    rendering = slicer.vtkSlicerVolumeRenderingLogic()
    rendering.SetMRMLScene(views)
    shown = scene.show_volume_rendering(run, "gradcam", rendering)
    assert shown is not None and shown.GetVisibility() and shown.GetVolumeNode() is node
    prop = shown.GetVolumePropertyNode()
    opacity = prop.GetScalarOpacity()
    assert opacity.GetValue(0.05) == 0.0 and opacity.GetValue(scene.OVERLAY_FLOOR) == 0.0
    assert opacity.GetValue(1.0) == pytest.approx(scene.RENDERING_MAX_OPACITY)
    np.testing.assert_allclose(prop.GetColor().GetColor(1.0), scene.INFERNO[-1][1], atol=1e-6)
    other = scene.show_volume_rendering(run, "grad", rendering)
    assert other.GetVolumeNode() is run.map_nodes["grad"] and not shown.GetVisibility()
    assert scene.show_volume_rendering(run, None, rendering) is None and not other.GetVisibility()
    assert scene.show_volume_rendering(run, "grad", None) is None  # no volume rendering in this application
    # The user crops the grad rendering with their own ROI: it is theirs and outlives the run.
    crop = views.AddNewNodeByClass("vtkMRMLMarkupsROINode", "crop")
    other.SetAndObserveROINodeID(crop.GetID())
    # A second run replaces the first: its map nodes, display nodes, legends, and the renderings' property nodes.
    _fake_run(ct, hu, tmp_path / "out2", geometry, methods=("grad",))
    second = scene.load_run_output(views, ct, tmp_path / "out2")
    scene.show_volume_rendering(second, "grad", rendering)
    left = [n.GetClassName() for n in (node, shown, prop, other, other.GetVolumePropertyNode())
            if views.IsNodePresent(n)]
    assert left == [] and views.IsNodePresent(crop)
    views.RemoveNode(crop)
    scene._remove_run(views, scene.run_nodes(views, ct))
    left = [views.GetNthNode(i).GetClassName() for i in range(before, views.GetNumberOfNodes())]
    assert sorted(left) == ["vtkMRMLColorTableNode", "vtkMRMLSubjectHierarchyNode"]  # added once, kept


def test_a_radiographs_maps_are_not_volume_rendered(views, tmp_path):
    from saliency_trust.data.volumes import VolumeGeometry, write_volume

    cxr = slicer.util.addVolumeFromArray(np.zeros((1, 24, 20), np.int16), name="cxr")
    (tmp_path / "out" / "maps").mkdir(parents=True)
    write_volume(tmp_path / "out" / "maps" / "grad.nrrd", np.full((1, 24, 20), 0.7, np.float32),
                 VolumeGeometry((1.0, 1.0, 1.0), (-0.0, -0.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)))
    (tmp_path / "out" / "prediction.json").write_text(json.dumps({"methods": ["grad"], "maps": {
        "grad": "maps/grad.nrrd"}}))
    run = scene.load_run_output(views, cxr, tmp_path / "out")
    rendering = slicer.vtkSlicerVolumeRenderingLogic()
    rendering.SetMRMLScene(views)
    assert scene.show_volume_rendering(run, "grad", rendering) is None
    assert rendering.GetFirstVolumeRenderingDisplayNode(run.map_nodes["grad"]) is None


def test_the_server_model_is_chosen_for_the_inputs_dimension():
    info = {"models": {"cxr/densenet121": {"architecture": "densenet121", "dimension": 2},
                       "ct/densenet121": {"architecture": "densenet121", "dimension": 3}}}
    assert client.choose_model(info, "densenet121", dimension=3) == "ct/densenet121"
    assert client.choose_model(info, "densenet121", dimension=2) == "cxr/densenet121"
    assert client.model_dimension(info, "ct/densenet121") == 3
    assert client.model_dimension({"models": {"old": {"architecture": "x"}}}, "old") == 2  # an older server
