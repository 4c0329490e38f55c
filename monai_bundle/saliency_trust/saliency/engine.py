"""The gradient engine: input-only gradients over images x samples x steps, in memory-sized chunks.

Every gradient method of the paper is a path integral of input gradients:

    attribution(image b) = mean_j  finalize( sum_k w_k * grad( Z_bj + alpha_k * (P_bj - Z_bj) ) )

with ``j`` over noise samples (or baselines) and ``k`` over integration steps: GRAD and GBP
(one sample, one step), IG (steps), SG (samples), SIG (samples x steps) and XRAI's IG
(two baselines x steps). A path without a baseline (SG) is one point per group with weight 1,
fed to the model as it is: no interpolation arithmetic, and ``finalize`` gets only the sums.
Images are ``[B, C, H, W]`` or volumes ``[B, C, D, H, W]``; nothing here depends on which.

:func:`integrate` flattens all (b, j, k) rows, feeds them through the model in chunks of at
most ``max_rows`` rows (balanced, so that no small ragged chunk is left at the end),
accumulates each (b, j) group with ``index_add_`` and folds a group into its image as soon as
its last step is done, so memory stays at one chunk plus the images in flight, whatever the
number of steps or samples. All chunk bookkeeping is host arithmetic: the loop never waits for
the device.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from saliency_trust.saliency.guided import LayerCapture, guide_relus

GroupFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class IntegrationPath:
    """One method's integration path; see the module docstring for the formula."""

    samples: int  # J groups per image
    alphas: torch.Tensor  # [K] on the device
    weights: torch.Tensor  # [K] on the device
    point: GroupFn  # (b [n], j [n]) -> P [n, C, *spatial]
    baseline: GroupFn | None  # (b [n], j [n]) -> Z [n, C, *spatial]; None: P itself, weight 1 (alphas unused)
    finalize: Callable[..., torch.Tensor]  # (S, P, Z) -> attr; (S, None, None) without a baseline
    # (first, last (b, j) group of a chunk, host ints; group = b * samples + j), called before point()
    prepare: Callable[[int, int], None] | None = None


