"""Sensitivity to trained weights: maps of randomized model states compared with the trained maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from saliency_trust.criteria.baselines import random_pair_ssim
from saliency_trust.metrics import spearman, ssim
from saliency_trust.networks import RANDOMIZATION_BLOCKS, randomization_states
from saliency_trust.saliency import SegmentCache, explain, predict


def randomization_curves(
    model: nn.Module,
    arch: str,
    images: torch.Tensor,
    methods: Sequence[str],
    preset: str = "paper",
    mode: str = "cascading",
    seed: int = 0,
    data_range: float = 1.0,
    pairs_per_image: int = 50,
    segment_cache: SegmentCache | None = None,
    explain_fn: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    examples: Sequence[int] = (),
    progress: bool = False,
    **overrides,
) -> dict:
    """SSIM and Spearman of every randomized state's maps to the trained maps, per image.

    All states explain the class the *trained* model predicts for each image, so a change in the
    map comes from the weights alone. Returns ``{"states": [...], "ssim": {method: [S, N]},
    "spearman": {method: [S, N]}, "baseline": {method: [N * pairs_per_image]}}`` where the
    baseline is SSIM between trained maps of different images (the paper's dotted line).
    ``segment_cache`` lets XRAI segment each image once for all states. ``explain_fn(state,
    targets)`` replaces the default ``explain`` call over all images (the assessment uses it to
    shard images across processes); ``examples`` are image indices whose per-state maps are kept
    under ``"examples"`` (``{method: [S, len(examples), H, W]}``) for the report's figures.
    """
    cache = segment_cache or SegmentCache()
    if explain_fn is None:
        def explain_fn(net: nn.Module, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            return explain(net, images, methods, targets=targets, preset=preset, segment_cache=cache, **overrides)
    keep = torch.as_tensor(list(examples), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        targets = predict(model, images).argmax(1)
    finally:
        model.train(was_training)
    trained = explain_fn(model, targets)
    out: dict = {"states": [], "ssim": {m: [] for m in methods}, "spearman": {m: [] for m in methods},
                 "examples": {m: [] for m in methods}}
    states = randomization_states(model, arch, mode=mode, seed=seed)
    if progress:
        from tqdm.auto import tqdm

        states = tqdm(states, total=len(RANDOMIZATION_BLOCKS[arch]), desc=f"randomization {arch}", unit="state",
                      leave=False)
    for name, state in states:
        maps = explain_fn(state, targets)
        out["states"].append(name)
        for m in methods:
            out["ssim"][m].append(ssim(maps[m], trained[m], data_range=data_range))
            out["spearman"][m].append(spearman(maps[m], trained[m]))
            out["examples"][m].append(maps[m][keep.to(maps[m].device)].cpu())
        del state, maps
    for key in ("ssim", "spearman", "examples"):
        out[key] = {m: torch.stack(v) for m, v in out[key].items()}
    out["baseline"] = {m: random_pair_ssim(trained[m], pairs_per_image, data_range, seed) for m in methods}
    out["trained_maps"] = trained
    return out
