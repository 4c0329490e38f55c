"""The names ``SaliencyTrustLib.logic`` had before the Lib was split into rooms, for callers outside the module
(``tests/service/test_serve.py``, ``docs/make_slicer_picture.py``); new code imports the rooms themselves
(see the package docstring). ``Results`` and ``load_results`` are gone: they are
:class:`~SaliencyTrustLib.scene.RunOutput` and :func:`~SaliencyTrustLib.scene.load_run_output` now, so that
they do not read as the engine's ``saliency_trust.results``.
"""

from __future__ import annotations

from SaliencyTrustLib import texts
from SaliencyTrustLib.bundle import find_bundle, find_models
from SaliencyTrustLib.controller import run_local
from SaliencyTrustLib.errors import BundleError, CancelledError, InputVolumeError, SaliencyTrustError
from SaliencyTrustLib.inputs import check_input_volume, dicom_series_uid, prepare
from SaliencyTrustLib.process import BundleProcess, Request, make_fixture_models, make_sample_study, run_bundle
from SaliencyTrustLib.scene import OVERLAY_FLOOR, perceptual_color_node, render_slice, show_legend, show_overlay
from SaliencyTrustLib.texts import CRITERIA, RESEARCH_ONLY, TABLE_COLUMNS

__all__ = ["CRITERIA", "OVERLAY_FLOOR", "RESEARCH_ONLY", "TABLE_COLUMNS", "BundleError", "BundleProcess",
           "CancelledError", "InputVolumeError", "Request", "SaliencyTrustError", "check_input_volume",
           "dicom_series_uid", "find_bundle", "find_models", "make_fixture_models", "make_sample_study",
           "perceptual_color_node", "prepare", "render_slice", "run_bundle", "run_local", "show_legend",
           "show_overlay"]


def __getattr__(name: str):
    """``METHODS`` and ``METHOD_NAMES``: the bundle's method table, read when first used (:mod:`texts`)."""
    if name in ("METHODS", "METHOD_NAMES"):
        return getattr(texts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
