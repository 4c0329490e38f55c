"""Map-to-ground-truth scores, batched on the device: AUPRC (exact ties), pointing game, Otsu IoU.

Every score flattens each map after the batch axis, so ``[B, H, W]`` maps and ``[B, D, H, W]`` volumes
are scored the same way: per pixel or per voxel.
"""

from __future__ import annotations

import torch


def pr_curve_points(maps: torch.Tensor, masks: torch.Tensor):
    """Per-image precision/recall at every distinct score (ties grouped), descending thresholds.

    Returns ``(recall, precision, keep, positives)``: ``[B, N]`` float64 values at each sorted
    position, ``keep`` marking the last position of each tie run (the curve's points), and the
    number of positives per image.
    """
    s = maps.flatten(1).double()
    y = masks.flatten(1).to(torch.float64)
    s_sorted, order = torch.sort(s, dim=1, descending=True, stable=True)
    y_sorted = y.gather(1, order)
    tp = torch.cumsum(y_sorted, 1)
    fp = torch.cumsum(1 - y_sorted, 1)
    keep = torch.ones_like(s_sorted, dtype=torch.bool)
    keep[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    pos = tp[:, -1:]
    recall = tp / pos
    precision = tp / (tp + fp)
    return recall, precision, keep, pos[:, 0]


def auprc(maps: torch.Tensor, masks: torch.Tensor, mode: str = "trapezoid") -> torch.Tensor:
    """Area under the precision-recall curve of each map's pixels (or voxels) against its mask, float64 ``[B]``.

    ``trapezoid``: ``sklearn.metrics.auc(recall, precision)`` on ``precision_recall_curve``
    (what the paper reported; includes the (recall 0, precision 1) start point). ``ap``:
    ``average_precision_score`` (step sum). Ties are grouped exactly as scikit-learn does.
    A mask without positives gives NaN (callers count it; it never enters a mean silently).
    """
    if mode not in ("trapezoid", "ap"):
        raise ValueError(f"mode must be 'trapezoid' or 'ap', got {mode!r}")
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    recall, precision, keep, pos = pr_curve_points(maps, masks)
    B, N = recall.shape
    idx = torch.arange(N, device=recall.device).expand(B, N)
    kept = torch.where(keep, idx, torch.full_like(idx, -1))
    prev = torch.cummax(kept, 1).values
    prev = torch.cat([torch.full((B, 1), -1, device=recall.device, dtype=prev.dtype), prev[:, :-1]], 1)
    r_prev = torch.where(prev >= 0, recall.gather(1, prev.clamp(min=0)), 0.0)
    p_prev = torch.where(prev >= 0, precision.gather(1, prev.clamp(min=0)), 1.0)
    dr = recall - r_prev
    term = dr * (precision + p_prev) / 2 if mode == "trapezoid" else dr * precision
    out = torch.where(keep, term, 0.0).sum(1)
    return torch.where(pos > 0, out, torch.nan)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Hit (1.0) when a pixel at the map's maximum lies inside the mask; NaN for an empty mask."""
    flat = maps.flatten(1)
    m = masks.flatten(1).bool()
    at_max = flat == flat.max(1, keepdim=True).values
    hit = (at_max & m).any(1).double()
    return torch.where(m.any(1), hit, torch.nan)


def otsu_threshold(maps: torch.Tensor, nbins: int = 256) -> torch.Tensor:
    """Otsu's threshold per map, as ``skimage.filters.threshold_otsu`` (256-bin histogram over the map's range)."""
    flat = maps.flatten(1).double()
    B = flat.shape[0]
    lo, hi = flat.min(1).values, flat.max(1).values
    width = (hi - lo).clamp(min=torch.finfo(torch.float64).tiny)
    bins = ((flat - lo[:, None]) / width[:, None] * nbins).floor().clamp(0, nbins - 1).long()
    hist = torch.zeros((B, nbins), dtype=torch.float64, device=flat.device).scatter_add_(1, bins, torch.ones_like(flat))
    edges = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, nbins + 1, dtype=torch.float64,
                                                            device=flat.device)[None]
    centers = (edges[:, :-1] + edges[:, 1:]) / 2
    w1 = torch.cumsum(hist, 1)
    w2 = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])
    m1 = torch.cumsum(hist * centers, 1) / w1
    m2 = torch.flip(torch.cumsum(torch.flip(hist * centers, [1]), 1), [1]) / w2
    var = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    var = torch.nan_to_num(var, nan=-1.0)
    idx = var.argmax(1)
    t = centers.gather(1, idx[:, None])[:, 0]
    return torch.where(hi > lo, t, lo)


def otsu_iou(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU between ``map > otsu_threshold(map)`` and the mask; NaN for an empty mask."""
    t = otsu_threshold(maps)
    seg = maps.flatten(1) > t.to(maps.dtype)[:, None]
    m = masks.flatten(1).bool()
    inter = (seg & m).sum(1).double()
    union = (seg | m).sum(1).double()
    return torch.where(m.any(1), inter / union.clamp(min=1), torch.nan)
