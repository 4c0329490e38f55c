"""``explain``: the paper's eight saliency maps for a batch of images or volumes, in as few model passes as the
maths allows.

Each method of the table (:mod:`saliency_trust.methods`) has one builder here (:data:`_BUILDERS`,
checked at import to cover exactly ``METHODS``); methods that share a pass (GRAD and Grad-CAM,
GBP and GGCAM) get it once through the call's :class:`_Job`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saliency_trust.saliency.engine import GradientEngine, IntegrationPath, auto_max_rows
from saliency_trust.saliency.guided import LayerCapture, find_module
from saliency_trust.saliency.hostwork import content_hash, content_hashes, sample_seed, seed_from, weights_fingerprint
from saliency_trust.saliency.postprocess import minmax, postprocess, visualize_grayscale
from saliency_trust.saliency.presets import METHODS, Recipe, get_recipe
from saliency_trust.saliency.xrai import DEFAULT_CACHE, SegmentCache, volume_xrai_deviation, xrai_greedy


def default_cam_layer(model: nn.Module) -> tuple[str, bool]:
    """The Grad-CAM layer of ``model``'s family and whether a ReLU follows it (see
    :data:`~saliency_trust.networks.modelfolder.FAMILY_DEFAULTS`).

    InceptionV3's ``Mixed_7c`` output is already post-ReLU; DenseNet's ``features`` ends at
    ``norm5`` and the model applies ``F.relu`` after it, so the post-ReLU map is taken there.
    """
    from saliency_trust.networks.modelfolder import family_defaults

    family = family_defaults(model)
    if "cam_layer" not in family:
        raise ValueError(f"no default Grad-CAM layer for {type(model).__name__}; pass cam_layer='<module name>'")
    return family["cam_layer"], family["cam_post_relu"]


@lru_cache(maxsize=64)
def _bilinear_weights(n_in: int, n_out: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`bilinear_matrix` kept on the device (no host copy, so no wait, on later calls)."""
    return bilinear_matrix(n_in, n_out, mode).to(device, dtype)


