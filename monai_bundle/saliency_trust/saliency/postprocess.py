"""Post-processing every map the way the paper did, batched on the device.

``visualize_grayscale`` is PAIR's ``VisualizeImageGrayscale``: sum of |attribution| over
channels, ``vmin`` = the map's minimum, ``vmax`` = its ``percentile`` (linear interpolation,
as ``np.percentile``), ``clip((m - vmin) / (vmax - vmin), 0, 1)``. The paper's scoring helper
then min-max normalizes again. A map whose ``vmax == vmin`` (constant, or flat up to the
percentile) has no ranking information: it becomes all zeros and is reported by
:func:`degenerate` rather than turning into NaN.
"""

from __future__ import annotations

import torch


def _to_2d(attr: torch.Tensor) -> torch.Tensor:
    if attr.ndim == 4:
        return attr.abs().sum(1)
    if attr.ndim == 3:
        return attr.abs()
    raise ValueError(f"expected [B, C, H, W] or [B, H, W] attributions, got {tuple(attr.shape)}")


def visualize_grayscale(attr: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """PAIR's grayscale visualization, per image, in float64; ``[B, H, W]`` in [0, 1]."""
    m = _to_2d(attr).double()
    flat = m.flatten(1)
    vmax = torch.quantile(flat, percentile / 100.0, dim=1, interpolation="linear")
    vmin = flat.min(1).values
    span = (vmax - vmin).view(-1, 1, 1)
    ok = span > 0
    out = torch.where(ok, (m - vmin.view(-1, 1, 1)) / torch.where(ok, span, 1.0), 0.0)
    return out.clamp(0.0, 1.0)


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Min-max each ``[H, W]`` map of a batch to [0, 1]; constant maps become zeros."""
    m = m.double()
    flat = m.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, 1.0), 0.0)


def postprocess(attr: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """The paper's full post-processing: grayscale visualization then min-max; float32 ``[B, H, W]``."""
    return minmax(visualize_grayscale(attr, percentile)).float()


def degenerate(maps: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: which maps are constant (carry no ranking), NaN or infinite."""
    flat = maps.flatten(1)
    bad = ~torch.isfinite(flat).all(1)
    finite = torch.where(torch.isfinite(flat), flat, 0.0)
    return bad | (finite.max(1).values == finite.min(1).values)
