"""The Slicer module's logic on real MRML nodes (slicer-core wheel) and the real bundle inference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

MODULE_DIR = REPO / "SaliencyTrust"
slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(MODULE_DIR))

from SaliencyTrustLib import texts  # noqa: E402
from SaliencyTrustLib.controller import run_local  # noqa: E402
from SaliencyTrustLib.errors import BundleError, InputVolumeError, SaliencyTrustError  # noqa: E402
from SaliencyTrustLib.inputs import check_input_volume, mask_from_roi, mask_from_segmentation, prepare  # noqa: E402
from SaliencyTrustLib.process import BundleProcess, Request  # noqa: E402
from SaliencyTrustLib.scene import load_run_output, perceptual_color_node, render_slice, show_overlay  # noqa: E402
from SaliencyTrustLib.texts import CRITERIA, TABLE_COLUMNS, trust_word  # noqa: E402

METHODS = ("grad", "gradcam", "gbp")


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s  # slicer.util helpers use the global scene
    for name in ("Red", "Yellow", "Green"):
        c = s.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        c.SetLayoutName(name)
    yield s
    s.Clear(1)


def load_dicom(scene, path: Path):
    """A SynthCXR DICOM into a scalar volume node, read by Slicer's own ITK/GDCM storage node."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CXR")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    assert storage.ReadData(node)
    return node


def matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def request(b: dict, **kw) -> Request:
    return Request(bundle_dir=str(b["bundle"]), model_dir=str(b["model"]), arch=b["arch"],
                     methods=kw.pop("methods", METHODS), preset="quick", device="cpu", python=sys.executable, **kw)


def table_rows(table) -> list[dict]:
    t = table.GetTable()
    cols = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    return [{cols[c]: t.GetValue(r, c).ToString() for c in range(len(cols))} for r in range(t.GetNumberOfRows())]


