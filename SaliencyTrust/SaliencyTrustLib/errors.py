"""The Lib's errors: each one sentence to show the user as it is."""

from __future__ import annotations


class SaliencyTrustError(Exception):
    """A problem to show the user as it is (one clear sentence)."""


class InputVolumeError(SaliencyTrustError):
    """The input volume cannot be explained (missing, not 2-D, empty, wrong type)."""


class BundleError(SaliencyTrustError):
    """The bundle process failed or was cancelled."""


class CancelledError(BundleError):
    """The user cancelled the run: not an error to show, nothing was added to the scene."""

    def __init__(self, message: str = "Cancelled: nothing was added to the scene.") -> None:
        super().__init__(message)
