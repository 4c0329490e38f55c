"""Network registry: the two classifiers of the paper and the localization baseline.

Classifiers take a batch ``[B, 3, H, W]`` in the network's input scale: the grayscale
radiograph in [0, 1] mapped to [-1, 1] (Inception scaling ``x / 127.5 - 1`` on 8-bit data) and
copied to three channels, exactly as the paper fed its Keras models (:func:`to_network_input`).
They return pre-softmax logits ``[B, num_classes]``; saliency explains the predicted logit.

The Grad-CAM layers and cascading randomization blocks of every family live in one table,
:data:`saliency_trust.networks.manifest.FAMILY_DEFAULTS` (InceptionV3: ``fc``, ``Mixed_7c`` ...
``Mixed_5b``, the paper's Logits, mixed10 ... mixed0, its verdict at mixed1 = ``Mixed_5c``;
DenseNet121: ``classifier``, ``denseblock4`` (+ ``norm5``), ``transition3`` ... ``conv0``
(+ ``norm0``)); the helpers below read it for the registry's names.

``resnet50`` and ``efficientnet_b0`` (torchvision) are there for models people bring (a model
folder's ``network`` field); the bundle's own study trains the paper's two.

Volumes: :data:`VOLUME_NETWORKS` names the 3-D networks the bundle trains on CT (``configs/train_ct.json``),
each a MONAI ``_target_`` spec that training writes into the model folder's ``model.json`` as it is, so
a folder never depends on this table: a narrow 3-D DenseNet121 (the primary), a small 3-D ResNet (the
second architecture, ReLUs for guided backprop) and a 3-D U-Net (the localization baseline).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from saliency_trust.networks.manifest import (  # file_sha256: re-exported
    FAMILY_DEFAULTS,
    REGISTRY_CLASSES,
    expand_blocks,
    family_defaults,
    file_sha256,  # noqa: F401
)

#: The classifiers the bundle's own study trains (the paper's two).
CLASSIFIERS = ("inception_v3", "densenet121")


def _family(name: str) -> dict:
    return FAMILY_DEFAULTS.get(REGISTRY_CLASSES.get(name, ""), {})


#: Grad-CAM layer of each registry classifier and whether the model applies a ReLU right after it.
CAM_LAYERS = {n: (_family(n)["cam_layer"], _family(n)["cam_post_relu"])
              for n in ("inception_v3", "densenet121", "resnet50", "efficientnet_b0")}


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


def _resnet50(num_classes: int) -> nn.Module:
    return models.resnet50(weights=None, num_classes=num_classes)


def _efficientnet_b0(num_classes: int) -> nn.Module:
    return models.efficientnet_b0(weights=None, num_classes=num_classes)


def _unet(num_classes: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1, norm="batch")


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "inception_v3": _inception_v3,
    "densenet121": _densenet121,
    "resnet50": _resnet50,
    "efficientnet_b0": _efficientnet_b0,
    "unet": _unet,
}


#: The 3-D networks of the bundle's CT study, as MONAI ``_target_`` specs (one input channel: the windowed CT).
#: Narrow so that they train on two CPU cores in minutes: DenseNet121 keeps its 121-layer topology (blocks
#: 6/12/24/16, the family's Grad-CAM layer and randomization blocks) with 16 initial features and growth rate 8
#: (the paper's: 64 and 32); the ResNet is ResNet-10's layout (one basic block per stage) at a quarter of its
#: widths, its stem striding z too (``conv1_t_stride`` 2, kernel 3), so both divide every axis by 32.
VOLUME_NETWORKS: dict[str, dict] = {
    "densenet121_3d": {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, "in_channels": 1,
                       "out_channels": 2, "init_features": 16, "growth_rate": 8},
    "resnet10_3d": {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
                    "block_inplanes": [16, 32, 64, 128], "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2,
                    "conv1_t_size": 3, "conv1_t_stride": 2},
    "unet_3d": {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"},
}


def volume_network_spec(name: str) -> dict:
    """A copy of :data:`VOLUME_NETWORKS` ``[name]`` (what training writes as ``model.json``'s ``network``)."""
    if name not in VOLUME_NETWORKS:
        raise ValueError(f"unknown 3-D network {name!r}; choose one of {sorted(VOLUME_NETWORKS)}")
    import copy

    return copy.deepcopy(VOLUME_NETWORKS[name])


def build_spec(spec: dict) -> nn.Module:
    """The network a MONAI ``_target_`` spec describes (``monai.networks.nets`` classes only: the specs training
    writes; a model folder's own ``network`` goes through :class:`~saliency_trust.networks.ModelFolder`'s checks)."""
    import importlib

    target = str(spec["_target_"])
    module_name, _, attr = target.rpartition(".")
    if module_name != "monai.networks.nets":
        raise ValueError(f"build_spec builds monai.networks.nets classes, not {target!r}")
    cls = getattr(importlib.import_module(module_name), attr)
    return cls(**{k: v for k, v in spec.items() if k != "_target_"})


def get_network(name: str, num_classes: int = 2, pretrained: str | Path | None = None) -> nn.Module:
    """Build ``inception_v3``, ``densenet121``, ``resnet50``, ``efficientnet_b0`` (torchvision) or ``unet``
    (MONAI, the localization baseline).

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
        # Only the classification head may differ (ImageNet's 1000 classes); every other tensor must load,
        # else a "pretrained" network would silently be mostly random (e.g. renamed keys).
        own = net.state_dict()
        mismatched = {k for k, v in state.items() if k in own and own[k].shape != v.shape}
        missing = [k for k in own if k not in state]
        if missing or not mismatched <= _head_keys(net):
            bad = missing or sorted(mismatched - _head_keys(net))
            raise ValueError(f"{path}: {len(bad)} tensor(s) of {type(net).__name__} do not load from these weights "
                             f"(e.g. {bad[:3]}); only the classification head may differ")
        net.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    else:
        net.load_state_dict(state)
    return net


def _head_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the classification head (the first randomization block of the network's family)."""
    blocks = family_defaults(net).get("randomization_blocks") or []
    head = blocks[0]["modules"] if blocks and isinstance(blocks[0], dict) else []
    return {k for k in net.state_dict() if any(k == m or k.startswith(m + ".") for m in head)}


@functools.lru_cache(maxsize=8)
def randomization_blocks(arch: str) -> list[tuple[str, tuple[str, ...]]]:
    """Named blocks of registry network ``arch`` for cascading randomization, head first."""
    blocks = _family(arch).get("randomization_blocks")
    if arch not in _BUILDERS or blocks is None:
        raise ValueError(f"no randomization blocks for {arch!r}; choose one of {sorted(CAM_LAYERS)}")
    if any(isinstance(b, str) for b in blocks):
        blocks = expand_blocks(get_network(arch), blocks)
    return [(b["name"], tuple(b["modules"])) for b in blocks]


def verdict_state(arch: str, states: list[str]) -> str:
    """The randomization state the verdict reads for registry network ``arch``: where the paper's
    cascade ended (InceptionV3: ``Mixed_5c``), for the other families the same depth (stem and
    first block kept), else the last state (the whole cascade)."""
    if not states:
        raise ValueError("no randomization states")
    family = _family(arch)
    want = family.get("verdict_block")
    keep = family.get("verdict_keep")
    if want is None and keep and arch in _BUILDERS:
        names = [b for b, _ in randomization_blocks(arch)]
        want = names[-keep - 1] if len(names) > keep else None
    return want if want in states else states[-1]
