"""XRAI's region part: Felzenszwalb segments (SLIC supervoxels on volumes, cached per image) and the full
greedy, vectorized.

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

Volumes (``[D, H, W, C]`` for the segmentation, ``[B, D, H, W]`` attributions) cannot use
Felzenszwalb (scikit-image's is 2-D only). They are over-segmented by SLIC supervoxels at several
segment counts (``Recipe.xrai_volume_segments``), on a copy scaled to [-1, 1] whose longest side is
at most ``xrai_volume_segment_size`` voxels; the masks are dilated on that grid by a 3-D ball
(``xrai_volume_dilation``), grouped into atoms there without ever holding all masks at once (one
bit per mask and voxel, 63 to a word), and the atoms are taken to the volume's grid by nearest
neighbour. The greedy is the same code. :func:`volume_xrai_deviation` says this in one sentence.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import felzenszwalb, slic
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


def volume_xrai_deviation(recipe: Recipe) -> str:
    """The sentence a report prints when XRAI ran on volumes under ``recipe``."""
    counts = "/".join(str(n) for n in recipe.xrai_volume_segments)
    return (f"XRAI on volumes: SLIC supervoxels ({counts} segments, compactness {recipe.xrai_volume_compactness:g}, "
            f"sigma {recipe.xrai_sigma:g}) on a copy at most {recipe.xrai_volume_segment_size} voxels on its longest "
            f"side, masks dilated there by a ball of radius {recipe.xrai_volume_dilation} and taken to the volume's "
            "grid by nearest neighbour, instead of the paper's Felzenszwalb at six scales on a 224 px copy dilated "
            "by disk(5) (Felzenszwalb is 2-D only); the same greedy ranking by attribution density.")


#: :func:`volume_xrai_deviation` of the default recipe (both presets share the volume settings).
VOLUME_XRAI_DEVIATION = volume_xrai_deviation(Recipe())


def segment_grid(shape: Sequence[int], size: int) -> tuple[int, ...]:
    """The grid a volume of ``shape`` is segmented on: longest side at most ``size``, aspect kept, never enlarged."""
    f = min(1.0, size / max(shape))
    return tuple(max(1, round(n * f)) for n in shape)


def _volume_segment_input(image_dhwc: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The copy SLIC sees: scaled to [-1, 1] over all channels, shrunk (linear, anti-aliased) to the segment grid."""
    im = image_dhwc.astype(np.float64)
    lo, hi = im.min(), im.max()
    im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
    im = im * 2.0 - 1.0
    grid = segment_grid(im.shape[:3], recipe.xrai_volume_segment_size)
    if grid != im.shape[:3]:
        # Linear with anti-aliasing: skimage's cubic resize of a volume takes seconds (11 s for 128^3 on one core).
        im = resize(im, (*grid, im.shape[3]), order=1, mode="edge", preserve_range=True, anti_aliasing=True)
    return im


def _volume_segment_counts(image_dhwc: np.ndarray, recipe: Recipe, counts: Sequence[int]) -> np.ndarray:
    small = _volume_segment_input(image_dhwc, recipe)
    one = small.shape[3] == 1
    labels = [slic(small[..., 0] if one else small, n_segments=int(n), compactness=recipe.xrai_volume_compactness,
                   sigma=recipe.xrai_sigma, channel_axis=None if one else -1, start_label=0).astype(np.int32)
              for n in counts]
    return np.stack(labels)


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
    """Felzenszwalb label maps ``[scales, H, W]`` (int32) on the image grid, as PAIR computes them.

    A volume ``[D, H, W, C]`` gets SLIC label maps ``[len(xrai_volume_segments), d, h, w]`` on its
    segmentation grid (:func:`segment_grid`), not the volume's.
    """
    if image_hwc.ndim == 4:
        return _volume_segment_counts(image_hwc, recipe, recipe.xrai_volume_segments)
    return _segment_scales(image_hwc, recipe, recipe.xrai_scales)


