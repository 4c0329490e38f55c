"""The four-criteria assessment on volumes, end to end and small: a tiny SynthCT set (NIfTI, MSD layout), the
bundle's CT configs (``train.json`` + ``train_ct.json`` [+ ``train_ct_baseline.json``]) training the 3-D model
folders for one epoch, ``run_assessment`` on those folders; checked against the volumes read independently
(maps, AUPRC, prior), with every verdict present, the volume deviations, the report's views of the volume, and the
refusals of models that cannot be assessed together. Plus the report's lesion slices and mosaics on small
fabricated volumes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from saliency_trust.data import load_volume_dataset
from saliency_trust.methods import METHODS
from saliency_trust.metrics import auprc
from saliency_trust.report.figures import lesion_centre, volume_mosaic, volume_views
from saliency_trust.results import CRITERIA, load_results
from saliency_trust.workflows.assess import plan_assessment, run_assessment
from saliency_trust.workflows.demo_ct import train

SIZE = [32, 32, 64]  # the classifiers divide by 32: a 1 x 1 x 2 Grad-CAM grid, not one constant cell
WINDOW = [-1000.0, 400.0]
#: A light recipe (these tests check the wiring on volumes, not the maps' quality).
RECIPE = {"ig_steps": 2, "sg_samples": 1, "sig_samples": 1, "sig_steps": 2, "xrai_steps": 1,
          "xrai_volume_segments": [8, 27]}


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory) -> dict:
    """SynthCT consolidation (28 volumes; seed 0 puts both classes in the validation split, so the validation AUC
    is defined and the best epoch saved), the five 3-D model folders trained one epoch, and the assessment."""
    from saliency_trust.data.synthct import generate_ct

    root = tmp_path_factory.mktemp("ct")
    data = generate_ct(root / "data", 28, task="consolidation", size=SIZE, seed=0, formats=("nifti",),
                       progress=False)["nifti"]
    models = root / "models"
    common = {"dataset_dir": str(data), "output_dir": str(models), "image_size": SIZE, "window_hu": WINDOW,
              "max_epochs": 1, "batch_size": 4}
    for arch, seed in (("densenet121_3d", 0), ("densenet121_3d", 1), ("resnet10_3d", 0)):
        train(["train_ct.json"], arch=arch, seed=seed, **common)
    for seed in (0, 1):
        train(["train_ct.json", "train_ct_baseline.json"], arch="unet_3d", seed=seed, **common)
    classifiers = [models / "densenet121_3d", models / "resnet10_3d"]
    out = root / "trust"
    results = run_assessment(data, out, classifiers, [models / "unet_3d"], preset="quick", n_images=4,
                             pairs_per_image=3, randomize=1, recipe_overrides=RECIPE, split="all",
                             include_training_images=True, device="cpu", progress=False)
    return {"root": root, "data": data, "models": models, "classifiers": classifiers, "out": out,
            "results": results}


def test_training_writes_3d_model_folders(ct_study):
    models = ct_study["models"]
    dn = json.loads((models / "densenet121_3d" / "model.json").read_text())
    assert dn["network"]["_target_"] == "monai.networks.nets.DenseNet121" and dn["network"]["spatial_dims"] == 3
    assert dn["input"]["size"] == SIZE and dn["input"]["window_hu"] == WINDOW and dn["input"]["channels"] == 1
    # SynthCT's geometry at this size: 256 mm over 32 slices, 400 mm over 32 rows and over 64 columns.
    assert dn["input"]["spacing_mm"] == [8.0, 12.5, 6.25]
    assert dn["replicates"] == {"0": "seed0.pt", "1": "seed1.pt"} and dn["task"] == "consolidation"
    record = json.loads((models / "densenet121_3d" / "seed1.metrics.json").read_text())
    assert record["epochs_run"] == 1 and 0 <= record["val_auc"] <= 1 and record["synthetic"] is True
    assert record["network"] == dn["network"] and record["input"] == dn["input"]
    unet = json.loads((models / "unet_3d" / "model.json").read_text())
    assert unet["kind"] == "localizer" and unet["input"]["size"] == SIZE and "classes" not in unet
    assert json.loads((models / "resnet10_3d" / "model.json").read_text())["network"]["_target_"].endswith("ResNet")


def test_results_on_volumes_with_every_verdict(ct_study):
    res = load_results(ct_study["out"] / "results.json")
    data = res.data
    assert data["grid"] == SIZE and data["image_size"] == SIZE and data["spatial_dims"] == 3
    assert data["window_hu"] == WINDOW and data["spacing_mm"] == [8.0, 12.5, 6.25]
    assert data["synthetic"] is True and data["generator"] == "SynthCT" and data["ground_truth"] == "masks"
    assert res.n_images == 4 and res.methods == list(METHODS)
    for m in METHODS:
        for c in CRITERIA:
            v = res.verdict(m, c)
            assert v.rule and v.rule != "not run", (m, c, v.why)
    curve = res.randomization[0]
    assert curve["states"][0] == "logits" and curve["verdict_state"] == "transition1"
    assert res.baselines["agreement_localization"] is not None and res.reproducibility
    rows = list(csv.DictReader((ct_study["out"] / "per_image.csv").open()))
    assert len(rows) == 4 * len(METHODS)


def test_numbers_are_on_the_volumes(ct_study):
    """Maps on the model's grid, AUPRC and the prior recomputed from the volumes read independently."""
    out, res = ct_study["out"], load_results(ct_study["out"] / "results.json")
    ds = load_volume_dataset(ct_study["data"], size=SIZE, window_hu=WINDOW)
    by_id = {r.id: r for r in ds.records}
    masks = torch.tensor(np.stack([by_id[i].mask for i in res.data["ids"]]))
    maps = torch.load(out / ".steps" / "maps_0.pt", weights_only=True)["value"]["maps"]
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    for m in ("grad", "gradcam", "xrai"):
        peaks = maps[m].amax(dim=(1, 2, 3))
        assert maps[m].shape == (4, *SIZE) and set(peaks.tolist()) <= {0.0, 1.0}  # min-maxed, or blank (0)
        want = np.where(peaks.numpy() > 0, auprc(maps[m], masks).numpy(), np.nan)
        got = np.array([float(r["auprc"]) if r["auprc"] else np.nan for r in rows if r["method"] == m])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        if m != "gradcam":  # a gradient and XRAI are never blank; Grad-CAM may be after one epoch
            assert np.isfinite(got).all(), m
    # The average-mask prior: the mean voxel mask of the training / validation positives not assessed.
    pool = [r.mask for r in ds.records if r.label == 1 and r.mask is not None and r.id not in res.data["ids"]
            and r.split in ("train", "val")]
    assert res.data["prior"] == f"mean of {len(pool)} training/validation masks" and pool
    prior = torch.tensor(np.stack(pool)).double().mean(0)
    want = auprc(prior.expand(4, *SIZE), masks).numpy()
    got = np.array([float(r["auprc_prior"]) for r in rows if r["method"] == "grad"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_volume_deviations_and_report(ct_study):
    res = load_results(ct_study["out"] / "results.json")
    text = "\n".join(res.deviations)
    assert "Volumes of 32 x 32 x 64 voxels at 8 x 12.5 x 6.25 mm" in text
    assert "Grad-CAM grid at this size: DenseNet121 1 x 1 x 2; ResNet 1 x 1 x 2" in text
    assert "XRAI on volumes: SLIC supervoxels (8/27 segments" in text and "Grad-CAM on volumes" in text
    assert "3-D networks: DenseNet121 (spatial_dims 3" in text and "Assessed on SynthCT volumes" in text
    assert "Images at" not in text and "Grad-CAM upsampled with half-pixel centres" not in text
    figures = ct_study["out"] / "figures"
    for name in ("volume_views.png", "utility.png", "randomization_examples.png", "agreement_examples.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (ct_study["out"] / "report.html").read_text()
    assert "32 x 32 x 64 voxels" in html and "SynthCT" in html and "maximum-intensity projection" in html


def _manifest_copy(src: Path, dst: Path, **input_changes) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "model.json").read_text())
    m["input"].update(input_changes)
    (dst / "model.json").write_text(json.dumps(m))
    return dst


def test_models_that_cannot_be_assessed_together_are_refused(ct_study, tmp_path, rsna_synth):
    dn, rn = ct_study["classifiers"]
    data, loc = ct_study["data"], ct_study["models"] / "unet_3d"
    kw = {"device": "cpu", "progress": False}
    other_window = _manifest_copy(rn, tmp_path / "rn_soft", window_hu=[-160.0, 240.0])
    with pytest.raises(ValueError, match="window the CT differently"):
        plan_assessment(data, tmp_path / "o", [dn, other_window], [loc], **kw)
    other_grid = _manifest_copy(loc, tmp_path / "unet_big", size=[64, 64, 64])
    with pytest.raises(ValueError, match="different volume grids"):
        plan_assessment(data, tmp_path / "o", [dn], [other_grid], **kw)
    with pytest.raises(ValueError, match="image_size is for 2-D models"):
        plan_assessment(data, tmp_path / "o", [dn], [], image_size=64, **kw)
    with pytest.raises(ValueError, match="the models are 3-D: the dataset must hold volumes"):
        plan_assessment(rsna_synth, tmp_path / "o", [dn], [], **kw)


def test_lesion_slices_and_mosaics():
    mask = np.zeros((10, 12, 14), bool)
    mask[2:5, 3:6, 4:9] = True
    assert lesion_centre(mask) == (3, 4, 6)
    two = np.zeros((10, 12, 14), bool)
    two[0:2, 0:2, 0:2] = True  # two lesions: along each axis the centre of mass lies between them
    two[8:10, 9:11, 10:13] = True
    # Each axis: the largest cross-section where the centre of mass misses (z, y: the larger lesion's first
    # slice; x: equal areas, the first).
    assert lesion_centre(two) == (8, 9, 0)
    assert lesion_centre(np.zeros((10, 12, 14), bool)) == (5, 6, 7)
    vol = np.arange(10 * 12 * 14, dtype=float).reshape(10, 12, 14)
    axial, coronal, sagittal, mip = volume_views(vol, (3, 4, 6))
    np.testing.assert_array_equal(axial, vol[3])
    np.testing.assert_array_equal(coronal, vol[:, 4, :])
    np.testing.assert_array_equal(sagittal, vol[:, :, 6])
    np.testing.assert_array_equal(mip, vol.max(0))
    mosaic = volume_mosaic(vol, (3, 4, 6), kind="map")
    assert mosaic.shape == (12 + 1 + 12, 14 + 1 + 14)  # axial | coronal (10 rows) over sagittal | MIP
    np.testing.assert_array_equal(mosaic[:12, :14], vol[3])
    assert np.isnan(mosaic[12]).all()  # the gap stays clear under an overlay
    stretched = volume_mosaic(mask, (3, 4, 6), (2.0, 1.0, 1.0), kind="mask")  # z voxels twice as long
    assert stretched.dtype == bool and stretched.shape == (20 + 1 + 20, 14 + 1 + 14)
    assert stretched[21:, 15:].sum() == mask.any(0).sum()  # the projection panel: the lesion in any slice
    assert stretched[:20, 15:].sum() == 2 * mask[:, 4, :].sum()  # the coronal slice, rows doubled
