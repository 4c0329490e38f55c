"""Localization utility: per-image AUPRC of each map against its ground truth, degenerate cases counted."""

from __future__ import annotations

import torch

from saliency_trust.metrics import auprc
from saliency_trust.saliency.postprocess import degenerate


def utility_scores(maps: torch.Tensor, masks: torch.Tensor, mode: str = "trapezoid") -> dict:
    """AUPRC per image (``[N]`` float64, NaN where undefined) with the reasons, counted.

    ``empty_mask`` (no positive pixel) and ``constant_map`` (a blank map has no ranking: the
    trapezoid from the (0, 1) start point would give it about (1 + prevalence) / 2) are both
    undefined, NaN, as in the paper (its min-max normalization made blank maps NaN and they were
    dropped); they never enter a mean, a CI or a test.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    empty = ~masks.flatten(1).any(1)
    constant = degenerate(maps) & ~empty
    scores = torch.where(constant.to(maps.device), torch.nan, auprc(maps, masks, mode=mode))
    return {
        "auprc": scores,
        "empty_mask": int(empty.sum()),
        "constant_map": int(constant.sum()),
        "constant_map_index": torch.nonzero(constant).flatten().tolist(),
    }
