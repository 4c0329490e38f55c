"""``explain``: the paper's eight saliency maps for a batch, in as few model passes as the maths allows."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saliency_trust.saliency.engine import GradientEngine, IntegrationPath, auto_max_rows
from saliency_trust.saliency.guided import LayerCapture, find_module
from saliency_trust.saliency.hostwork import content_hash, content_hashes, seed_from, weights_fingerprint
from saliency_trust.saliency.postprocess import minmax, postprocess, visualize_grayscale
from saliency_trust.saliency.presets import METHODS, Recipe, get_recipe
from saliency_trust.saliency.xrai import DEFAULT_CACHE, SegmentCache, xrai_greedy


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


def upsample_cam(cam: torch.Tensor, size: tuple[int, int], mode: str = "half_pixel") -> torch.Tensor:
    """Bilinear upsampling of ``[B, h, w]`` maps (``mode`` as :func:`bilinear_matrix`)."""
    ry = _bilinear_weights(cam.shape[-2], size[0], mode, cam.device, cam.dtype)
    rx = _bilinear_weights(cam.shape[-1], size[1], mode, cam.device, cam.dtype)
    return ry @ cam @ rx.T


def image_seed(image: torch.Tensor, seed: int, model_key: str = "") -> int:
    """A noise seed from the image's content, the recipe seed and the model's weights fingerprint.

    Independent of batch position; the same for one (image, model, seed), different across models.
    """
    return seed_from(content_hash(image), seed, model_key)


def smoothing_noise(image: torch.Tensor, samples: int, sigma_frac: float, seed: int,
                    state: Any = None, model_key: str = "") -> torch.Tensor:
    """The ``[samples, C, H, W]`` Gaussian noise SG/SIG add to one ``[C, H, W]`` image.

    sigma = ``sigma_frac`` x (max - min) of the image (PAIR's ``stdev_spread``). The generator
    lives on the image's device, seeded by :func:`image_seed` from the image, ``seed`` and
    ``model_key`` (:func:`~saliency_trust.saliency.hostwork.weights_fingerprint` of the model being
    explained), so the noise is reproducible, does not depend on which other images share the
    batch, and differs between models as the paper's fresh draws did. ``state``, the image's
    :func:`~saliency_trust.saliency.hostwork.content_hash` if the caller has it, saves hashing
    again (and waiting for the device to copy the image out).
    """
    gen = torch.Generator(device=image.device)
    gen.manual_seed(seed_from(content_hash(image) if state is None else state, seed, model_key))
    sigma = sigma_frac * (image.max() - image.min())
    noise = torch.randn((samples, *image.shape), generator=gen, device=image.device, dtype=image.dtype)
    return noise * sigma


class _NoisyImages:
    """SG/SIG's points ``image + noise``, made per image when a chunk first reaches it and dropped
    once the chunks move past it.

    ``prepare(first, last)`` (called by the engine with host integers before each chunk) fills
    the images of the chunk; ``__call__(b, j)`` then only gathers rows on the device.
    """

    def __init__(self, images: torch.Tensor, states: Sequence[Any], samples: int, sigma: float, seed: int,
                 model_key: str) -> None:
        self.images, self.states = images, states
        self.samples, self.sigma, self.seed, self.model_key = samples, sigma, seed, model_key
        self._cache: dict[int, torch.Tensor] = {}
        self._first = 0
        self._stack: torch.Tensor | None = None

    def prepare(self, first: int, last: int) -> None:
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
    targets: torch.Tensor | Sequence[int] | int | None = None,
    preset: str | Recipe = "paper",
    raw: bool = False,
    segment_cache: SegmentCache | None = None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Saliency maps of ``images`` ``[B, C, H, W]`` (the network's input scale) for ``model``.

    ``methods`` is any of ``grad, sg, ig, sig, gradcam, gbp, ggcam, xrai`` (all when None);
    ``targets`` are per-image classes (default: the predicted class, as in the paper). Returns
    one ``[B, H, W]`` float map per method, post-processed to [0, 1] as the paper did, or with
    ``raw=True`` the unprocessed attributions (``[B, C, H, W]`` for gradient methods, ``[B, H, W]``
    for Grad-CAM, GGCAM and XRAI). ``preset`` is ``"paper"`` or ``"quick"``; any
    :class:`~saliency_trust.saliency.presets.Recipe` field can be overridden by keyword.
    The model is put in eval mode for the call and each module's mode restored after it; nothing
    else on it changes.
    """
    recipe = get_recipe(preset, **overrides)
    todo = _check_methods(methods)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
    x = images.detach() if images.is_floating_point() else images.detach().float()
    B, dev = x.shape[0], x.device
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
        rawmaps = _raw_maps(engine, model, x, t, todo, recipe, segment_cache or DEFAULT_CACHE)
    finally:
        for m in training:
            m.training = True
    if raw:
        return {m: rawmaps[m] for m in todo}
    out = {m: postprocess(rawmaps[m], recipe.percentile) for m in todo if m != "ggcam"}
    if "ggcam" in todo:
        # The paper multiplies the already-visualized GBP and Grad-CAM maps, then min-maxes.
        g = visualize_grayscale(rawmaps["gbp"], recipe.percentile)
        c = visualize_grayscale(rawmaps["gradcam"], recipe.percentile)
        out["ggcam"] = minmax(g * c).float()
    return {m: out[m] for m in todo}


def _raw_maps(engine: GradientEngine, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
              todo: tuple[str, ...], recipe: Recipe, cache: SegmentCache) -> dict[str, torch.Tensor]:
    B, C, H, W = x.shape
    dev = x.device
    raw: dict[str, torch.Tensor] = {}
    rows = engine.chunk_rows(B)
    # One host copy of the images, made before any pass is queued, hashed once on host threads:
    # the hashes seed SG's and SIG's noise and key the XRAI segments, so the device never waits
    # for them later on.
    host, states, hwc, keys = None, [], [], []
    if {"sg", "sig", "xrai"} & set(todo):
        host = x.detach().cpu()
        states = content_hashes(host)
    if "xrai" in todo:
        hwc = list(host.permute(0, 2, 3, 1).numpy())
        keys = [cache.key_from(s, recipe) for s in states]
        if dev.type == "cuda":  # segment on the host's cores while the device runs the passes
            cache.prefetch(hwc, recipe, keys)
    need_cam = bool({"gradcam", "ggcam"} & set(todo))
    if "grad" in todo or need_cam:
        layer = None
        if need_cam:
            name, post_relu = (recipe.cam_layer, recipe.cam_post_relu) if recipe.cam_layer else default_cam_layer(model)
            layer = LayerCapture(find_module(model, name), post_relu=post_relu)
        grads, cams = [], []
        for i in range(0, B, rows):
            g, act, ga = engine.gradients(x[i : i + rows], t[i : i + rows], capture=layer)
            grads.append(g)
            if layer is not None:
                weights = ga.mean(dim=(2, 3), keepdim=True)
                cams.append(F.relu((weights * act).sum(1, keepdim=True)))
        raw["grad"] = torch.cat(grads)
        if need_cam:
            cam = torch.cat(cams)
            # Divide by max (PAIR's should_resize), then bilinear (the recipe's resize semantics).
            peak = cam.flatten(1).max(1).values.view(-1, 1, 1, 1)
            cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), cam)
            raw["gradcam"] = upsample_cam(cam[:, 0], (H, W), recipe.cam_resize)
    if {"gbp", "ggcam"} & set(todo):
        raw["gbp"] = torch.cat([engine.gradients(x[i : i + rows], t[i : i + rows], guided=True)[0]
                                for i in range(0, B, rows)])
    if "ggcam" in todo:
        raw["ggcam"] = raw["gbp"].abs().sum(1) * raw["gradcam"]

    def same(b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return x[b]

    def const(value: float | tuple[float, ...]):
        # One value, or one per channel (black in a per-channel normalization); a view: nothing written per chunk.
        one = torch.tensor(value, device=dev, dtype=x.dtype).reshape(1, -1, 1, 1)
        if one.shape[1] not in (1, C):
            raise ValueError(f"ig_baseline has {one.shape[1]} values for {C} input channels")
        return lambda b, j: one.expand(b.shape[0], C, H, W)

    def ig_finalize(S, P, Z):
        return (P - Z) * S

    if "ig" in todo:
        a, w = _linspace(recipe.ig_steps, x)
        raw["ig"] = engine.integrate(x, t, IntegrationPath(1, a, w, same, const(recipe.ig_baseline), ig_finalize))
    model_key = weights_fingerprint(model) if {"sg", "sig"} & set(todo) else ""
    if "sg" in todo:
        noisy = _NoisyImages(x, states, recipe.sg_samples, recipe.sg_sigma, recipe.seed, model_key)
        one = torch.ones(1, device=dev, dtype=x.dtype)
        fin = (lambda S, P, Z: S * S) if recipe.sg_magnitude else (lambda S, P, Z: S)
        # No baseline: the model sees image + noise itself, exactly PAIR's input.
        sg_path = IntegrationPath(recipe.sg_samples, one, one, noisy, None, fin, noisy.prepare)
        raw["sg"] = engine.integrate(x, t, sg_path)
    if "sig" in todo:
        noisy = _NoisyImages(x, states, recipe.sig_samples, recipe.sg_sigma, recipe.seed + 1,  # independent of SG's
                             model_key)
        a, w = _linspace(recipe.sig_steps, x)
        fin = (lambda S, P, Z: ((P - Z) * S) ** 2) if recipe.sg_magnitude else ig_finalize
        black = const(recipe.ig_baseline)
        sig_path = IntegrationPath(recipe.sig_samples, a, w, noisy, black, fin, noisy.prepare)
        raw["sig"] = engine.integrate(x, t, sig_path)
    if "xrai" in todo:
        lo = x.flatten(1).min(1).values
        hi = x.flatten(1).max(1).values
        ends = torch.stack([lo, hi], 1)  # PAIR's default baselines: the image's min and max

        def xrai_base(b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return ends[b, j].view(-1, 1, 1, 1).expand(-1, C, H, W)

        a, w = _linspace(recipe.xrai_steps, x)
        ig2 = engine.integrate(x, t, IntegrationPath(2, a, w, same, xrai_base, ig_finalize))
        attr = ig2.max(1).values  # signed max over channels
        atoms = cache.atoms_batch(hwc, recipe, dev, keys)
        raw["xrai"] = xrai_greedy(attr, atoms, recipe.xrai_min_pixel_diff, recipe.xrai_area_threshold).to(x.dtype)
    return raw
