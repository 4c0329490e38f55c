"""Trust criteria: utility, randomization, repeatability, reproducibility; baselines and statistics."""

from saliency_trust.criteria.agreement import map_agreement, output_agreement
from saliency_trust.criteria.baselines import average_mask_prior, leave_one_out_priors, random_pair_ssim
from saliency_trust.criteria.randomization import randomization_curves
from saliency_trust.criteria.statistics import bootstrap_ci, holm, summarize, wilcoxon_greater
from saliency_trust.criteria.utility import utility_scores
from saliency_trust.criteria.verdicts import agreement_verdict, randomization_verdict, utility_verdicts

__all__ = [
    "agreement_verdict",
    "map_agreement",
    "output_agreement",
    "randomization_curves",
    "randomization_verdict",
    "utility_verdicts",
    "average_mask_prior",
    "bootstrap_ci",
    "holm",
    "leave_one_out_priors",
    "random_pair_ssim",
    "summarize",
    "utility_scores",
    "wilcoxon_greater",
]
