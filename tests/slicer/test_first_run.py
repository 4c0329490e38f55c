"""A clinician's first run, in the module's library: saved scenes, ROI scoring on a full-size radiograph,
the demo training's progress and outcome, the synthetic-training warning. No Qt; real MRML nodes."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.slicer.demo_lines import DEMO_LINES, fake_demo

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(REPO / "SaliencyTrust"))

from SaliencyTrustLib import controller  # noqa: E402
from SaliencyTrustLib.errors import BundleError  # noqa: E402
from SaliencyTrustLib.inputs import mask_from_roi, score_mask, write_volume  # noqa: E402
from SaliencyTrustLib.process import ASSESSMENT_SHARE, TrainProcess, TrainProgress  # noqa: E402
from SaliencyTrustLib.scene import load_run_output, map_input, nodes_by_class, run_nodes  # noqa: E402
from SaliencyTrustLib.texts import training_note  # noqa: E402


def _volume(scene, name: str, shape=(1, 32, 40), seed: int = 0):
    slicer.mrmlScene = scene
    rng = np.random.default_rng(seed)
    return slicer.util.addVolumeFromArray((rng.random(shape) * 1000).astype(np.int16), name=name)


def _fake_output(volume, folder: Path) -> Path:
    """What the bundle leaves: prediction.json and one map on the input's grid."""
    (folder / "maps").mkdir(parents=True)
    write_volume(volume, folder / "maps" / "grad.nrrd")
    (folder / "prediction.json").write_text(json.dumps({
        "maps": {"grad": "maps/grad.nrrd"}, "methods": ["grad"], "probabilities": [0.3, 0.7], "predicted_class": 1,
        "preset": "quick", "task": "lung opacity", "model": {"arch": "densenet121", "replicate": 0}}))
    return folder


def test_maps_keep_their_input_after_a_saved_scene_is_imported_into_a_nonempty_one(scene, tmp_path):
    """Defect 3c: maps named their input by an ID string; after an import the IDs are renumbered, so the
    maps pointed at the open scene's volume, and its next run deleted the imported results."""
    saved = slicer.vtkMRMLScene()
    patient_a = _volume(saved, "patient A")
    res = load_run_output(saved, patient_a, _fake_output(patient_a, tmp_path / "a"))
    saved.SetSaveToXMLString(1)
    saved.Commit()
    xml = saved.GetSceneXMLString()

    patient_b = _volume(scene, "patient B", seed=1)
    assert patient_b.GetID() == patient_a.GetID()  # both scenes numbered their first volume alike
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(xml)
    scene.Import()
    imported_a = next(n for n in nodes_by_class(scene, "vtkMRMLScalarVolumeNode") if n.GetName() == "patient A")
    imported_map = next(n for n in nodes_by_class(scene, "vtkMRMLScalarVolumeNode")
                        if n.GetName() == res.map_nodes["grad"].GetName())
    assert imported_a.GetID() != patient_b.GetID()
    assert map_input(scene, imported_map) is imported_a
    assert run_nodes(scene, patient_b) == []
    # A run on patient B replaces B's results only: the imported ones stay.
    slicer.mrmlScene = scene
    load_run_output(scene, patient_b, _fake_output(patient_b, tmp_path / "b"))
    assert scene.IsNodePresent(imported_map)
    assert map_input(scene, imported_map) is imported_a
    saved.Clear(1)


