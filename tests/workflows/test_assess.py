"""The assessment workflow end to end on SynthCXR: results file, per-image CSV, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from saliency_trust.networks import get_network
from saliency_trust.results import Results, load_results
from saliency_trust.workflows.assess import CSV_COLUMNS, run_assessment

from tests.conftest import shared_set


def strict_json(path) -> dict:
    """Parse with a strict parser: NaN / Infinity are refused."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from saliency_trust.data.synth import generate

    root = tmp_path_factory.mktemp("assess")
    data = generate(root / "data", "opacity", n=60, size=80, seed=7, progress=False)
    paths = {}
    for name, arch, seed in (("d0", "densenet121", 10), ("d1", "densenet121", 11), ("i0", "inception_v3", 12),
                             ("u0", "unet", 0), ("u1", "unet", 1)):
        torch.manual_seed(seed)
        paths[name] = root / f"{name}.pt"
        torch.save(get_network(arch).state_dict(), paths[name])
    return root, data, paths


@pytest.mark.slow
def test_assessment_writes_results_and_resumes_identically(setup):
    root, data, p = setup
    kwargs = {
        "classifiers": [{"arch": "densenet121", "path": p["d0"]}, {"arch": "densenet121", "path": p["d1"]},
                        {"arch": "inception_v3", "path": p["i0"]}],
        "localizers": [p["u0"], p["u1"]], "methods": ["grad", "gradcam", "xrai"], "preset": "quick",
        "n_images": 4, "pairs_per_image": 3, "device": "cpu",
    }
    out = root / "out"
    first = run_assessment(data, out, **kwargs)
    assert isinstance(first, Results) and first.schema_version == 3 and first.methods == ["grad", "gradcam", "xrai"]
    cfg = first.provenance["config"]
    assert cfg["preset"] == "quick" and cfg["data_range"] == 1.0 and len(cfg["classifiers"][0]["sha256"]) == 64
    assert cfg["randomization_target"] == "trained" and cfg["explain_class"] == "predicted"
    # The resume key covers the engine's sources: steps saved by other code are not reused.
    from saliency_trust.provenance import code_fingerprint

    assert cfg["code"] == code_fingerprint() and len(code_fingerprint()) == 64
    # The cascade stops where the paper's did: DenseNet121's stem (conv0) and first block are kept.
    assert len(first.randomization) == 2 and first.randomization[0]["states"][-1] == "transition1"
    assert len(first.randomization[0]["states"]) == 7 and first.randomization[0]["beyond_paper"] == []
    assert first.randomization[0]["verdict_state"] == "transition1"
    assert "stem and the first block" in first.randomization[0]["verdict_state_source"]
    # Each replicate draws its own random weights.
    assert first.randomization[0]["init_seed"] != first.randomization[1]["init_seed"]
    for m in first.methods:
        v = first.verdicts[m]
        assert set(v) == {"utility", "randomization", "repeatability", "reproducibility"}
        assert all(v[c].rule and v[c].plain for c in v)
        assert v["randomization"].state == "transition1" and v["randomization"].evidence in (
            "pass", "fail", "inconclusive")
    # Data: the split file's test set, at the images' own grid (random weights carry no training record).
    assert first.data["split"].startswith("auto: the split file") and first.data["image_size"] is None
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    n = first.n_images
    assert 2 <= n <= 4 and len(rows) == n * 3 and {r["method"] for r in rows} == {"grad", "gradcam", "xrai"}
    assert list(rows[0]) == CSV_COLUMNS
    for r in rows:
        p_pred = float(r["predicted_probability"])
        assert 0.5 <= p_pred <= 1 and r["explained_class"] == r["predicted_class"]
        assert r["randomized_state"] == "transition1"
    saved = strict_json(out / "results.json")
    assert load_results(out / "results.json") == first
    assert saved["verdicts"]["grad"]["utility"]["passed"] == first.verdict("grad", "utility").passed
    # The report: self-contained (figures inlined), verdict table first, quick preset labelled.
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and 'src="figures/' not in page
    assert page.index('class="verdicts"') < page.index("1. Localization utility")
    assert "<b>quick</b> preset" in page and page.count("<tr><th>") == 1 + 3  # header + one row per method
    assert "Where this run differs from the paper" in page and "SynthCXR" in page
    assert "Agrees with a second model" in page and "Rule:" in page  # words in headers, rules on hover
    for name in ("utility", "randomization", "randomization_examples", "agreement", "agreement_examples"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupt: lose the results and two finished steps; the rerun recomputes only those.
    (out / "results.json").unlink()
    (out / ".steps" / "randomization_1.pt").unlink()
    (out / ".steps" / "maps_2.pt").unlink()
    second = run_assessment(data, out, **kwargs)
    a, b = first.to_dict(), second.to_dict()
    for k in ("utility", "randomization", "repeatability", "reproducibility", "baselines", "verdicts"):
        assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True), k


