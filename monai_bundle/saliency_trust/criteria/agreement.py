"""Repeatability (replicates of one architecture) and reproducibility (two architectures): map SSIM."""

from __future__ import annotations

import torch

from saliency_trust.metrics import ssim


def map_agreement(maps_a: dict[str, torch.Tensor], maps_b: dict[str, torch.Tensor],
                  data_range: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image SSIM between two models' maps of the same images, for every method both have."""
    common = [m for m in maps_a if m in maps_b]
    if not common:
        raise ValueError("the two map sets share no method")
    return {m: ssim(maps_a[m], maps_b[m], data_range=data_range) for m in common}


def output_agreement(outputs_a: torch.Tensor, outputs_b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The baseline for both criteria: SSIM between two localization-network replicates' outputs."""
    return ssim(outputs_a, outputs_b, data_range=data_range)
