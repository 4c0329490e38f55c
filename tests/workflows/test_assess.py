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
    # The resume key covers the engine's sources: steps saved by other code are not reused.
    from saliency_trust.workflows.train import code_fingerprint

    assert first["provenance"]["config"]["code"] == code_fingerprint() and len(code_fingerprint()) == 64
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
    # The report: self-contained (figures inlined), verdict table first, quick preset labelled.
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and 'src="figures/' not in page
    assert page.index('class="verdicts"') < page.index("1. Localization utility")
    assert "<b>quick</b> preset" in page and page.count("<tr><th>") == 1 + 3  # header + one row per method
    for name in ("utility", "randomization", "randomization_examples", "agreement", "agreement_examples"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

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
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (tmp_path / "two" / "report.html").is_file()
    for k in ("utility", "randomization", "repeatability", "reproducibility", "baselines", "verdicts"):
        _assert_close(two[k], json.loads(json.dumps(single[k])), k)


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
    else:
        assert a == b, (where, a, b)
