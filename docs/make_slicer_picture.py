"""The README's Slicer picture: a real MRML scene rendered by Slicer's own slice logic, offscreen.

    .venv/bin/python docs/make_slicer_picture.py [--models demo_out/models/opacity/densenet121]
        [--out docs/slicer_overlay.png]

A 320 px SynthCXR DICOM study made by the bundle (``saliency_trust.workflows.sample``) is read by
Slicer's volume storage node into a ``slicer-core`` scene; the module's library runs the bundle
on it with the models ``make demo`` trained, loads the maps and the trust table into the scene
exactly as in Slicer, and ``render_slice`` draws the slice view (``vtkMRMLSliceLogic``: the same
reslice, colour mapping, threshold transparency and layer blending a Slicer view shows). The
picture sets that view beside the module's table as the panel shows it (its column titles).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SaliencyTrust"))


def main(argv: list[str] | None = None) -> int:
    """Make the picture; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=str(REPO / "demo_out" / "models" / "opacity" / "densenet121"),
                   help="a model folder")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--seed", type=int, default=10,
                   help="SynthCXR sample seed (10: a positive image the demo's opacity model detects)")
    p.add_argument("--out", default=str(REPO / "docs" / "slicer_overlay.png"))
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    import slicer
    from SaliencyTrustLib import controller
    from SaliencyTrustLib import logic as L

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    for name in ("Red", "Yellow", "Green"):
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    work = Path(tempfile.mkdtemp(prefix="slicer-picture-"))
    bundle = REPO / "monai_bundle"
    study = L.make_sample_study(bundle, work / "study", python=sys.executable, seed=a.seed)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SynthCXR sample")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(study))
    storage.SetSingleFile(True)
    if not storage.ReadData(volume):
        raise SystemExit(f"could not read {study}")
    req = L.Request(bundle_dir=str(bundle), model_dir=str(a.models), methods=L.METHODS,
                    preset="quick", device="cpu", python=sys.executable)
    res = L.run_local(scene, volume, req, work / "run", timeout=1800)
    controller.show_method(scene, res, a.method, 0.6)
    picture = L.render_slice(scene, volume, res.map_nodes[a.method], 0.6, size=512)

    table = res.table_node
    cols = ["method", "trust", *L.CRITERIA, "repeatability_here_ssim", "randomization_here_ssim"]
    import textwrap

    t = table.GetTable()
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    def cell(text: str, c: str) -> str:
        return "\n".join(textwrap.wrap(text, 38)) if c == "trust" else text

    rows = [[cell(t.GetValue(r, names.index(c)).ToString(), c) for c in cols] for r in range(t.GetNumberOfRows())]
    short = {"repeatability_here_ssim": "This image:\nSSIM to the\nother copy",
             "randomization_here_ssim": "This image:\nSSIM to a\nrandom net"}
    headers = [short.get(c, "\n".join(textwrap.wrap(table.GetColumnTitle(c), 13))) for c in cols]

    fig = plt.figure(figsize=(15, 6.2))
    ax = fig.add_axes((0.0, 0.06, 0.36, 0.86))
    ax.imshow(picture)
    ax.set_title(f"{L.METHOD_NAMES[a.method]} over the radiograph\n(Slicer slice view, offscreen; below "
                 f"{L.OVERLAY_FLOOR} transparent)", fontsize=9)
    ax.axis("off")
    cax = fig.add_axes((0.365, 0.2, 0.01, 0.6))
    grad = np.linspace(1, 0, 256)[:, None]
    lut = L.perceptual_color_node(scene).GetLookupTable()
    cax.imshow(np.array([[lut.GetTableValue(int(v * 255))[:3]] for v in grad[:, 0]]), aspect="auto",
               extent=(0, 1, 0, 1))
    cax.set_xticks([])
    cax.yaxis.tick_right()
    cax.set_yticks([0, L.OVERLAY_FLOOR, 0.5, 1])
    cax.set_title("saliency", fontsize=8)
    bx = fig.add_axes((0.41, 0.06, 0.58, 0.72))
    tb = bx.table(cellText=rows, colLabels=headers, loc="upper center", cellLoc="center",
                  colWidths=[0.13, 0.25, 0.085, 0.1, 0.09, 0.09, 0.085, 0.085])
    tb.auto_set_font_size(False)
    tb.set_fontsize(7)
    for (i, _j), box in tb.get_celld().items():
        text = box.get_text().get_text()
        box.set_height(0.105 if i == 0 else 0.085)
        if i == 0:
            box.set_facecolor("#eeeeee")
        elif text.startswith(("FAIL", "Fails")):
            box.set_facecolor("#f9dcdc")
        elif text in ("pass", "Passes all four"):
            box.set_facecolor("#dcf2dc")
    bx.axis("off")
    lines = [L.RESEARCH_ONLY, res.summary(), res.assessment_line()]
    if res.banner():
        lines += textwrap.wrap(res.banner(), 150)
    fig.text(0.41, 0.985, "\n".join(lines), fontsize=7.5, va="top")
    fig.text(0.41, 0.02, "pass = met on the assessment data; FAIL = not met; n/a = could not be judged (never a pass)."
             " Column headers as in the module; hover text there gives each rule.", fontsize=7.5)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
