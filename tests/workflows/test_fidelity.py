"""Defaults that cannot mislead: which images are assessed, the deviations derived from the run,
TorchScript and partly-ReLU models, per-model finding classes, and live checks scored like the study."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from saliency_trust.data import load_dataset
from saliency_trust.data.split import split_of
from saliency_trust.networks import ModelFolder, UnchangedError, get_network, randomize_block
from saliency_trust.workflows.assess import compute_maps, deviations, plan_assessment, run_assessment

from tests.conftest import REPO


def _torchscript_folder(root: Path, size: int = 64) -> Path:
    """A model folder of two traced DenseNet121 replicates (TorchScript), [-1, 1] input."""
    folder = root / "scripted"
    folder.mkdir(parents=True, exist_ok=True)
    for k in (0, 1):
        torch.manual_seed(40 + k)
        net = get_network("densenet121").eval()
        torch.jit.trace(net, torch.zeros(1, 3, size, size)).save(str(folder / f"s{k}.pt"))
    (folder / "model.json").write_text(json.dumps({
        "schema_version": 1, "name": "scripted densenet", "network": "densenet121", "format": "torchscript",
        "replicates": {"0": "s0.pt", "1": "s1.pt"}, "input": {"size": size, "channels": 3,
                                                               "normalization": {"range": [-1.0, 1.0]}},
        "classes": ["no opacity", "lung opacity"], "finding_class": 1}))
    return folder


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory):
    """An 80-image SynthCXR folder without split.csv (as RSNA and SIIM ship), with two DenseNet121 replicates
    and two U-Nets trained on it through train.json / train_baseline.json (1 epoch each)."""
    from saliency_trust.data.synth import generate
    from saliency_trust.workflows.demo import train

    root = tmp_path_factory.mktemp("unsplit")
    data = generate(root / "data", "opacity", n=80, size=64, seed=21, progress=False)
    (data / "split.csv").unlink()
    models = root / "models"
    common = {"dataset_dir": str(data), "output_dir": str(models), "image_size": 64, "batch_size": 8,
              "max_epochs": 1}
    for seed in (0, 1):
        train("train.json", arch="densenet121", seed=seed, learning_rate=0.001, **common)
        train("train_baseline.json", seed=seed, **common)
    return root, data, models


@pytest.mark.slow
def test_trust_json_after_train_json_never_assesses_a_training_image(unsplit, tmp_path):
    root, data, models = unsplit
    out = tmp_path / "trust"
    env = {**os.environ, "PYTHONPATH": str(REPO / "monai_bundle"), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "monai_bundle/configs/trust.json"),
           "--bundle_root", str(REPO / "monai_bundle"), "--dataset_dir", str(data), "--models_dir", str(models),
           "--output_dir", str(out), "--preset", "quick", "--methods", "['grad','gradcam']",
           "--classifiers", f"['{models / 'densenet121'}']", "--pairs_per_image", "3", "--randomize", "0",
           "--report", "False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    d = saved["data"]
    ids = d["ids"]
    ds = load_dataset(data, image_size=64)
    test_positives = sorted(r.id for r in ds if r.label == 1 and split_of(r.id, None) == "test" and r.mask.any())
    training = {r.id for r in ds if split_of(r.id, None) != "test"}
    assert ids == test_positives and len(ids) >= 2 and not set(ids) & training
    assert d["split"].startswith("auto: the hash split's test part")
    assert {"densenet121 (lung opacity) #0", "densenet121 (lung opacity) #1"} <= set(d["trained_on_this_dataset"])
    assert any(name.startswith("unet") for name in d["trained_on_this_dataset"])
    assert d["images_used"]["utility"]["max"] == len(ids) and d["images_used"]["utility"]["unit"] == "images"
    assert "prior" in d and d["prior"].startswith("mean of")  # the training masks: they are not assessed
    # "all" on a dataset the models were trained on needs the explicit option, which the output then states.
    kw = {"methods": ["grad"], "preset": "quick", "pairs_per_image": 2, "randomize": 0, "device": "cpu",
          "report": False, "progress": False}
    with pytest.raises(ValueError, match="include_training_images"):
        run_assessment(data, tmp_path / "all", [models / "densenet121"], n_images=4, split="all", **kw)
    listed = tmp_path / "ids.txt"
    listed.write_text(sorted(training & {r.id for r in ds if r.label == 1})[0] + "\n")
    with pytest.raises(ValueError, match="training or validation images"):
        run_assessment(data, tmp_path / "listed", [models / "densenet121"], split=str(listed), **kw)
    res = run_assessment(data, tmp_path / "all", [models / "densenet121"], n_images=4, split="all",
                         include_training_images=True, **kw)
    assert any("Images the models were trained on are assessed" in line for line in res.deviations)
    assert not any("Images the models were trained on" in line for line in saved["deviations"])
    # Pretraining is recorded by train.json, and its absence is a deviation.
    assert ModelFolder.open(models / "densenet121").record(0)["pretrained"] is None
    assert any("without ImageNet pretraining: densenet121 (lung opacity) #0" in line for line in saved["deviations"])


def _plan(tmp_path: Path, data: Path, classifiers: list, localizers: list = (), **kw):
    return plan_assessment(data, tmp_path / "plan", classifiers, list(localizers), methods=["grad"], preset="quick",
                           n_images=4, device="cpu", **kw)


def _with(plan, **settings):
    """The plan with some settings changed (the settings are frozen: a new object)."""
    return dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, **settings))


def test_every_deviation_line_appears_exactly_when_it_applies(unsplit, tmp_path):
    root, data, models = unsplit
    plan = _plan(tmp_path, data, [models / "densenet121"], [models / "unet"])
    lines = deviations(plan)

    def has(text: str, p=plan) -> bool:
        return any(text in line for line in deviations(p))

    def with_facts(**facts):
        return dataclasses.replace(plan, facts={**plan.facts, **facts})

    # Image size: 64 px here, with the Grad-CAM grid it gives; none at the paper's 320 px.
    assert has("Images at 64 px; the paper used 320 px. Grad-CAM grid at this size: densenet121 2 x 2")
    at320 = dataclasses.replace(plan, data={**plan.data, "image_size": 320, "grid": [320, 320]})
    assert not has("the paper used 320 px", at320)
    # Pretraining: recorded as none -> said; a local ImageNet file -> not said; not recorded -> said so.
    assert has("without ImageNet pretraining")
    pre = with_facts(pretrained={k: "/w/imagenet.pt" for k in plan.facts["pretrained"]})
    assert not has("pretraining", pre)
    assert has("Pretraining not recorded", with_facts(pretrained={"x #0": "not recorded"}))
    # Normalization of the second architecture: the paper's DenseNet121 took ImageNet statistics.
    assert not has("Second architecture")
    second = with_facts(second="inception_v3", normalization={"densenet121": "[-1, 1]", "inception_v3": "[-1, 1]"})
    assert has("Second architecture inception_v3 takes [-1, 1] input", second)
    imagenet2 = with_facts(second="inception_v3",
                           normalization={"densenet121": "[-1, 1]", "inception_v3": "ImageNet mean/std"})
    assert not has("Second architecture", imagenet2)
    # U-Net on a detection (boxes) dataset: the paper used RetinaNet on RSNA.
    assert plan.facts["ground_truth"] == "boxes" and has("on a detection dataset with boxes")
    assert not has("on a detection dataset", with_facts(ground_truth="masks"))
    assert not has("on a detection dataset", dataclasses.replace(plan, localizers=[]))
    # Randomized replicates: 2 here (the folder's two), the paper averaged 3; none when not run.
    assert len(plan.randomized) == 2 and has("2 randomized replicate(s)")
    three = dataclasses.replace(plan, roles=dataclasses.replace(plan.roles, randomized=(0, 1, 2)))
    assert not has("randomized replicate", three)
    # IG baseline: per channel in the model's own scale when its input is not [-1, 1].
    assert not has("Integrated Gradients baseline")
    ig = with_facts(normalization={"densenet121": "ImageNet mean/std"},
                    ig_baseline={"densenet121": (-2.1179, -2.0357, -1.8044)})
    assert has("Integrated Gradients baseline for densenet121: black in its own input scale", ig)
    # One localizer: agreement judged against chance only, said.
    assert not has("One localization network")
    assert has("One localization network", dataclasses.replace(plan, localizers=plan.localizers[:1]))
    # SSIM data range, explained class and randomization target: each line only off the paper's value.
    assert has("SSIM data_range 1.0") and not has("SSIM data_range", _with(plan, data_range=2.0))
    assert not has("finding (lesion) class") and has("finding (lesion) class",
                                                      _with(plan, explain_class="finding"))
    assert has("explain the trained model's class")
    assert not has("explain the trained model's class", _with(plan, randomization_target="own"))
    # Randomization not run: said, whatever the reason.
    assert has("Cascading randomization not run: x", dataclasses.replace(plan, not_run={"randomization": "x"}))
    # The localizer agreement's SSIM data range, only when two localizers are compared.
    assert has("Localization-network agreement SSIM") and len(plan.localizers) == 2
    assert not has("Localization-network agreement SSIM", dataclasses.replace(plan, localizers=plan.localizers[:1]))
    assert len(lines) == len(set(lines))
    # Provenance records each model's explain settings.
    assert plan.config["explain_settings"]["densenet121"] == {"cam_layer": "features", "cam_post_relu": True,
                                                              "ig_baseline": -1.0}


def test_cam_grid_at_the_papers_size_and_at_128(tmp_path):
    from saliency_trust.workflows.assess import _cam_grid

    folder = ModelFolder.open(_torchscript_folder(tmp_path))  # any folder: the grid reads the net given
    cases = (("inception_v3", 128, [2, 2]), ("inception_v3", 320, [8, 8]), ("densenet121", 112, [3, 3]))
    for arch, size, want in cases:
        implied = ModelFolder(folder.folder, {"network": arch, "input": {"size": size}}, implied=True, arch=arch)
        assert _cam_grid(implied, get_network(arch), size) == want, (arch, size)


def test_torchscript_classifier_is_assessed_and_inferred_with_what_it_cannot_do_said(unsplit, tmp_path):
    from saliency_trust.workflows.infer import run_inference

    root, data, _ = unsplit
    scripted = _torchscript_folder(tmp_path)
    res = run_assessment(data, tmp_path / "ts", [scripted], methods=["grad", "gbp"], preset="quick", n_images=3,
                         pairs_per_image=2, device="cpu", report=True, progress=False)
    why = "TorchScript model"
    assert res.verdict("grad", "randomization").passed is None and why in res.verdict("grad", "randomization").why
    assert why in res.baselines["not_run"]["untrained"] and res.baselines["utility_untrained"]["grad"]["n"] == 0
    assert res.verdict("grad", "utility").n == 3 and res.verdict("grad", "repeatability").n > 0
    assert any("Untrained-network utility baseline not run" in line for line in res.deviations)
    assert (tmp_path / "ts" / "report.html").is_file()
    # Randomizing a scripted module changes nothing: refused, never an SSIM of 1.0.
    with pytest.raises(UnchangedError, match="TorchScript"):
        randomize_block(torch.jit.load(str(scripted / "s0.pt")), ("classifier",), seed=0)
    positive = next(r for r in load_dataset(data) if r.label == 1)
    pred = run_inference(positive.path, tmp_path / "inf", scripted, methods=["grad", "gbp"], preset="quick")
    assert pred["checks"]["randomization"]["ssim"] is None and "TorchScript" in pred["checks"]["randomization"]["why"]
    assert set(pred["checks"]["repeatability"]["ssim"]) == {"grad", "gbp"}
    assert {"gradcam", "ggcam"} <= set(pred["methods_left_out"])


def test_two_folders_of_one_network_are_not_a_second_architecture(unsplit, tmp_path):
    import shutil

    root, data, models = unsplit
    copy = tmp_path / "copy"
    shutil.copytree(models / "densenet121", copy)
    with pytest.raises(ValueError, match="reproducibility needs a different architecture"):
        _plan(tmp_path, data, [models / "densenet121", copy])
    # The same architecture under another name: torchvision's builder instead of the registry's name.
    renamed = tmp_path / "renamed"
    shutil.copytree(models / "densenet121", renamed)
    manifest = json.loads((renamed / "model.json").read_text())
    manifest.update(network={"_target_": "torchvision.models.densenet121", "num_classes": 2})
    (renamed / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="same layers"):
        _plan(tmp_path, data, [models / "densenet121", renamed])
    # A mistyped verdict block is refused, never silently the last (stem-randomized) state.
    typo = tmp_path / "typo"
    shutil.copytree(models / "densenet121", typo)
    manifest = json.loads((typo / "model.json").read_text())
    manifest["verdict_block"] = "denseblok1"
    (typo / "model.json").write_text(json.dumps(manifest))
    from saliency_trust.networks import ManifestError

    with pytest.raises(ManifestError, match="verdict_block"):
        ModelFolder.open(typo).load(0)


def test_each_model_explains_its_own_finding_class(unsplit, tmp_path):
    root, data, models = unsplit
    other = tmp_path / "flipped"
    other.mkdir()
    torch.manual_seed(3)
    torch.save(get_network("resnet50").state_dict(), other / "w.pt")
    (other / "model.json").write_text(json.dumps({
        "schema_version": 1, "network": "resnet50", "weights": "w.pt",
        "input": {"size": 64, "channels": 3, "normalization": {"range": [-1.0, 1.0]}},
        "classes": ["lung opacity", "no opacity"], "finding_class": 0}))
    plan = _plan(tmp_path, data, [{"model": models / "densenet121", "replicates": [0]}, other],
                 explain_class="finding", randomize=0)
    maps = compute_maps(plan, progress=False)
    assert maps.targets[0].tolist() == [1] * len(plan.ids) and maps.targets[1].tolist() == [0] * len(plan.ids)


def test_a_partly_relu_network_gets_guided_backprop_with_the_caveat_stated(unsplit, tmp_path):
    root, data, models = unsplit
    folder = tmp_path / "mobilenet"
    folder.mkdir()
    manifest = {"schema_version": 1, "network": {"_target_": "torchvision.models.mobilenet_v3_small", "num_classes": 2},
                "weights": "w.pt", "classes": ["no opacity", "lung opacity"], "cam_layer": "features",
                "input": {"size": 64, "channels": 3, "normalization": {"preset": "imagenet"}},
                "randomization_blocks": [{"name": "logits", "modules": ["classifier"]},
                                         {"name": "features", "modules": ["features"]}]}
    torch.save(ModelFolder(folder, manifest)._construct().state_dict(), folder / "w.pt")
    (folder / "model.json").write_text(json.dumps(manifest))
    full = plan_assessment(data, tmp_path / "p2", [folder], [], preset="quick", n_images=4, device="cpu")
    assert "gbp" in full.methods and "Hardswish" in full.data["method_notes"]["gbp"]
    assert any(line.startswith("gbp: guided backprop guides only the ReLUs") for line in deviations(full))


def test_a_localizer_trained_at_another_size_is_refused(unsplit, tmp_path):
    import shutil

    root, data, models = unsplit
    loc = tmp_path / "unet96"
    shutil.copytree(models / "unet", loc)
    manifest = json.loads((loc / "model.json").read_text())
    manifest["input"]["size"] = 96
    (loc / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="localization network was trained at 96 px and the classifiers at 64 px"):
        _plan(tmp_path, data, [models / "densenet121"], [loc])


def test_live_checks_score_like_the_study(trained_bundle, tmp_path):
    """inference.json's checks: the study's data range, its verdict block, its target rule; a blank map is blank."""
    from saliency_trust.criteria import defined_ssim
    from saliency_trust.results import load_results
    from saliency_trust.saliency import explain, predict
    from saliency_trust.workflows.infer import run_inference

    folder = ModelFolder.open(trained_bundle["model"])
    assessed = load_results(folder.folder / "results.json")
    pred = run_inference(trained_bundle["dicom"], tmp_path / "live", folder.folder, methods=["grad", "gradcam"],
                         preset="quick")
    c = pred["checks"]
    assert c["data_range"] == assessed.provenance["config"]["data_range"] == 1.0
    assert c["data_range_source"] == "the results.json beside the model"
    net = folder.load(0)
    assert c["randomization"]["state"] == folder.verdict_block(net) == "transition1"
    assert c["randomization"]["target"] == assessed.provenance["config"]["randomization_target"]
    # Recompute the repeatability check with the study's own function.
    from saliency_trust.data.groundtruth import resize_image
    from saliency_trust.data.imageio import read_input

    img, _ = read_input(trained_bundle["dicom"])
    x = folder.to_input(torch.from_numpy(resize_image(img, (64, 64)))[None])
    t = predict(net, x).argmax(1)
    other = folder.load(1)
    t1 = predict(other, x).argmax(1)  # as in the study, each replicate explains its own prediction
    settings = {**folder.explain_settings(net), "cam_resize": "half_pixel"}
    a = explain(net, x, ["grad"], targets=t, preset="quick", **settings)["grad"]
    b = explain(other, x, ["grad"], targets=t1, preset="quick", **settings)["grad"]
    assert c["repeatability"]["explained_class"] == int(t1[0]) and pred["explain_class"] == "predicted"
    assert c["repeatability"]["ssim"]["grad"] == pytest.approx(float(defined_ssim(a, b, 1.0)[0]), abs=1e-9)
    # The randomized state: the random weights the assessment drew for this replicate.
    from saliency_trust.networks import randomization_states, replicate_seed

    seed = replicate_seed(assessed.provenance["config"]["seed"], folder.sha256(0))
    assert c["randomization"]["init_seed"] == seed
    assert seed in {r["init_seed"] for r in assessed.randomization}
    state = next(s for n, s in randomization_states(net, folder.randomization_blocks(net), seed=seed)
                 if n == "transition1")
    r = explain(state, x, ["grad"], targets=t, preset="quick", **settings)["grad"]  # quick: target "trained"
    assert c["randomization"]["ssim"]["grad"] == pytest.approx(float(defined_ssim(a, r, 1.0)[0]), abs=1e-9)
    # An empty mask is said to be empty, not taken for blank maps.
    from PIL import Image

    Image.fromarray(np.zeros(img.shape, np.uint8)).save(tmp_path / "empty.png")
    empty = run_inference(trained_bundle["dicom"], tmp_path / "e", folder.folder, methods=["grad"], preset="quick",
                          mask=tmp_path / "empty.png", checks=False)["checks"]
    assert empty["auprc"] == {"grad": None} and "empty" in empty["auprc_why"] and not empty["blank"]
    # A blank map: zero the classifier head, so the input gradient is exactly zero everywhere.
    blank_folder = tmp_path / "blank"
    blank_folder.mkdir()
    for k in (0, 1):
        sd = torch.load(folder.weights(k), weights_only=True)
        sd["classifier.weight"].zero_()
        torch.save(sd, blank_folder / f"seed{k}.pt")
    manifest = json.loads((folder.folder / "model.json").read_text())
    (blank_folder / "model.json").write_text(json.dumps(manifest))
    m = np.zeros(img.shape, bool)
    m[img.shape[0] // 4: img.shape[0] // 2, img.shape[1] // 4: img.shape[1] // 2] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    blank = run_inference(trained_bundle["dicom"], tmp_path / "b", blank_folder, methods=["grad"], preset="quick",
                          mask=tmp_path / "mask.png")
    bc = blank["checks"]
    assert bc["repeatability"]["ssim"]["grad"] is None and bc["blank"]["repeatability"] == ["grad"]
    assert bc["auprc"]["grad"] is None and bc["blank"]["auprc"] == ["grad"]  # never the ~0.5 of a constant map
    assert bc["data_range"] == 1.0 and bc["data_range_source"].startswith("the quick preset")