class _Pending:
    """One image's segmentation running on the pool, its scales split over ``parts`` tasks.

    Each task resizes the image itself: a few ms, repeated per task, against ~100 ms per scale.
    A volume (``[D, H, W, C]``) splits its SLIC segment counts the same way.
    """

    def __init__(self, image_hwc: np.ndarray, recipe: Recipe, parts: int) -> None:
        volume = image_hwc.ndim == 4
        scales = list(recipe.xrai_volume_segments if volume else recipe.xrai_scales)
        run = _volume_segment_counts if volume else _segment_scales
        parts = max(1, min(parts, len(scales)))
        self.groups = [list(range(i, len(scales), parts)) for i in range(parts)]
        self.futures = [pool("xrai-segments").submit(run, image_hwc, recipe, [scales[k] for k in g])
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


def ball_offsets(radius: int, ndim: int = 3) -> torch.Tensor:
    """Integer offsets ``[P, ndim]`` of skimage's ``ball(radius)`` (``disk`` for ``ndim=2``): |offset| <= radius."""
    r = torch.arange(-radius, radius + 1)
    grid = torch.stack(torch.meshgrid(*([r] * ndim), indexing="ij"), -1).reshape(-1, ndim)
    return grid[(grid**2).sum(1) <= radius**2]


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
    """Pixels (voxels) grouped by mask membership: ``membership [M, A]``, ``inverse [N]``, ``sizes [A]``."""

    membership: torch.Tensor
    inverse: torch.Tensor
    sizes: torch.Tensor
    shape: tuple[int, ...]


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


def membership_words(labels: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Which dilated masks hold each voxel, 63 masks to an int64 word: ``([N, words], M)``.

    ``labels [S, *grid]``: one label map per scale; every label of every scale is a mask (ids
    ``min..max`` per scale, scale after scale, as :func:`masks_from_labels` orders them), dilated by
    the footprint ``offsets`` (:func:`ball_offsets`). A voxel is in a dilated mask when a voxel at
    one of the offsets carries its label (the footprint is symmetric), so each offset and scale is
    one gather and one scatter over the voxels; no ``[M, N]`` mask is ever made.
    """
    S, *grid = labels.shape
    nd = len(grid)
    N = int(np.prod(grid))
    dev = labels.device
    rel = torch.empty(labels.shape, dtype=torch.int64, device=dev)
    base = 0
    for s in range(S):
        lo, hi = int(labels[s].min()), int(labels[s].max())
        rel[s] = labels[s].long() - lo + base
        base += hi - lo + 1
    M = base
    words = (M + 62) // 63
    packed = torch.zeros((N, words), dtype=torch.int64, device=dev)
    r = int(offsets.abs().max()) if offsets.numel() else 0
    padded = F.pad(rel, (r, r) * nd, value=-1) if r else rel
    one = torch.ones((), dtype=torch.int64, device=dev)
    for off in offsets.tolist():
        window = tuple(slice(r + o, r + o + n) for o, n in zip(off, grid, strict=True))
        shifted = padded[(slice(None), *window)].reshape(S, N)
        for s in range(S):
            v = shifted[s]
            valid = v >= 0
            word = torch.where(valid, v // 63, 0)[:, None]
            bit = torch.where(valid, torch.bitwise_left_shift(one, v.clamp(min=0) % 63), 0)[:, None]
            packed.scatter_(1, word, packed.gather(1, word) | bit)
    return packed, M


def atoms_from_labels(labels: torch.Tensor, offsets: torch.Tensor) -> Atoms:
    """:func:`atoms_from_masks` of the masks of ``labels [S, *grid]`` dilated by ``offsets``, from packed bits.

    Equal to ``atoms_from_masks(masks_from_labels(labels, r))`` for 2-D labels and
    ``ball_offsets(r, 2)``; for volumes it needs memory for the words, not for the masks.
    """
    grid = tuple(labels.shape[1:])
    packed, M = membership_words(labels, offsets)
    N = packed.shape[0]
    uniq, inverse = torch.unique(packed, dim=0, return_inverse=True)
    A = uniq.shape[0]
    first = torch.full((A,), N, dtype=torch.long, device=packed.device)
    first.scatter_reduce_(0, inverse, torch.arange(N, device=packed.device), reduce="amin")
    m = torch.arange(M, device=packed.device)
    membership = ((packed[first][:, m // 63] >> (m % 63)) & 1).bool().T.contiguous()  # [M, A]
    sizes = torch.bincount(inverse, minlength=A)
    return Atoms(membership=membership, inverse=inverse, sizes=sizes, shape=grid)


def nearest_index(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """For each of ``n_out`` output cells the nearest of ``n_in`` input cells (half-pixel centres)."""
    i = torch.arange(n_out, dtype=torch.float64, device=device)
    return torch.floor((i + 0.5) * (n_in / n_out)).long().clamp(max=n_in - 1)


def volume_atoms(labels: torch.Tensor, recipe: Recipe, shape: Sequence[int]) -> Atoms:
    """Atoms of a volume of ``shape`` from its SLIC ``labels [S, d, h, w]`` on the segmentation grid.

    Masks are dilated by ``ball(xrai_volume_dilation)`` on that grid; each voxel of the volume
    takes the atom of its nearest segmentation-grid voxel.
    """
    low = atoms_from_labels(labels, ball_offsets(recipe.xrai_volume_dilation, labels.ndim - 1).to(labels.device))
    shape = tuple(int(n) for n in shape)
    if shape == low.shape:
        return low
    dev = labels.device
    idx = [nearest_index(n_in, n_out, dev) for n_in, n_out in zip(low.shape, shape, strict=True)]
    grid = low.inverse.view(low.shape)
    inverse = grid[idx[0]][:, idx[1]][:, :, idx[2]].reshape(-1)
    sizes = torch.bincount(inverse, minlength=low.membership.shape[1])
    return Atoms(membership=low.membership, inverse=inverse, sizes=sizes, shape=shape)


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
    def key_from(state: Any, recipe: Recipe, volume: bool = False) -> str:
        """The key of an image given its :func:`~saliency_trust.saliency.hostwork.content_hash`.

        ``volume=True``: the key of a volume, made from the settings its SLIC segmentation uses.
        """
        if volume:
            settings: tuple = ("xrai-volume", recipe.xrai_volume_segments, recipe.xrai_volume_compactness,
                               recipe.xrai_volume_segment_size, recipe.xrai_sigma, recipe.xrai_volume_dilation)
        else:
            settings = ("xrai", recipe.xrai_segment_size, recipe.xrai_scales, recipe.xrai_sigma,
                        recipe.xrai_min_segment, recipe.xrai_dilation)
        return derived(state, repr(settings)).hex()

    @staticmethod
    def key(image_hwc: np.ndarray, recipe: Recipe) -> str:
        """An image's key: its content (hashed in ``[C, H, W]`` order, as ``explain`` does) and the settings.

        ``[D, H, W, C]`` is a volume (hashed in ``[C, D, H, W]`` order).
        """
        return SegmentCache.key_from(content_hash(np.moveaxis(image_hwc, -1, 0)), recipe, volume=image_hwc.ndim == 4)

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
        if image_hwc.ndim == 4:
            atoms = volume_atoms(labels, recipe, image_hwc.shape[:3])
        else:
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


def greedy_by_updates(attribution: torch.Tensor, atoms: Atoms, min_pixel_diff: int = 50,
                      area_threshold: float = 1.0) -> torch.Tensor:
    """The same 'full' greedy for one map (any shape), keeping each mask's uncovered count and sum up to date.

    A step subtracts only the newly covered atoms' sizes and sums from the masks that hold them,
    instead of recounting every mask over every atom: the work is about one pass over the
    membership matrix in all, not one per step. Volumes need this (tens of thousands of atoms and
    hundreds of masks); counts stay exact (integers in float64), sums carry the rounding of their
    subtractions (about 1e-16 relative per step). Returns float64 of ``attribution``'s shape.
    """
    dev = attribution.device
    N = attribution.numel()
    inverse = atoms.inverse.to(dev)
    member = atoms.membership.to(dev)
    memf = member.to(torch.float64)
    size = atoms.sizes.to(dev, torch.float64)
    asum = torch.zeros(size.shape[0], dtype=torch.float64, device=dev).index_add_(
        0, inverse, attribution.reshape(-1).double())
    counts, sums = memf @ size, memf @ asum
    alive = member.any(1)
    covered = torch.zeros(size.shape[0], dtype=torch.bool, device=dev)
    value = torch.full(size.shape, -torch.inf, dtype=torch.float64, device=dev)
    covered_size = 0.0
    for _ in range(member.shape[0]):
        alive &= counts >= min_pixel_diff
        gain = torch.where(alive, sums / counts.clamp(min=1), -torch.inf)
        best = int(gain.argmax())  # first index on ties, as the batched greedy and PAIR
        best_gain = gain[best]
        if not bool(torch.isfinite(best_gain)) or covered_size / N > area_threshold:
            break
        new = (member[best] & ~covered).nonzero()[:, 0]
        value[new] = best_gain
        covered[new] = True
        covered_size += float(size[new].sum())
        counts -= memf[:, new] @ size[new]
        sums -= memf[:, new] @ asum[new]
        alive[best] = False
    rest = ~torch.isfinite(value)
    if rest.any():
        value[rest] = asum[rest].sum() / size[rest].sum()
    return value[inverse].view(attribution.shape)


def xrai_greedy(
    attributions: torch.Tensor,
    atoms: list[Atoms],
    min_pixel_diff: int = 50,
    area_threshold: float = 1.0,
) -> torch.Tensor:
    """XRAI 'full' region maps (float64) for ``attributions [B, H, W]`` or ``[B, D, H, W]``, same shape.

    Images run together, batched (below); volumes one by one through :func:`greedy_by_updates`.
    """
    if attributions.ndim == 4:
        return torch.stack([greedy_by_updates(a, at, min_pixel_diff, area_threshold)
                            for a, at in zip(attributions, atoms, strict=True)])
    B = attributions.shape[0]
    dev = attributions.device
    N = int(np.prod(attributions.shape[1:]))
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
    return out.view(attributions.shape)
