"""Model folders with torch: build, load and check the network of a ``model.json``, and feed it.

:class:`ModelFolder` is :class:`~saliency_trust.networks.manifest.ModelManifest` (the manifest, read
with the standard library only: schema, discovery, the files training writes) plus what needs the
network: building it (registry name, or a ``_target_`` that must be a ``torch.nn.Module`` class or a
torchvision model builder, checked before anything is called), loading and checking its weights
(layers named by the manifest exist, the output is ``[B, classes]``), the input mapping (size,
channels, normalization: :meth:`ModelFolder.network_input`) and the explain settings (Grad-CAM layer,
IG's black baseline, randomization blocks, the methods a network cannot give).

To explain images through a model folder in one call, with its input mapping and settings, use
:func:`saliency_trust.explainer.explainer` (it lives above ``saliency``, which this package must not
import). The manifest part's names are re-exported here, so ``saliency_trust.networks.modelfolder``
keeps every name it had.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from saliency_trust.networks.activations import has_relu, other_activations
from saliency_trust.networks.manifest import (
    ASSESSMENT,
    FAMILY_DEFAULTS,
    IMAGENET,
    KINDS,
    LEGACY_FILE,
    MANIFEST,
    PAPER_INPUT,
    REGISTRY_CLASSES,
    SCHEMA,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    ManifestError,
    ModelManifest,
    assessment_path,
    expand_blocks,
    family_defaults,
    file_sha256,
    legacy_architectures,
    record_file,
    replicate_file,
    training_weights,
    write_training_manifest,
)
from saliency_trust.networks.manifest import find_models as _find_models
from saliency_trust.networks.registry import get_network

__all__ = [
    "ASSESSMENT", "FAMILY_DEFAULTS", "IMAGENET", "KINDS", "LEGACY_FILE", "MANIFEST", "PAPER_INPUT", "REGISTRY_CLASSES",
    "SCHEMA", "SCHEMA_FILE", "SCHEMA_VERSION", "ManifestError", "ModelFolder", "ModelManifest", "assessment_path",
    "expand_blocks", "family_defaults", "file_sha256", "find_models", "legacy_architectures", "record_file",
    "replicate_file", "resize_images", "resize_volumes", "training_weights", "write_training_manifest",
]


def find_models(root: str | Path, depth: int = 2) -> dict[str, ModelFolder | ManifestError]:
    """:func:`~saliency_trust.networks.manifest.find_models` with each model a :class:`ModelFolder`."""
    return _find_models(root, depth, model_class=ModelFolder)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` images resized to ``size`` as the readers resize (antialiased bilinear, half-pixel
    centres: :func:`saliency_trust.data.groundtruth.resize_image`, batched); the same size is a no-op."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = images if images.is_floating_point() else images.float()
    return F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[:, 0]


def resize_volumes(volumes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``[B, D, H, W]`` volumes resampled to ``size`` as the volume readers resample (extent kept, linear between
    voxel centres, antialiased when shrinking: :func:`saliency_trust.data.volumes.resample_volume`); the same size
    is a no-op."""
    if tuple(volumes.shape[-3:]) == tuple(size):
        return volumes
    from saliency_trust.data.volumes import resample_volume

    host = volumes.detach().float().cpu().numpy()
    out = np.stack([resample_volume(v, tuple(size))[0] for v in host])
    return torch.from_numpy(out).to(volumes.device)


