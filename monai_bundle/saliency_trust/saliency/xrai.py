"""XRAI's region part: Felzenszwalb segments (cached per image) and the full greedy, vectorized.

Segmentation depends on the image only, so :class:`SegmentCache` keeps, per image content
hash, the six label maps and the "atoms" derived from them: the pixels grouped by which
dilated masks contain them. Every mask and every union of masks is a union of atoms, so the
greedy's per-mask counts and attribution sums are exact small mat-vecs over atoms
(``[M, A]`` with A in the thousands) instead of over pixels, and all images of a batch run
the greedy together with no host synchronisation per step.

The greedy is PAIR's ``algorithm='full'``: repeatedly drop masks that would add fewer than
``min_pixel_diff`` new pixels, take the mask with the highest mean attribution over its new
pixels (first index on ties), give those pixels that gain, until the covered fraction exceeds
``area_threshold`` or no mask is left; uncovered pixels get their own mean attribution.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb
from skimage.transform import resize

from saliency_trust.saliency.hostwork import content_hash, derived, host_threads, pool
from saliency_trust.saliency.presets import Recipe


def _segment_input(image_hwc: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The copy Felzenszwalb sees: scaled to [-1, 1], resized to ``xrai_segment_size`` (as PAIR)."""
    im = image_hwc.astype(np.float64)
    lo, hi = im.min(), im.max()
    im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
    im = im * 2.0 - 1.0
    size = recipe.xrai_segment_size
    return resize(im, (size, size), order=3, mode="constant", preserve_range=True, anti_aliasing=True)


def _segment_scales(image_hwc: np.ndarray, recipe: Recipe, scales: Sequence[int]) -> np.ndarray:
    small = _segment_input(image_hwc, recipe)
    labels = []
    for scale in scales:
        seg = felzenszwalb(small, scale=scale, sigma=recipe.xrai_sigma, min_size=recipe.xrai_min_segment)
        seg = resize(seg, image_hwc.shape[:2], order=0, preserve_range=True, mode="constant",
                     anti_aliasing=False).astype(np.int32)
        labels.append(seg)
    return np.stack(labels)


