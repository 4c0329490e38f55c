"""What a network's forward pass used, read from its autograd graph (no hooks on the model).

The model-folder probe (:meth:`~saliency_trust.networks.ModelFolder.check`) asks which activations a
network applies, and guided backprop (:mod:`saliency_trust.saliency.guided`) finds the ReLU nodes
to guide; both read the graph the same way, here, so ``networks`` needs nothing from ``saliency``.
"""

from __future__ import annotations

import torch

_RELU_NODES = frozenset({"ReluBackward0", "ReluBackward1"})


def relu_nodes(output: torch.Tensor):
    """The ReLU nodes of ``output``'s autograd graph (any ReLU form records the same node), each once."""
    root = output.grad_fn
    if root is None:
        raise ValueError("the output does not depend on the input through autograd; nothing to guide")
    seen = set()  # the node objects themselves, kept alive so that no id is reused mid-walk
    stack = [root]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() in _RELU_NODES:
            yield node
        stack.extend(f for f, _ in node.next_functions if f is not None and f not in seen)


#: Autograd node names (without ``BackwardN``) of activations guided backprop does not guide.
_OTHER_ACTIVATIONS = {"Hardswish": "Hardswish", "Silu": "SiLU", "Gelu": "GELU", "Sigmoid": "Sigmoid",
                      "Hardsigmoid": "Hardsigmoid", "Elu": "ELU", "LeakyRelu": "LeakyReLU", "Tanh": "Tanh",
                      "Mish": "Mish", "Softplus": "Softplus", "Hardtanh": "Hardtanh (e.g. ReLU6)",
                      "PreluKernel": "PReLU", "Glu": "GLU"}


def other_activations(output: torch.Tensor) -> list[str]:
    """The activations other than ReLU in ``output``'s autograd graph (guided backprop leaves them unguided)."""
    root = output.grad_fn
    if root is None:
        return []
    seen, found, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        base = node.name().rstrip("0123456789")
        base = base[: -len("Backward")] if base.endswith("Backward") else base
        if base in _OTHER_ACTIVATIONS:
            found.add(_OTHER_ACTIVATIONS[base])
        stack.extend(f for f, _ in node.next_functions if f is not None and f not in seen)
    return sorted(found)


def has_relu(output: torch.Tensor) -> bool:
    """Whether the forward pass that made ``output`` applied a ReLU (guided backprop needs one)."""
    return next(relu_nodes(output), None) is not None


