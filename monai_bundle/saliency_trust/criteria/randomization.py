"""Sensitivity to trained weights: maps of randomized model states compared with the trained maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from saliency_trust.criteria.agreement import blank, defined_ssim
from saliency_trust.criteria.baselines import random_pair_ssim
from saliency_trust.metrics import spearman
from saliency_trust.networks import randomization_blocks, randomization_states, verdict_state
from saliency_trust.saliency import SegmentCache, explain, predict
from saliency_trust.settings import TARGETS


@dataclass(kw_only=True)
class RandomizationCurve:
    """One cascade of randomized states compared with the trained maps, per state and image.

    ``ssim`` / ``spearman``: method -> ``[S, N]`` (NaN where a map is blank); ``undefined`` /
    ``spearman_undefined``: method -> per-state counts of undefined images; ``class_changed``: per
    state, how many images the state predicts differently from the trained model; ``baseline``:
    method -> SSIM between trained maps of different images (the paper's dotted line), ``[N *
    pairs]`` grouped by image; ``cascade_mean``: method -> mean over states of the mean SSIM over
    images; ``examples``: method -> ``[S, len(examples), H, W]`` maps for the figures;
    ``trained_maps``: the trained model's maps (not kept in a saved step).
    """

    states: list[str]
    verdict_state: str
    class_changed: list[int]
    ssim: dict[str, torch.Tensor]
    spearman: dict[str, torch.Tensor]
    undefined: dict[str, list[int]]
    spearman_undefined: dict[str, list[int]]
    baseline: dict[str, torch.Tensor]
    cascade_mean: dict[str, float]
    examples: dict[str, torch.Tensor]
    trained_maps: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def verdict_index(self) -> int:
        """The row of :attr:`verdict_state` in the per-state arrays."""
        return self.states.index(self.verdict_state)

    def to_state(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts on the CPU (what ``torch.load(weights_only=True)`` reads back),
        without the trained maps."""
        out = asdict(replace(self, trained_maps=None))
        del out["trained_maps"]
        for key in ("ssim", "spearman", "baseline", "examples"):
            out[key] = {m: v.cpu() for m, v in out[key].items()}
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RandomizationCurve:
        """The curve :meth:`to_state` saved."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


def randomization_curves(
    model: nn.Module,
    blocks: str | Sequence[tuple[str, Sequence[str]]],
    images: torch.Tensor,
    methods: Sequence[str],
    *,
    preset: str = "paper",
    mode: str = "cascading",
    seed: int = 0,
    data_range: float = 1.0,
    pairs_per_image: int = 50,
    segment_cache: SegmentCache | None = None,
    explain_fn: Callable[[nn.Module, torch.Tensor | None], dict[str, torch.Tensor]] | None = None,
    examples: Sequence[int] = (),
    progress: bool = False,
    target: str = "own",
    trained_maps: dict[str, torch.Tensor] | None = None,
    trained_targets: torch.Tensor | None = None,
    verdict_block: str | None = None,
    init_seed: int | None = None,
    full_cascade: bool = True,
    **overrides,
) -> RandomizationCurve:
    """SSIM and Spearman of every randomized state's maps to the trained maps, per image.

    ``blocks``: the randomization blocks, head first (a model folder's, or a registry network's
    name); ``verdict_block``: the state the verdict reads (default: the registry's rule for a name,
    else the last state).

    ``target="own"``: each state explains its own predicted class, as the paper's pipeline did
    (argmax of the model being explained); ``"trained"``: the trained model's class, so a change
    comes from the weights alone. ``trained_maps`` / ``trained_targets`` are the trained model's
    maps and explained classes when the caller already has them (no second ``explain``). Blank
    maps make SSIM and Spearman undefined (NaN; counted in ``"undefined"`` per state).

    Returns a :class:`RandomizationCurve` (``baseline``: SSIM between trained maps of different images, the
    paper's dotted line,
    grouped by image. ``explain_fn(state, targets)`` replaces the default ``explain`` over all
    images (the assessment shards images across processes with it). ``init_seed`` seeds the
    re-initialization (default ``seed``; the assessment gives each replicate its own,
    :func:`~saliency_trust.networks.randomize.replicate_seed`). ``"cascade_mean"`` is the mean over
    states of the mean SSIM over images: the whole curve in one number. ``full_cascade`` False stops
    at ``verdict_block`` (the paper's cascade ended there); True goes on to the last block.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    cache = segment_cache or SegmentCache()
    if explain_fn is None:
        def explain_fn(net: nn.Module, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
            return explain(net, images, methods, targets=targets, preset=preset, segment_cache=cache, seed=seed,
                           **overrides)
    keep = torch.as_tensor(list(examples), dtype=torch.long)
    if trained_targets is None:
        was_training = model.training
        model.eval()
        try:
            trained_targets = predict(model, images).argmax(1)
        finally:
            model.train(was_training)
    trained = trained_maps if trained_maps is not None else explain_fn(model, trained_targets)
    out: dict = {"states": [], "ssim": {m: [] for m in methods}, "spearman": {m: [] for m in methods},
                 "examples": {m: [] for m in methods}, "undefined": {m: [] for m in methods},
                 "spearman_undefined": {m: [] for m in methods}, "class_changed": []}
    block_list = randomization_blocks(blocks) if isinstance(blocks, str) else list(blocks)
    states = randomization_states(model, block_list, mode=mode, seed=seed if init_seed is None else init_seed)
    if progress:
        from tqdm.auto import tqdm

        states = tqdm(states, total=len(block_list), desc="randomization", unit="state", leave=False)
    for name, state in states:
        own = predict(state, images).argmax(1)
        targets = own if target == "own" else trained_targets
        maps = explain_fn(state, targets.to(images.device))
        out["states"].append(name)
        out["class_changed"].append(int((own.cpu() != trained_targets.cpu()).sum()))
        for m in methods:
            a, b = maps[m], trained[m].to(maps[m].device)
            s = defined_ssim(a, b, data_range)
            r = spearman(a, b)
            out["ssim"][m].append(s)
            out["spearman"][m].append(r)
            out["undefined"][m].append(int((blank(a) | blank(b)).sum()))
            out["spearman_undefined"][m].append(int((~torch.isfinite(r)).sum()))
            out["examples"][m].append(a[keep.to(a.device)].cpu())
        del state, maps
        if not full_cascade and name == verdict_block:
            break
    for key in ("ssim", "spearman", "examples"):
        out[key] = {m: torch.stack(v) for m, v in out[key].items()}
    if verdict_block is not None and verdict_block in out["states"]:
        out["verdict_state"] = verdict_block
    elif isinstance(blocks, str):
        out["verdict_state"] = verdict_state(blocks, out["states"])
    else:
        out["verdict_state"] = out["states"][-1]
    out["cascade_mean"] = {m: float(torch.nanmean(torch.nanmean(out["ssim"][m].double(), 1)))
                           if torch.isfinite(out["ssim"][m]).any() else float("nan") for m in methods}
    out["baseline"] = {m: random_pair_ssim(trained[m], pairs_per_image, data_range=data_range, seed=seed)
                       for m in methods}
    return RandomizationCurve(**out, trained_maps=trained)
