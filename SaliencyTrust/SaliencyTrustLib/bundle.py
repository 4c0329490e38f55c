"""The bundle the module runs: where it is, and its standard-library modules, loaded by file path.

The panel reads model folders (``saliency_trust/networks/manifest.py``) and the saliency methods
(``saliency_trust/methods.py``) with the bundle's own code, without importing the engine (torch) into
Slicer's process: each file is loaded by its path, once per bundle file, never through the package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from SaliencyTrustLib.errors import BundleError

#: The module's folder (``SaliencyTrust/``), beside which the bundle is installed.
MODULE_DIR = Path(__file__).resolve().parents[1]
#: The bundle's model-folder reader (standard library only), relative to the bundle folder.
MANIFEST_MODULE = "saliency_trust/networks/manifest.py"
#: The bundle's table of saliency methods (standard library only), relative to the bundle folder.
METHODS_MODULE = "saliency_trust/methods.py"


def find_bundle(module_dir: str | Path) -> Path:
    """The MONAI bundle the module runs: installed beside it by the extension build
    (``SaliencyTrustBundle``, see CMakeLists.txt), or the ``monai_bundle`` folder of a source checkout
    (the "Additional module paths" route)."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "SaliencyTrustBundle", module_dir.parent / "monai_bundle"):
        if (candidate / "configs" / "inference.json").is_file():
            return candidate
    return module_dir / "SaliencyTrustBundle"


def bundle_module(bundle_dir: str | Path, relative: str, purpose: str = "") -> ModuleType:
    """The bundle's file ``relative`` (a standard-library-only module), loaded by its path.

    One copy per bundle file is kept. A bundle without the file, or a file that fails to load, raises
    :class:`~SaliencyTrustLib.errors.BundleError` in one sentence, ending with ``purpose`` (", so ...").
    """
    path = Path(bundle_dir) / relative
    if not path.is_file():
        raise BundleError(f"No SaliencyTrust bundle at {bundle_dir} (it has no {relative}){purpose}.")
    name = f"_saliency_trust_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up while it loads
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise BundleError(f"The bundle's {relative} at {bundle_dir} could not be loaded{purpose} "
                              f"({type(exc).__name__}: {exc}).") from exc
    return sys.modules[name]


def find_models(model_dir: str | Path, bundle_dir: str | Path | None = None) -> dict:
    """The bundle's model listing of ``model_dir``: name -> model manifest, or the error that makes one unusable."""
    module = bundle_module(bundle_dir or find_bundle(MODULE_DIR), MANIFEST_MODULE)
    return module.find_models(model_dir)


def methods_module(bundle_dir: str | Path | None = None) -> ModuleType:
    """The bundle's table of saliency methods (``METHODS``, ``LABELS``), from the module's own bundle by default."""
    return bundle_module(bundle_dir or find_bundle(MODULE_DIR), METHODS_MODULE,
                         ", so the saliency methods are unknown")


def manifest_dimension(manifest) -> int:
    """A model folder's spatial dimension: 3 when its ``model.json`` gives ``input.size`` as ``[D, H, W]`` (a 3-D
    network: it explains a CT volume), else 2 (one radiograph)."""
    dims = getattr(manifest, "spatial_dims", None)  # the bundle's reader says it (older bundles: from the size)
    if dims in (2, 3):
        return int(dims)
    size = (getattr(manifest, "input", None) or {}).get("size")
    return 3 if isinstance(size, (list, tuple)) and len(size) == 3 else 2


def model_dimension(model_dir: str | Path, arch: str | None = None, bundle_dir: str | Path | None = None) -> int:
    """The spatial dimension (2 or 3) of the model in ``model_dir`` (``arch`` picks one of an older flat folder),
    read with the bundle's own model-folder reader; its errors are the reader's (one sentence)."""
    module = bundle_module(bundle_dir or find_bundle(MODULE_DIR), MANIFEST_MODULE)
    return manifest_dimension(module.ModelManifest.open(model_dir, arch or None))
