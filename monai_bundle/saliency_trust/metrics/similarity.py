"""Map-to-map similarity, batched on the device, on 2-D maps and 3-D volumes: SSIM equal to scikit-image's,
and Spearman."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _spatial_dims(ndim: int, spatial_dims: int | None) -> tuple[int, bool]:
    """(spatial dims, batched) of a ``ndim``-dimensional input; see :func:`ssim`."""
    if spatial_dims is None:
        if ndim not in (2, 3, 4):
            raise ValueError(f"SSIM takes [H, W], [B, H, W] or [B, D, H, W] maps, got {ndim} dimensions")
        return (2, ndim == 3) if ndim < 4 else (3, True)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if ndim not in (spatial_dims, spatial_dims + 1):
        raise ValueError(f"{ndim}-dimensional input is neither one {spatial_dims}-D map nor a batch of them")
    return spatial_dims, ndim == spatial_dims + 1


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float | torch.Tensor,
    *,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
    use_sample_covariance: bool = True,
    dtype: torch.dtype = torch.float64,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Mean SSIM per pair of maps or volumes, equal to ``skimage.metrics.structural_similarity``.

    Same definition as scikit-image's defaults on 2-D and 3-D arrays: a uniform ``win_size``
    window (win_size² pixels or win_size³ voxels), sample covariance
    (x NP/(NP-1)), and the mean over the positions whose window lies inside the map (a valid
    pooling is exactly skimage's border crop). ``data_range`` is required: 1.0 for maps in
    [0, 1]; the paper's skimage<=0.19 silently used 2.0 for floats (``paper`` settings).

    Shapes: ``[H, W]`` (one map), ``[B, H, W]`` (a batch of maps), ``[B, D, H, W]`` (a batch of
    volumes); ``spatial_dims=3`` reads a 3-D input as one ``[D, H, W]`` volume. Every spatial side
    must be at least ``win_size`` (scikit-image's rule). Returns float64 ``[B]`` (a scalar for one
    map); a pair of constant equal maps gives 1, never NaN.
    """
    if data_range is None:
        raise ValueError("data_range must be given explicitly (1.0 for [0, 1] maps; the paper's skimage used 2.0)")
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    nd, batched = _spatial_dims(a.ndim, spatial_dims)
    if not batched:
        return ssim(a[None], b[None], data_range, win_size=win_size, k1=k1, k2=k2,
                    use_sample_covariance=use_sample_covariance, dtype=dtype, spatial_dims=nd)[0]
    if win_size % 2 == 0 or win_size < 1:
        raise ValueError(f"win_size must be odd and positive (scikit-image's rule), got {win_size}")
    if min(a.shape[-nd:]) < win_size:
        window = "x".join([str(win_size)] * nd)
        raise ValueError(f"maps of {tuple(a.shape[-nd:])} are smaller than the {window} window "
                         f"(every side must be at least {win_size})")
    x = a.to(dtype)[:, None]
    y = b.to(dtype)[:, None]
    # Valid uniform-window means: avg_pool divides by win_size**nd like scipy's uniform_filter. On volumes the
    # window runs one axis at a time as a sum of shifted views (the same mean to ~1e-15 in float64, about a
    # seventh of avg_pool3d's time on the CPU: 21 adds per voxel instead of 343).
    stats = torch.cat([x, y, x * x, y * y, x * y], 1)
    stats = F.avg_pool2d(stats, win_size, stride=1) if nd == 2 else _box_mean(stats, win_size, (2, 3, 4))
    ux, uy, uxx, uyy, uxy = stats.unbind(1)
    n = win_size**nd
    cov = n / (n - 1) if use_sample_covariance else 1.0
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    r = torch.as_tensor(data_range, dtype=dtype, device=x.device).reshape(-1, *([1] * nd))
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def _box_mean(x: torch.Tensor, win_size: int, dims: tuple[int, ...]) -> torch.Tensor:
    """The mean over every valid ``win_size`` window along each of ``dims`` in turn (a separable uniform filter
    without padding: each dimension shrinks by ``win_size - 1``)."""
    for dim in dims:
        n = x.shape[dim] - win_size + 1
        acc = x.narrow(dim, 0, n).clone()
        for shift in range(1, win_size):
            acc += x.narrow(dim, shift, n)
        x = acc / win_size
    return x


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
    """Spearman rank correlation per pair of maps or volumes (flattened), float64 ``[B]``; NaN for a constant map."""
    ra = average_ranks(a.flatten(1).double())
    rb = average_ranks(b.flatten(1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
