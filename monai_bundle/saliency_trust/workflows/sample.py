"""First-run material made on this computer: a SynthCXR DICOM study and small untrained fixture models.

``--study DIR`` writes one lesion-positive SynthCXR radiograph (320 px, the paper's input size)
as a DICOM study (its own patient, study and series UIDs) and prints the file's path: the Slicer
module's SampleData entry loads it. ``--fixture-models DIR`` writes a model folder
``DIR/densenet121`` of two seeded, *untrained* DenseNet121 replicates at 64 px with their
training records (marked untrained) and its ``model.json``, so the Slicer module's self-test can
run the whole bundle path in seconds without training. Neither downloads anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saliency_trust.data.dicom import write_dicom
from saliency_trust.data.synth import FIELD_OF_VIEW_MM, render, stable_uid

#: Seed of the sample (image 0 of that seed, rendered lesion-positive).
SAMPLE_SEED = 7


def make_study(out: str | Path, task: str = "opacity", size: int = 320, seed: int = SAMPLE_SEED) -> Path:
    """One lesion-positive SynthCXR radiograph as a DICOM study under ``out``; returns the file."""
    index = 0
    case = render(task, index, size, seed, positive=True)
    study, series, sop = (stable_uid("synthcxr-sample", task, seed, size, k) for k in ("study", "series", "sop"))
    spacing = FIELD_OF_VIEW_MM / size
    path = Path(out) / "SynthCXR-study" / f"{sop}.dcm"
    write_dicom(path, case.pixels, patient_id=f"SynthCXR-sample-{task}", study_uid=study, series_uid=series,
                sop_uid=sop, pixel_spacing=(spacing, spacing), bits_stored=12,
                description=f"SynthCXR {task} sample (synthetic, not a patient)")
    return path


def make_fixture_models(out: str | Path, size: int = 64, seeds: tuple[int, ...] = (0, 1),
                        arch: str = "densenet121") -> Path:
    """A model folder ``out/<arch>`` of seeded untrained replicates, laid out as training writes it
    (``model.json``, weights, records marked ``untrained: true``); returns the model folder."""
    import torch

    from saliency_trust.data.imageio import atomic_write_bytes
    from saliency_trust.networks import get_network
    from saliency_trust.networks.modelfolder import record_file, training_weights, write_training_manifest
    from saliency_trust.workflows.train import atomic_save_state

    for seed in seeds:
        torch.manual_seed(seed)
        net = get_network(arch, num_classes=2)
        weights = Path(training_weights(out, arch, seed))
        sha = atomic_save_state(net, weights)
        record = {"arch": arch, "seed": seed, "image_size": size, "task": "lung opacity", "untrained": True,
                  "sha256": sha, "model_file": weights.name}
        atomic_write_bytes(record_file(weights), json.dumps(record, indent=2).encode())
        write_training_manifest(weights.parent, arch, seed, size, task="lung opacity")
    return Path(out) / arch


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--study DIR`` and / or ``--fixture-models DIR``."""
    p = argparse.ArgumentParser(prog="python -m saliency_trust.workflows.sample", description=__doc__.splitlines()[0])
    p.add_argument("--study", help="write a SynthCXR DICOM study here and print its file")
    p.add_argument("--task", default="opacity", choices=("opacity", "pneumothorax"))
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--seed", type=int, default=SAMPLE_SEED)
    p.add_argument("--fixture-models", help="write a model folder of two untrained 64 px DenseNet121 replicates here")
    a = p.parse_args(argv)
    if not a.study and not a.fixture_models:
        p.error("give --study and / or --fixture-models")
    if a.study:
        print(make_study(a.study, a.task, a.size, a.seed))
    if a.fixture_models:
        print(make_fixture_models(a.fixture_models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
