"""Trust criteria: utility, randomization, repeatability, reproducibility; baselines and statistics."""

from saliency_trust.criteria.agreement import blank, defined_ssim, map_agreement, output_agreement
from saliency_trust.criteria.baselines import (
    average_mask_prior,
    leave_one_out_priors,
    per_image_chance,
    random_pair_ssim,
)
from saliency_trust.criteria.randomization import TARGETS, RandomizationCurve, randomization_curves
from saliency_trust.criteria.statistics import bootstrap_ci, holm, summarize, wilcoxon_greater
from saliency_trust.criteria.utility import utility_scores
from saliency_trust.criteria.verdicts import agreement_verdicts, not_run, randomization_verdict, utility_verdicts

__all__ = [
    "TARGETS",
    "agreement_verdicts",
    "average_mask_prior",
    "blank",
    "bootstrap_ci",
    "defined_ssim",
    "holm",
    "leave_one_out_priors",
    "map_agreement",
    "not_run",
    "output_agreement",
    "per_image_chance",
    "RandomizationCurve",
    "random_pair_ssim",
    "randomization_curves",
    "randomization_verdict",
    "summarize",
    "utility_scores",
    "utility_verdicts",
    "wilcoxon_greater",
]
