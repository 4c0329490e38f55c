"""The eight saliency methods of Arun et al., exact to their definitions and batched on the device,
on images ``[B, C, H, W]`` and volumes ``[B, C, D, H, W]``."""

from saliency_trust.saliency.explain import (
    VOLUME_CAM_DEVIATION,
    default_cam_layer,
    explain,
    predict,
    smoothing_noise,
    volume_deviations,
    volume_noise,
)
from saliency_trust.saliency.postprocess import degenerate, minmax, postprocess, visualize_grayscale
from saliency_trust.saliency.presets import METHODS, PRESETS, Recipe, get_recipe
from saliency_trust.saliency.xrai import VOLUME_XRAI_DEVIATION, SegmentCache, volume_xrai_deviation

__all__ = [
    "METHODS",
    "PRESETS",
    "VOLUME_CAM_DEVIATION",
    "VOLUME_XRAI_DEVIATION",
    "Recipe",
    "SegmentCache",
    "default_cam_layer",
    "degenerate",
    "explain",
    "get_recipe",
    "minmax",
    "postprocess",
    "predict",
    "smoothing_noise",
    "visualize_grayscale",
    "volume_deviations",
    "volume_noise",
    "volume_xrai_deviation",
]
