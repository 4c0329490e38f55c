"""Small deterministic models for reference tests: the same network with module or functional ReLUs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class TinyNet(nn.Module):
    """conv-relu-conv-relu ('block') -> GAP -> linear. ``functional=True`` uses F.relu."""

    def __init__(self, functional: bool = False, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.block = nn.ReLU()
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.relu(self.conv1(x), inplace=True)
            h = F.relu(self.conv2(h))
        else:
            h = self.block(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def tiny(functional: bool = False, dtype=torch.float64, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(functional).to(dtype).eval()


def images(n: int = 3, size: int = 20, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 3, size, size), generator=g, dtype=dtype) * 2 - 1)


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


_RELUS = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_}
if hasattr(F, "relu_"):
    _RELUS.add(F.relu_)


class ReluMode(TorchFunctionMode):
    """Reference guided backprop: while active, every ReLU call (module or functional) is a guided ReLU.

    Independent of the engine's graph hooks: it replaces the forward op instead of hooking the
    recorded backward node.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


class TinyNet3d(nn.Module):
    """The 3-D twin of :class:`TinyNet`: conv-relu-conv-relu ('block') -> GAP -> linear, on ``[B, C, D, H, W]``."""

    def __init__(self, functional: bool = False, channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv3d(channels, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv3d(4, 6, 3, padding=1, stride=2)
        self.block = nn.ReLU()
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.relu(self.conv2(F.relu(self.conv1(x), inplace=True)))
        else:
            h = self.block(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.mean((2, 3, 4)))


def tiny3d(functional: bool = False, channels: int = 1, dtype=torch.float64, seed: int = 0) -> TinyNet3d:
    torch.manual_seed(seed)
    return TinyNet3d(functional, channels).to(dtype).eval()


def phantom(shape: tuple[int, int, int] = (32, 32, 32), seed: int = 0) -> np.ndarray:
    """A chest-CT-like volume in [-1, 1]: body, two darker lungs, a bright nodule, smooth noise."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    z, y, x = ((np.mgrid[: shape[0], : shape[1], : shape[2]] + 0.5) / np.array(shape)[:, None, None, None]) * 2 - 1
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    lungs = (((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 0.9) ** 2) < 1
    cz, cy, cx = rng.uniform(-0.3, 0.3, 3)
    nodule = (x - 0.4 - cx / 3) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < 0.15**2  # in the right lung
    v = np.where(body, 0.0, -1.0) - 0.8 * lungs + 0.9 * nodule
    v = v + gaussian_filter(rng.normal(0, 0.1, v.shape), 1.0)
    return np.clip(v, -1, 1)


def volumes(n: int = 1, shape: tuple[int, int, int] = (32, 32, 32), channels: int = 1, dtype=torch.float64,
            seed: int = 0) -> torch.Tensor:
    """``[n, channels, D, H, W]`` phantoms (each image its own seed; channels are copies)."""
    v = np.stack([phantom(shape, seed + i) for i in range(n)])[:, None]
    return torch.tensor(np.repeat(v, channels, axis=1), dtype=dtype)