def _ras(volume, i: float, j: float) -> np.ndarray:
    """The RAS position of voxel (i, j, 0)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ [i, j, 0, 1]


def _reference_roi_mask(volume, roi) -> np.ndarray:
    """The plain full-grid computation (every voxel centre through both matrices)."""
    import vtk

    arr = slicer.util.arrayFromVolume(volume)
    k, j, i = np.meshgrid(*(np.arange(n) for n in arr.shape), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ijk
    o = roi.GetObjectToWorldMatrix()
    local = np.linalg.inv(np.array([[o.GetElement(r, c) for c in range(4)] for r in range(4)])) @ ras
    half = np.array(roi.GetSize()) / 2.0
    return np.all(np.abs(local[:3]) <= half[:, None] + 1e-6, axis=0).reshape(arr.shape)


def test_roi_mask_equals_the_full_grid_computation_on_a_rotated_roi(scene):
    volume = _volume(scene, "cxr", shape=(1, 70, 90))
    volume.SetSpacing(0.7, 0.5, 1.0)
    volume.SetOrigin(-10.0, 5.0, 0.0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre = _ras(volume, 40, 30)[:3]
    roi.SetCenter(*centre)
    roi.SetSize(25.0, 12.0, 4.0)
    import vtk

    turn = vtk.vtkMatrix4x4()  # turned by about 29 degrees in the image plane, about the ROI's centre
    c, s = np.cos(0.5), np.sin(0.5)
    for r, row in enumerate(((c, -s, 0.0, centre[0]), (s, c, 0.0, centre[1]), (0.0, 0.0, 1.0, centre[2]))):
        for col, v in enumerate(row):
            turn.SetElement(r, col, v)
    roi.SetAndObserveObjectToNodeMatrix(turn)
    roi.SetCenter(*centre)
    axis = [0.0, 0.0, 0.0]
    roi.GetXAxisWorld(axis)
    assert abs(axis[1]) > 0.4  # it is turned
    mask = mask_from_roi(volume, roi, rows_per_block=7)
    ref = _reference_roi_mask(volume, roi)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(mask, ref)


def test_roi_scoring_on_a_3000_by_2500_radiograph_builds_no_big_arrays(scene, tmp_path):
    """Part 5: the full coordinate grid of a 3000 x 2500 image took about 1 GB on the GUI thread."""
    slicer.mrmlScene = scene
    volume = slicer.util.addVolumeFromArray(np.zeros((1, 3000, 2500), np.uint16), name="big")
    volume.SetSpacing(0.14, 0.14, 1.0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*_ras(volume, 1200, 1500)[:3])
    roi.SetSize(60.0, 40.0, 10.0)
    tracemalloc.start()
    try:
        mask = score_mask(volume, roi)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.shape == (1, 3000, 2500) and mask.any()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"  # the mask is 7.5 MB; the old grid was ~1 GB


def test_training_progress_is_determinate_from_the_demos_own_lines():
    progress = TrainProgress()
    seen = [(progress.fraction(), progress.text())]
    for line in DEMO_LINES:
        progress.feed([line])
        seen.append((progress.fraction(), progress.text()))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0
    assert fractions[-1] == pytest.approx(1.0 - ASSESSMENT_SHARE)  # the assessment is left
    assert seen[0][1].startswith("Making the SynthCXR images")
    assert any(t == "Training inception_v3 copy 0 (3 of 5), epoch 2 of at most 6..." for _, t in seen)
    assert seen[-1][1].startswith("Assessing")
    train_only = TrainProgress(assessment=False)
    train_only.feed(DEMO_LINES)
    assert train_only.fraction() == pytest.approx(0.99)


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory) -> Path:
    from saliency_trust.workflows.sample import make_fixture_models

    return make_fixture_models(tmp_path_factory.mktemp("fixture"))


@pytest.mark.parametrize("exit_code", [0, 1])
def test_train_demo_models_succeeds_when_models_were_written_and_says_what_else_happened(
        tmp_path, fixture_model, exit_code):
    """Part 5: a validation AUC below the demo's bar (exit 1 from the demo before it trained to the bar)
    made the panel report failure although the models were there."""
    train = TrainProcess(REPO / "monai_bundle", tmp_path / "chosen", "opacity", python=sys.executable)
    train.command = [sys.executable, fake_demo(tmp_path, fixture_model, exit_code, True), *train.command[3:]]
    train.start()
    train._proc.wait(60)
    outcome = train.outcome()
    assert outcome.model_dir == tmp_path / "chosen" / "models" / "opacity"
    assert "below validation AUC 0.9" in outcome.note
    assert train.progress()[0] == pytest.approx(1.0 - ASSESSMENT_SHARE)
    assert "densenet121" in controller.model_choices(outcome.model_dir)


def test_train_demo_models_fails_when_no_model_was_written(tmp_path, fixture_model):
    train = TrainProcess(REPO / "monai_bundle", tmp_path / "chosen", "opacity", python=sys.executable)
    train.command = [sys.executable, fake_demo(tmp_path, fixture_model, 1, False), *train.command[3:]]
    train.start()
    train._proc.wait(60)
    with pytest.raises(BundleError, match="exit code 1"):
        train.outcome()


def test_a_model_trained_on_synthetic_images_is_said_so(tmp_path, fixture_model):
    assert training_note({}) == "" and training_note({"dataset_dir": str(tmp_path)}) == ""
    (tmp_path / "synthcxr.json").write_text("{}")
    note = training_note({"dataset_dir": str(tmp_path)})
    assert "synthetic SynthCXR images" in note
    # The untrained fixture replicates carry no training data: no note; their choice says so too.
    assert controller.model_choices(fixture_model.parent)["densenet121"].training_note == ""
