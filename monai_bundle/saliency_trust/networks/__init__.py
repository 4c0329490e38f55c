"""Networks: model folders (``model.json``: :mod:`~saliency_trust.networks.manifest` without torch,
:mod:`~saliency_trust.networks.modelfolder` with it), the registry, randomization blocks."""

from saliency_trust.networks.manifest import (
    FAMILY_DEFAULTS,
    MANIFEST,
    SCHEMA,
    SCHEMA_FILE,
    ManifestError,
    ModelManifest,
    assessment_path,
)
from saliency_trust.networks.modelfolder import ModelFolder, find_models
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
    "SCHEMA_FILE",
    "ManifestError",
    "ModelManifest",
    "UnchangedError",
    "ModelFolder",
    "assessment_path",
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
