"""Fixtures shared by the Slicer-side tests (slicer-core wheel)."""

from __future__ import annotations

import pytest


@pytest.fixture
def scene():
    """A fresh MRML scene, also set as ``slicer.mrmlScene`` (slicer.util helpers use the global scene)."""
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    yield s
    s.Clear(1)
