"""Localization utility: per-image AUPRC of each map against its ground truth, degenerate cases counted."""

from __future__ import annotations

import torch

from saliency_trust.metrics import auprc
from saliency_trust.saliency.postprocess import degenerate


def utility_scores(maps: torch.Tensor, masks: torch.Tensor, mode: str = "trapezoid") -> dict:
    """AUPRC per image (``[N]`` float64) with the reasons any image cannot be scored.

    ``empty_mask`` (no positive pixel: AUPRC undefined, NaN) and ``constant_map`` (no ranking: its
    AUPRC equals the prevalence-based floor, kept but flagged) are counted, never hidden.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    scores = auprc(maps, masks, mode=mode)
    empty = ~masks.flatten(1).any(1)
    constant = degenerate(maps) & ~empty
    return {
        "auprc": scores,
        "empty_mask": int(empty.sum()),
        "constant_map": int(constant.sum()),
        "constant_map_index": torch.nonzero(constant).flatten().tolist(),
    }