@pytest.mark.slow
def test_local_run_puts_aligned_overlays_and_trust_table_in_the_scene(scene, trained_bundle, tmp_path):
    import torch
    from saliency_trust.metrics import auprc

    volume = load_dicom(scene, trained_bundle["dicom"])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion")
    arr = slicer.util.arrayFromVolume(volume)
    # An ROI over the centre-right quarter, in RAS through the volume's own IJK-to-RAS matrix.
    ijk_to_ras = matrix(volume)
    c = ijk_to_ras @ np.array([arr.shape[2] * 0.6, arr.shape[1] * 0.5, 0, 1])
    roi.SetCenter(*c[:3])
    roi.SetSize(abs(ijk_to_ras[0, 0]) * arr.shape[2] / 4, abs(ijk_to_ras[1, 1]) * arr.shape[1] / 4, 10)

    res = run_local(scene, volume, request(trained_bundle), tmp_path / "work", score_node=roi, timeout=600)

    # One overlay per method, on exactly the input's grid, values in [0, 1].
    assert set(res.map_nodes) == set(METHODS)
    for node in res.map_nodes.values():
        assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        np.testing.assert_allclose(matrix(node), matrix(volume), atol=1e-5)
        values = slicer.util.arrayFromVolume(node)
        assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0
        disp = node.GetDisplayNode()
        assert disp.GetColorNodeID() == perceptual_color_node(scene).GetID()
        assert (disp.GetWindowLevelMin(), disp.GetWindowLevelMax()) == (0.0, 1.0)
    # The colour table is perceptual: monotone lightness from black to pale yellow.
    lut = perceptual_color_node(scene)
    rgb = np.array([lut.GetLookupTable().GetTableValue(i)[:3] for i in range(256)])
    luma = rgb @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luma) > -1e-3) and luma[0] < 0.02 and luma[-1] > 0.9

    # Foreground layer of every slice view.
    assert show_overlay(scene, volume, res.map_nodes["gradcam"], 0.4) == 3
    comps = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(comps.GetNumberOfItems()):
        comp = comps.GetItemAsObject(i)
        assert comp.GetBackgroundVolumeID() == volume.GetID()
        assert comp.GetForegroundVolumeID() == res.map_nodes["gradcam"].GetID()
        assert comp.GetForegroundOpacity() == pytest.approx(0.4)

    # The table: one row per method, the dataset-level verdicts and this image's checks.
    rows = table_rows(res.table_node)
    assert [r["method"] for r in rows] == [texts.METHOD_NAMES[m] for m in METHODS]
    assert list(rows[0]) == list(TABLE_COLUMNS)
    saved = json.loads((trained_bundle["model"] / "results.json").read_text())
    pred = res.prediction
    for r, m in zip(rows, METHODS, strict=True):
        for crit in CRITERIA:
            want = {True: "pass", False: "FAIL", None: "n/a"}[saved["verdicts"][m][crit]["passed"]]
            assert r[crit] == want, (r, crit)
        assert r["trust"] == trust_word({c: saved["verdicts"][m][c]["passed"] for c in CRITERIA})[0]
        assert (m in res.failing) == r["trust"].startswith("Fails")
        for col, check in (("repeatability_here_ssim", "repeatability"), ("randomization_here_ssim", "randomization")):
            if m in pred["checks"]["blank"].get(check, []):  # a blank map has no SSIM: said in words, no number
                assert r[col] == "blank map" and pred["checks"][check]["ssim"][m] is None
            else:
                assert float(r[col]) == pytest.approx(pred["checks"][check]["ssim"][m], abs=5e-4)
    assert res.banner() == "" if not res.failing else res.banner().startswith("Do not trust")
    assert " predicted " in res.summary() and len(pred["probabilities"]) == 2

    # Offscreen picture through Slicer's own slice logic: the overlay changes what the view shows.
    picture = render_slice(scene, volume, res.map_nodes["gradcam"], 0.5, size=256)
    plain = render_slice(scene, volume, None, 0.0, size=256)
    assert picture.shape == (256, 256, 3) and np.abs(picture.astype(int) - plain).mean() > 5
    assert (picture[..., 0].astype(int) - picture[..., 2]).mean() > (plain[..., 0].astype(int) - plain[..., 2]).mean()

    # ROI scoring equals the engine's AUPRC on the overlay and the ROI mask as the scene holds them.
    mask = mask_from_roi(volume, roi)
    assert 0 < mask.sum() < mask.size
    inside = [roi.IsPointInROIWorld(list((matrix(volume) @ np.array([i, j, 0, 1]))[:3]))
              for j in range(0, arr.shape[1], 7) for i in range(0, arr.shape[2], 7)]
    assert np.array_equal(np.array(inside), mask[0, ::7, ::7].ravel())  # our vectorized test = Slicer's own
    for r, m in zip(rows, METHODS, strict=True):
        overlay = torch.from_numpy(slicer.util.arrayFromVolume(res.map_nodes[m])[0].astype(np.float64))
        engine = float(auprc(overlay[None], torch.from_numpy(mask[0])[None])[0])
        assert pred["checks"]["auprc"][m] == pytest.approx(engine, abs=1e-12)
        assert float(r["auprc_here"]) == pytest.approx(engine, abs=5e-4)


def _node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def test_bad_input_volumes_get_clear_messages_and_leave_the_scene_unchanged(scene, tmp_path):
    import vtk

    three_d = slicer.util.addVolumeFromArray(np.zeros((5, 16, 16, 3), np.uint8), name="CT",
                                             nodeClassName="vtkMRMLVectorVolumeNode")  # a grey CT is an input now
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    label.SetAndObserveImageData(vtk.vtkImageData())
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    rgb = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "photo")
    img = vtk.vtkImageData()
    img.SetDimensions(8, 8, 1)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(img)
    before = _node_count(scene)
    req = Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(tmp_path), python=sys.executable)
    cases = {three_d: "a colour volume of 5 slices", label: "is a label map", empty: "no image data",
             rgb: "3 components per voxel", None: "Select an input volume"}
    for node, words in cases.items():
        with pytest.raises(InputVolumeError, match=words.replace("(", r"\(").replace(")", r"\)")):
            run_local(scene, node, req, tmp_path / "work")
    assert _node_count(scene) == before
    assert not (tmp_path / "work" / "output").exists()  # refused before any process started


