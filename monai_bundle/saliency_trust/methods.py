"""The eight saliency methods of the paper, in one table (standard library only).

Every name, label and pass count elsewhere derives from :data:`TABLE`: the engine's ``explain``
(which builds each map from the entry's ``builds`` rule), the recipes' pass counts, the report's
labels and the Slicer module's names (the module loads this file by path, without torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One saliency method: its key, the label people read, and how its map is made.

    ``passes`` names the recipe fields whose product is the number of forward + input-gradient
    passes per image (``()``: one plain or guided pass, shared with the methods of the same
    ``shared_pass``); ``builds`` says in one line how the map is built, for the docs and the report.
    """

    key: str
    label: str
    builds: str
    passes: tuple[str, ...] = ()
    shared_pass: str | None = None
    factor: int = 1


TABLE: tuple[Method, ...] = (
    Method("grad", "Gradient", "input gradient of the class logit", shared_pass="plain"),
    Method("sg", "SmoothGrad", "mean squared input gradient over noisy copies", ("sg_samples",)),
    Method("ig", "Integrated Gradients", "path integral of gradients from a black baseline", ("ig_steps",)),
    Method("sig", "SmoothGrad-IG", "SmoothGrad over Integrated Gradients runs", ("sig_samples", "sig_steps")),
    Method("gradcam", "Grad-CAM", "gradient-weighted last conv features, ReLU, upsampled", shared_pass="plain"),
    Method("gbp", "Guided Backprop", "input gradient through guided ReLUs", shared_pass="guided"),
    Method("ggcam", "Guided Grad-CAM", "visualized Guided Backprop x visualized Grad-CAM",
           shared_pass="guided+plain"),
    Method("xrai", "XRAI", "IG from min and max baselines, ranked over segments", ("xrai_steps",), factor=2),
)

METHODS: tuple[str, ...] = tuple(m.key for m in TABLE)
BY_KEY: Mapping[str, Method] = {m.key: m for m in TABLE}
LABELS: Mapping[str, str] = {m.key: m.label for m in TABLE}


def passes_per_image(recipe: Any, methods: tuple[str, ...] | list[str] = METHODS) -> int:
    """Forward + input-gradient passes per image and model state for ``methods`` under ``recipe``.

    The plain pass (gradient, Grad-CAM) and the guided pass (GBP) are each run once for every
    method that needs them; Guided Grad-CAM needs both.
    """
    chosen = [BY_KEY[m] for m in dict.fromkeys(methods)]
    shared: set[str] = set()
    n = 0
    for m in chosen:
        if m.shared_pass is not None:
            shared.update(m.shared_pass.split("+"))
            continue
        count = m.factor
        for field in m.passes:
            count *= int(getattr(recipe, field))
        n += count
    return n + len(shared)
