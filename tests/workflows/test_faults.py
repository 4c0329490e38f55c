"""Runs killed with SIGKILL (saliency_trust.faults points) resume to the same results; nothing half-written shows."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from saliency_trust.faults import ENV
from saliency_trust.networks import ModelFolder, get_network

from tests.conftest import REPO

CRITERIA_KEYS = ("utility", "randomization", "repeatability", "reproducibility", "baselines", "verdicts", "data")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from saliency_trust.data.synth import generate

    root = tmp_path_factory.mktemp("faults")
    data = generate(root / "data", "opacity", n=40, size=64, seed=5, progress=False)
    paths = {}
    for name, arch, seed in (("d0", "densenet121", 20), ("d1", "densenet121", 21), ("u0", "unet", 2),
                             ("u1", "unet", 3)):
        torch.manual_seed(seed)
        paths[name] = str(root / f"{name}.pt")
        torch.save(get_network(arch).state_dict(), paths[name])
    kwargs = {"classifiers": [{"arch": "densenet121", "path": paths[k]} for k in ("d0", "d1")],
              "localizers": [paths["u0"], paths["u1"]], "methods": ["grad", "gradcam"], "preset": "quick",
              "n_images": 3, "pairs_per_image": 2, "device": "cpu", "report": True, "progress": False}
    return root, data, kwargs


def _assess(data: Path, out: Path, kwargs: dict, fault: str | None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import json, sys
        from saliency_trust.workflows.assess import run_assessment
        run_assessment({str(data)!r}, {str(out)!r}, **json.loads(sys.argv[1]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _visible_outputs_are_whole(out: Path) -> None:
    """Every file under its final name is complete: strict JSON parses, the CSV has all its rows, PNGs end."""
    if (out / "results.json").exists():
        json.loads((out / "results.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    if (out / "per_image.csv").exists():
        rows = list(csv.DictReader((out / "per_image.csv").open()))
        assert rows and all(None not in r.values() for r in rows)
    for png in (out / "figures").glob("*.png") if (out / "figures").is_dir() else []:
        assert png.read_bytes().endswith(b"IEND\xaeB`\x82"), png
    for step in (out / ".steps").glob("*.pt") if (out / ".steps").is_dir() else []:
        torch.load(step, weights_only=True)  # a torn file would not load


@pytest.mark.slow
def test_assessment_killed_at_several_points_resumes_to_identical_results(setup, tmp_path):
    root, data, kwargs = setup
    clean = _assess(data, tmp_path / "clean", kwargs, None)
    assert clean.returncode == 0, clean.stderr[-3000:]
    out = tmp_path / "killed"
    # explain:0-1 trained replicates, 2 untrained, 3.. the randomization states of replicate 0.
    for fault in ("explain:1", "explain:6", "write:per_image.csv", "write:results.json"):
        r = _assess(data, out, kwargs, fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
        _visible_outputs_are_whole(out)
        assert not (out / "results.json").exists(), fault  # each kill lands before the results are written
    leftovers = [p.name for p in out.rglob(".*.tmp*")]
    assert leftovers, "the kill while writing should have left a temporary behind"
    final = _assess(data, out, kwargs, None)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(out.rglob(".*.tmp*")), "stale temporaries of the killed runs are cleaned up"
    a = json.loads((tmp_path / "clean" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for k in CRITERIA_KEYS:
        assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True), k
    assert (tmp_path / "clean" / "per_image.csv").read_bytes() == (out / "per_image.csv").read_bytes()


@pytest.mark.slow
def test_training_killed_while_saving_restarts_cleanly_to_the_same_weights(rsna_synth, tmp_path):
    cfg = REPO / "monai_bundle" / "configs"

    def train(out: Path, fault: str | None) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop(ENV, None)
        if fault:
            env[ENV] = fault
        return subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "train.json"),
             "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
             "--dataset_dir", str(rsna_synth), "--output_dir", str(out), "--arch", "densenet121", "--seed", "4",
             "--image_size", "64", "--max_epochs", "2", "--batch_size", "8", "--train_limit", "16"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    clean = train(tmp_path / "clean", None)
    assert clean.returncode == 0, clean.stderr[-3000:]
    out = tmp_path / "killed"
    for fault in ("write:seed4.pt", "write:model.json", "write:seed4.metrics.json"):
        r = train(out, fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
        if (out / "densenet121" / "seed4.pt").exists():  # a previous epoch's best: whole, never torn
            torch.load(out / "densenet121" / "seed4.pt", weights_only=True)
        if (out / "densenet121" / "seed4.metrics.json").exists():
            json.loads((out / "densenet121" / "seed4.metrics.json").read_text())
    again = train(out, None)
    assert again.returncode == 0, again.stderr[-3000:]
    want = torch.load(tmp_path / "clean" / "densenet121" / "seed4.pt", weights_only=True)
    got = torch.load(out / "densenet121" / "seed4.pt", weights_only=True)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a = json.loads((tmp_path / "clean" / "densenet121" / "seed4.metrics.json").read_text())
    b = json.loads((out / "densenet121" / "seed4.metrics.json").read_text())
    assert a["val_auc"] == b["val_auc"] and a["best_epoch"] == b["best_epoch"]
    assert ModelFolder.open(out / "densenet121").replicates == {4: out / "densenet121" / "seed4.pt"}