@dataclass
class ModelFolder(ModelManifest):
    """A network and its replicates (:class:`~saliency_trust.networks.manifest.ModelManifest`), with the network:
    build, load, check, the input mapping and the explain settings."""

    _probe: dict | None = field(default=None, repr=False, compare=False)  # what check()'s forward pass saw

    def build(self) -> Any:
        """The network with fresh weights (what the untrained baseline explains), checked (:meth:`check`)."""
        if self.format == "torchscript":
            raise ManifestError(f"{self.folder / MANIFEST}: a TorchScript model has no untrained form to build")
        net = self._construct()
        self.check(net)
        return net

    def load(self, replicate: int | None = None, device: Any = "cpu") -> Any:
        """Replicate ``replicate`` (None: the first) with its weights, on ``device``, in eval mode, checked."""
        path = self.weights(replicate)
        if self.format == "torchscript":
            try:
                net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ManifestError(f"{path}: cannot load TorchScript ({type(exc).__name__}: {exc})") from None
        else:
            net = self._construct()
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ManifestError(f"{path}: cannot load weights ({type(exc).__name__}: {exc})") from None
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            if not isinstance(state, dict):
                raise ManifestError(f"{path}: not a state dict (a {type(state).__name__})")
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
                raise ManifestError(f"{path}: the weights do not fit the network of field 'network' ({first})") \
                    from None
        self.check(net)
        return net.to(device).eval()

    def _construct(self) -> Any:
        net_spec = self.network
        if isinstance(net_spec, str):
            return get_network(net_spec, num_classes=max(len(self.classes), 2))
        target = net_spec["_target_"]
        module_name, _, attr = target.rpartition(".")
        if module_name.split(".")[0] in sys.stdlib_module_names:  # no network lives there: not even imported
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' names {target!r}, which is not a "
                                "torch.nn.Module class but part of Python's standard library; nothing was imported "
                                "or called")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' names {target!r}, which "
                                f"cannot be imported ({type(exc).__name__}: {exc})") from None
        if not _safe_factory(factory):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' names {target!r}, which is not a "
                                "torch.nn.Module class (nor a torchvision model builder); nothing else is called")
        kwargs = {k: v for k, v in net_spec.items() if k != "_target_"}
        try:
            net = factory(**kwargs)
        except Exception as exc:
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network': {target}(**{kwargs}) failed "
                                f"({type(exc).__name__}: {exc})") from None
        if not isinstance(net, torch.nn.Module):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' made a "
                                f"{type(net).__name__}, not a torch.nn.Module")
        return net

    def spec(self, net: Any) -> dict[str, Any]:
        """The Grad-CAM layer, randomization blocks and verdict block: the manifest's, else the family's."""
        family = family_defaults(net)
        out = {"cam_layer": None, "cam_post_relu": False, "randomization_blocks": None, "verdict_block": None}
        out.update({k: v for k, v in family.items() if k in out})
        if "randomization_blocks" in family:
            out["randomization_blocks"] = expand_blocks(net, family["randomization_blocks"])
            keep = family.get("verdict_keep")
            if keep and out["verdict_block"] is None and len(out["randomization_blocks"]) > keep:
                out["verdict_block"] = out["randomization_blocks"][-keep - 1]["name"]
        given = {k: self.manifest[k] for k in out if k in self.manifest}
        if "cam_layer" in given and "cam_post_relu" not in given:
            given["cam_post_relu"] = False
        if "randomization_blocks" in given and "verdict_block" not in given:
            given["verdict_block"] = None  # the family's verdict block belongs to the family's blocks
        out.update(given)
        return out

    def check(self, net: Any) -> None:
        """Refuse a network whose named layers are missing or whose output is not ``[B, classes]``."""
        where = self.folder / MANIFEST
        spec = self.spec(net)
        modules = dict(net.named_modules())
        if self.kind == "classifier" and self.format != "torchscript":
            if spec["cam_layer"] is None:
                raise ManifestError(f"{where}: field 'cam_layer' is required for a {type(net).__name__} "
                                    "(no default for its family)")
            if spec["cam_layer"] not in modules:
                raise ManifestError(f"{where}: field 'cam_layer' names {spec['cam_layer']!r}, which the network "
                                    "does not have")
            if spec["randomization_blocks"] is None:
                raise ManifestError(f"{where}: field 'randomization_blocks' is required for a "
                                    f"{type(net).__name__} (no default for its family)")
            for b in spec["randomization_blocks"]:
                missing = [n for n in b["modules"] if n not in modules]
                if missing:
                    raise ManifestError(f"{where}: field 'randomization_blocks': block {b['name']!r} names "
                                        f"{missing[0]!r}, which the network does not have")
            names = [b["name"] for b in spec["randomization_blocks"]]
            if spec["verdict_block"] is not None and spec["verdict_block"] not in names:
                raise ManifestError(f"{where}: field 'verdict_block' names {spec['verdict_block']!r}, which is not one "
                                    f"of the randomization blocks {names}")
        if self._probe is not None:  # one architecture per folder: its replicates and copies need no new probe
            return
        grid = self.input_size or (96, 96)
        dev = next((p.device for p in net.parameters()), torch.device("cpu"))
        x = torch.zeros((2, self.channels, *grid), device=dev, requires_grad=True)
        was = net.training
        net.eval()
        try:
            y = net(x)
        except Exception as exc:
            shape = ", ".join(str(n) for n in x.shape)
            raise ManifestError(f"{where}: the network fails on a [{shape}] input "
                                f"(fields 'input.size', 'input.channels'): {type(exc).__name__}: {exc}") from None
        finally:
            net.train(was)
        want = (2, len(self.classes)) if self.kind == "classifier" else (2, 1, *grid)
        if not isinstance(y, torch.Tensor):
            raise ManifestError(f"{where}: the network returns a {type(y).__name__}, not a tensor of shape "
                                f"[B, {want[1]}]")
        if tuple(y.shape) != want:
            field_name = "classes" if self.kind == "classifier" else "kind"
            raise ManifestError(f"{where}: the network returns {list(y.shape)} for a batch of 2, expected "
                                f"{list(want)} (field '{field_name}')")
        self._probe = {"relu": has_relu(y), "other": other_activations(y)}

    def unavailable(self, net: Any) -> dict[str, str]:
        """Methods this network cannot give, each with the reason in one sentence."""
        self.check(net)
        out = {}
        if not self._probe["relu"]:
            why = (f"guided backprop is defined for ReLU networks and {self.name} uses no ReLU "
                   "(its activations are of another kind)")
            out.update(gbp=why, ggcam=why)
        if self.format == "torchscript":
            why = "Grad-CAM reads a layer through a forward hook, which a TorchScript model does not run"
            out.update(gradcam=why, ggcam=why)
        return out

    def method_notes(self, net: Any) -> dict[str, str]:
        """Methods computed with a caveat the output must state (guided backprop on a partly-ReLU network)."""
        self.check(net)
        if self._probe["relu"] and self._probe["other"]:
            why = (f"guided backprop guides only the ReLUs of {self.name}; its other activations "
                   f"({', '.join(self._probe['other'])}) pass the gradient unguided")
            return {"gbp": why, "ggcam": why}
        return {}

    def _expected(self) -> str:
        if self.is_volume:
            return "volumes [B, D, H, W] or [B, 1, D, H, W]"
        return "grayscale [B, H, W] or [B, 1, H, W] images"

    def to_input(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (``[B, H, W]`` or ``[B, 1, H, W]``; a volume model: ``[B, D, H, W]`` or
        ``[B, 1, D, H, W]``, already windowed to [0, 1] by ``input.window_hu``) at the network's size -> its input
        ``[B, C, H, W]`` (``[B, C, D, H, W]``): window, channels, normalization; no resize
        (:meth:`network_input` resizes too)."""
        nd = self.spatial_dims
        x = images01[:, None] if images01.ndim == nd + 1 else images01
        if x.ndim != nd + 2 or x.shape[1] != 1:
            raise ValueError(f"expected {self._expected()}, got {tuple(images01.shape)}")
        x = x.float() if not x.is_floating_point() else x
        norm = self.normalization
        if "window" in norm:
            lo, hi = norm["window"]
            x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        x = x.expand(-1, self.channels, *([-1] * nd))
        scale, shift = self._affine()
        view = (1, -1, *([1] * nd))
        return (x * torch.tensor(scale, dtype=x.dtype, device=x.device).view(view)
                + torch.tensor(shift, dtype=x.dtype, device=x.device).view(view)).contiguous()

    def network_input(self, images01: torch.Tensor, size: int | tuple[int, ...] | None = None) -> torch.Tensor:
        """Images in [0, 1] as the readers give them (``[B, H, W]`` or ``[B, 1, H, W]``, any size; a volume model:
        ``[B, D, H, W]`` or ``[B, 1, D, H, W]`` windowed to [0, 1]) -> the network's input ``[B, C, S, S]``
        (``[B, C, D, H, W]``): resized to ``size`` (default: the size the model was trained at, else the images'
        own) as the readers resize (:func:`resize_images`, :func:`resize_volumes`), then :meth:`to_input`."""
        nd = self.spatial_dims
        x = images01[:, 0] if images01.ndim == nd + 2 and images01.shape[1] == 1 else images01
        if x.ndim != nd + 1:
            raise ValueError(f"expected {self._expected()}, got {tuple(images01.shape)}")
        grid = (size,) * nd if isinstance(size, int) else tuple(size) if size else self.input_size
        if grid is not None and len(grid) != nd:
            raise ValueError(f"size {size!r} is not a {nd}-D grid")
        if grid is None:
            return self.to_input(x)
        return self.to_input(resize_volumes(x, grid) if nd == 3 else resize_images(x, grid))

    def _affine(self) -> tuple[list[float], list[float]]:
        """Per channel ``(scale, shift)``: network input = scale * x01 + shift (after any window)."""
        norm = self.normalization
        c = self.channels
        if "range" in norm:
            lo, hi = norm["range"]
            return [hi - lo] * c, [lo] * c
        mean, std = IMAGENET[c] if norm.get("preset") == "imagenet" else (norm["mean"], norm["std"])
        mean = list(mean) * (c if len(mean) == 1 else 1)
        std = list(std) * (c if len(std) == 1 else 1)
        return [1.0 / s for s in std], [-m / s for m, s in zip(mean, std, strict=True)]

    def black(self) -> float | tuple[float, ...]:
        """A black pixel in the network's input scale (IG's baseline), per channel when they differ."""
        _, shift = self._affine()
        return shift[0] if len(set(shift)) == 1 else tuple(shift)

    def explain_settings(self, net: Any) -> dict[str, Any]:
        """The ``explain`` settings this model needs: its Grad-CAM layer and IG's black baseline."""
        spec = self.spec(net)
        return {"cam_layer": spec["cam_layer"], "cam_post_relu": spec["cam_post_relu"], "ig_baseline": self.black()}

    def randomization_blocks(self, net: Any) -> list[tuple[str, tuple[str, ...]]]:
        """``(name, modules)`` blocks, head first, for cascading randomization."""
        return [(b["name"], tuple(b["modules"])) for b in self.spec(net)["randomization_blocks"]]

    def verdict_block(self, net: Any) -> str:
        """The block whose randomized state the verdict reads: the manifest's, the family's (the paper's
        depth: stem and first block kept), else the last given block (the whole given cascade)."""
        spec = self.spec(net)
        return spec["verdict_block"] or spec["randomization_blocks"][-1]["name"]

    def verdict_block_source(self, net: Any) -> str:
        """Where :meth:`verdict_block` comes from, in words (for the output)."""
        if "verdict_block" in self.manifest:
            return "model.json's verdict_block"
        if "randomization_blocks" in self.manifest:
            return "the last of model.json's randomization_blocks (no verdict_block given: the whole given cascade)"
        if family_defaults(net).get("verdict_keep"):
            return "the paper's depth for this family: the stem and the first block are never randomized"
        return "the paper's final state (InceptionV3 mixed1 = Mixed_5c; mixed0 and the stem kept)"


def _safe_factory(factory: Any) -> bool:
    """Whether ``model.json`` may call ``factory``: a ``torch.nn.Module`` subclass, or one of torchvision's
    registered model builders (``torchvision.models.list_models()``). Checked before anything is called,
    so a manifest naming ``subprocess.run`` or ``os.system`` runs nothing."""
    if isinstance(factory, type):
        return issubclass(factory, torch.nn.Module)
    try:
        from torchvision import models

        return any(models.get_model_builder(name) is factory for name in models.list_models())
    except (ImportError, AttributeError, ValueError):
        return False
