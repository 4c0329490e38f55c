"""The assessment workflow end to end on SynthCXR: results file, per-image CSV, resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from saliency_trust.networks import get_network
from saliency_trust.workflows.assess import run_assessment


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
    assert first["schema_version"] == 1 and first["methods"] == ["grad", "gradcam", "xrai"]
    assert first["provenance"]["config"]["preset"] == "quick" and first["provenance"]["config"]["data_range"] == 1.0
    assert len(first["provenance"]["config"]["classifiers"][0]["sha256"]) == 64
    assert len(first["randomization"]) == 2 and len(first["randomization"][0]["states"]) == 9
    for m in first["methods"]:
        v = first["verdicts"][m]
        assert set(v) == {"utility", "randomization", "repeatability", "reproducibility"}
        assert all("rule" in v[c] for c in v)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    n = first["provenance"]["config"]["n_images"]
    assert 2 <= n <= 4 and len(rows) == n * 3 and {r["method"] for r in rows} == {"grad", "gradcam", "xrai"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["verdicts"] == json.loads(json.dumps(first["verdicts"]))

    # Interrupt: lose the results and two finished steps; the rerun recomputes only those.
    (out / "results.json").unlink()
    (out / ".steps" / "randomization_1.pt").unlink()
    (out / ".steps" / "maps_2.pt").unlink()
    second = run_assessment(data, out, **kwargs)
    for k in ("utility", "randomization", "repeatability", "reproducibility", "baselines", "verdicts"):
        assert json.dumps(second[k], sort_keys=True) == json.dumps(first[k], sort_keys=True), k


@pytest.mark.slow
def test_trust_config_runs_through_monai_bundle(setup, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    root, data, p = setup
    models = tmp_path / "models"
    models.mkdir()
    for src, dst in (("d0", "inception_v3_seed0"), ("d1", "inception_v3_seed1"), ("i0", "densenet121_seed0"),
                     ("u0", "unet_seed0"), ("u1", "unet_seed1")):
        arch = {"d": "densenet121", "i": "inception_v3", "u": "unet"}[dst[0]]
        torch.manual_seed(int(src[1]))
        torch.save(get_network(arch).state_dict(), models / f"{dst}.pt")
    cfg = REPO / "monai_bundle" / "configs"
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "trust.json"),
         "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
         "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--models_dir", str(models),
         "--methods", "['grad']", "--preset", "quick", "--n_images", "2", "--pairs_per_image", "2",
         "--device", "cpu"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["methods"] == ["grad"] and len(res["randomization"][0]["states"]) == 12  # InceptionV3 blocks
