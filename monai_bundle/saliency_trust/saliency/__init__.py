"""The eight saliency methods of Arun et al., exact to their definitions and batched on the device."""

from saliency_trust.saliency.explain import default_cam_layer, explain, predict, smoothing_noise
from saliency_trust.saliency.postprocess import degenerate, minmax, postprocess, visualize_grayscale
from saliency_trust.saliency.presets import METHODS, PRESETS, Recipe, get_recipe
from saliency_trust.saliency.xrai import SegmentCache

__all__ = [
    "METHODS",
    "PRESETS",
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
]
