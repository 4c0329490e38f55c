"""Baselines the criteria are read against (Arun et al. section 1.5-1.7 of our protocol notes)."""

from __future__ import annotations

import torch

#: The most map elements (pixels or voxels over all pairs) one SSIM call of :func:`random_pair_ssim` compares.
SSIM_CHUNK = 2**23


def average_mask_prior(masks: torch.Tensor) -> torch.Tensor:
    """The low utility baseline: the mean of the ground-truth masks ``[N, H, W]`` (float64 ``[H, W]``), or of
    voxel masks ``[N, D, H, W]`` (float64 ``[D, H, W]``): per voxel, the share of masks that cover it."""
    if masks.ndim not in (3, 4) or masks.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, H, W] or [N, D, H, W] stack of masks, got {tuple(masks.shape)}")
    return masks.double().mean(0)


def leave_one_out_priors(masks: torch.Tensor) -> torch.Tensor:
    """For each image (or volume), the average-mask prior of all the *other* masks (float64, the masks' shape)."""
    n = masks.shape[0]
    if masks.ndim not in (3, 4):
        raise ValueError(f"expected an [N, H, W] or [N, D, H, W] stack of masks, got {tuple(masks.shape)}")
    if n < 2:
        raise ValueError("a leave-one-out prior needs at least two masks")
    m = masks.double()
    return (m.sum(0, keepdim=True) - m) / (n - 1)


def random_pair_ssim(maps: torch.Tensor, pairs_per_image: int = 50, *, data_range: float = 1.0,
                     seed: int = 0, other: torch.Tensor | None = None) -> torch.Tensor:
    """Chance level: SSIM between maps of *different* images (the paper's randomization baseline).

    For each image i, ``pairs_per_image`` partners j != i are drawn uniformly (the paper's code: 50
    random pairs per image); the pair is ``(maps[i], other[j])``, ``other`` defaulting to ``maps``
    (for agreement between two models, ``other`` is the second model's maps). Returns the
    ``N * pairs_per_image`` values grouped by image (image i's pairs at ``i * pairs_per_image``
    onwards); a pair with a blank map is NaN.
    """
    from saliency_trust.criteria.agreement import defined_ssim

    n = maps.shape[0]
    if n < 2:
        raise ValueError("random-pair SSIM needs at least two maps")
    other = maps if other is None else other
    if other.shape != maps.shape:
        raise ValueError(f"map sets differ in shape: {tuple(maps.shape)} and {tuple(other.shape)}")
    g = torch.Generator().manual_seed(seed)
    partner = torch.randint(0, n - 1, (n, pairs_per_image), generator=g)
    partner = partner + (partner >= torch.arange(n)[:, None]).long()  # skip the image itself
    first = torch.arange(n).repeat_interleave(pairs_per_image).to(maps.device)
    second = partner.reshape(-1).to(maps.device)
    # Pairs in chunks of at most SSIM_CHUNK elements: the copies of a chunk's maps and SSIM's five statistics
    # stay bounded (12 volumes of 32 x 64 x 64 with 20 pairs each would be 1.3 GB of statistics at once).
    step = max(1, SSIM_CHUNK // max(1, maps[0].numel()))
    if first.numel() <= step:
        return defined_ssim(maps[first], other[second], data_range)
    return torch.cat([defined_ssim(maps[first[i : i + step]], other[second[i : i + step]], data_range)
                      for i in range(0, first.numel(), step)])


def per_image_chance(pair_values: torch.Tensor, n_images: int) -> torch.Tensor:
    """Each image's mean over its random pairs (NaN pairs ignored), float64 ``[N]``: paired with its own score."""
    return pair_values.double().reshape(n_images, -1).nanmean(1)
