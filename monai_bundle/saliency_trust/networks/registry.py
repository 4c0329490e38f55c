"""Network registry: the two classifiers of the paper and the localization baseline.

Classifiers take a batch ``[B, 3, H, W]`` in the network's input scale: the grayscale
radiograph in [0, 1] mapped to [-1, 1] (Inception scaling ``x / 127.5 - 1`` on 8-bit data) and
copied to three channels, exactly as the paper fed its Keras models (:func:`to_network_input`).
They return pre-softmax logits ``[B, num_classes]``; saliency explains the predicted logit.

Cascading randomization blocks (top to bottom), the single place where they are defined:

================  ===========================================================================
architecture      blocks, in randomization order
================  ===========================================================================
inception_v3      ``fc`` (logits), ``Mixed_7c``, ``Mixed_7b``, ``Mixed_7a``, ``Mixed_6e``,
                  ``Mixed_6d``, ``Mixed_6c``, ``Mixed_6b``, ``Mixed_6a``, ``Mixed_5d``,
                  ``Mixed_5c``, ``Mixed_5b`` -- the paper's Logits, mixed10 ... mixed0
                  (torchvision Mixed_5b = Keras mixed0; the paper stopped at mixed1 = Mixed_5c;
                  we add Mixed_5b so the cascade reaches the first Inception block). The stem
                  convolutions are never randomized, as in the paper.
densenet121       ``classifier``, ``denseblock4`` (+ ``norm5``), ``transition3``, ``denseblock3``,
                  ``transition2``, ``denseblock2``, ``transition1``, ``denseblock1``, ``conv0``
                  (+ ``norm0``)
================  ===========================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models

CLASSIFIERS = ("inception_v3", "densenet121")

#: Randomization blocks, top (head) first; each entry lists module names reset together.
RANDOMIZATION_BLOCKS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "inception_v3": [
        ("logits", ("fc",)),
        *[(n, (n,)) for n in ("Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c",
                             "Mixed_6b", "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b")],
    ],
    "densenet121": [
        ("logits", ("classifier",)),
        ("denseblock4", ("features.denseblock4", "features.norm5")),
        ("transition3", ("features.transition3",)),
        ("denseblock3", ("features.denseblock3",)),
        ("transition2", ("features.transition2",)),
        ("denseblock2", ("features.denseblock2",)),
        ("transition1", ("features.transition1",)),
        ("denseblock1", ("features.denseblock1",)),
        ("conv0", ("features.conv0", "features.norm0")),
    ],
}

#: The state whose maps the randomization verdict reads: where the paper's cascade ended
#: (InceptionV3: mixed1 = torchvision Mixed_5c). Later states stay on the curve, marked as beyond
#: the paper. Architectures not listed: the last state (the whole cascade).
PAPER_FINAL_STATE = {"inception_v3": "Mixed_5c"}

#: Grad-CAM layer per architecture and whether the model applies a ReLU right after it: the
#: last post-ReLU feature map, as the paper's Keras layers (mixed10, DenseNet's final relu).
CAM_LAYERS = {"inception_v3": ("Mixed_7c", False), "densenet121": ("features", True)}


def to_network_input(images01: torch.Tensor) -> torch.Tensor:
    """Map grayscale images in [0, 1] (``[B, H, W]`` or ``[B, 1, H, W]``) to ``[B, 3, H, W]`` in [-1, 1]."""
    if images01.ndim == 3:
        images01 = images01[:, None]
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"expected [B, H, W] or [B, 1|3, H, W] images, got {tuple(images01.shape)}")
    x = images01 * 2.0 - 1.0
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _inception_v3(num_classes: int) -> nn.Module:
    # aux_logits off: the paper's Keras model had no auxiliary head; transform_input off: our
    # inputs are already in [-1, 1] (the torchvision flag assumes ImageNet normalization).
    return models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                               transform_input=False, num_classes=num_classes)


def _densenet121(num_classes: int) -> nn.Module:
    return models.densenet121(weights=None, num_classes=num_classes)


def _unet(num_classes: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1, norm="batch")


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "inception_v3": _inception_v3,
    "densenet121": _densenet121,
    "unet": _unet,
}


def get_network(name: str, num_classes: int = 2, pretrained: str | Path | None = None) -> nn.Module:
    """Build ``inception_v3``, ``densenet121`` (torchvision) or ``unet`` (MONAI, localization baseline).

    Nothing is downloaded. ``pretrained`` is a local state_dict file (for example torchvision's
    ImageNet weights saved beforehand); it loads with ``weights_only=True`` and the
    classification head is skipped when its shape differs (ImageNet's 1000 classes).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(_BUILDERS)}")
    net = _BUILDERS[name](num_classes)
    if pretrained is not None:
        load_weights(net, pretrained, skip_mismatched=True)
    return net


def load_weights(net: nn.Module, path: str | Path, skip_mismatched: bool = False) -> nn.Module:
    """Load a plain state_dict (``weights_only=True``); with ``skip_mismatched``, drop shape mismatches."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot load weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if skip_mismatched:
        own = net.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(state, strict=False)
    else:
        net.load_state_dict(state)
    return net


def randomization_blocks(arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """Named blocks of ``arch`` for cascading randomization, head first."""
    if arch not in RANDOMIZATION_BLOCKS:
        raise ValueError(f"no randomization blocks for {arch!r}; choose one of {sorted(RANDOMIZATION_BLOCKS)}")
    return RANDOMIZATION_BLOCKS[arch]


def verdict_state(arch: str, states: list[str]) -> str:
    """The randomization state the verdict reads for ``arch`` (see :data:`PAPER_FINAL_STATE`)."""
    if not states:
        raise ValueError("no randomization states")
    want = PAPER_FINAL_STATE.get(arch)
    return want if want in states else states[-1]


def trained_image_size(weights: str | Path) -> int | None:
    """The input size recorded by training beside ``weights`` (``<stem>.metrics.json``), or None."""
    import json

    meta = Path(weights).with_suffix(".metrics.json")
    if not meta.is_file():
        return None
    try:
        size = json.loads(meta.read_text()).get("image_size")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta}: unreadable training record ({exc})") from None
    return int(size) if size else None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (model hashes for provenance)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
