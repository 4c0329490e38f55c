"""Networks: registry of classifiers and the localization baseline, with randomization blocks."""

from saliency_trust.networks.randomize import randomization_states, randomize_block
from saliency_trust.networks.registry import (
    CAM_LAYERS,
    CLASSIFIERS,
    PAPER_FINAL_STATE,
    RANDOMIZATION_BLOCKS,
    file_sha256,
    get_network,
    load_weights,
    randomization_blocks,
    to_network_input,
    trained_image_size,
    verdict_state,
)

__all__ = [
    "CAM_LAYERS",
    "CLASSIFIERS",
    "PAPER_FINAL_STATE",
    "RANDOMIZATION_BLOCKS",
    "file_sha256",
    "get_network",
    "load_weights",
    "randomization_blocks",
    "randomization_states",
    "randomize_block",
    "to_network_input",
    "trained_image_size",
    "verdict_state",
]
