"""Named fault points: where the fault tests kill a run (SIGKILL) to prove that it survives.

A point does nothing unless the environment variable ``SALIENCY_TRUST_FAULT`` names it; then the
process kills itself with SIGKILL there, exactly as a power cut or the OOM killer would, with no
chance to clean up. The points are placed where an interruption is most harmful: between writing
a temporary file and renaming it, and between the maps of two model states.
"""

from __future__ import annotations

import os
import signal

ENV = "SALIENCY_TRUST_FAULT"


def point(name: str) -> None:
    """Die here (SIGKILL) when ``SALIENCY_TRUST_FAULT`` equals ``name``; otherwise return at once."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


__all__ = ["ENV", "point"]
