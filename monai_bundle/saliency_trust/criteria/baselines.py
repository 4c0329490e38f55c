"""Baselines the criteria are read against (Arun et al. section 1.5-1.7 of our protocol notes)."""

from __future__ import annotations

import torch

from saliency_trust.metrics import ssim


def average_mask_prior(masks: torch.Tensor) -> torch.Tensor:
    """The low utility baseline: the mean of the ground-truth masks ``[N, H, W]`` (float64 ``[H, W]``)."""
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, H, W] stack of masks, got {tuple(masks.shape)}")
    return masks.double().mean(0)


def leave_one_out_priors(masks: torch.Tensor) -> torch.Tensor:
    """For each image, the average-mask prior of all the *other* masks (float64 ``[N, H, W]``)."""
    n = masks.shape[0]
    if n < 2:
        raise ValueError("a leave-one-out prior needs at least two masks")
    m = masks.double()
    return (m.sum(0, keepdim=True) - m) / (n - 1)


def random_pair_ssim(maps: torch.Tensor, pairs_per_image: int = 50, data_range: float = 1.0,
                     seed: int = 0) -> torch.Tensor:
    """The randomization baseline: SSIM between maps of *different* images of one model.

    For each image, ``pairs_per_image`` partners are drawn uniformly among the other images (the
    paper's code: 50 random pairs per image). Returns the ``N * pairs_per_image`` SSIM values.
    """
    n = maps.shape[0]
    if n < 2:
        raise ValueError("random-pair SSIM needs at least two maps")
    g = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, n - 1, (n, pairs_per_image), generator=g)
    partner = partner + (partner >= torch.arange(n)[:, None]).long()  # skip the image itself
    first = torch.arange(n).repeat_interleave(pairs_per_image)
    second = partner.reshape(-1).to(maps.device)
    return ssim(maps[first.to(maps.device)], maps[second], data_range=data_range)
