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
