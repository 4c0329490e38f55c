"""``make demo-ct``: the four criteria on volumes, on SynthCT chest CT, in one command on the CPU.

SynthCT volumes (:data:`TASK` by default: an airspace consolidation is the only class signal; NIfTI in the
Medical Segmentation Decathlon's layout) at :data:`SIZE`; two replicates of a narrow 3-D DenseNet121, one 3-D
ResNet (the second architecture) and two 3-D U-Net localization networks trained through the bundle's configs
(``train.json`` + ``train_ct.json`` [+ ``train_ct_baseline.json``], classifiers until their validation AUC
reaches ``--stop-auc``, at most a few epochs); then the assessment of the 3-D model folders with the ``quick``
preset, lighter still for two CPU cores (:data:`DEMO_CT_RECIPE`), on :data:`IMAGES` lesion-positive test
volumes, and its report (maps as three orthogonal slices through the lesion and a maximum-intensity projection).
Prints the validation scores, the verdict table, the sanity checks and where the report is; exits 0 unless
something failed.

    python -m saliency_trust.workflows.demo_ct --out demo_ct_out [--task nodule]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saliency_trust.results import Results

#: Lesion-positive test volumes assessed: the 2-D demo's count and reason (``saliency_trust.workflows.demo.IMAGES``:
#: Holm across 8 methods with the exact Wilcoxon needs at least 8).
IMAGES = 12
#: Set before torch is imported (libgomp reads it once): waiting worker threads sleep instead of spinning. On a
#: 2-core machine where another process is busy, spinning made every parallel region wait for a descheduled
#: thread: a 3-D DenseNet121 pass took 634-2177 ms per volume on 2 spinning threads against 44 ms passive and
#: 43 ms on one thread (measured 2026-12-02 beside a running test suite); this demo took 18 min so, 5 min alone.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")

#: The lesion: consolidation (an irregular region of one lung filled to soft-tissue density). Measured at
#: 32 x 64 x 64 with 100 volumes (70 for training), 10 epochs of the narrow DenseNet121: held-out AUC 0.90 for
#: consolidation, 0.50 for nodules (18-30 mm, 3-5 voxels across at this size: too few cases to learn them).
TASK = "consolidation"
#: Volumes (D, H, W): 256 mm x 400 mm x 400 mm at 8 x 6.25 x 6.25 mm. Both classifiers divide every axis by 32,
#: so Grad-CAM reads a 1 x 2 x 2 grid here (the deviations say so); a finer grid needs volumes the CPU
#: cannot train and explain in this demo's time.
SIZE = (32, 64, 64)
#: The HU window of the models (the lung window): CT -> [0, 1].
WINDOW_HU = (-1000.0, 400.0)
#: SynthCT volumes and seed: seed 5's hash split of 140 volumes holds 89 training, 24 validation and 30 test
#: volumes, 14 of them lesion-positive (enough for :data:`IMAGES`; seeds 0-3 need 160 or more volumes for 12).
N, SEED = 140, 5
#: Random partners per volume for the chance levels (the 2-D demo: 20, the paper: 50). Each pair is a 3-D SSIM
#: of two whole volumes; 8 partners x 12 volumes give each method's chance level from 96 pairs.
PAIRS = 8
#: (network of saliency_trust.networks.registry.VOLUME_NETWORKS, seed): two replicates of the primary, one second.
CLASSIFIERS = (("densenet121_3d", 0), ("densenet121_3d", 1), ("resnet10_3d", 0))
LOCALIZER = "unet_3d"
#: The 2-D demo's light recipe, and XRAI on four SLIC levels instead of five (8 to 125 supervoxels: the greedy's
#: host time per volume and state grows with the number of regions; 216 supervoxels of ~600 voxels are finer than
#: the lesions here anyway). Recorded in results.json and in its deviations.
DEMO_CT_RECIPE = {"sg_samples": 3, "sig_samples": 2, "sig_steps": 3, "ig_steps": 5, "xrai_steps": 4,
                  "xrai_volume_segments": [8, 27, 64, 125]}


def train(configs: list[str], **overrides) -> dict:
    """Run ``train.json`` with the override configs ``configs`` on top, in this process; returns the metrics file."""
    from monai.bundle import run

    from saliency_trust.networks.modelfolder import record_file, training_weights
    from saliency_trust.workflows.demo import BUNDLE

    files = [str(BUNDLE / "configs" / "train.json")] + [str(BUNDLE / "configs" / c) for c in configs]
    run(config_file=files, logging_file=str(BUNDLE / "configs" / "logging.conf"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"), bundle_root=str(BUNDLE), **overrides)
    return json.loads(record_file(training_weights(overrides["output_dir"], overrides["arch"],
                                                   overrides["seed"])).read_text())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saliency_trust.workflows.demo_ct", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_ct_out")
    p.add_argument("--task", choices=("consolidation", "nodule"), default=TASK)
    p.add_argument("--n", type=int, default=N, help="SynthCT volumes (about 70/15/15 train/val/test)")
    p.add_argument("--size", type=int, nargs=3, default=list(SIZE), metavar=("D", "H", "W"))
    p.add_argument("--seed", type=int, default=SEED, help="SynthCT seed")
    p.add_argument("--epochs", type=int, default=10, help="DenseNet121: most epochs (training stops at --stop-auc)")
    p.add_argument("--resnet-epochs", type=int, default=20, help="ResNet: most epochs (about a third of the time each)")
    p.add_argument("--stop-auc", type=float, default=0.95)
    p.add_argument("--min-epochs", type=int, default=4)
    p.add_argument("--baseline-epochs", type=int, default=10, help="3-D U-Net epochs")
    p.add_argument("--images", type=int, default=IMAGES,
                   help="lesion-positive test volumes assessed (the rules need at least 8; see demo.IMAGES)")
    p.add_argument("--pairs", type=int, default=PAIRS, help="random pairs per volume for the chance baselines")
    p.add_argument("--min-auc", type=float, default=0.75, help="a classifier below this is reported, not an error")
    p.add_argument("--strict", action="store_true", help="exit 1 when a classifier ends below --min-auc")
    p.add_argument("--skip-assessment", action="store_true", help="data and training only")
    return p


def _train_all(a: argparse.Namespace, data: Path, models: Path) -> list[tuple]:
    """The classifiers and the localization networks; one row per model: arch, seed, metric, value, epochs."""
    common = {"dataset_dir": str(data), "output_dir": str(models), "image_size": list(a.size),
              "window_hu": list(WINDOW_HU)}
    rows = []
    for arch, seed in CLASSIFIERS:
        epochs = a.epochs if arch.startswith("densenet") else a.resnet_epochs
        m = train(["train_ct.json"], arch=arch, seed=seed, max_epochs=epochs, stop_at=a.stop_auc,
                  min_epochs=min(a.min_epochs, epochs), **common)
        rows.append((arch, seed, "val_auc", m["val_auc"], m["epochs_run"]))
    for seed in (0, 1):
        m = train(["train_ct.json", "train_ct_baseline.json"], arch=LOCALIZER, seed=seed,
                  max_epochs=a.baseline_epochs, **common)
        rows.append((LOCALIZER, seed, "val_dice", m["val_dice"], m["epochs_run"]))
    return rows


def assess(data: Path, models: Path, out: Path, a: argparse.Namespace) -> Results:
    """The trust assessment of the 3-D model folders: the primary's first two replicates (one randomized), the
    second architecture's first, the two U-Net replicates; quick preset with :data:`DEMO_CT_RECIPE`."""
    from saliency_trust.workflows.assess import run_assessment

    primary, second = CLASSIFIERS[0][0], CLASSIFIERS[2][0]
    return run_assessment(data, out, [models / primary, models / second], [models / LOCALIZER], preset="quick",
                          n_images=a.images, pairs_per_image=a.pairs, randomize=1, recipe_overrides=DEMO_CT_RECIPE,
                          device="cpu", progress=False)


