"""Train / val / test assignment of records."""

from __future__ import annotations

import hashlib


def split_of(record_id: str, split: str | None) -> str:
    """The record's split, or a stable 70/15/15 split from a hash of its id when none is given."""
    if split:
        return split
    u = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "little") / 2**64
    return "train" if u < 0.7 else ("val" if u < 0.85 else "test")


__all__ = ["split_of"]
