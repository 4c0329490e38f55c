"""The README's Python example runs as written (on a small SynthCXR set and untrained weights)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch
from saliency_trust.data.synth import generate
from saliency_trust.networks import get_network
from saliency_trust.networks.manifest import write_training_manifest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one Python example"
    return blocks[0]


def test_readme_example_runs_and_prints_one_auprc_per_method(tmp_path, monkeypatch):
    code = _example()
    assert len(code.strip().splitlines()) <= 12, "the example is meant to be about ten lines"
    generate(tmp_path / "demo_out" / "data" / "opacity", "opacity", n=12, size=112, seed=0)
    models = tmp_path / "demo_out" / "models" / "opacity" / "densenet121"  # the model folder make demo writes
    models.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(get_network("densenet121").state_dict(), models / "seed0.pt")
    write_training_manifest(models, "densenet121", 0, 112, task="lung opacity")  # as train.json writes it
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().split("\n")
    rows = [line.split() for line in lines if line.strip()]
    assert [r[0] for r in rows] == ["gradcam", "xrai"], out.getvalue()
    for _, value in rows:
        assert 0.0 <= float(value) <= 1.0
