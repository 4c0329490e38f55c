"""Small deterministic models for reference tests: the same network with module or functional ReLUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
