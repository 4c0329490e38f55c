"""Networks: model folders (``model.json``), the registry, randomization blocks."""

from saliency_trust.networks.modelfolder import (
    FAMILY_DEFAULTS,
    MANIFEST,
    SCHEMA,
    ManifestError,
    ModelFolder,
    find_models,
)
from saliency_trust.networks.randomize import UnchangedError, randomization_states, randomize_block, replicate_seed
from saliency_trust.networks.registry import (
    CAM_LAYERS,
    CLASSIFIERS,
    file_sha256,
    get_network,
    load_weights,
    randomization_blocks,
    to_network_input,
    verdict_state,
)

__all__ = [
    "CAM_LAYERS",
    "CLASSIFIERS",
    "FAMILY_DEFAULTS",
    "MANIFEST",
    "SCHEMA",
    "ManifestError",
    "UnchangedError",
    "ModelFolder",
    "file_sha256",
    "find_models",
    "get_network",
    "load_weights",
    "randomization_blocks",
    "randomization_states",
    "randomize_block",
    "replicate_seed",
    "to_network_input",
    "verdict_state",
]
