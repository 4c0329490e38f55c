"""Data: SynthCXR and SynthCT generators, RSNA / SIIM / generic and volume (MSD, DICOM series) readers, ground truth."""

from saliency_trust.data.errors import DataError
from saliency_trust.data.readers import Dataset, Record, detect_layout, load_dataset, read_image
from saliency_trust.data.volumes import (
    VolumeDataset,
    VolumeGeometry,
    VolumeRecord,
    load_volume_dataset,
    read_dicom_series,
    read_volume,
    resample_mask,
    resample_volume,
    window_hu,
)

__all__ = ["DataError", "Dataset", "Record", "VolumeDataset", "VolumeGeometry", "VolumeRecord", "detect_layout",
           "load_dataset", "load_volume_dataset", "read_dicom_series", "read_image", "read_volume", "resample_mask",
           "resample_volume", "window_hu"]
