"""Post-processing every map the way the paper did, batched on the device, per image over all its pixels or voxels.

``visualize_grayscale`` is PAIR's ``VisualizeImageGrayscale``: sum of |attribution| over
channels, ``vmin`` = the map's minimum, ``vmax`` = its ``percentile`` (linear interpolation,
as ``np.percentile``), ``clip((m - vmin) / (vmax - vmin), 0, 1)``. The paper's scoring helper
then min-max normalizes again. A map whose ``vmax == vmin`` (constant, or flat up to the
percentile) has no ranking information: it becomes all zeros and is reported by
:func:`degenerate` rather than turning into NaN.

On volumes the same rules run per image over all its voxels (``spatial_dims=3``: attributions
``[B, C, D, H, W]`` or ``[B, D, H, W]``, maps ``[B, D, H, W]``); the percentile is the volume's.
"""

from __future__ import annotations

import torch

#: ``torch.quantile`` refuses inputs with more elements than this; bigger batches go image by image.
_QUANTILE_LIMIT = 2**24


def _to_maps(attr: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if attr.ndim == spatial_dims + 2:
        return attr.abs().sum(1)
    if attr.ndim == spatial_dims + 1:
        return attr.abs()
    names = ("[B, C, H, W] or [B, H, W]" if spatial_dims == 2 else "[B, C, D, H, W] or [B, D, H, W]")
    raise ValueError(f"expected {names} attributions, got {tuple(attr.shape)}")


def _per_image(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[B]`` values shaped to broadcast over ``m``'s ``[B, ...]`` maps."""
    return v.view(-1, *([1] * (m.ndim - 1)))


def row_quantile(flat: torch.Tensor, q: float, limit: int = _QUANTILE_LIMIT) -> torch.Tensor:
    """``torch.quantile(flat, q, dim=1)`` (linear interpolation) for ``[B, N]`` of any size.

    One batched call when it fits ``torch.quantile``'s size limit (the 2-D case, bit for bit what
    it always was); otherwise image by image, and rows still over the limit (volumes of more than
    2**24 voxels) by two ``kthvalue`` calls and the same linear interpolation.
    """
    if flat.numel() <= limit:
        return torch.quantile(flat, q, dim=1, interpolation="linear")
    out = []
    for row in flat:
        if row.numel() <= limit:
            out.append(torch.quantile(row, q, interpolation="linear"))
            continue
        pos = q * (row.numel() - 1)
        lo_i = int(pos // 1)
        hi_i = min(lo_i + 1, row.numel() - 1)
        lo = row.kthvalue(lo_i + 1).values
        hi = row.kthvalue(hi_i + 1).values
        out.append(torch.lerp(lo, hi, torch.as_tensor(pos - lo_i, dtype=row.dtype, device=row.device)))
    return torch.stack(out)


def visualize_grayscale(attr: torch.Tensor, percentile: float = 99.0, *, spatial_dims: int = 2) -> torch.Tensor:
    """PAIR's grayscale visualization, per image, in float64; ``[B, H, W]`` (or ``[B, D, H, W]``) in [0, 1]."""
    m = _to_maps(attr, spatial_dims).double()
    flat = m.flatten(1)
    vmax = row_quantile(flat, percentile / 100.0)
    vmin = flat.min(1).values
    span = _per_image(vmax - vmin, m)
    ok = span > 0
    out = torch.where(ok, (m - _per_image(vmin, m)) / torch.where(ok, span, 1.0), 0.0)
    return out.clamp(0.0, 1.0)


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Min-max each map (``[H, W]`` or ``[D, H, W]``) of a batch to [0, 1]; constant maps become zeros."""
    m = m.double()
    flat = m.flatten(1)
    lo = _per_image(flat.min(1).values, m)
    hi = _per_image(flat.max(1).values, m)
    span = hi - lo
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, 1.0), 0.0)


def postprocess(attr: torch.Tensor, percentile: float = 99.0, *, spatial_dims: int = 2) -> torch.Tensor:
    """The paper's full post-processing: grayscale visualization then min-max; float32 ``[B, H, W]``
    (``[B, D, H, W]`` with ``spatial_dims=3``)."""
    return minmax(visualize_grayscale(attr, percentile, spatial_dims=spatial_dims)).float()


def degenerate(maps: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: which maps are constant (carry no ranking), NaN or infinite."""
    flat = maps.flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    finite = torch.where(torch.isfinite(flat), flat, 0.0)
    return bad | (finite.max(1).values == finite.min(1).values)
