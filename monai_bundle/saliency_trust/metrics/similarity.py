"""Map-to-map similarity, batched on the device: SSIM equal to scikit-image's, and Spearman."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float | torch.Tensor,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    use_sample_covariance: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Mean SSIM per pair of ``[B, H, W]`` maps, equal to ``skimage.metrics.structural_similarity``.

    Same definition as scikit-image's defaults: a uniform ``win_size`` window, sample covariance
    (x NP/(NP-1)), and the mean over the pixels whose window lies inside the image (a valid
    convolution is exactly skimage's border crop). ``data_range`` is required: 1.0 for maps in
    [0, 1]; the paper's skimage<=0.19 silently used 2.0 for floats (``paper`` settings).
    Returns float64 ``[B]``; a pair of constant equal maps gives 1, never NaN.
    """
    if data_range is None:
        raise ValueError("data_range must be given explicitly (1.0 for [0, 1] maps; the paper's skimage used 2.0)")
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 2:
        return ssim(a[None], b[None], data_range, win_size, k1, k2, use_sample_covariance, dtype)[0]
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"maps of {tuple(a.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    x = a.to(dtype)[:, None]
    y = b.to(dtype)[:, None]
    # Valid uniform-window means: avg_pool2d divides by win_size**2 like scipy's uniform_filter.
    stats = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], 1), win_size, stride=1)
    ux, uy, uxx, uyy, uxy = stats.unbind(1)
    n = win_size**2
    cov = n / (n - 1) if use_sample_covariance else 1.0
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    r = torch.as_tensor(data_range, dtype=dtype, device=x.device).reshape(-1, 1, 1)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) along the last axis with ties averaged, as ``scipy.stats.rankdata``."""
    flat = v.reshape(-1, v.shape[-1])
    B, N = flat.shape
    sorted_v, order = torch.sort(flat, dim=1, stable=True)
    new_run = torch.ones_like(sorted_v, dtype=torch.bool)
    new_run[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    run_id = torch.cumsum(new_run.long(), 1) - 1
    pos = torch.arange(N, device=v.device, dtype=torch.float64).expand(B, N)
    first = torch.full((B, N), float(N), dtype=torch.float64, device=v.device).scatter_reduce(
        1, run_id, pos, reduce="amin")
    last = torch.zeros((B, N), dtype=torch.float64, device=v.device).scatter_reduce(1, run_id, pos, reduce="amax")
    avg = (first.gather(1, run_id) + last.gather(1, run_id)) / 2 + 1
    ranks = torch.empty_like(avg).scatter_(1, order, avg)
    return ranks.reshape(v.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per pair of maps (flattened), float64 ``[B]``; NaN for a constant map."""
    ra = average_ranks(a.flatten(1).double())
    rb = average_ranks(b.flatten(1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
