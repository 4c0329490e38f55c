"""Shared fixtures: small SynthCXR sets in both challenge layouts, and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SALIENCY_TRUST_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def rsna_synth(tmp_path_factory) -> Path:
    """24 opacity images at 96 px in the RSNA layout."""
    from saliency_trust.data.synth import generate

    return generate(tmp_path_factory.mktemp("rsna") / "ds", "opacity", n=24, size=96, seed=3, progress=False)


@pytest.fixture(scope="session")
def siim_synth(tmp_path_factory) -> Path:
    """24 pneumothorax images at 96 px in the SIIM layout."""
    from saliency_trust.data.synth import generate

    return generate(tmp_path_factory.mktemp("siim") / "ds", "pneumothorax", n=24, size=96, seed=4, progress=False)


def shared_set(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not (path / "labels.csv").is_file():
        pytest.skip(f"shared data {path} is absent")
    return path


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> dict:
    """Two DenseNet121 replicates trained through train.json on a small SynthCXR set (64 px, 2 epochs),
    with a real trust ``results.json`` in their model folder, as inference.json expects.

    Shared by the Slicer-module and service tests; about a minute on two cores.
    """
    import shutil

    from saliency_trust.data.synth import generate
    from saliency_trust.workflows.assess import run_assessment
    from saliency_trust.workflows.demo import train

    root = tmp_path_factory.mktemp("bundle")
    data = generate(root / "data", "opacity", n=48, size=64, seed=11, progress=False)
    models = root / "models"
    for seed in (0, 1):
        train("train.json", arch="densenet121", seed=seed, max_epochs=2, learning_rate=0.001, batch_size=8,
              dataset_dir=str(data), output_dir=str(models), image_size=64)
    model = models / "densenet121"  # the model folder train.json wrote (model.json, seed0.pt, seed1.pt)
    run_assessment(data, root / "trust", [model], [], methods=["grad", "gradcam", "gbp"], preset="quick",
                   n_images=6, pairs_per_image=3, randomize=1, device="cpu", report=False, progress=False)
    shutil.copy(root / "trust" / "results.json", model / "results.json")
    positives = [line.split(",")[0] for line in (data / "split.csv").read_text().splitlines()[1:]
                 if line.split(",")[1] == "test" and line.split(",")[2] == "1"]
    images = data / "stage_2_train_images"
    return {"root": root, "data": data, "models": models, "model": model, "bundle": REPO / "monai_bundle",
            "dicom": images / f"{positives[0]}.dcm", "arch": "densenet121"}
