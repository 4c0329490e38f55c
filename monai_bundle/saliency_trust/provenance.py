"""Provenance: the versions and the code that decided a result."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def versions() -> dict[str, str]:
    """Versions of the packages that decide the results."""
    import monai
    import numpy as np
    import torch
    import torchvision

    import saliency_trust

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "monai": monai.__version__,
            "numpy": np.__version__, "saliency_trust": saliency_trust.__version__}


def code_fingerprint(root: str | Path | None = None) -> str:
    """SHA-256 over every Python source of the ``saliency_trust`` package (paths and bytes).

    Part of the assessment's resume key: steps saved by other code are recomputed rather than
    mixed into new results. The whole package counts, so no hand-kept list can miss a module.
    ``root`` is the package folder (default: the installed one).
    """
    if root is None:
        import saliency_trust

        root = Path(saliency_trust.__file__).parent
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


__all__ = ["code_fingerprint", "versions"]
