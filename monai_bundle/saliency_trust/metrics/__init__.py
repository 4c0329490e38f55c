"""Metrics, batched on the device and equal to their CPU references (scikit-image, scikit-learn, scipy)."""

from saliency_trust.metrics.localization import (
           auprc,
           otsu_iou,
           otsu_threshold,
           pointing_game,
           pr_curve_points,
)
from saliency_trust.metrics.similarity import average_ranks, spearman, ssim

__all__ = ["auprc", "average_ranks", "otsu_iou", "otsu_threshold", "pointing_game", "pr_curve_points",
           "spearman", "ssim"]
