"""Data: SynthCXR generator, RSNA / SIIM / generic readers, ground-truth rasterizing."""

from saliency_trust.data.errors import DataError
from saliency_trust.data.readers import Dataset, Record, detect_layout, load_dataset, read_image

__all__ = ["DataError", "Dataset", "Record", "detect_layout", "load_dataset", "read_image"]