@pytest.mark.slow
def test_failed_bundle_process_reaches_the_user_and_leaves_the_scene_unchanged(scene, trained_bundle, tmp_path):
    volume = load_dicom(scene, trained_bundle["dicom"])
    before = _node_count(scene)
    with pytest.raises(BundleError, match=r"densenet121: no replicate 7 \(it has \[0, 1\]\)"):
        run_local(scene, volume, request(trained_bundle, replicate=7), tmp_path / "work", timeout=600)
    assert _node_count(scene) == before
    # A process that is cancelled says so and adds nothing either.
    image, _ = prepare(volume, None, tmp_path / "in2")
    proc = BundleProcess(request(trained_bundle), image, tmp_path / "out2").start()
    proc.cancel()
    with pytest.raises(BundleError, match="Cancelled"):
        proc.result()
    assert _node_count(scene) == before
    # A results folder that cannot be loaded rolls back the nodes it had added.
    out = tmp_path / "broken"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "grad.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    (out / "prediction.json").write_text(json.dumps({"maps": {"grad": "maps/grad.nrrd"}, "methods": ["grad"]}))
    with pytest.raises(SaliencyTrustError, match="grad.nrrd"):
        load_run_output(scene, volume, out)
    assert _node_count(scene) == before  # the colour table it had added went too


@pytest.mark.slow
def test_segmentation_scoring_equals_the_engine(scene, trained_bundle, tmp_path):
    import torch
    from saliency_trust.metrics import auprc

    volume = load_dicom(scene, trained_bundle["dicom"])
    arr = slicer.util.arrayFromVolume(volume)
    truth = np.zeros(arr.shape, np.uint8)
    truth[0, 20:40, 30:50] = 1
    label = slicer.util.addVolumeFromArray(truth, name="truth", nodeClassName="vtkMRMLLabelMapVolumeNode")
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    label.SetIJKToRASMatrix(m)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesion")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    mask_from_segmentation(volume, seg)  # the first call may create the subject hierarchy singleton
    before = _node_count(scene)
    mask = mask_from_segmentation(volume, seg)
    assert np.array_equal(mask, truth.astype(bool))
    assert _node_count(scene) == before  # nothing left behind
    res = run_local(scene, volume, request(trained_bundle, methods=("gradcam",), checks=False), tmp_path / "w",
                      score_node=seg, timeout=600)
    overlay = torch.from_numpy(slicer.util.arrayFromVolume(res.map_nodes["gradcam"])[0].astype(np.float64))
    engine = float(auprc(overlay[None], torch.from_numpy(mask[0])[None])[0])
    assert res.prediction["checks"]["auprc"]["gradcam"] == pytest.approx(engine, abs=1e-12)
    assert table_rows(res.table_node)[0]["repeatability_here_ssim"] == ""  # checks were off


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add((node.module or "").split(".")[0])
    return out


def test_logic_imports_no_qt_and_the_module_only_what_slicer_has():
    lib = set().union(*(_imports(p) for p in (MODULE_DIR / "SaliencyTrustLib").glob("*.py")))
    assert not lib & {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule"}, lib
    # The library must load without Slicer's application: slicer-core is enough (already imported above).
    assert check_input_volume and BundleProcess
    slicer_has = {"qt", "ctk", "vtk", "slicer", "numpy", "SaliencyTrustLib", "PyTorchUtils", "__future__",
                  "packaging", "pydicom", "SampleData", "DICOMLib"}
    module = _imports(MODULE_DIR / "SaliencyTrust.py")
    extra = {m for m in module if m not in slicer_has and m not in sys.stdlib_module_names}
    assert not extra, f"SaliencyTrust.py imports what Slicer lacks: {extra}"
    assert not lib - slicer_has - set(sys.stdlib_module_names) - {"requests"}, lib
