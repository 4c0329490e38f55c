"""Guided ReLUs and Grad-CAM layer capture without touching the user's model.

Module hooks miss functional ReLUs (torchvision InceptionV3 has no ``nn.ReLU`` at all, and
DenseNet121 ends with ``F.relu``), and swapping modules mutates the model. Instead the forward
pass runs unchanged, with the framework's own kernels, and :func:`guide_relus` then walks the
autograd graph it recorded and puts a pre-hook on every ReLU node -- ``nn.ReLU``, ``F.relu``,
``torch.relu``, ``Tensor.relu`` and their in-place forms all record the same node -- that
clamps the incoming gradient at 0. The node's own backward then keeps it only where the
forward output is > 0: together that is guided backpropagation's rule. The hooks live on
this one graph and are gone with it; nothing is registered on the model.

(Replacing every ReLU call through a ``TorchFunctionMode`` gives the same gradients but pays a
Python dispatch on every operation; the tests keep such a mode as an independent check.)

:class:`LayerCapture` records the Grad-CAM layer with a forward hook that is removed on exit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from saliency_trust.networks.activations import has_relu, other_activations, relu_nodes  # noqa: F401

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_RELUS_INPLACE = {torch.relu_, torch.Tensor.relu_}
if hasattr(F, "relu_"):
    _RELUS_INPLACE.add(F.relu_)


def _clamp_incoming(grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if g is None else g.clamp(min=0) for g in grad_outputs)


def guide_relus(output: torch.Tensor) -> int:
    """Make every ReLU in ``output``'s autograd graph backpropagate the guided way; returns their number.

    Call it between the forward pass and ``torch.autograd.grad``. Raises ``ValueError`` when
    the graph holds no ReLU (guided backprop would silently be the plain gradient).
    """
    n = 0
    for node in relu_nodes(output):
        node.register_prehook(_clamp_incoming)
        n += 1
    if n == 0:
        raise ValueError("guided backprop needs ReLUs, and the model's forward pass used none")
    return n


class _ReluAfter(TorchFunctionMode):
    """Catch the first ReLU applied to ``target`` and run it out of place, keeping its output."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target: torch.Tensor | None = target
        self.result: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.target is not None and (func in _RELUS or func in _RELUS_INPLACE) and args[0] is self.target:
            self.target = None
            self.result = torch.relu(args[0])
            return self.result
        return func(*args, **(kwargs or {}))


class LayerCapture:
    """Record a module's output during a forward pass (forward hook, removed on exit).

    With ``post_relu=True`` the layer's output goes straight into a ReLU that the model applies
    itself (DenseNet's ``features`` -> ``F.relu(..., inplace=True)``): the hook then starts a
    function mode that runs that one ReLU out of place and records its output, so Grad-CAM sees
    the post-ReLU map the paper used and its true gradient. Only the few ops after the layer go
    through the mode; nothing stays on the model after the ``with`` block.
    """

    def __init__(self, module: nn.Module, post_relu: bool = False) -> None:
        self.module = module
        self.post_relu = post_relu
        self.activation: torch.Tensor | None = None
        self._handle = None
        self._mode: _ReluAfter | None = None

    def __enter__(self) -> LayerCapture:
        self.activation = None
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.activation = self._mode.result
            self._mode = None
            if self.activation is None and exc[0] is None:
                raise RuntimeError(f"the output of {type(self.module).__name__} was not fed to a ReLU; "
                                   "use cam_post_relu=False for this layer")

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if self.post_relu:
            if self._mode is None:
                self._mode = _ReluAfter(output)
                self._mode.__enter__()
        else:
            self.activation = output


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path), with a clear error when it is absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no layer {name!r} for Grad-CAM; give cam_layer= one of its module names") from None
