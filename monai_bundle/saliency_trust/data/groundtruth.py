"""Ground truth on the image grid: box rasterizing and mask / image resizing.

Box convention (documented once, used everywhere):

* On the image's own grid a box ``(x, y, w, h)`` (top-left corner, width, height, in pixels,
  possibly fractional) covers every pixel it touches: columns ``floor(x) .. ceil(x + w) - 1``
  and rows ``floor(y) .. ceil(y + h) - 1``.
* When the image is resized from ``S`` to ``T`` pixels, boxes follow the paper's code
  (Arun et al., ``int(320 * c / 1023)`` for 1024 -> 320): each end ``c`` maps to
  ``int(T * c / (S - 1))`` and both ends are inclusive.
* A box partly outside the image is clipped to it; a box wholly outside, or with a
  non-positive size, is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from saliency_trust.data.errors import DataError

Box = tuple[float, float, float, float]


def _span(lo: float, length: float, src: int, dst: int) -> tuple[int, int]:
    if src == dst:
        return math.floor(lo), math.ceil(lo + length) - 1
    return int(dst * lo / (src - 1)), int(dst * (lo + length) / (src - 1))


def rasterize_boxes(
    boxes: Iterable[Box],
    src_shape: tuple[int, int],
    dst_shape: tuple[int, int] | None = None,
    source: str = "<boxes>",
) -> np.ndarray:
    """Union of ``boxes`` (given on a ``src_shape`` grid) as a bool mask on ``dst_shape``."""
    sh, sw = src_shape
    dh, dw = dst_shape if dst_shape is not None else src_shape
    mask = np.zeros((dh, dw), dtype=bool)
    for x, y, w, h in boxes:
        if not all(map(math.isfinite, (x, y, w, h))):
            raise DataError(source, f"box ({x}, {y}, {w}, {h}) has a non-finite coordinate")
        if w <= 0 or h <= 0:
            raise DataError(source, f"box ({x}, {y}, {w}, {h}) has a non-positive width or height")
        if x >= sw or y >= sh or x + w <= 0 or y + h <= 0:
            raise DataError(source, f"box (x={x}, y={y}, w={w}, h={h}) lies outside the {sw}x{sh} image")
        c0, c1 = _span(x, w, sw, dw)
        r0, r1 = _span(y, h, sh, dh)
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, dw - 1), min(r1, dh - 1)
        mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float image with antialiased bilinear interpolation (no-op at the same size)."""
    if tuple(image.shape) == tuple(size):
        return image.astype(np.float32, copy=False)
    return _interpolate(image, size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask bilinearly and threshold at 0.5 (how the SIIM 320 px masks were made)."""
    if tuple(mask.shape) == tuple(size):
        return mask.astype(bool, copy=False)
    return _interpolate(mask, size) >= 0.5


def _interpolate(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # torch is imported here, not at the top: the data package (SynthCXR, DICOM) works without it.
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()