def _sanity_checks(res: Results) -> dict[str, bool]:
    """What a working pipeline shows on volumes: trained maps localize better than untrained ones."""
    checks = {}
    for meth in ("grad", "xrai"):
        tr = res.utility[meth]["mean"]
        un = res.baselines["utility_untrained"][meth]["mean"]
        checks[f"{meth} trained AUPRC {_f(tr)} > untrained {_f(un)}"] = tr is not None and un is not None and tr > un
    return checks


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run the CT demo; returns 0 unless something failed (``--strict``: also when a classifier misses the bar)."""
    if "torch" not in sys.modules:  # a fresh process (the command line): set it before torch loads
        os.environ.setdefault(*WAIT_POLICY)
    from saliency_trust.data.synthct import generate_ct
    from saliency_trust.workflows.demo import verdict_lines

    a = _parser().parse_args(argv)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    out = Path(a.out)
    t0 = time.time()
    data = out / "data" / a.task / "nifti"
    if not (data / "split.csv").is_file():
        generate_ct(out / "data" / a.task, a.n, task=a.task, size=a.size, seed=a.seed, formats=("nifti",),
                    progress=False)
    timings = {"data_min": (time.time() - t0) / 60}
    models = out / "models" / a.task
    rows = _train_all(a, data, models)
    timings["training_min"] = (time.time() - t0) / 60 - timings["data_min"]
    results, report = None, None
    if not a.skip_assessment:
        results = assess(data, models, out / "trust" / a.task, a)
        report = out / "trust" / a.task / "report.html"
        # Beside the primary's weights, where inference, the service and the Slicer module read the verdicts.
        shutil.copy(out / "trust" / a.task / "results.json", models / CLASSIFIERS[0][0] / "results.json")
    minutes = (time.time() - t0) / 60
    timings["assessment_min"] = minutes - timings["data_min"] - timings["training_min"]
    print(f"\nSaliencyTrust on volumes: SynthCT {a.task}, {a.n} volumes of {' x '.join(map(str, a.size))} voxels, "
          f"window {list(WINDOW_HU)} HU; maps with the quick preset, lighter for CPU: {DEMO_CT_RECIPE}")
    print(f"{'model':<16}{'seed':>5}  {'metric':<9}{'value':>7}{'epochs':>8}")
    for arch, s, metric, v, epochs in rows:
        print(f"{arch:<16}{s:>5}  {metric:<9}{v:>7.3f}{epochs:>8}")
    checks = _sanity_checks(results) if results is not None else {}
    if results is not None:
        print(f"\nVerdicts ({results.n_images} volumes; mean/reference and n used):")
        print("\n".join(verdict_lines(results)))
        print("\n".join(results.usage_lines()))
        print("\nSanity checks:")
        for text, ok in checks.items():
            print(f"  [{'ok' if ok else 'NOT MET'}] {text}")
    print(f"\nfinished in {minutes:.1f} min (data {timings['data_min']:.1f}, training {timings['training_min']:.1f}, "
          f"assessment {timings['assessment_min']:.1f}); models under {models}")
    if report is not None:
        print(f"report: {report.resolve()}")
    summary = {"rows": [dict(zip(("model", "seed", "metric", "value", "epochs"), r, strict=True)) for r in rows],
               "minutes": minutes, **timings, "task": a.task, "size": list(a.size), "n": a.n,
               "window_hu": list(WINDOW_HU), "recipe": DEMO_CT_RECIPE, "checks": checks,
               "report": str(report) if report else None}
    (out / "demo_ct_summary.json").write_text(json.dumps(summary, indent=2))
    low = [r for r in rows if r[2] == "val_auc" and r[3] < a.min_auc]
    if low:
        print(f"NOTE: {len(low)} classifier(s) ended below validation AUC {a.min_auc}: {low}")
        return 1 if a.strict else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
