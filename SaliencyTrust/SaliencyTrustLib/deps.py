"""The Python packages the bundle needs inside Slicer, checked and installed without touching Slicer's torch.

torch (and torchvision) come only through the PyTorch extension (``PyTorchUtils``), at least
:data:`TORCH_MIN` (MONAI 1.6 requires torch >= 2.8). Everything else is installed from
``Resources/requirements.txt`` with a constraints file that pins the torch, torchvision and numpy
already present, so pip can neither replace nor upgrade them; from a local wheel folder
(``--no-index --find-links``) when one is given, for machines without internet. After installing,
versions are checked again through the installed metadata.

No Qt here: the module asks the user and calls Slicer's ``pip_install``; this part is tested.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

TORCH_MIN = "2.8"
#: The oldest Python the bundle runs on (MONAI 1.6); Slicer 5.8 has 3.9, Slicer 5.10 and later 3.12.
PYTHON_MIN = (3, 10)
SLICER_MIN = "5.10"
#: Distributions that only the PyTorch extension may install or change.
PINNED = ("torch", "torchvision", "numpy")


def python_problem() -> str:
    """'' on a Slicer whose Python can run the bundle, else one sentence saying which Slicer is needed.

    Checked before anything is installed or launched: on Slicer 5.8 (Python 3.9) MONAI 1.6 cannot
    be installed, and finding that out after downloading PyTorch helps nobody.
    """
    if tuple(sys.version_info[:2]) >= PYTHON_MIN:
        return ""
    have = ".".join(str(v) for v in sys.version_info[:3])
    return (f"SaliencyTrust needs Slicer {SLICER_MIN} or later: this Slicer's Python is {have}, and MONAI 1.6, "
            f"which runs the maps, needs Python {'.'.join(map(str, PYTHON_MIN))} or later.")


def read_requirements(path: str | Path) -> list[Requirement]:
    """The requirements of a requirements file (comments and blank lines skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(Requirement(line))
    return out


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirements: list[Requirement]) -> list[str]:
    """The requirements not satisfied by what is installed, as ``"name>=x (found y)"`` strings."""
    out = []
    for req in requirements:
        found = installed_version(req.name)
        if found is None:
            out.append(f"{req} (not installed)")
            continue
        try:
            ok = req.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{req} (found {found})")
    return out


def torch_problem() -> str:
    """'' when torch and torchvision are installed and torch is at least TORCH_MIN, else why not."""
    torch = installed_version("torch")
    if torch is None:
        return "PyTorch is not installed"
    if Version(torch.split("+")[0]) < Version(TORCH_MIN):
        return f"PyTorch {torch} is older than the {TORCH_MIN} that MONAI needs"
    if installed_version("torchvision") is None:
        return "torchvision is not installed"
    return ""


def constraints_text() -> str:
    """A pip constraints file pinning the torch, torchvision and numpy present (pip must not move them)."""
    lines = [f"{name}=={v}" for name in PINNED if (v := installed_version(name))]
    return "\n".join(lines) + "\n"


def pip_arguments(requirements_file: str | Path, constraints_file: str | Path,
                  wheel_dir: str | Path | None = None) -> list[str]:
    """Arguments for ``pip install``: the requirements under the constraints, offline from a wheel folder."""
    args = ["-r", str(requirements_file), "-c", str(constraints_file)]
    if wheel_dir:
        folder = Path(wheel_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"The wheel folder {folder} does not exist.")
        args += ["--no-index", "--find-links", str(folder)]
    return args
