"""Test-only packages the Makefile installs in folders of their own beside the venv (never into it).

``slicer-5.10``: pydicom 2.4.4, numpy 2.0.2 and scipy 1.13.1, what Slicer 5.10 ships; ``slicer-5.8``:
pydicom 2.4.4 and numpy 1.26.4 (Slicer 5.8); ``monailabel-0.8.5``: MONAI Label's own package,
without its dependencies, for its client. ``make test`` sets ``SALIENCY_TRUST_REQUIRE_EXTRAS``,
so there a missing folder fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SLICER_510 = "slicer-5.10"
SLICER_58 = "slicer-5.8"
MONAILABEL = "monailabel-0.8.5"


def extra(name: str) -> Path:
    """The folder of test-only packages ``name`` (``$VENV/<name>``), or skip (fail under ``make test``)."""
    path = Path(sys.prefix) / name
    if not path.is_dir():
        message = f"{path} is absent: `make test` installs it (see the Makefile)"
        if os.environ.get("SALIENCY_TRUST_REQUIRE_EXTRAS"):
            pytest.fail(message)
        pytest.skip(message)
    return path
