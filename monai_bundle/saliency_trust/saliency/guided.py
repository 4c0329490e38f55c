"""Guided ReLUs and Grad-CAM layer capture without touching the user's model.

Module hooks miss functional ReLUs (torchvision InceptionV3 has no ``nn.ReLU`` at all, and
DenseNet121 ends with ``F.relu``), and swapping modules mutates the model. Instead
:class:`ReluMode`, a ``TorchFunctionMode`` active only during our own guided forward pass,
turns every ReLU call -- ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms,
which ``nn.ReLU`` also goes through -- into a guided ReLU whose backward passes gradient only
where the forward output is > 0 and the incoming gradient is > 0.

:class:`LayerCapture` records the Grad-CAM layer with a forward hook that is removed on exit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_RELUS = {F.relu, torch.relu, torch.Tensor.relu}
_RELUS_INPLACE = {torch.relu_, torch.Tensor.relu_}
if hasattr(F, "relu_"):
    _RELUS_INPLACE.add(F.relu_)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


def guided_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU whose backward is guided backpropagation's (Springenberg et al. 2015)."""
    return _GuidedReLU.apply(x)


class ReluMode(TorchFunctionMode):
    """While active, every ReLU call is a guided ReLU (module or functional, in place or not)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS or func in _RELUS_INPLACE:
            return guided_relu(args[0])
        return func(*args, **(kwargs or {}))


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
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"model has no layer {name!r} for Grad-CAM; give cam_layer= one of its module names")
    return modules[name]
