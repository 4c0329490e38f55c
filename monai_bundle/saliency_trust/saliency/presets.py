"""Recipes: every knob of the eight methods, with the paper's settings and a quick CPU profile.

``paper`` reproduces what Arun et al. ran through PAIR ``saliency`` (see
``../shared/reference/paper_protocol.md`` section 1.3):

* IG: 10 steps, alphas ``linspace(0, 1, 10)`` with both ends, weight 1/10 each, black baseline
  (-1 in the network's [-1, 1] scale).
* SG: 25 samples, Gaussian sigma = 15 % of each image's (max - min), mean of squared gradients.
  Noise is drawn per (image content, model weights, ``seed``): reproducible for one model and
  image, independent across models (the paper drew fresh noise on every call, so replicates and
  randomization states never shared it).
* SIG: 25 noisy IG-10 runs, squared and averaged.
* Grad-CAM: last post-ReLU feature map, channel weights = spatial mean of the gradients, ReLU,
  divide by max, bilinear upsampling. ``cam_resize="tf1_legacy"`` (both presets, so study numbers
  compare with the paper's) is TF1's ``resize_bilinear`` as the paper's PAIR code ran it: output
  pixel i samples input coordinate ``i * in / out``, clamped at the last row/column, about half a
  feature cell up and left of the image. ``"half_pixel"`` (half-pixel centres, as skimage and PAIR
  core today) is the geometrically correct resize; inference, Slicer and the service use it for
  everything drawn on a patient's image.
* GBP: every ReLU (module or functional) passes gradient only where its output > 0 and the
  incoming gradient > 0.
* GGCAM: post-processed GBP map x post-processed Grad-CAM map, then min-max.
* XRAI: IG from the image's min and max constant baselines x 100 steps each, averaged, signed max
  over channels; Felzenszwalb at scales 50/100/150/250/500/1200, sigma 0.8, min size 150 on a
  224 px copy scaled to [-1, 1]; masks dilated by disk(5); full greedy by attribution density,
  50-pixel minimum gain, area threshold 1.0.
* Post-processing (every map): sum of |attribution| over channels, clip at the 99th percentile
  (min -> 0, p99 -> 1), then min-max again. XRAI's output is already one channel: we take its
  absolute value before the same clip (the paper's own helper crashes on 2-D input, so the
  closest reading is documented here and used for both presets).

``quick`` keeps every definition but cuts steps and samples so that the CPU demo finishes in
minutes; every result made with it carries ``preset: quick``.

Volumes (``[B, C, D, H, W]``) run every definition above unchanged, except two, stated as
deviations (:data:`~saliency_trust.saliency.explain.VOLUME_CAM_DEVIATION`,
:data:`~saliency_trust.saliency.xrai.VOLUME_XRAI_DEVIATION`):

* Grad-CAM is upsampled trilinearly with half-pixel centres whatever ``cam_resize`` says; the TF1
  legacy resize is a detail of the paper's 2-D code.
* XRAI's over-segmentation is SLIC supervoxels (Felzenszwalb is 2-D only) at
  ``xrai_volume_segments`` = 8/27/64/125/216 segments: SLIC seeds on a regular grid, so on a cube these
  are 2 to 6 supervoxels per axis, five distinct levels from coarse to fine as PAIR's six Felzenszwalb
  scales are (14 to 67 segments on a chest radiograph; counts between cubes give repeated levels).
  Compactness ``xrai_volume_compactness`` 0.1 on the copy scaled to [-1, 1] (intensity edges
  dominate, as in Felzenszwalb), Gaussian pre-smoothing ``xrai_sigma``, on a copy whose longest
  side is at most ``xrai_volume_segment_size`` (64; never enlarged; linear anti-aliased shrinking);
  masks dilated there by a ball of radius ``xrai_volume_dilation`` (2 voxels of that grid), then
  taken to the volume's grid by nearest neighbour. The greedy is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from saliency_trust.methods import METHODS, passes_per_image

__all__ = ["CAM_RESIZE_MODES", "METHODS", "PRESETS", "Recipe", "get_recipe"]

#: Grad-CAM upsampling: the paper's TF1 legacy bilinear, or half-pixel centres.
CAM_RESIZE_MODES = ("tf1_legacy", "half_pixel")


@dataclass(frozen=True)
class Recipe:
    """All settings of one ``explain`` call."""

    name: str = "paper"
    ig_steps: int = 10
    ig_baseline: float | tuple[float, ...] = -1.0  # black in the network's input scale (per channel: a tuple)
    sg_samples: int = 25
    sg_sigma: float = 0.15  # fraction of each image's value range
    sg_magnitude: bool = True  # mean of squared gradients (PAIR magnitude=True)
    sig_samples: int = 25
    sig_steps: int = 10
    xrai_steps: int = 100
    xrai_segment_size: int = 224
    xrai_scales: tuple[int, ...] = (50, 100, 150, 250, 500, 1200)
    xrai_sigma: float = 0.8
    xrai_min_segment: int = 150
    xrai_dilation: int = 5
    xrai_min_pixel_diff: int = 50
    xrai_area_threshold: float = 1.0
    # XRAI on volumes (SLIC supervoxels; see the module docstring and saliency.xrai.VOLUME_XRAI_DEVIATION)
    xrai_volume_segments: tuple[int, ...] = (8, 27, 64, 125, 216)  # SLIC n_segments, one segmentation each
    xrai_volume_compactness: float = 0.1  # SLIC compactness on the copy scaled to [-1, 1]
    xrai_volume_segment_size: int = 64  # longest side of the copy SLIC sees (volumes are never enlarged)
    xrai_volume_dilation: int = 2  # ball radius, in voxels of that copy
    percentile: float = 99.0
    cam_layer: str | None = None  # None: the architecture's registered layer
    cam_post_relu: bool = False  # with cam_layer: apply the ReLU that follows that layer (see LayerCapture)
    cam_resize: str = "tf1_legacy"  # or "half_pixel" (geometrically correct; what is drawn on a patient's image)
    # (volumes: always half_pixel, trilinear; the legacy resize is the paper's 2-D detail)
    seed: int = 0
    dtype: str = "float32"  # or "bfloat16" (autocast)
    compile: bool = False  # torch.compile the gradient-only passes
    max_rows: int | None = None  # rows (images x steps x samples) per chunk; None: from memory_budget_mb
    memory_budget_mb: int | None = None  # activation memory per chunk; None: half the free device memory

    def __post_init__(self) -> None:
        if self.cam_resize not in CAM_RESIZE_MODES:
            raise ValueError(f"cam_resize must be one of {list(CAM_RESIZE_MODES)}, got {self.cam_resize!r}")
        if not self.xrai_volume_segments or any(int(n) < 1 for n in self.xrai_volume_segments):
            raise ValueError(f"xrai_volume_segments must be positive segment counts, got {self.xrai_volume_segments!r}")
        if self.xrai_volume_segment_size < 1 or self.xrai_volume_dilation < 0:
            raise ValueError("xrai_volume_segment_size must be >= 1 and xrai_volume_dilation >= 0, got "
                             f"{self.xrai_volume_segment_size} and {self.xrai_volume_dilation}")

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with some settings changed; unknown names are an error."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise TypeError(f"unknown saliency setting(s) {bad}; known: {sorted(known)}")
        for key in ("xrai_scales", "xrai_volume_segments", "ig_baseline"):
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(overrides[key])
        return replace(self, **overrides)

    def passes_per_image(self, methods: tuple[str, ...] | list[str] = METHODS) -> int:
        """Forward + input-gradient passes per image and model state for ``methods``
        (:func:`saliency_trust.methods.passes_per_image`)."""
        return passes_per_image(self, methods)


PRESETS: dict[str, Recipe] = {
    "paper": Recipe(),
    "quick": Recipe(name="quick", ig_steps=8, sg_samples=8, sig_samples=4, sig_steps=6, xrai_steps=12),
}


def get_recipe(preset: str | Recipe = "paper", **overrides: Any) -> Recipe:
    """The named preset (``paper`` or ``quick``) with ``overrides`` applied."""
    if isinstance(preset, Recipe):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return base.with_overrides(**overrides) if overrides else base
