"""The Lib's local run on a CT volume loaded from a DICOM series by Slicer (slicer-core wheel) with a 3-D model
folder, the bundle out of process: maps on the CT's grid in the scene, the segmentation's AUPRC per voxel
equal to the engine's on what the scene shows, and a 2-D model refused before anything starts."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.slicer.test_volume_scene import DIRECTION, ORIGIN, ijk_to_ras, load_series
from tests.volume_models import ct_case, make_2d_model, make_ct_models

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(REPO / "SaliencyTrust"))

from SaliencyTrustLib import controller, inputs  # noqa: E402
from SaliencyTrustLib.errors import InputVolumeError  # noqa: E402
from SaliencyTrustLib.process import Request  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder with the 3-D model and a 2-D one, and a SynthCT nodule case written as a DICOM series."""
    from saliency_trust.data.dicom import write_ct_series

    root = tmp_path_factory.mktemp("ct-slicer")
    make_ct_models(root / "models")
    make_2d_model(root / "models", "tiny2d")
    case = ct_case(0, positive=True)
    series = write_ct_series(root / "series", case.hu, spacing=case.geometry.spacing, origin=ORIGIN,
                             direction=DIRECTION, patient_id="p", study_uid="2.25.61", series_uid="2.25.62",
                             frame_of_reference_uid="2.25.63", sop_uids=[f"2.25.64{k}" for k in range(16)])
    return {"models": root / "models", "series": series, "mask": case.mask}


@pytest.fixture
def s():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    for name in ("Red", "Yellow", "Green"):
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    yield scene
    scene.Clear(1)


def _request(models, name: str, **kw) -> Request:
    return Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(models / name), methods=("grad", "gradcam"),
                   preset="quick", device="cpu", python=sys.executable, **kw)


def test_the_model_list_holds_both_kinds_and_a_2d_model_is_refused_on_a_ct_before_anything_runs(s, setup, tmp_path):
    choices = controller.model_choices(setup["models"], REPO / "monai_bundle")
    assert {k: c.dimension for k, c in choices.items()} == {"ct3d": 3, "tiny2d": 2}
    ct = load_series(s, setup["series"])
    before = s.GetNumberOfNodes()
    with pytest.raises(InputVolumeError, match=r"^'CT' is a CT volume \(32 x 32 x 16 voxels\) and the model "
                                               r"'tiny2d' is a 2-D model"):
        controller.run_local(s, ct, _request(setup["models"], "tiny2d"), tmp_path / "work")
    assert s.GetNumberOfNodes() == before and not (tmp_path / "work").exists()  # nothing exported or started
    # The panel's path: the same sentence from the Run, before the export.
    settings = controller.Settings(volume=ct, score_node=None, request=_request(setup["models"], "tiny2d"),
                                   model_dimension=2, model_name="tiny2d")
    with pytest.raises(InputVolumeError, match="is a 2-D model"):
        controller.Run(settings, tmp_path / "run").start()
    assert not (tmp_path / "run" / "input").exists()


def test_a_ct_runs_through_the_bundle_and_its_segmentation_is_scored_per_voxel(s, setup, tmp_path):
    import torch
    from saliency_trust.metrics import auprc

    ct = load_series(s, setup["series"])
    label = slicer.util.addVolumeFromArray(setup["mask"].astype(np.uint8), name="truth",
                                           nodeClassName="vtkMRMLLabelMapVolumeNode")
    from tests.slicer.test_volume_scene import _vtk_matrix

    label.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras(ct)))
    seg = s.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodule")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    run = controller.run_local(s, ct, _request(setup["models"], "ct3d", checks=False), tmp_path / "work",
                               score_node=seg, timeout=600)
    assert set(run.map_nodes) == {"grad", "gradcam"} and run.prediction["input"]["kind"] == "volume"
    mask = inputs.mask_from_segmentation(ct, seg)
    assert np.array_equal(mask, setup["mask"])
    for m, node in run.map_nodes.items():
        assert node.GetImageData().GetDimensions() == (32, 32, 16)
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(ct), atol=1e-4)
        shown = slicer.util.arrayFromVolume(node).astype(np.float64)
        assert shown.min() >= 0 and shown.max() <= 1 and shown.std() > 0.01
        engine = float(auprc(torch.from_numpy(shown)[None], torch.from_numpy(mask)[None])[0])
        assert run.prediction["checks"]["auprc"][m] == pytest.approx(engine, abs=1e-6)
    assert run.table_node.GetNumberOfRows() == 2
