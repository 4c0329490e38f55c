"""What the demo prints while it trains (condensed), and a stand-in for it that prints the same and writes models."""

from __future__ import annotations

import textwrap
from pathlib import Path

# A condensed copy of what `python -m saliency_trust.workflows.demo --tasks pneumothorax --no-shortcut` prints
# (tiny settings): the bundle's input summary per training, the training helper's epoch lines, the best line.
DEMO_LINES = [
    "SynthCXR pneumothorax:  50%|#####     | 24/48",
    *[line for arch, seed, cap, metric in (("densenet121", 0, 4, "auc"), ("densenet121", 1, 4, "auc"),
                                           ("inception_v3", 0, 6, "auc"), (None, 0, 16, "dice"),
                                           (None, 1, 16, "dice"))
      for line in ("2026-12-02 11:31:26,697 - INFO - --- input summary of monai.bundle.scripts.run ---",
                   *([f"2026-12-02 11:31:26,697 - INFO - > arch: '{arch}'"] if arch else []),
                   f"2026-12-02 11:31:26,697 - INFO - > seed: {seed}",
                   f"2026-12-02 11:31:26,697 - INFO - > max_epochs: {cap}",
                   *(f"2026-12-02 11:31:29,789 - saliency_trust.workflows.train - INFO - epoch {e}: val_{metric} = "
                     f"0.6667 (best 0.6667 at epoch 1)" for e in range(1, cap + 1)),
                   f"        best val_{metric} 0.6667 at epoch 1 -> /x/models/pneumothorax/m/seed{seed}.pt")],
]


def fake_demo(tmp_path: Path, fixture: Path, exit_code: int, write_models: bool) -> str:
    """A script that prints the demo's lines (pausing half way), copies ``fixture`` in as the trained
    DenseNet121 folder when ``write_models``, warns of a low AUC and exits with ``exit_code``."""
    script = tmp_path / "fake_demo.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, sys, time
        from pathlib import Path
        lines = {DEMO_LINES!r}
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        for k, line in enumerate(lines):
            print(line, flush=True)
            if k == len(lines) // 2:
                time.sleep(1.0)
        if {write_models!r}:
            # Written now, as training writes them (copy, not copy2: the files get this run's times).
            shutil.copytree({str(fixture)!r}, out / "models" / "opacity" / "densenet121", copy_function=shutil.copy)
        print("WARNING: 1 classifier(s) below validation AUC 0.9: [('opacity', 'densenet121', 0, 'val_auc', 0.61)]")
        sys.exit({exit_code})
        """))
    return str(script)


