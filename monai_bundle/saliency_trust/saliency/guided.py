"""Guided ReLUs and Grad-CAM layer capture without touching the user's model.

Module hooks miss functional ReLUs (torchvision InceptionV3 has no ``nn.ReLU`` at all, and
DenseNet121 ends with ``F.relu``), and swapping modules mutates the model. Instead a
``TorchFunctionMode`` is active only during our own forward pass:

* with ``guided=True`` every ReLU call -- ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their
  in-place forms, which ``nn.ReLU`` also goes through -- becomes a guided ReLU whose backward
  passes gradient only where the forward output is > 0 and the incoming gradient is > 0;
* with ``capture=<module>`` the module's output is recorded by a forward hook (removed at exit);
  if that output is immediately fed to a ReLU (DenseNet's ``features`` -> ``F.relu``), the ReLU's
  output is recorded instead, so Grad-CAM always sees the post-ReLU map the paper used.

Nothing on the model changes, and the mode is gone when the ``with`` block ends.
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
    """Guide ReLUs and/or capture the Grad-CAM activation during a forward pass."""

    def __init__(self, guided: bool = False, capture: nn.Module | None = None) -> None:
        super().__init__()
        self.guided = guided
        self.capture = capture
        self._pre: torch.Tensor | None = None
        self.activation: torch.Tensor | None = None
        self._handle = None

    def __enter__(self) -> ReluMode:
        if self.capture is not None:
            self._handle = self.capture.register_forward_hook(self._record)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        super().__exit__(*exc)

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._pre = output
        self.activation = output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS or func in _RELUS_INPLACE:
            x = args[0]
            consumes_capture = self._pre is not None and x is self._pre
            if self.guided:
                out = guided_relu(x)
            elif consumes_capture:
                out = torch.relu(x)  # out of place: the captured map must survive for its gradient
            else:
                out = func(*args, **kwargs)
            if consumes_capture:
                self.activation = out
                self._pre = None
            return out
        return func(*args, **kwargs)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path), with a clear error when it is absent."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"model has no layer {name!r} for Grad-CAM; give cam_layer= one of its module names")
    return modules[name]
