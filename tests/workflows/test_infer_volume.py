"""inference.json's workflow on a CT volume and a 3-D model folder: the input's HU windowed and resampled as
training does, every map on the input's own grid and geometry, live checks in 3-D, and the refusals."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from saliency_trust.data.errors import DataError
from saliency_trust.data.volumes import VolumeGeometry, read_volume, resample_volume, window_hu, write_volume
from saliency_trust.workflows.infer import input_kind, run_inference

from tests.volume_models import NETWORK, NETWORK_SIZE, WINDOW_HU, ct_case, make_2d_model, make_ct_models

#: Columns and rows swapped and one flipped, slices along +z: a transposed or mirrored map would show.
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The models, and one SynthCT nodule case as a DICOM series, NIfTI, NRRD, a zipped series, with its mask."""
    from saliency_trust.data.dicom import write_ct_series

    root = tmp_path_factory.mktemp("ct-infer")
    ct = ct_case(0, positive=True)
    geo = VolumeGeometry(ct.geometry.spacing, (-150.0, 80.0, -40.0), DIRECTION)
    series = write_ct_series(root / "series", ct.hu, spacing=geo.spacing, origin=geo.origin, direction=geo.direction,
                             patient_id="p", study_uid="2.25.81", series_uid="2.25.82",
                             frame_of_reference_uid="2.25.83", sop_uids=[f"2.25.84{k}" for k in range(len(ct.hu))])
    archive = root / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"study/series/{f.name}")
    files = {"series": series, "zip": archive, "nifti": write_volume(root / "ct.nii.gz", ct.hu, geo),
             "nrrd": write_volume(root / "ct.nrrd", ct.hu, geo)}
    mask = write_volume(root / "nodule.nii.gz", ct.mask.astype(np.uint8), geo)
    return {"models": make_ct_models(root / "models"), "hu": ct.hu, "mask": ct.mask, "mask_file": mask,
            "geometry": geo, "root": root, **files}


def _read(path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def test_maps_lie_on_the_ct_grid_and_equal_the_models_own_computation(case, tmp_path):
    from saliency_trust.criteria import utility_scores
    from saliency_trust.metrics import auprc
    from saliency_trust.saliency import explain

    out = tmp_path / "out"
    res = run_inference(case["series"], out, case["models"], methods=["grad", "gradcam", "xrai"], preset="quick",
                        mask=case["mask_file"], map_format="nifti", device="cpu")
    # What was done, said in prediction.json: the window, the resampling and the spacings.
    inp = res["input"]
    assert inp["kind"] == "volume" and inp["shape"] == [16, 32, 32] and inp["window_hu"] == list(WINDOW_HU)
    assert inp["resampled"]["to"] == list(NETWORK_SIZE) and inp["resampled"]["spacing"] == [8.0, 12.5, 12.5]
    np.testing.assert_allclose(inp["spacing"], case["geometry"].spacing)
    np.testing.assert_allclose(inp["direction"], DIRECTION, atol=1e-9)
    assert inp["notes"] == []  # trained at this spacing
    assert res["model"]["spatial_dims"] == 3 and res["model"]["image_size"] == list(NETWORK_SIZE)
    assert json.loads((out / "prediction.json").read_text())["input"] == inp
    # The probabilities and maps are the network's on the HU resampled to its grid, then windowed, in [-1, 1].
    hu, geo = read_volume(case["series"])
    resampled, _ = resample_volume(hu, NETWORK_SIZE, geo.spacing)
    x = torch.from_numpy(window_hu(resampled, WINDOW_HU) * 2.0 - 1.0)[None, None]
    from monai.networks.nets import DenseNet

    net = DenseNet(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in NETWORK.items() if k != "_target_"})
    net.load_state_dict(torch.load(case["models"] / "seed0.pt", weights_only=True))
    net.eval()
    probs = torch.softmax(net(x), 1)[0].detach()
    np.testing.assert_allclose(res["probabilities"], probs.numpy(), atol=1e-6)
    want = explain(net, x, ["grad", "gradcam"], preset="quick", seed=0, cam_layer="features.denseblock2",
                   cam_post_relu=False, ig_baseline=-1.0, cam_resize="half_pixel")
    for m in ("grad", "gradcam", "xrai"):
        img = _read(out / res["maps"][m])
        assert res["maps"][m] == f"maps/{m}.nii.gz"
        assert img.GetSize() == (32, 32, 16)  # (x, y, z): the input's own grid
        np.testing.assert_allclose(img.GetSpacing(), geo.spacing[::-1], rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), geo.origin, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), geo.direction, atol=1e-6)
        values = _read_array(img)
        assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1 and values.std() > 0.01
        if m in want:  # back on the input grid by the same resampling, clipped to [0, 1]
            back = np.clip(resample_volume(want[m][0].numpy(), hu.shape)[0], 0, 1)
            np.testing.assert_allclose(values, back, atol=1e-5)
        # AUPRC per voxel against the mask on the input grid: the engine's own number.
        truth = torch.from_numpy(case["mask"])[None]
        assert res["checks"]["auprc"][m] == pytest.approx(
            float(auprc(torch.from_numpy(values.astype(np.float64))[None], truth)[0]), abs=1e-6)
        assert res["checks"]["auprc"][m] == pytest.approx(
            float(utility_scores(torch.from_numpy(values.astype(np.float64))[None], truth)["auprc"][0]), abs=1e-6)
    assert res["checks"]["mask_pixels"] == int(case["mask"].sum()) > 0
    # The live checks in 3-D: another replicate, and the randomized network (the family's depth).
    rep, ran = res["checks"]["repeatability"], res["checks"]["randomization"]
    assert rep["against"] == "seed1.pt" and set(rep["ssim"]) == {"grad", "gradcam", "xrai"}
    assert all(v is None or -1 <= v <= 1 for v in rep["ssim"].values()) and rep["ssim"]["grad"] is not None
    assert ran["state"] == "transition1" and ran["ssim"]["grad"] is not None
    assert not (out / "error.json").exists()


