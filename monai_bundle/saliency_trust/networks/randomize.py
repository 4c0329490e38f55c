"""Model-parameter randomization (Adebayo et al. 2018) over named blocks (a model folder's, or a registry network's).

Re-initialization scheme (the paper does not state its own): every module inside a block that
has parameters or running statistics is reset as if freshly constructed -- ``reset_parameters()``
for convolutions and linear layers (PyTorch's Kaiming-uniform weights and uniform biases), and for
BatchNorm ``reset_running_stats()`` plus ``reset_parameters()`` (running mean 0, variance 1,
weight 1, bias 0). Random draws come from a generator seeded by ``(seed, block index)``, so a
state is reproducible and independent of the order in which states are made; the assessment seeds
each replicate by its weights' fingerprint (:func:`replicate_seed`), so replicates draw different
random weights. A block whose weights do not change (a TorchScript module has no
``reset_parameters``) is refused (:class:`UnchangedError`). The trained model is never modified:
each state is a copy.

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
    before = [t.detach().clone() for n in members for t in _tensors(modules[n])]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name in members:
                _reset_module(modules[name])
    after = [t.detach() for n in members for t in _tensors(modules[n])]
    if not before or all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise UnchangedError(f"re-initializing {list(members)} left every weight unchanged ({type(model).__name__}: "
                             "a TorchScript module has no reset_parameters); randomization cannot be run on this model")


class UnchangedError(ValueError):
    """Randomization left the weights as they were (e.g. a TorchScript model): its maps would prove nothing."""


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]


def replicate_seed(seed: int, fingerprint: str) -> int:
    """The re-initialization seed of one replicate: from the run's seed and its weights' fingerprint, so
    replicates draw different random weights (the paper's mean +- SD band across replicates)."""
    import hashlib

    return int(hashlib.sha256(f"{int(seed)}:{fingerprint}".encode()).hexdigest()[:12], 16)


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
