"""Model-parameter randomization (Adebayo et al. 2018) over named blocks (a model folder's, or a registry network's).

Re-initialization scheme (the paper does not state its own): every module inside a block that
has parameters or running statistics is reset as if freshly constructed -- ``reset_parameters()``
for convolutions and linear layers (PyTorch's Kaiming-uniform weights and uniform biases), and for
BatchNorm ``reset_running_stats()`` plus ``reset_parameters()`` (running mean 0, variance 1,
weight 1, bias 0). Random draws come from a generator seeded by ``(seed, block index)``, so a
state is reproducible and independent of the order in which states are made. The trained
model is never modified: each state is a copy.

* cascading: state k has blocks 0..k (head first) re-initialized -- the paper's Figure 3 curves;
* independent: state k has only block k re-initialized.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from saliency_trust.networks.registry import randomization_blocks


def _reset_module(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_running_stats()
            m.reset_parameters()
        elif hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()


def randomize_block(model: nn.Module, members: tuple[str, ...], seed: int) -> None:
    """Re-initialize the modules named ``members`` of ``model`` in place, reproducibly from ``seed``."""
    modules = dict(model.named_modules())
    missing = [n for n in members if n not in modules]
    if missing:
        raise ValueError(f"model has no module(s) {missing} to randomize")
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name in members:
                _reset_module(modules[name])


def randomization_states(
    model: nn.Module,
    blocks: str | Sequence[tuple[str, Sequence[str]]],
    mode: str = "cascading",
    seed: int = 0,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(block name, randomized copy)`` for each block, head first.

    ``blocks`` are ``(name, module names)`` pairs (:meth:`~saliency_trust.networks.ModelFolder.randomization_blocks`)
    or a registry network's name. ``mode`` is ``"cascading"`` (blocks accumulate, as the paper) or
    ``"independent"`` (one block at a time). Copies are made lazily; the caller's model is left as it is.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    if isinstance(blocks, str):
        blocks = randomization_blocks(blocks)
    current = copy.deepcopy(model) if mode == "cascading" else None
    for k, (name, members) in enumerate(blocks):
        state = current if mode == "cascading" else copy.deepcopy(model)
        randomize_block(state, tuple(members), seed=seed * 1000 + k)
        yield name, (copy.deepcopy(state) if mode == "cascading" else state)