def _read_array(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img)


def test_every_volume_format_gives_the_same_prediction_and_maps(case, tmp_path):
    results = {}
    for name in ("series", "zip", "nifti", "nrrd"):
        res = run_inference(case[name], tmp_path / name, case["models"], methods=["grad"], preset="quick",
                            checks=False, device="cpu", map_format="nrrd")
        assert res["maps"]["grad"] == "maps/grad.nrrd"
        results[name] = (res["probabilities"], _read_array(_read(tmp_path / name / "maps" / "grad.nrrd")))
    base_p, base_map = results["series"]
    for name, (p, values) in results.items():
        np.testing.assert_allclose(p, base_p, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(values, base_map, atol=1e-6, err_msg=name)
    # Stored values without their rescale (no air at -1000): run, and said in the notes.
    raw = write_volume(tmp_path / "raw.nii.gz", (case["hu"] + 1024).astype(np.uint16), case["geometry"])
    res = run_inference(raw, tmp_path / "raw", case["models"], methods=["grad"], preset="quick", checks=False,
                        device="cpu")
    assert len(res["input"]["notes"]) == 1 and "may not be HU" in res["input"]["notes"][0]


def test_a_model_of_the_other_kind_and_bad_volumes_are_refused_by_name(case, tmp_path):
    from PIL import Image

    two_d = make_2d_model(tmp_path, "cxr")
    for name in ("series", "zip", "nifti"):
        out = tmp_path / f"2d-{name}"
        with pytest.raises(DataError, match="is a 2-D model that explains one radiograph") as err:
            run_inference(case[name], out, two_d, methods=["grad"], preset="quick", device="cpu")
        assert err.value.source == str(case[name])
        assert json.loads((out / "error.json").read_text())["source"] == str(case[name])
        assert not (out / "maps").exists() and not (out / "prediction.json").exists()
    png = tmp_path / "cxr.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 255).astype(np.uint8)).save(png)
    one_slice = write_volume(tmp_path / "one.nii.gz", case["hu"][:1], case["geometry"])
    for image in (png, one_slice):
        with pytest.raises(DataError, match="is a 3-D model that explains a CT volume") as err:
            run_inference(image, tmp_path / "3d-image", case["models"], methods=["grad"], device="cpu")
        assert err.value.source == str(image)
    assert input_kind(case["series"]) == ("volume", "a DICOM series folder of 16 files")
    # A series with a slice missing, zipped: the member is named; a mask on another grid is named.
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        for f in sorted(case["series"].iterdir()):
            if f.name != "CT00008.dcm":
                zf.write(f, f.name)
    with pytest.raises(DataError, match="missing slice|uneven") as err:
        run_inference(broken, tmp_path / "broken", case["models"], methods=["grad"], device="cpu")
    assert str(broken) in str(err.value)
    other = write_volume(tmp_path / "other.nii.gz", case["mask"][:8].astype(np.uint8), case["geometry"])
    with pytest.raises(DataError, match="mask is") as err:
        run_inference(case["nifti"], tmp_path / "bad-mask", case["models"], methods=["grad"], mask=other,
                      device="cpu")
    assert err.value.source == str(other)
    with pytest.raises(ValueError, match="image_size is for 2-D models"):
        run_inference(case["nifti"], tmp_path / "size", case["models"], methods=["grad"], image_size=64,
                      device="cpu")
