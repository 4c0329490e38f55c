"""Repeatability (replicates of one architecture) and reproducibility (two architectures): map SSIM.

A blank map (constant after post-processing, e.g. an all-zero Grad-CAM) has no structure to
compare: SSIM against it is undefined (NaN, counted by the caller), as in the paper, whose
min-max normalization turned such maps into NaN that were then dropped.
"""

from __future__ import annotations

import torch

from saliency_trust.metrics import ssim
from saliency_trust.saliency.postprocess import degenerate


def blank(maps: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: maps with no ranking (constant, NaN or infinite); their scores are undefined."""
    return degenerate(maps)


def defined_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-pair SSIM (float64 ``[B]``), NaN where either map is blank."""
    s = ssim(a, b, data_range=data_range)
    return torch.where(blank(a).to(s.device) | blank(b).to(s.device), torch.nan, s)


def map_agreement(maps_a: dict[str, torch.Tensor], maps_b: dict[str, torch.Tensor],
                  data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image SSIM between two models' maps of the same images, for every method both have (NaN: blank)."""
    common = [m for m in maps_a if m in maps_b]
    if not common:
        raise ValueError("the two map sets share no method")
    return {m: defined_ssim(maps_a[m], maps_b[m], data_range) for m in common}


def output_agreement(outputs_a: torch.Tensor, outputs_b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The paper's baseline for both criteria: SSIM between two localization-network replicates' outputs."""
    return defined_ssim(outputs_a, outputs_b, data_range)
