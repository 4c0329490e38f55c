"""SIIM-ACR run-length encoding: column-major pixel order, run starts relative to the previous run's end."""

from __future__ import annotations

import numpy as np

from saliency_trust.data.errors import DataError


def encode_siim_rle(mask: np.ndarray) -> str:
    """Encode a 2-D boolean mask the way SIIM's ``train-rle.csv`` does."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = change[0::2], change[1::2]
    if len(starts) == 0:
        return "-1"
    rel = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{int(s)} {int(n)}" for s, n in zip(rel, ends - starts, strict=True))


def decode_siim_rle(rle: str, shape: tuple[int, int], source: str = "<rle>") -> np.ndarray:
    """Decode one SIIM RLE string onto a ``shape`` (H, W) grid.

    ``"-1"`` (a negative) decodes to an all-False mask. Anything malformed -- text that is not
    integers, an odd count, a negative offset or length, a run past the image's end -- raises
    :class:`DataError` naming ``source``.
    """
    text = rle.strip()
    h, w = shape
    if text == "-1" or text == "":
        return np.zeros(shape, dtype=bool)
    try:
        values = np.array([int(t) for t in text.split()], dtype=np.int64)
    except ValueError as exc:
        raise DataError(source, f"malformed RLE: non-integer token ({exc})") from None
    if len(values) % 2:
        raise DataError(source, f"malformed RLE: odd number of values ({len(values)})")
    rel, lengths = values[0::2], values[1::2]
    if (rel < 0).any() or (lengths <= 0).any():
        raise DataError(source, "malformed RLE: negative offset or non-positive run length")
    ends = np.cumsum(rel + lengths)
    starts = ends - lengths
    if len(ends) and ends[-1] > h * w:
        raise DataError(source, f"malformed RLE: runs end at pixel {int(ends[-1])}, past the {h}x{w} image")
    flat = np.zeros(h * w + 1, dtype=np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return (np.cumsum(flat[:-1]) > 0).reshape(w, h).T.copy()
