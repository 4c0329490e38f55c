"""inference.json's workflow on each input type: maps on exactly the input's grid, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from saliency_trust.data.dicom import read_dicom
from saliency_trust.data.errors import DataError
from saliency_trust.data.imageio import read_input
from saliency_trust.networks import get_network
from saliency_trust.workflows.infer import run_inference


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(get_network("densenet121").state_dict(), folder / f"densenet121_seed{seed}.pt")
        (folder / f"densenet121_seed{seed}.metrics.json").write_text(json.dumps({"image_size": 64}))
    return folder


def _dicom(rsna_synth):
    return sorted((rsna_synth / "stage_2_train_images").glob("*.dcm"))[0]


def test_every_input_type_reads_to_the_training_scale(rsna_synth, tmp_path):
    dcm = _dicom(rsna_synth)
    want, _ = read_dicom(dcm)
    img, ref = read_input(dcm)
    np.testing.assert_array_equal(img, want)
    assert ref.GetSize()[:2] == want.shape[::-1]
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "IM0001").write_bytes(dcm.read_bytes())  # DICOM without a suffix, found by its magic
    np.testing.assert_array_equal(read_input(folder)[0], want)
    # The same pixels as a volume file (what Slicer exports): unsigned 12-bit data -> the same scale.
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(dcm)))
    for name in ("cxr.nrrd", "cxr.nii.gz"):
        vol = sitk.GetImageFromArray(raw)
        sitk.WriteImage(vol, str(tmp_path / name))
        np.testing.assert_allclose(read_input(tmp_path / name)[0], want, atol=1e-6)
    png = tmp_path / "cxr.png"
    from PIL import Image

    Image.fromarray((want * 255).round().astype(np.uint8)).save(png)
    np.testing.assert_allclose(read_input(png)[0], (want * 255).round() / 255, atol=1e-6)


def test_bad_inputs_name_the_file_and_the_problem(rsna_synth, tmp_path):
    cases = {}
    vol = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 16, 16), np.int16)), str(vol))
    cases[vol] = "expected one 2-D radiograph"
    two = tmp_path / "two"
    two.mkdir()
    for k in range(2):
        (two / f"{k}.dcm").write_bytes(_dicom(rsna_synth).read_bytes())
    cases[two] = "exactly one radiograph; found 2"
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    cases[txt] = "unsupported file type"
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 32, 32), 7.5, np.float32)), str(flat))
    cases[flat] = "constant image"
    for path, words in cases.items():
        with pytest.raises(DataError, match=words) as err:
            read_input(path)
        assert str(path) in str(err.value)


@pytest.mark.slow
def test_maps_lie_on_the_input_grid_with_checks_and_mask(models, rsna_synth, tmp_path):
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(_dicom(rsna_synth))))[0]
    vol = sitk.GetImageFromArray(raw[None])  # 3-D, one slice, as Slicer writes it
    vol.SetSpacing((0.7, 0.9, 2.0))
    vol.SetOrigin((-12.5, 30.0, 4.0))
    vol.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    image = tmp_path / "cxr.nrrd"
    sitk.WriteImage(vol, str(image))
    mask = np.zeros_like(raw, np.uint8)
    mask[30:50, 20:60] = 1
    m = sitk.GetImageFromArray(mask[None])
    m.CopyInformation(vol)
    sitk.WriteImage(m, str(tmp_path / "gt.nii.gz"))
    res = run_inference(image, tmp_path / "out", models, arch="densenet121", methods=["grad", "gradcam"],
                        preset="quick", mask=tmp_path / "gt.nii.gz", map_format="nifti", device="cpu")
    assert res["model"]["image_size"] == 64 and abs(sum(res["probabilities"]) - 1) < 1e-6
    assert res["checks"]["repeatability"]["against"] == "densenet121_seed1.pt"
    assert res["checks"]["randomization"]["state"] == "transition1"  # the paper's depth: stem and first block kept
    assert set(res["checks"]["auprc"]) == {"grad", "gradcam"} and res["checks"]["mask_pixels"] == 800
    assert res["verdicts"] is None  # no results.json beside these weights
    for meth in ("grad", "gradcam"):
        out = sitk.ReadImage(str(tmp_path / "out" / res["maps"][meth]))
        assert out.GetSize() == vol.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), vol.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(out.GetOrigin(), vol.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetDirection(), vol.GetDirection(), atol=1e-6)
        arr = sitk.GetArrayFromImage(out)
        assert arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    saved = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert saved["maps"] == res["maps"] and "cxr" not in json.dumps(saved["input"])
    with pytest.raises(DataError, match="must share the grid"):
        small = sitk.GetImageFromArray(np.zeros((1, 8, 8), np.uint8))
        sitk.WriteImage(small, str(tmp_path / "small.nrrd"))
        run_inference(image, tmp_path / "out2", models, arch="densenet121", methods=["grad"], preset="quick",
                      mask=tmp_path / "small.nrrd", device="cpu", checks=False)
    assert json.loads((tmp_path / "out2" / "error.json").read_text())["problem"].startswith("mask is")