def bilinear_matrix(n_in: int, n_out: int, mode: str = "half_pixel") -> torch.Tensor:
    """``[n_out, n_in]`` float64 weights of a 1-D bilinear resize.

    ``half_pixel``: skimage's order-1 resize (half-pixel centres, mirror boundary), PyTorch's
    ``align_corners=False``. ``tf1_legacy``: TF1 ``tf.image.resize_bilinear`` with its defaults
    (``align_corners=False``, no half-pixel centres), what the paper's PAIR Grad-CAM ran: output
    pixel i samples input coordinate ``i * n_in / n_out``, the upper neighbour clamped to the last
    row.
    """
    if mode == "tf1_legacy":
        src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
        i0 = torch.floor(src)
        frac = src - i0
        lo = i0.long().clamp(max=n_in - 1)
        hi = (i0 + 1).long().clamp(max=n_in - 1)
    elif mode == "half_pixel":
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
        i0 = torch.floor(src)
        frac = src - i0
        period = max(2 * (n_in - 1), 1)

        def mirror(i: torch.Tensor) -> torch.Tensor:
            i = torch.remainder(i, period)
            return torch.where(i > n_in - 1, period - i, i).long()

        lo, hi = mirror(i0), mirror(i0 + 1)
    else:
        raise ValueError(f"unknown resize mode {mode!r}; use 'tf1_legacy' or 'half_pixel'")
    m = torch.zeros((n_out, n_in), dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def upsample_cam(cam: torch.Tensor, size: Sequence[int], mode: str = "half_pixel") -> torch.Tensor:
    """Bilinear upsampling of ``[B, h, w]`` maps, or trilinear of ``[B, d, h, w]`` volumes, to ``size``.

    Separable: one :func:`bilinear_matrix` per axis (``mode`` as there), so a volume gets exactly
    the 2-D rule along each of its three axes (skimage's order-1 resize with half-pixel centres and
    mirror boundary). The TF1 legacy resize is the paper's 2-D detail: volumes refuse it.
    """
    size = tuple(int(n) for n in size)
    if len(size) == 2 and cam.ndim == 3:
        ry = _bilinear_weights(cam.shape[-2], size[0], mode, cam.device, cam.dtype)
        rx = _bilinear_weights(cam.shape[-1], size[1], mode, cam.device, cam.dtype)
        return ry @ cam @ rx.T
    if len(size) == 3 and cam.ndim == 4:
        if mode == "tf1_legacy":
            raise ValueError("the tf1_legacy resize is the paper's 2-D Grad-CAM detail; upsample volumes with "
                             "'half_pixel'")
        B, d = cam.shape[:2]
        rz = _bilinear_weights(d, size[0], mode, cam.device, cam.dtype)
        ry = _bilinear_weights(cam.shape[-2], size[1], mode, cam.device, cam.dtype)
        rx = _bilinear_weights(cam.shape[-1], size[2], mode, cam.device, cam.dtype)
        planes = ry @ cam @ rx.T  # [B, d, H, W]: each depth plane as in 2-D
        return (rz @ planes.reshape(B, d, -1)).reshape(B, *size)
    raise ValueError(f"upsample_cam takes [B, h, w] maps to (H, W) or [B, d, h, w] volumes to (D, H, W), got "
                     f"{tuple(cam.shape)} to {size}")


def image_seed(image: torch.Tensor, seed: int, model_key: str = "") -> int:
    """A noise seed from the image's content, the recipe seed and the model's weights fingerprint.

    Independent of batch position; the same for one (image, model, seed), different across models.
    """
    return seed_from(content_hash(image), seed, model_key)


def smoothing_noise(image: torch.Tensor, samples: int, sigma_frac: float, seed: int, *,
                    state: Any = None, model_key: str = "") -> torch.Tensor:
    """The ``[samples, C, H, W]`` Gaussian noise SG/SIG add to one ``[C, H, W]`` image.

    sigma = ``sigma_frac`` x (max - min) of the image (PAIR's ``stdev_spread``). The generator
    lives on the image's device, seeded by :func:`image_seed` from the image, ``seed`` and
    ``model_key`` (:func:`~saliency_trust.saliency.hostwork.weights_fingerprint` of the model being
    explained), so the noise is reproducible, does not depend on which other images share the
    batch, and differs between models as the paper's fresh draws did. ``state``, the image's
    :func:`~saliency_trust.saliency.hostwork.content_hash` if the caller has it, saves hashing
    again (and waiting for the device to copy the image out).

    A volume ``[C, D, H, W]`` gets ``[samples, C, D, H, W]``: :func:`volume_noise` of samples
    ``0 .. samples - 1``, each from its own generator (what ``explain`` adds, chunk by chunk).
    """
    if image.ndim == 4:
        return volume_noise(image, range(samples), sigma_frac, seed, state=state, model_key=model_key)
    gen = torch.Generator(device=image.device)
    gen.manual_seed(seed_from(content_hash(image) if state is None else state, seed, model_key))
    sigma = sigma_frac * (image.max() - image.min())
    noise = torch.randn((samples, *image.shape), generator=gen, device=image.device, dtype=image.dtype)
    return noise * sigma


def volume_noise(volume: torch.Tensor, samples: Sequence[int], sigma_frac: float, seed: int, *,
                 state: Any = None, model_key: str = "") -> torch.Tensor:
    """The Gaussian noise of the given sample indices for one ``[C, D, H, W]`` volume: ``[len(samples), C, D, H, W]``.

    Sample ``j`` comes from its own generator, seeded by
    :func:`~saliency_trust.saliency.hostwork.sample_seed` (the volume's content, ``seed``, the
    model's fingerprint and ``j``), so any subset of samples can be drawn alone: SG/SIG on a
    volume hold one chunk of samples at a time, and the noise does not depend on the chunking.
    sigma as in :func:`smoothing_noise`.
    """
    state = content_hash(volume) if state is None else state
    sigma = sigma_frac * (volume.max() - volume.min())
    gen = torch.Generator(device=volume.device)
    out = torch.empty((len(samples), *volume.shape), device=volume.device, dtype=volume.dtype)
    for i, j in enumerate(samples):
        gen.manual_seed(sample_seed(state, seed, model_key, int(j)))
        out[i] = torch.randn(volume.shape, generator=gen, device=volume.device, dtype=volume.dtype)
    return out * sigma


class _NoisyImages:
    """SG/SIG's points ``image + noise`` for 2-D images, made per image when a chunk first reaches it
    and dropped once the chunks move past it.

    ``prepare(first, last)`` (called by the engine with the host indices of the chunk's first and
    last (image, sample) group) fills the images of the chunk; ``__call__(b, j)`` then only
    gathers rows on the device.
    """

    def __init__(self, images: torch.Tensor, states: Sequence[Any], samples: int, sigma: float, seed: int,
                 model_key: str) -> None:
        self.images, self.states = images, states
        self.samples, self.sigma, self.seed, self.model_key = samples, sigma, seed, model_key
        self._cache: dict[int, torch.Tensor] = {}
        self._first = 0
        self._stack: torch.Tensor | None = None

    def prepare(self, first_group: int, last_group: int) -> None:
        first, last = first_group // self.samples, last_group // self.samples
        for stale in [k for k in self._cache if k < first]:
            del self._cache[stale]
        for bb in range(first, last + 1):
            if bb not in self._cache:
                noise = smoothing_noise(self.images[bb], self.samples, self.sigma, self.seed, state=self.states[bb],
                                        model_key=self.model_key)
                self._cache[bb] = noise.add_(self.images[bb])
        self._first = first
        span = [self._cache[bb] for bb in range(first, last + 1)]
        self._stack = span[0] if len(span) == 1 else torch.cat(span)

    def __call__(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        assert self._stack is not None, "prepare() first"
        return self._stack[(b - self._first) * self.samples + j]


class _NoisyVolumes:
    """SG/SIG's points ``volume + noise`` for volumes, made per (volume, sample) group of each chunk only.

    Each group's noise comes from its own generator (:func:`volume_noise`'s rule), so memory holds
    one chunk's groups, never all samples of a volume, and the values do not depend on the chunking.
    """

    def __init__(self, volumes: torch.Tensor, states: Sequence[Any], samples: int, sigma: float, seed: int,
                 model_key: str) -> None:
        self.volumes, self.states = volumes, states
        self.samples, self.seed, self.model_key = samples, seed, model_key
        flat = volumes.flatten(1)
        self.sigmas = [sigma * (hi - lo) for hi, lo in zip(flat.max(1).values, flat.min(1).values, strict=True)]
        self._gen = torch.Generator(device=volumes.device)
        self._first = 0
        self._stack: torch.Tensor | None = None

    def prepare(self, first_group: int, last_group: int) -> None:
        shape = self.volumes.shape[1:]
        self._stack = None  # the previous chunk's points go before this chunk's are made
        stack = torch.empty((last_group - first_group + 1, *shape), device=self.volumes.device,
                            dtype=self.volumes.dtype)
        for i, g in enumerate(range(first_group, last_group + 1)):
            b, j = divmod(g, self.samples)
            self._gen.manual_seed(sample_seed(self.states[b], self.seed, self.model_key, j))
            noise = torch.randn(shape, generator=self._gen, device=self.volumes.device, dtype=self.volumes.dtype)
            stack[i] = noise.mul_(self.sigmas[b]).add_(self.volumes[b])
        self._first, self._stack = first_group, stack

    def __call__(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        assert self._stack is not None, "prepare() first"
        return self._stack[b * self.samples + j - self._first]


def _linspace(steps: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PAIR's IG path: ``linspace(0, 1, steps)`` with both ends, each step weighted 1/steps."""
    alphas = torch.linspace(0.0, 1.0, steps, device=like.device, dtype=like.dtype)
    return alphas, torch.full((steps,), 1.0 / steps, device=like.device, dtype=like.dtype)


def _check_methods(methods: Sequence[str] | str | None) -> tuple[str, ...]:
    if methods is None:
        return METHODS
    if isinstance(methods, str):
        methods = [methods]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    return tuple(dict.fromkeys(methods))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, max_rows: int = 64) -> torch.Tensor:
    """Logits ``[B, classes]`` in chunks (eval mode is the caller's business)."""
    return torch.cat([model(images[i : i + max_rows]) for i in range(0, images.shape[0], max_rows)])


def explain(
    model: nn.Module,
    images: torch.Tensor,
    methods: Sequence[str] | str | None = None,
    *,
    targets: torch.Tensor | Sequence[int] | int | None = None,
    preset: str | Recipe = "paper",
    raw: bool = False,
    segment_cache: SegmentCache | None = None,
    **overrides: Any,
) -> dict[str, torch.Tensor]:
    """Saliency maps of ``images`` ``[B, C, H, W]``, or volumes ``[B, C, D, H, W]``, for ``model``.

    ``images`` are in the network's input scale. ``methods`` is any of ``grad, sg, ig, sig,
    gradcam, gbp, ggcam, xrai`` (all when None); ``targets`` are per-image classes (default: the
    predicted class, as in the paper). Returns one ``[B, H, W]`` (``[B, D, H, W]``) float map per
    method, post-processed to [0, 1] per image as the paper did, or with ``raw=True`` the
    unprocessed attributions (``[B, C, ...]`` for gradient methods, ``[B, ...]`` for Grad-CAM,
    GGCAM and XRAI). ``preset`` is ``"paper"`` or ``"quick"``; any
    :class:`~saliency_trust.saliency.presets.Recipe` field can be overridden by keyword.
    The model is put in eval mode for the call and each module's mode restored after it; nothing
    else on it changes.

    Volumes: every definition is the 2-D one, except Grad-CAM's upsampling (trilinear, half-pixel
    centres, whatever ``cam_resize`` says: :data:`VOLUME_CAM_DEVIATION`) and XRAI's segments (SLIC
    supervoxels: :data:`~saliency_trust.saliency.xrai.VOLUME_XRAI_DEVIATION`);
    :func:`volume_deviations` lists the sentences for a recipe and methods. SG/SIG noise is drawn
    per (volume, sample), one chunk of samples at a time.
    """
    recipe = get_recipe(preset, **overrides)
    todo = _check_methods(methods)
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [B, C, H, W] or volumes [B, C, D, H, W], got {tuple(images.shape)}")
    x = images.detach() if images.is_floating_point() else images.detach().float()
    B, dev = x.shape[0], x.device
    nd = x.ndim - 2
    training = [m for m in model.modules() if m.training]  # usually none: a walk, not model.eval()'s writes
    for m in training:
        m.training = False
    try:
        max_rows = recipe.max_rows or auto_max_rows(model, x, recipe.memory_budget_mb, recipe.dtype)
        engine = GradientEngine(model, dtype=recipe.dtype, compile=recipe.compile, max_rows=max_rows)
        if targets is None:
            t = predict(model, x, max_rows).argmax(1)
        elif isinstance(targets, int):
            t = torch.full((B,), targets, dtype=torch.long, device=dev)
        else:
            t = torch.as_tensor(targets, dtype=torch.long, device=dev).reshape(B)
        rawmaps = _raw_maps(_Job(engine, model, x, t, todo, recipe, segment_cache or DEFAULT_CACHE))
    finally:
        for m in training:
            m.training = True
    if raw:
        return {m: rawmaps[m] for m in todo}
    out = {m: postprocess(rawmaps[m], recipe.percentile, spatial_dims=nd) for m in todo if m != "ggcam"}
    if "ggcam" in todo:
        # The paper multiplies the already-visualized GBP and Grad-CAM maps, then min-maxes.
        g = visualize_grayscale(rawmaps["gbp"], recipe.percentile, spatial_dims=nd)
        c = visualize_grayscale(rawmaps["gradcam"], recipe.percentile, spatial_dims=nd)
        out["ggcam"] = minmax(g * c).float()
    return {m: out[m] for m in todo}


#: What Grad-CAM on volumes does differently from the paper's recipe (the report prints it).
VOLUME_CAM_DEVIATION = ("Grad-CAM on volumes: channel weights are the gradient's mean over (d, h, w) and the map "
                        "is upsampled trilinearly with half-pixel centres; the paper's TF1 legacy resize "
                        "(cam_resize 'tf1_legacy') is a 2-D detail and is not applied to volumes.")


def volume_deviations(recipe: Recipe | str = "paper", methods: Sequence[str] | str | None = None) -> list[str]:
    """The sentences that say how ``methods`` under ``recipe`` on volumes differ from the paper's 2-D recipe."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    todo = _check_methods(methods)
    out = []
    if {"gradcam", "ggcam"} & set(todo):
        out.append(VOLUME_CAM_DEVIATION)
    if "xrai" in todo:
        out.append(volume_xrai_deviation(recipe))
    return out


@dataclass
class _Job:
    """One ``explain`` call's inputs and what its builders have made so far (``raw``, by method key)."""

    engine: GradientEngine
    model: nn.Module
    x: torch.Tensor
    t: torch.Tensor
    todo: tuple[str, ...]
    recipe: Recipe
    cache: SegmentCache
    states: list[Any] = field(default_factory=list)  # content hashes (SG/SIG seeds, XRAI keys)
    hwc: list[np.ndarray] = field(default_factory=list)  # channels-last host copies (XRAI segments)
    keys: list[str] = field(default_factory=list)  # XRAI segment-cache keys
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    _model_key: str | None = None

    @property
    def volume(self) -> bool:
        return self.x.ndim == 5

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def rows(self) -> int:
        return self.engine.chunk_rows(self.x.shape[0])

    def model_key(self) -> str:
        if self._model_key is None:
            self._model_key = weights_fingerprint(self.model)
        return self._model_key

    def get(self, key: str) -> torch.Tensor:
        """The raw map of method ``key``, built once (methods that share a pass build each other's maps)."""
        if key not in self.raw:
            self.raw[key] = _BUILDERS[key](self)
        return self.raw[key]

    def per_row(self, v: torch.Tensor) -> torch.Tensor:
        """``[n]`` values shaped to broadcast over ``[n, C, *spatial]`` rows."""
        return v.view(-1, *([1] * (self.x.ndim - 1)))

    def noisy(self, samples: int, seed: int) -> _NoisyImages | _NoisyVolumes:
        kind = _NoisyVolumes if self.volume else _NoisyImages
        return kind(self.x, self.states, samples, self.recipe.sg_sigma, seed, self.model_key())

    def black(self):
        """The IG baseline as a group function: one value, or one per channel; a view, nothing written per chunk."""
        C = self.x.shape[1]
        one = torch.tensor(self.recipe.ig_baseline, device=self.x.device, dtype=self.x.dtype)
        one = one.reshape(1, -1, *([1] * len(self.spatial)))
        if one.shape[1] not in (1, C):
            raise ValueError(f"ig_baseline has {one.shape[1]} values for {C} input channels")
        return lambda b, j: one.expand(b.shape[0], C, *self.spatial)

    def same(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.x[b]


def _ig_finalize(S: torch.Tensor, P: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    return (P - Z) * S


def _plain_pass(job: _Job) -> torch.Tensor:
    """GRAD, and Grad-CAM from the same forward + input-gradient pass when the call needs it."""
    x, t, rows, recipe = job.x, job.t, job.rows, job.recipe
    need_cam = bool({"gradcam", "ggcam"} & set(job.todo))
    layer = None
    if need_cam:
        name, post_relu = (recipe.cam_layer, recipe.cam_post_relu) if recipe.cam_layer else default_cam_layer(job.model)
        layer = LayerCapture(find_module(job.model, name), post_relu=post_relu)
    grads, cams = [], []
    for i in range(0, x.shape[0], rows):
        g, act, ga = job.engine.gradients(x[i : i + rows], t[i : i + rows], capture=layer)
        grads.append(g)
        if layer is not None:
            weights = ga.mean(dim=tuple(range(2, ga.ndim)), keepdim=True)  # over (h, w) or (d, h, w)
            cams.append(F.relu((weights * act).sum(1, keepdim=True)))
    if need_cam:
        cam = torch.cat(cams)
        if cam.ndim != x.ndim:
            raise ValueError(f"the Grad-CAM layer's output {tuple(cam.shape[1:])} has not the input's "
                             f"{len(job.spatial)} spatial axes; choose a convolutional layer (cam_layer=)")
        # Divide by max (PAIR's should_resize), then bilinear / trilinear (the recipe's resize on images;
        # half-pixel centres on volumes).
        peak = job.per_row(cam.flatten(1).max(1).values)
        cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), cam)
        mode = "half_pixel" if job.volume else recipe.cam_resize
        job.raw["gradcam"] = upsample_cam(cam[:, 0], job.spatial, mode)
    job.raw["grad"] = torch.cat(grads)
    return job.raw["grad"]


def _gradcam(job: _Job) -> torch.Tensor:
    _plain_pass(job)
    return job.raw["gradcam"]


def _gbp(job: _Job) -> torch.Tensor:
    x, t, rows = job.x, job.t, job.rows
    return torch.cat([job.engine.gradients(x[i : i + rows], t[i : i + rows], guided=True)[0]
                      for i in range(0, x.shape[0], rows)])


def _ggcam(job: _Job) -> torch.Tensor:
    return job.get("gbp").abs().sum(1) * job.get("gradcam")


def _ig(job: _Job) -> torch.Tensor:
    a, w = _linspace(job.recipe.ig_steps, job.x)
    return job.engine.integrate(job.x, job.t, IntegrationPath(1, a, w, job.same, job.black(), _ig_finalize))


def _sg(job: _Job) -> torch.Tensor:
    recipe = job.recipe
    noisy = job.noisy(recipe.sg_samples, recipe.seed)
    one = torch.ones(1, device=job.x.device, dtype=job.x.dtype)
    fin = (lambda S, P, Z: S * S) if recipe.sg_magnitude else (lambda S, P, Z: S)
    # No baseline: the model sees image + noise itself, exactly PAIR's input.
    return job.engine.integrate(job.x, job.t, IntegrationPath(recipe.sg_samples, one, one, noisy, None, fin,
                                                              noisy.prepare))


def _sig(job: _Job) -> torch.Tensor:
    recipe = job.recipe
    noisy = job.noisy(recipe.sig_samples, recipe.seed + 1)  # independent of SG's
    a, w = _linspace(recipe.sig_steps, job.x)
    fin = (lambda S, P, Z: ((P - Z) * S) ** 2) if recipe.sg_magnitude else _ig_finalize
    path = IntegrationPath(recipe.sig_samples, a, w, noisy, job.black(), fin, noisy.prepare)
    return job.engine.integrate(job.x, job.t, path)


def _xrai(job: _Job) -> torch.Tensor:
    x, recipe = job.x, job.recipe
    lo = x.flatten(1).min(1).values
    hi = x.flatten(1).max(1).values
    ends = torch.stack([lo, hi], 1)  # PAIR's default baselines: the image's min and max
    C = x.shape[1]

    def xrai_base(b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return job.per_row(ends[b, j]).expand(-1, C, *job.spatial)

    a, w = _linspace(recipe.xrai_steps, x)
    ig2 = job.engine.integrate(x, job.t, IntegrationPath(2, a, w, job.same, xrai_base, _ig_finalize))
    attr = ig2.max(1).values  # signed max over channels
    atoms = job.cache.atoms_batch(job.hwc, recipe, x.device, job.keys)
    return xrai_greedy(attr, atoms, recipe.xrai_min_pixel_diff, recipe.xrai_area_threshold).to(x.dtype)


#: How each method's raw map is built: one builder per key of the method table (checked below).
_BUILDERS: dict[str, Callable[[_Job], torch.Tensor]] = {
    "grad": _plain_pass, "sg": _sg, "ig": _ig, "sig": _sig, "gradcam": _gradcam, "gbp": _gbp, "ggcam": _ggcam,
    "xrai": _xrai,
}
if set(_BUILDERS) != set(METHODS):
    raise ImportError(f"saliency.explain has builders for {sorted(_BUILDERS)} but the method table "
                      f"(saliency_trust.methods) lists {sorted(METHODS)}; give every method one builder")


def _raw_maps(job: _Job) -> dict[str, torch.Tensor]:
    """Every raw map ``job`` asks for (and the ones they are made from), in the table's order."""
    todo, x, recipe = job.todo, job.x, job.recipe
    # One host copy of the images, made before any pass is queued, hashed once on host threads:
    # the hashes seed SG's and SIG's noise and key the XRAI segments, so the device never waits
    # for them later on.
    if {"sg", "sig", "xrai"} & set(todo):
        host = x.detach().cpu()
        job.states = content_hashes(host)
        if "xrai" in todo:
            job.hwc = list(host.movedim(1, -1).numpy())
            job.keys = [job.cache.key_from(s, recipe, volume=job.volume) for s in job.states]
            if x.device.type == "cuda":  # segment on the host's cores while the device runs the passes
                job.cache.prefetch(job.hwc, recipe, job.keys)
    for m in METHODS:
        if m in todo:
            job.get(m)
    return job.raw
