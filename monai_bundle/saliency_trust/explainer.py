"""Explain images through a model folder in one call: its input mapping and its explain settings, bound.

:func:`explainer` loads a replicate of a model folder (``model.json``) and returns an
:class:`Explainer`. Called with images as the readers give them (grayscale in [0, 1], any size), it
maps them to the network's input exactly as the folder says (size, channels, window, normalization:
:meth:`~saliency_trust.networks.ModelFolder.network_input`), explains them with the folder's settings
(Grad-CAM layer and whether a ReLU follows it, IG's black baseline in the network's scale) and returns
the maps on the images' own grid. A model trained on ImageNet-normalized input gets ImageNet-normalized
input; there is nothing to remember::

    explain = explainer("models/densenet121")
    maps = explain(images01, ["gradcam", "ig"], preset="quick")

:class:`Explainer` binds any network of the folder (an untrained build, a randomized state:
:meth:`Explainer.with_network`). This module sits above ``networks`` and ``saliency`` and imports
both; neither may import it (``saliency`` already imports ``networks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from saliency_trust.methods import METHODS
from saliency_trust.networks.modelfolder import ManifestError, ModelFolder, resize_images, resize_volumes
from saliency_trust.saliency import Recipe, SegmentCache, explain, predict

#: ``target`` words: the predicted class (the paper's rule), or the folder's finding class.
TARGETS = ("predicted", "finding")


def _images(images: Any, spatial_dims: int = 2) -> torch.Tensor:
    """Images as ``[B, H, W]``: a tensor or a NumPy array, ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; with
    ``spatial_dims=3`` volumes as ``[B, D, H, W]`` from ``[D, H, W]``, ``[B, D, H, W]`` or ``[B, 1, D, H, W]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected images as a tensor or a NumPy array, got {type(images).__name__}")
    nd = spatial_dims
    if x.ndim == nd:
        x = x[None]
    elif x.ndim == nd + 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != nd + 1:
        forms = ("[H, W], [B, H, W] or [B, 1, H, W] images" if nd == 2
                 else "[D, H, W], [B, D, H, W] or [B, 1, D, H, W] volumes (a 3-D model)")
        raise ValueError(f"expected grayscale {forms} in [0, 1], got {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


@dataclass(frozen=True)
class Explainer:
    """A network of a model folder, bound to the folder's input mapping and explain settings.

    ``folder.check(net)`` runs on creation: a network whose named layers are missing or whose output is
    not ``[B, classes]`` is refused (:class:`~saliency_trust.networks.ManifestError`).
    """

    folder: ModelFolder
    net: nn.Module
    replicate: int | None = None  # which replicate ``net`` holds (None: another network of the folder)

    def __post_init__(self) -> None:
        if self.folder.kind != "classifier":
            raise ManifestError(f"{self.folder.folder}: a {self.folder.kind}, not a classifier to explain")
        self.folder.check(self.net)

    @property
    def device(self) -> torch.device:
        """Where the network's parameters are (the images are moved there)."""
        return next((p.device for p in self.net.parameters()), torch.device("cpu"))

    @property
    def settings(self) -> dict[str, Any]:
        """The folder's ``explain`` settings for this network (Grad-CAM layer, IG's black baseline)."""
        return self.folder.explain_settings(self.net)

    @property
    def unavailable(self) -> dict[str, str]:
        """Methods this network cannot give, each with the reason in one sentence."""
        return self.folder.unavailable(self.net)

    def with_network(self, net: nn.Module) -> Explainer:
        """The same folder's mapping and settings bound to ``net`` (an untrained build, a randomized state)."""
        return Explainer(self.folder, net)

    def network_input(self, images: Any) -> torch.Tensor:
        """Images in [0, 1] (any size) -> the network's input ``[B, C, S, S]`` (a volume model: volumes windowed to
        [0, 1] -> ``[B, C, D, H, W]``) on its device."""
        return self.folder.network_input(_images(images, self.folder.spatial_dims).to(self.device))

    def probabilities(self, images: Any) -> torch.Tensor:
        """Softmax of the network's logits for ``images`` in [0, 1], ``[B, classes]``."""
        return self.probabilities_of(self.network_input(images))

    def probabilities_of(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits for ``x`` already in the network's input scale (:meth:`network_input`)."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return torch.softmax(predict(self.net, x).float(), 1)
        finally:
            self.net.train(was)

    def methods(self, methods: Sequence[str] | str | None = None) -> list[str]:
        """``methods`` checked against what this network can give (None: every method it can give)."""
        gone = self.unavailable
        if methods is None:
            return [m for m in METHODS if m not in gone]
        chosen = [methods] if isinstance(methods, str) else list(methods)
        bad = [m for m in chosen if m in gone]
        if bad:
            raise ValueError(f"method(s) {bad} cannot be computed for {self.folder.name}: {gone[bad[0]]}")
        return chosen

    def targets(self, target: str | int | Sequence[int] | torch.Tensor | None) -> Any:
        """What ``explain`` gets as ``targets``: None for ``"predicted"`` (its default), the finding class for
        ``"finding"``, anything else as given."""
        if target is None or (isinstance(target, str) and target == "predicted"):
            return None
        if isinstance(target, str):
            if target != "finding":
                raise ValueError(f"target must be one of {TARGETS}, a class index or one per image, not {target!r}")
            return self.folder.finding_class
        return target

    def explain_input(self, x: torch.Tensor, methods: Sequence[str] | str | None = None, *,
                      target: str | int | Sequence[int] | torch.Tensor | None = "predicted",
                      preset: str | Recipe = "paper", raw: bool = False, segment_cache: SegmentCache | None = None,
                      **overrides: Any) -> dict[str, torch.Tensor]:
        """Maps of ``x``, already in the network's input scale (:meth:`network_input`), on the network's grid.

        ``overrides`` are recipe fields (``seed``, ``cam_resize`` ...); they win over the folder's settings.
        """
        return explain(self.net, x, self.methods(methods), targets=self.targets(target), preset=preset, raw=raw,
                       segment_cache=segment_cache, **{**self.settings, **overrides})

    def __call__(self, images: Any, methods: Sequence[str] | str | None = None, *,
                 target: str | int | Sequence[int] | torch.Tensor | None = "predicted", preset: str | Recipe = "paper",
                 grid: str = "input", segment_cache: SegmentCache | None = None,
                 **overrides: Any) -> dict[str, torch.Tensor]:
        """Saliency maps of ``images`` (grayscale in [0, 1] as the readers give them: ``[H, W]``, ``[B, H, W]``
        or ``[B, 1, H, W]``, tensor or NumPy, any size), one ``[B, H, W]`` map in [0, 1] per method. A volume
        model (``input.size`` ``[D, H, W]``) takes volumes windowed to [0, 1] (``[D, H, W]``, ``[B, D, H, W]`` or
        ``[B, 1, D, H, W]``) and gives ``[B, D, H, W]`` maps.

        The images go through the folder's input mapping (:meth:`network_input`) and are explained with its
        settings (:meth:`explain_input`). ``methods`` None: every method this network can give; asking for
        one it cannot give (guided backprop without ReLUs) raises ValueError with the reason. ``target``:
        ``"predicted"`` (the paper's), ``"finding"`` (the folder's finding class), a class index, or one per
        image. ``grid``: ``"input"`` gives the maps on the images' own grid (resized as the readers resize,
        clipped to [0, 1], as inference writes them), ``"network"`` on the network's.
        """
        if grid not in ("input", "network"):
            raise ValueError(f"grid must be 'input' or 'network', not {grid!r}")
        nd = self.folder.spatial_dims
        images01 = _images(images, nd)
        maps = self.explain_input(self.network_input(images01), methods, target=target, preset=preset,
                                  segment_cache=segment_cache, **overrides)
        size = tuple(images01.shape[-nd:])
        if grid == "network" or all(tuple(m.shape[-nd:]) == size for m in maps.values()):
            return maps
        resize = resize_volumes if nd == 3 else resize_images
        return {k: resize(m, size).clamp(0.0, 1.0) for k, m in maps.items()}


def explainer(model: str | Path | ModelFolder, replicate: int | None = None, *, arch: str | None = None,
              device: str | torch.device | None = None) -> Explainer:
    """An :class:`Explainer` for replicate ``replicate`` (None: the first) of the model folder ``model``.

    ``model`` is a model folder (``model.json``), an old ``<arch>_seed<k>.pt`` folder (``arch`` picks the
    architecture) or an open :class:`~saliency_trust.networks.ModelFolder`. The weights load with
    ``weights_only=True`` onto ``device`` (default: CUDA when there is one, else the CPU), checked.
    """
    folder = model if isinstance(model, ModelFolder) else ModelFolder.open(model, arch)
    if folder.kind != "classifier":
        raise ManifestError(f"{folder.folder}: a {folder.kind}, not a classifier to explain")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k = next(iter(folder.replicates)) if replicate is None else int(replicate)
    return Explainer(folder, folder.load(k, dev), k)