def segment_labels(image_hwc: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Felzenszwalb label maps ``[scales, H, W]`` (int32) on the image grid, as PAIR computes them."""
    return _segment_scales(image_hwc, recipe, recipe.xrai_scales)


class _Pending:
    """One image's segmentation running on the pool, its scales split over ``parts`` tasks.

    Each task resizes the image itself: a few ms, repeated per task, against ~100 ms per scale.
    """

    def __init__(self, image_hwc: np.ndarray, recipe: Recipe, parts: int) -> None:
        scales = list(recipe.xrai_scales)
        parts = max(1, min(parts, len(scales)))
        self.groups = [list(range(i, len(scales), parts)) for i in range(parts)]
        self.futures = [pool("xrai-segments").submit(_segment_scales, image_hwc, recipe, [scales[k] for k in g])
                        for g in self.groups]

    def result(self, timeout: float | None = None) -> np.ndarray:
        """The ``[scales, H, W]`` labels in the recipe's scale order (waits for the tasks)."""
        labels: dict[int, np.ndarray] = {}
        for g, fut in zip(self.groups, self.futures, strict=True):
            labels.update(zip(g, fut.result(timeout), strict=True))
        return np.stack([labels[k] for k in range(len(labels))])


def disk(radius: int) -> torch.Tensor:
    """skimage's ``disk(radius)`` footprint as a float tensor."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()


def masks_from_labels(labels: torch.Tensor, dilation: int) -> torch.Tensor:
    """All segments of all scales as bool masks ``[M, H, W]``, dilated by ``disk(dilation)``."""
    masks = []
    for seg in labels:
        lo, hi = int(seg.min()), int(seg.max())
        ids = torch.arange(lo, hi + 1, device=seg.device)
        masks.append(seg[None] == ids[:, None, None])
    m = torch.cat(masks)
    if dilation:
        k = disk(dilation).to(m.device)[None, None]
        m = F.conv2d(m[:, None].float(), k, padding=dilation)[:, 0] > 0.5
    return m


@dataclass
class Atoms:
    """Pixels grouped by mask membership: ``membership [M, A]``, ``inverse [H*W]``, ``sizes [A]``."""

    membership: torch.Tensor
    inverse: torch.Tensor
    sizes: torch.Tensor
    shape: tuple[int, int]


def atoms_from_masks(masks: torch.Tensor) -> Atoms:
    """Group pixels that belong to exactly the same masks."""
    M, H, W = masks.shape
    bits = masks.reshape(M, H * W).T  # [N, M]
    words = (M + 62) // 63
    pad = words * 63 - M
    if pad:
        bits = torch.cat([bits, torch.zeros((H * W, pad), dtype=torch.bool, device=bits.device)], 1)
    weights = (2 ** torch.arange(63, dtype=torch.int64, device=bits.device))
    packed = (bits.view(H * W, words, 63).long() * weights).sum(-1)  # [N, words], exact in int64
    uniq, inverse = torch.unique(packed, dim=0, return_inverse=True)
    A = uniq.shape[0]
    first = torch.full((A,), H * W, dtype=torch.long, device=bits.device)
    first.scatter_reduce_(0, inverse, torch.arange(H * W, device=bits.device), reduce="amin")
    membership = masks.reshape(M, H * W)[:, first]
    sizes = torch.bincount(inverse, minlength=A)
    return Atoms(membership=membership, inverse=inverse, sizes=sizes, shape=(H, W))


class SegmentCache:
    """Per-image XRAI atoms, keyed by image content and segmentation settings (LRU).

    Segmentation runs once per image on the host (skimage, as PAIR), in a pool of threads:
    :meth:`prefetch` starts it without waiting, so ``explain`` on a GPU segments while the
    device runs the gradient passes. The dilated masks and their atoms are built on the device
    and kept, so later model states skip all of it.
    """

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._store: OrderedDict[str, Atoms] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_from(state: Any, recipe: Recipe) -> str:
        """The key of an image given its :func:`~saliency_trust.saliency.hostwork.content_hash`."""
        return derived(state, repr(("xrai", recipe.xrai_segment_size, recipe.xrai_scales, recipe.xrai_sigma,
                                    recipe.xrai_min_segment, recipe.xrai_dilation))).hex()

    @staticmethod
    def key(image_hwc: np.ndarray, recipe: Recipe) -> str:
        """An image's key: its content (hashed in ``[C, H, W]`` order, as ``explain`` does) and the settings."""
        return SegmentCache.key_from(content_hash(np.moveaxis(image_hwc, -1, 0)), recipe)

    def prefetch(self, images_hwc: Sequence[np.ndarray], recipe: Recipe,
                 keys: Sequence[str] | None = None) -> list[str]:
        """Start segmenting the images not cached yet (returns at once); their keys, in order.

        ``keys``: the images' keys if the caller has them (from :meth:`key_from`).
        """
        keys = [self.key(im, recipe) for im in images_hwc] if keys is None else list(keys)
        todo = {k: im for k, im in zip(keys, images_hwc, strict=True)
                if k not in self._store and k not in self._pending}
        parts = host_threads() // max(1, len(todo))  # few images: split each image's scales over threads
        for k, im in todo.items():
            self._pending[k] = _Pending(im, recipe, parts)
        # Segmentations started but never collected (a call that raised after its prefetch) are
        # kept for a later call on the same images, but no more of them than the cache holds.
        while len(self._pending) > self.capacity:
            self._pending.pop(next(iter(self._pending)))
        return keys

    def atoms(self, image_hwc: np.ndarray, recipe: Recipe, device: torch.device, key: str | None = None) -> Atoms:
        """The atoms of one image's dilated segments (computed once, then kept)."""
        k = key or self.key(image_hwc, recipe)
        if k in self._store:
            self.hits += 1
            self._store.move_to_end(k)
            return self._store[k]
        self.misses += 1
        pending = self._pending.pop(k, None) or _Pending(image_hwc, recipe, host_threads())
        labels = torch.from_numpy(pending.result()).to(device)
        atoms = atoms_from_masks(masks_from_labels(labels, recipe.xrai_dilation))
        self._store[k] = atoms
        if len(self._store) > self.capacity:
            self._store.popitem(last=False)
        return atoms

    def atoms_batch(self, images_hwc: Sequence[np.ndarray], recipe: Recipe, device: torch.device,
                    keys: Sequence[str] | None = None) -> list[Atoms]:
        """:meth:`atoms` of several images, their segmentations run side by side.

        ``keys``: the images' keys if the caller has them (saves hashing again). Images already
        segmenting (an earlier :meth:`prefetch`) or cached are not started again.
        """
        keys = self.prefetch(images_hwc, recipe, keys)
        return [self.atoms(im, recipe, device, key=k) for im, k in zip(images_hwc, keys, strict=True)]


DEFAULT_CACHE = SegmentCache()


def xrai_greedy(
    attributions: torch.Tensor,
    atoms: list[Atoms],
    min_pixel_diff: int = 50,
    area_threshold: float = 1.0,
) -> torch.Tensor:
    """XRAI 'full' region maps ``[B, H, W]`` (float64) for 2-D ``attributions [B, H, W]``."""
    B, H, W = attributions.shape
    dev = attributions.device
    N = H * W
    Mmax = max(a.membership.shape[0] for a in atoms)
    Amax = max(a.membership.shape[1] for a in atoms)
    member = torch.zeros((B, Mmax, Amax), dtype=torch.float64, device=dev)
    size = torch.zeros((B, Amax), dtype=torch.float64, device=dev)
    asum = torch.zeros((B, Amax), dtype=torch.float64, device=dev)
    flat = attributions.reshape(B, N).double()
    for i, a in enumerate(atoms):
        M, A = a.membership.shape
        member[i, :M, :A] = a.membership.to(dev, torch.float64)
        size[i, :A] = a.sizes.to(dev, torch.float64)
        asum[i, :A] = torch.zeros(A, dtype=torch.float64, device=dev).index_add_(0, a.inverse.to(dev), flat[i])
    alive = member.sum(-1) > 0  # padding rows are never alive
    covered = torch.zeros((B, Amax), dtype=torch.bool, device=dev)
    value = torch.full((B, Amax), -torch.inf, dtype=torch.float64, device=dev)
    rows = torch.arange(B, device=dev)
    rhs = torch.stack([size, asum], -1)  # [B, A, 2]: one pass over `member` gives counts and sums
    # Masks only ever die and images only ever stop, so every few steps (each step on the CPU, where
    # looking costs nothing; every 16 on a GPU, where it waits for the device) the loop ends once
    # no image is active and drops the masks dead in every image. Order is kept: ties still go to
    # the first mask.
    every = 1 if dev.type == "cpu" else 16
    for step in range(1, Mmax + 1):
        cs = torch.bmm(member, rhs * (~covered)[..., None])
        counts, sums = cs[..., 0], cs[..., 1]
        alive &= counts >= min_pixel_diff
        gain = torch.where(alive, sums / counts.clamp(min=1), -torch.inf)
        best = gain.argmax(1)
        best_gain = gain[rows, best]
        area = (size * covered).sum(1) / N
        active = torch.isfinite(best_gain) & (area <= area_threshold)
        new = (member[rows, best] > 0) & ~covered & active[:, None]
        value = torch.where(new, best_gain[:, None], value)
        covered |= new
        alive[rows, best] &= ~active
        if step % every == 0:
            keep = alive.any(0)
            if not bool(active.any()) or not bool(keep.any()):
                break
            if not bool(keep.all()):
                member, alive = member[:, keep], alive[:, keep]
    out = torch.empty((B, N), dtype=torch.float64, device=dev)
    for i, a in enumerate(atoms):
        A = a.membership.shape[1]
        v = value[i, :A]
        rest = ~torch.isfinite(v)
        if rest.any():
            v = v.clone()
            v[rest] = asum[i, :A][rest].sum() / size[i, :A][rest].sum()
        out[i] = v[a.inverse.to(dev)]
    return out.view(B, H, W)
