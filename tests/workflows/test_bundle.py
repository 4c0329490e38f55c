"""The bundle as a researcher runs it: `python -m monai.bundle ...` on SynthCXR, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from saliency_trust.networks import ModelFolder, get_network, load_weights

from tests.conftest import REPO

BUNDLE = REPO / "monai_bundle"
CONFIGS = BUNDLE / "configs"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # No network at run time: make any download attempt fail loudly instead of hanging.
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", no_proxy="")
    return env


def _bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    from saliency_trust.data.synth import generate

    return generate(tmp_path_factory.mktemp("train") / "opacity", "opacity", n=40, size=80, seed=5, progress=False)


def test_verify_metadata_offline_and_able_to_fail(tmp_path):
    ok = _bundle("verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
                 "--filepath", str(CONFIGS / "metadata_schema.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "metadata is verified with no error" in ok.stdout + ok.stderr
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    meta["version"] = "one"
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(CONFIGS / "metadata_schema.json", tmp_path / "schema.json")
    bad = _bundle("verify_metadata", "--meta_file", str(tmp_path / "metadata.json"),
                  "--filepath", str(tmp_path / "schema.json"))
    assert bad.returncode != 0 or "verified with no error" not in bad.stdout + bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["densenet121", "inception_v3"])
def test_train_config_writes_state_dict_and_metrics(tiny_set, tmp_path, arch):
    out = tmp_path / "models"
    r = _bundle("run", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(BUNDLE),
                "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
                "--dataset_dir", str(tiny_set), "--output_dir", str(out), "--arch", arch, "--seed", "3",
                "--image_size", "80", "--max_epochs", "1", "--batch_size", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    weights = out / arch / "seed3.pt"
    metrics = json.loads((out / arch / "seed3.metrics.json").read_text())
    assert 0.0 <= metrics["val_auc"] <= 1.0 and metrics["arch"] == arch and metrics["seed"] == 3
    assert metrics["n_train"] > 0 and metrics["versions"]["torch"] == torch.__version__
    state = torch.load(weights, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    load_weights(get_network(arch), weights)  # strict: every key matches the registry's network
    # The model folder's manifest lists the replicate and says how the network takes its input.
    folder = ModelFolder.open(out / arch)
    assert not folder.implied and folder.replicates == {3: weights} and folder.image_size == 80
    assert folder.kind == "classifier" and folder.task == "lung opacity" and folder.black() == -1.0


@pytest.mark.slow
def test_train_baseline_config(tiny_set, tmp_path):
    out = tmp_path / "models"
    # An override of train.json, stacked as multi_gpu_train.json is.
    r = _bundle("run", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'train_baseline.json'}']",
                "--bundle_root", str(BUNDLE),
                "--meta_file", str(CONFIGS / "metadata.json"), "--dataset_dir", str(tiny_set),
                "--output_dir", str(out), "--image_size", "80", "--max_epochs", "1", "--batch_size", "8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "unet" / "seed0.metrics.json").read_text())
    assert 0.0 <= metrics["val_dice"] <= 1.0
    load_weights(get_network("unet"), out / "unet" / "seed0.pt")
    assert ModelFolder.open(out / "unet").kind == "localizer"


@pytest.mark.slow
def test_multi_gpu_train_config_under_torchrun_on_cpu(tiny_set, tmp_path):
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file",
           f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
           "--bundle_root", str(BUNDLE), "--meta_file", str(CONFIGS / "metadata.json"),
           "--dataset_dir", str(tiny_set), "--output_dir", str(out), "--arch", "densenet121",
           "--image_size", "80", "--max_epochs", "1", "--batch_size", "4"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "densenet121" / "seed0.metrics.json").read_text())
    assert 0.0 <= metrics["val_auc"] <= 1.0
    state = torch.load(out / "densenet121" / "seed0.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the plain network, not the DDP wrapper