class GradientEngine:
    """Runs forward + input-gradient passes of one model, optionally guided, bf16, compiled."""

    def __init__(self, model: nn.Module, dtype: str = "float32", compile: bool = False,
                 max_rows: int = 32) -> None:
        self.model = model
        self.max_rows = max(1, int(max_rows))
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        self.dtype = dtype
        self.compiled = torch.compile(model) if compile else None

    def _autocast(self, device: torch.device):
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def gradients(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        guided: bool = False,
        capture: LayerCapture | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """d logit[target] / d x for a batch; with ``capture``, also the layer map and its gradient."""
        x = x.detach().requires_grad_(True)
        n = x.shape[0]
        fixed = self.compiled is not None and not guided and capture is None
        if fixed and n < self.max_rows:
            # One compiled graph: pad the last chunk to the fixed shape instead of recompiling.
            pad = self.max_rows - n
            xin = torch.cat([x, x[-1:].detach().expand(pad, *x.shape[1:])])
            targets = torch.cat([targets, targets[-1:].expand(pad)])
        else:
            xin = x
        with self._autocast(x.device), (capture if capture is not None else contextlib.nullcontext()):
            logits = (self.compiled if fixed else self.model)(xin)
        score = logits.to(x.dtype).gather(1, targets[:, None]).sum()
        if guided:
            guide_relus(score)
        if capture is not None:
            act = capture.activation
            capture.activation = None
            if act is None:
                raise RuntimeError("the Grad-CAM layer did not run in the forward pass")
            g, ga = torch.autograd.grad(score, [x, act])
            return g, act.detach().to(x.dtype), ga.to(x.dtype)
        (g,) = torch.autograd.grad(score, [x])
        return g, None, None

    def chunk_rows(self, total: int) -> int:
        """Rows per chunk for ``total`` rows: ``max_rows`` spread evenly (fixed when compiled)."""
        if self.compiled is not None:
            return self.max_rows  # one graph shape; the last chunk is padded
        return max(1, math.ceil(total / max(1, math.ceil(total / self.max_rows))))

    def integrate(self, images: torch.Tensor, targets: torch.Tensor, path: IntegrationPath) -> torch.Tensor:
        """Attributions ``[B, C, *spatial]`` of ``images`` along ``path`` (see module docstring)."""
        B = images.shape[0]
        per_row = (-1, *([1] * (images.ndim - 1)))
        pointwise = path.baseline is None
        J, K = path.samples, 1 if pointwise else len(path.alphas)
        total = B * J * K
        out = torch.zeros_like(images)
        carry_group, carry_sum = -1, None
        rows = self.chunk_rows(total)
        for start in range(0, total, rows):
            stop = min(start + rows, total)
            if path.prepare is not None:
                path.prepare(start // K, (stop - 1) // K)
            r = torch.arange(start, stop, device=images.device)
            g, k = r // K, r % K
            b, j = g // J, g % J
            if pointwise:
                grads, _, _ = self.gradients(path.point(b, j), targets[b])
            else:
                P, Z = path.point(b, j), path.baseline(b, j)
                a = path.alphas[k].view(per_row)
                grads, _, _ = self.gradients(Z + a * (P - Z), targets[b])
                grads = grads * path.weights[k].view(per_row)
            g0 = int(start // K)
            n_local = int((stop - 1) // K) - g0 + 1
            if K == 1:  # one row per group: the sums are the gradients themselves
                S = grads.to(images.dtype)
            else:
                S = torch.zeros((n_local, *images.shape[1:]), dtype=images.dtype, device=images.device)
                S.index_add_(0, g - g0, grads)
            if carry_sum is not None and carry_group == g0:
                S[0] += carry_sum
            complete = n_local if (stop % K == 0) else n_local - 1
            if complete < n_local:
                carry_group, carry_sum = g0 + n_local - 1, S[-1].clone()
            else:
                carry_group, carry_sum = -1, None
            if complete:
                gg = torch.arange(g0, g0 + complete, device=images.device)
                gb, gj = gg // J, gg % J
                if pointwise:
                    attr = path.finalize(S[:complete], None, None)
                else:
                    attr = path.finalize(S[:complete], path.point(gb, gj), path.baseline(gb, gj))
                out.index_add_(0, gb, attr / J)
        return out


_PER_ROW: weakref.WeakKeyDictionary[nn.Module, dict[tuple, float]] = weakref.WeakKeyDictionary()
#: The CPU default for images (what it always was) and the cap for volumes on the CPU.
CPU_ROWS = 32


def _available_host_bytes() -> int:
    """Memory the host can give now (``MemAvailable``; all physical memory where that is not readable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _cpu_row_bytes(model: nn.Module, images: torch.Tensor, engine_dtype: str) -> float:
    """Bytes one row of a chunk needs on the CPU, from a one-row forward pass.

    What autograd saves for the backward pass (each storage once, the model's own weights left out:
    they are there whatever the rows) is the activation memory a row holds; the backward's gradient
    buffers are about as much again, and the engine keeps a few input-sized tensors per row (point,
    baseline, interpolated input, its gradient, the sums).
    """
    sizes: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    x = images[:1].detach().clone().requires_grad_(True)
    autocast = (torch.autocast(device_type="cpu", dtype=torch.bfloat16) if engine_dtype == "bfloat16"
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x)
    return 2.0 * sum(sizes.values()) + 6.0 * x.numel() * x.element_size()


def auto_max_rows(model: nn.Module, images: torch.Tensor, budget_mb: int | None, engine_dtype: str) -> int:
    """Rows per chunk that fit ``budget_mb`` of activation memory.

    On CUDA a probe (one 2-row pass) measures the memory a row takes; ``budget_mb=None`` means
    half of the device memory free now (what the caching allocator holds unused counts as free).
    At most 1024 rows. On the CPU, images (``[B, C, H, W]``) take 32 rows as they always did;
    volumes (``[B, C, D, H, W]``) take as many rows as fit the budget (``None``: half of the
    host memory available now), at most 32, with a row's size from what autograd saves in a
    one-row forward pass (:func:`_cpu_row_bytes`). Either probe runs once per model, input
    shape and dtype; later calls reuse its figure.
    """
    dev = images.device
    if dev.type != "cuda" and images.ndim <= 4:
        return CPU_ROWS
    key = (tuple(images.shape[1:]), images.dtype, engine_dtype, str(dev))
    memo = _PER_ROW.setdefault(model, {})
    if dev.type != "cuda":
        if key not in memo:
            memo[key] = max(_cpu_row_bytes(model, images, engine_dtype), 1.0)
        budget = budget_mb * 2**20 if budget_mb is not None else _available_host_bytes() / 2
        return max(1, min(int(budget // memo[key]), CPU_ROWS))
    if key not in memo:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        probe = GradientEngine(model, dtype=engine_dtype, max_rows=2)
        x = images[:1].expand(2, *images.shape[1:]).contiguous()
        probe.gradients(x, torch.zeros(2, dtype=torch.long, device=dev))
        torch.cuda.synchronize(dev)
        memo[key] = max((torch.cuda.max_memory_allocated(dev) - base) / 2, 1)
    if budget_mb is None:
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        budget = free / 2
    else:
        budget = budget_mb * 2**20
    return max(1, min(int(budget // memo[key]), 1024))