@pytest.mark.slow
def test_trust_config_runs_through_monai_bundle(setup, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    root, data, p = setup
    from saliency_trust.networks.modelfolder import training_weights, write_training_manifest

    models = tmp_path / "models"
    # Model folders as train.json writes them: <models_dir>/<arch>/seed<k>.pt and model.json.
    for arch, seed in (("inception_v3", 0), ("inception_v3", 1), ("densenet121", 0), ("unet", 0), ("unet", 1)):
        torch.manual_seed(seed)
        weights = Path(training_weights(models, arch, seed))
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(get_network(arch).state_dict(), weights)
        write_training_manifest(weights.parent, arch, seed, 96, task="lung opacity",
                                kind="localizer" if arch == "unet" else "classifier")
    cfg = REPO / "monai_bundle" / "configs"
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "trust.json"),
         "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
         "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--models_dir", str(models),
         "--methods", "['grad']", "--preset", "quick", "--n_images", "2", "--pairs_per_image", "2",
         "--device", "cpu", "--randomization_target", "own", "--full_cascade", "True"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = strict_json(tmp_path / "out" / "results.json")
    assert res["methods"] == ["grad"] and len(res["randomization"][0]["states"]) == 12  # InceptionV3 blocks
    # As the paper: randomized models explain their own prediction; the verdict reads mixed1 = Mixed_5c.
    assert res["provenance"]["config"]["randomization_target"] == "own"
    assert res["randomization"][0]["verdict_state"] == "Mixed_5c" and res["randomization"][0]["beyond_paper"] == [
        "Mixed_5b"]
    assert "images per method" in r.stdout  # how many images each criterion used


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one(setup, tmp_path):
    """multi_gpu_trust.json with 2 CPU processes (gloo) gives the single-process results."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    root, data, p = setup
    classifiers = [{"arch": "densenet121", "path": str(p["d0"])}, {"arch": "densenet121", "path": str(p["d1"])},
                   {"arch": "inception_v3", "path": str(p["i0"])}]
    localizers = [str(p["u0"]), str(p["u1"])]
    kwargs = {"methods": ["grad", "sg", "gradcam"], "preset": "quick", "n_images": 5, "pairs_per_image": 3,
              "randomize": 1, "block": 2}  # blocks [0, 1] [2, 3] [4]: rank 0 takes two, rank 1 one
    # Same device and thread count as each torchrun process: CPU reductions depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_assessment(data, tmp_path / "one", classifiers, localizers, device="cpu", report=False,
                                progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)
    cfg = REPO / "monai_bundle" / "configs"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "monai.bundle", "run", "--config_file", f"['{cfg / 'trust.json'}','{cfg / 'multi_gpu_trust.json'}']",
         "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
         "--dataset_dir", str(data), "--output_dir", str(tmp_path / "two"), "--classifiers", json.dumps(classifiers),
         "--localizers", json.dumps(localizers), "--methods", json.dumps(kwargs["methods"]), "--preset", "quick",
         "--n_images", "5", "--pairs_per_image", "3", "--randomize", "1", "--block", "2", "--device", "cpu"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 processes" in r.stdout
    two = strict_json(tmp_path / "two" / "results.json")
    assert (tmp_path / "two" / "report.html").is_file()
    one = single.to_dict()
    for k in ("utility", "randomization", "repeatability", "reproducibility", "baselines", "verdicts"):
        _assert_close(two[k], one[k], k)


def _assert_close(a, b, where: str, tol: float = 0.0) -> None:
    """Equal structure, strings and bools; floats equal within ``tol`` (exact by default; NaN equals NaN)."""
    import math

    assert type(a) is type(b) or isinstance(a, float | int) and isinstance(b, float | int), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (where, a, b)
    elif a is None or b is None:
        assert a is None and b is None, (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
def test_split_image_size_and_missing_ground_truth(setup, tmp_path):
    """--split all / a file of ids; the training record's size is used and a mismatch refused; a positive
    image without a mask is skipped with its id; explaining the finding class."""
    import shutil

    import numpy as np
    from PIL import Image

    root, data, p = setup
    # A generic dataset without a split file: 5 positives with masks, 1 positive without, 2 negatives.
    ds = tmp_path / "generic"
    (ds / "images").mkdir(parents=True)
    rows = ["file,mask,label"]
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((72, 72)) * 255).astype(np.uint8)).save(ds / "images" / f"im{i}.png")
        if i < 5:
            m = np.zeros((72, 72), np.uint8)
            m[10 + i : 30 + i, 20:40] = 255
            Image.fromarray(m).save(ds / "images" / f"m{i}.png")
            rows.append(f"images/im{i}.png,images/m{i}.png,1")
        else:
            rows.append(f"images/im{i}.png,,{1 if i == 5 else 0}")
    (ds / "labels.csv").write_text("\n".join(rows) + "\n")
    models = tmp_path / "models"
    models.mkdir()
    for k, src in enumerate(("d0", "d1")):
        shutil.copy(p[src], models / f"densenet121_seed{k}.pt")
        (models / f"densenet121_seed{k}.metrics.json").write_text(json.dumps({"image_size": 64}))
    cls = [{"arch": "densenet121", "path": models / f"densenet121_seed{k}.pt"} for k in (0, 1)]
    kw = {"methods": ["grad"], "preset": "quick", "pairs_per_image": 2, "device": "cpu", "randomize": 0,
          "report": False, "progress": False}
    res = run_assessment(ds, tmp_path / "all", cls, split="all", **kw)
    assert res.n_images == 5 and res.data["image_size"] == 64 and res.data["grid"] == [64, 64]
    assert res.data["image_size_source"] == "the models' training records"
    assert res.data["skipped"] == [{"id": "im5", "why": "lesion-positive but has no ground-truth mask or box"}]
    assert res.data["prior"].startswith("leave-one-out") and any("leave-one-out" in d for d in res.deviations)
    assert res.verdict("grad", "utility").n == 5 and res.verdict("grad", "repeatability").n == 5
    auto = run_assessment(ds, tmp_path / "auto", cls, **kw)  # no split file: every image, said so
    assert auto.n_images == 5 and auto.data["split"] == (
        "auto: every image (no split file, and no model's training record names this dataset)")
    ids = tmp_path / "ids.txt"
    ids.write_text("id\nim1\nim3\nim4\n")
    listed = run_assessment(ds, tmp_path / "listed", cls, split=str(ids), **kw)
    assert listed.data["ids"] == ["im1", "im3", "im4"]
    ids.write_text("im1\nim7\n")  # im7 is a negative
    with pytest.raises(ValueError, match="not lesion-positive"):
        run_assessment(ds, tmp_path / "bad", cls, split=str(ids), **kw)
    with pytest.raises(ValueError, match="differs from the 64 px the models were trained at"):
        run_assessment(ds, tmp_path / "size", cls, split="all", image_size=96, **kw)
    # The paper preset's default: each randomized model explains its own prediction.
    from saliency_trust.workflows.assess import plan_assessment

    assert plan_assessment(ds, tmp_path / "plan", cls, split="all").settings.target_rule == "own"
    assert plan_assessment(ds, tmp_path / "plan", cls, split="all", preset="quick").settings.target_rule == "trained"
    finding = run_assessment(ds, tmp_path / "finding", cls, split="all", explain_class="finding", **kw)
    rows = list(csv.DictReader((tmp_path / "finding" / "per_image.csv").open()))
    assert {r["explained_class"] for r in rows} == {"1"} and any("finding" in d for d in finding.deviations)


@pytest.mark.slow
def test_the_100_real_rsna_positives_are_all_assessed_with_strict_json(tmp_path):
    """Untrained networks on the 100 real QTIM RSNA positives, --split all: all 100 used, strict JSON out."""
    data = shared_set("rsna_pneumonia_qtim100")
    paths = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"densenet121_seed{seed}.pt")
        torch.save(get_network("densenet121").state_dict(), paths[-1])
    res = run_assessment(data, tmp_path / "out", [{"arch": "densenet121", "path": q} for q in paths],
                         methods=["grad", "gradcam"], preset="quick", image_size=64, split="all", pairs_per_image=5,
                         device="cpu", report=False, progress=False)  # default: every replicate randomized
    assert res.n_images == 100 and len(set(res.data["ids"])) == 100 and res.data["skipped"] == []
    # The paper's 3 randomized replicates by default, counted as 100 images (replicates averaged per image).
    assert len(res.randomization) == 3 and res.provenance["config"]["randomized_replicates"] == 3
    assert not any("randomized replicate" in line for line in res.deviations)
    assert len({r["init_seed"] for r in res.randomization}) == 3
    saved = strict_json(tmp_path / "out" / "results.json")
    assert saved["data"]["n_images"] == 100
    for m in ("grad", "gradcam"):
        for c in ("utility", "randomization", "repeatability"):
            v = res.verdict(m, c)
            assert v.n + v.n_undefined == 100, (m, c, v.n, v.n_undefined)  # every image is used or counted
    rows = list(csv.DictReader((tmp_path / "out" / "per_image.csv").open()))
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 100
