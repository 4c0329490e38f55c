"""The widget tier on a CT volume: the module's real ``SaliencyTrustWidget`` bound by Slicer's own
``parameterNodeWrapper`` (fake Qt only, see tests/slicer/test_widget_tier.py), a real MRML scene, a CT loaded from
a DICOM series by Slicer's reader, and a model folder holding a 3-D and a 2-D model.

The model of the other kind is said under the model choice and Apply stays off; Apply with the 3-D model runs the
real bundle and lays its maps over the CT in the three slice views, and the volume rendering check box renders
the chosen map with Slicer's own volume rendering logic."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from tests.slicer import fakeapp
from tests.slicer.test_volume_scene import DIRECTION, ORIGIN, load_series
from tests.slicer.test_widget_tier import Harness
from tests.volume_models import ct_case, make_2d_model, make_ct_models

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from saliency_trust.data.dicom import write_ct_series

    root = tmp_path_factory.mktemp("ct-widget")
    make_ct_models(root / "models")
    make_2d_model(root / "models", "tiny2d")
    case = ct_case(1, positive=True)
    series = write_ct_series(root / "series", case.hu, spacing=case.geometry.spacing, origin=ORIGIN,
                             direction=DIRECTION, patient_id="p", study_uid="2.25.51", series_uid="2.25.52",
                             frame_of_reference_uid="2.25.53", sop_uids=[f"2.25.54{k}" for k in range(16)])
    return {"models": root / "models", "series": series}


def _harness(tag, tmp_path, monkeypatch) -> Harness:
    if not (fakeapp.SOURCES / tag / "slicer" / "parameterNodeWrapper" / "wrapper.py").is_file():
        message = f"Slicer's parameterNodeWrapper sources at {tag} are not in {fakeapp.SOURCES}"
        if os.environ.get("SALIENCY_TRUST_REQUIRE_EXTRAS"):
            pytest.fail(message)
        pytest.skip(message)
    return Harness(tag, tmp_path, monkeypatch)


@pytest.fixture(params=fakeapp.TAGS)
def app(request, tmp_path, monkeypatch):
    h = _harness(request.param, tmp_path, monkeypatch)
    yield h
    try:
        h.widget.cleanup()
        h.check_clean()
    finally:
        h.scene.Clear(1)


def _choose(app, name: str) -> None:
    ui = app.ui
    index = ui.archSelector.findText(name)
    assert index >= 0, [ui.archSelector.itemText(i) for i in range(ui.archSelector.count())]
    ui.archSelector.currentIndex = index
    assert app.node.arch == name


def test_a_model_of_the_other_kind_is_said_under_the_choice_and_apply_stays_off(app, setup):
    ui = app.ui
    ct = load_series(app.scene, setup["series"])
    cxr = app.volume("cxr")
    ui.modelPath.setCurrentPath(str(setup["models"]))
    app.pump(lambda: True)
    assert sorted(ui.archSelector.itemText(i) for i in range(ui.archSelector.count())) == ["ct3d", "tiny2d"]
    ui.inputSelector.setCurrentNode(ct)
    _choose(app, "tiny2d")
    assert ui.fitLabel.visible and ui.fitLabel.text.startswith("'CT' is a CT volume (32 x 32 x 16 voxels) and the "
                                                               "model 'tiny2d' is a 2-D model")
    assert not ui.applyButton.enabled
    _choose(app, "ct3d")
    assert not ui.fitLabel.visible and ui.fitLabel.text == "" and ui.applyButton.enabled
    ui.inputSelector.setCurrentNode(cxr)
    assert ui.fitLabel.visible and "'ct3d' is a 3-D model that explains a CT volume" in ui.fitLabel.text
    assert not ui.applyButton.enabled
    ui.serverCheckBox.click()  # the server chooses its own model by the input's kind: not said here
    assert not ui.fitLabel.visible and ui.applyButton.enabled
    app.check_clean()


@pytest.mark.parametrize("tag", [fakeapp.TAGS[0]])
def test_apply_on_a_ct_shows_its_maps_in_the_three_views_and_renders_the_chosen_one(tag, setup, tmp_path,
                                                                                     monkeypatch):
    app = _harness(tag, tmp_path, monkeypatch)
    try:
        rendering = slicer.vtkSlicerVolumeRenderingLogic()
        rendering.SetMRMLScene(app.scene)
        module = type(sys)("volumerendering")
        module.logic = lambda: rendering
        monkeypatch.setattr(slicer.modules, "volumerendering", module, raising=False)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(app.scene)
        for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            node = app.scene.AddNewNodeByClass("vtkMRMLSliceNode")
            node.SetName(name)
            node.SetLayoutName(name)
            node.SetOrientation(orientation)
        ui = app.ui
        ct = load_series(app.scene, setup["series"])
        roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "region")
        roi.SetCenter(*ct.GetOrigin())  # a corner of the CT: the ROI covers part of it, over several slices
        roi.SetSize(300.0, 300.0, 150.0)
        ui.modelPath.setCurrentPath(str(setup["models"]))
        app.pump(lambda: True)
        ui.inputSelector.setCurrentNode(ct)
        ui.scoreSelector.setCurrentNode(roi)
        _choose(app, "ct3d")
        app.choose_methods("grad", "gradcam")
        assert not ui.volumeRenderingCheckBox.enabled  # no CT maps yet
        ui.applyButton.click()
        assert not app.shown_errors, app.shown_errors
        app.pump(lambda: not app.busy(), timeout=600)
        assert not app.shown_errors, app.shown_errors
        assert ui.statusLabel.text.startswith("Done in"), ui.statusLabel.text
        maps = {n.GetAttribute("SaliencyTrust.method"): n for n in app.maps_in_scene()}
        assert set(maps) == {"grad", "gradcam"}
        for node in maps.values():
            assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
        shown = maps[ui.methodSelector.currentData]
        for c in app.scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
            assert (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) == (ct.GetID(), shown.GetID())
        table = ui.tableView.mrmlTableNode()
        assert table is not None and table.GetNumberOfRows() == 2
        # The ROI's AUPRC per voxel: the engine's, on the map the scene shows and the ROI's voxel mask.
        import torch
        from saliency_trust.metrics import auprc as engine_auprc
        from SaliencyTrustLib import inputs

        mask = inputs.mask_from_roi(ct, roi)
        assert mask.any() and not mask.all() and mask.any(axis=(1, 2)).sum() > 1
        auprc = app.widget.results.prediction["checks"]["auprc"]
        for m, node in maps.items():
            values = torch.from_numpy(slicer.util.arrayFromVolume(node).astype(np.float64))[None]
            assert auprc[m] == pytest.approx(float(engine_auprc(values, torch.from_numpy(mask)[None])[0]), abs=1e-6)
        # The views went through the shown map's peak (the first map's).
        from SaliencyTrustLib import scene

        peak = np.array(scene.map_peak_ras(maps["grad"]))
        for n in app.scene.GetNodesByClass("vtkMRMLSliceNode"):
            m = n.GetSliceToRAS()
            normal = np.array([m.GetElement(r, 2) for r in range(3)])
            origin = np.array([m.GetElement(r, 3) for r in range(3)])
            assert float(normal @ (origin - peak)) == pytest.approx(0.0, abs=1e-6), n.GetName()
        # Volume rendering: off until asked, then the chosen map, following the method switcher.
        assert ui.volumeRenderingCheckBox.enabled and not app.node.volumeRendering
        assert rendering.GetFirstVolumeRenderingDisplayNode(shown) is None
        ui.volumeRenderingCheckBox.click()
        assert app.node.volumeRendering
        first = rendering.GetFirstVolumeRenderingDisplayNode(shown)
        assert first is not None and first.GetVisibility()
        assert first.GetVolumePropertyNode().GetScalarOpacity().GetValue(scene.OVERLAY_FLOOR) == 0.0
        other = next(m for m in maps if maps[m] is not shown)
        ui.methodSelector.currentIndex = ui.methodSelector.findData(other)
        second = rendering.GetFirstVolumeRenderingDisplayNode(maps[other])
        assert second is not None and second.GetVisibility() and not first.GetVisibility()
        ui.volumeRenderingCheckBox.click()
        assert not second.GetVisibility() and not app.node.volumeRendering
        app.check_clean()
        app.widget.cleanup()
        app.check_clean()
    finally:
        app.scene.Clear(1)


def test_the_modules_own_self_test_of_bad_inputs_passes_here(app):
    """SaliencyTrust.py's Reload & Test case for inputs (a CT is a 3-D input, a 2-D model refuses it, a colour
    volume is refused, the scene is unchanged), run on this scene; the rest of its self-test needs a real Slicer."""
    case = app.module.SaliencyTrustTest("test_bad_input_leaves_scene_unchanged")
    case.setUp()
    case.test_bad_input_leaves_scene_unchanged()
    app.check_clean()
