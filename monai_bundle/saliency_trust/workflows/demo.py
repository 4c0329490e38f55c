"""``make demo``: SynthCXR for both tasks, then the classifiers and the localization baseline, trained
through the bundle's own configs on the quick CPU profile; prints the validation AUCs.

    python -m saliency_trust.workflows.demo --out demo_out [--n 400] [--size 112] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from saliency_trust.data.synth import generate

BUNDLE = Path(__file__).resolve().parents[2]  # monai_bundle/
#: (task, generator seed); each task gets its own classifiers and localization network.
TASKS = (("opacity", 0), ("pneumothorax", 1))
#: (architecture, seed): two InceptionV3 replicates and one DenseNet121, as the paper.
CLASSIFIERS = (("inception_v3", 0), ("inception_v3", 1), ("densenet121", 0))


def train(config: str, **overrides) -> dict:
    """Run one bundle training config in this process; returns its metrics file's content."""
    from monai.bundle import run

    cfg = BUNDLE / "configs" / config
    run(config_file=str(cfg), logging_file=str(BUNDLE / "configs" / "logging.conf"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"), bundle_root=str(BUNDLE), **overrides)
    arch, seed = overrides.get("arch", "unet"), overrides["seed"]
    metrics = Path(overrides["output_dir"]) / f"{arch}_seed{seed}.metrics.json"
    return json.loads(metrics.read_text())


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a non-zero exit code when a classifier misses the AUC bar."""
    p = argparse.ArgumentParser(prog="python -m saliency_trust.workflows.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--n", type=int, default=360, help="images per task")
    p.add_argument("--size", type=int, default=112, help="image size (quick profile)")
    p.add_argument("--epochs", type=int, default=6, help="InceptionV3 epochs")
    p.add_argument("--densenet-epochs", type=int, default=4, help="DenseNet121 converges faster")
    p.add_argument("--baseline-epochs", type=int, default=16, help="U-Net epochs (about 3 s each here)")
    p.add_argument("--min-auc", type=float, default=0.90)
    a = p.parse_args(argv)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    out = Path(a.out)
    t0 = time.time()
    rows = []
    for task, seed in TASKS:
        data = out / "data" / task
        if not (data / "split.csv").is_file():
            generate(data, task, n=a.n, size=a.size, seed=seed)
        models = out / "models" / task
        common = {"dataset_dir": str(data), "output_dir": str(models), "image_size": a.size}
        for arch, s in CLASSIFIERS:
            epochs = a.densenet_epochs if arch == "densenet121" else a.epochs
            m = train("train.json", arch=arch, seed=s, max_epochs=epochs, learning_rate=0.001, **common)
            rows.append((task, arch, s, "val_auc", m["val_auc"]))
        m = train("train_baseline.json", seed=0, max_epochs=a.baseline_epochs, **common)
        rows.append((task, "unet", 0, "val_dice", m["val_dice"]))
    minutes = (time.time() - t0) / 60
    print("\nSaliencyTrust demo: validation scores on SynthCXR (quick profile, "
          f"{a.size} px, {a.n} images per task)")
    print(f"{'task':<14}{'model':<14}{'seed':>5}  {'metric':<9}{'value':>7}")
    for task, arch, s, metric, v in rows:
        print(f"{task:<14}{arch:<14}{s:>5}  {metric:<9}{v:>7.3f}")
    print(f"finished in {minutes:.1f} min; models and metrics under {out / 'models'}")
    summary = {"rows": [dict(zip(("task", "model", "seed", "metric", "value"), r, strict=True)) for r in rows],
               "minutes": minutes, "size": a.size, "n": a.n, "epochs": a.epochs,
               "densenet_epochs": a.densenet_epochs, "baseline_epochs": a.baseline_epochs}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    low = [r for r in rows if r[3] == "val_auc" and r[4] < a.min_auc]
    if low:
        print(f"WARNING: {len(low)} classifier(s) below validation AUC {a.min_auc}: {low}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
