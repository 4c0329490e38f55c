"""The patient's own pixels: what the module hands the bundle reaches the model as the bundle reads it.

A volume loaded from DICOM goes to the bundle as its DICOM file (found through Slicer's DICOM
database or the volume's storage file), so a 12-bit image is read through its stored range as the
training data were; any other volume goes as NRRD whose header states its intensity range.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tests.conftest import REPO

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(REPO / "SaliencyTrust"))

from saliency_trust.data.dicom import read_dicom, write_dicom  # noqa: E402
from saliency_trust.data.groundtruth import resize_image  # noqa: E402
from saliency_trust.data.imageio import read_image, read_input  # noqa: E402
from saliency_trust.networks import to_network_input  # noqa: E402
from SaliencyTrustLib.errors import InputVolumeError  # noqa: E402
from SaliencyTrustLib.inputs import IDENTIFYING, INTENSITY_ATTRIBUTE, check_input_volume, prepare, source_dicom  # noqa: E402
from SaliencyTrustLib.process import Request  # noqa: E402
from SaliencyTrustLib.scene import RunOutput  # noqa: E402

SOP = "2.25.4242"


class DicomDatabase:
    """Stands in for ``slicer.dicomDatabase`` (ctkDICOMDatabase, absent from slicer-core): the one call the Lib
    makes, ``fileForInstance(uid)`` -> the file's path, or '' for an unknown instance."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def fileForInstance(self, uid: str) -> str:  # noqa: N802  (Slicer's name)
        return str(self.files.get(uid, ""))


def _dim_twelve_bit(path: Path) -> Path:
    """A 12-bit radiograph whose brightest pixel is 1000 (of 4095)."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((96, 80)) * 900).astype(np.uint16)
    pixels[40:50, 30:40] = 1000
    return write_dicom(path, pixels, patient_id="p", study_uid="2.25.1", series_uid="2.25.2", sop_uid=SOP,
                       pixel_spacing=(0.7, 0.7), bits_stored=12)


def _load(scene, path: Path, keep_storage: bool = True):
    """Read a file into a scalar volume node with Slicer's own storage node (ITK / GDCM), as loadVolume does."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CXR")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    if not keep_storage:  # as the DICOM module's default (GDCM series) reader leaves it: no storage node
        node.SetAndObserveStorageNodeID(None)
    return node


def _model_input(img: np.ndarray) -> torch.Tensor:
    return to_network_input(torch.from_numpy(resize_image(img, (64, 64)))[None])


def test_a_dim_12_bit_dicom_gives_the_model_the_input_the_bundle_reader_gives(scene, tmp_path, monkeypatch):
    """Loaded through the DICOM database (no storage file) or from the file: the module sends the DICOM file, and
    the model input equals the bundle reader's on that file (1000 -> 0.24, not 0.98 as the NRRD export was)."""
    dicom = _dim_twelve_bit(tmp_path / "db" / "x.dcm")
    want, _ = read_dicom(dicom)
    assert want.max() == pytest.approx(1000 / 4095, abs=1e-6)
    monkeypatch.setattr(slicer, "dicomDatabase", DicomDatabase({SOP: dicom}), raising=False)

    from_database = _load(scene, dicom, keep_storage=False)
    from_database.SetAttribute("DICOM.instanceUIDs", SOP)
    from_file = _load(scene, dicom)
    for k, volume in enumerate((from_database, from_file)):
        image, _ = prepare(volume, None, tmp_path / f"in{k}")
        assert image.suffix == ".dcm"
        import pydicom

        sent, original = pydicom.dcmread(str(image)), pydicom.dcmread(str(dicom))
        np.testing.assert_array_equal(sent.pixel_array, original.pixel_array)
        assert not any(k in sent for k in IDENTIFYING) and "PatientName" in original  # nothing identifying leaves
        request = Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(tmp_path))
        cmd = request.command(image, tmp_path / "out")
        assert "--intensity_range" not in cmd
        got, _ = read_input(cmd[cmd.index("--image") + 1])  # what run_inference reads from that command
        np.testing.assert_array_equal(got, want)
        torch.testing.assert_close(_model_input(got), _model_input(want), rtol=0, atol=0)

    # The voxels changed after loading: the file is no longer the image, the volume itself is exported, and the
    # NRRD says its range (16-bit type: 0-65535), so nothing is guessed from the brightest pixel.
    arr = slicer.util.arrayFromVolume(from_file)
    arr[:] = arr // 2
    slicer.util.arrayFromVolumeModified(from_file)
    image, _ = prepare(from_file, None, tmp_path / "changed")
    assert image.suffix == ".nrrd"
    got, _ = read_input(image)
    assert got.max() == pytest.approx(500 / 65535, abs=1e-6)


def test_a_volume_not_from_dicom_goes_with_its_intensity_range(scene, tmp_path):
    """A 16-bit picture whose maximum is 1000 reaches the model as the bundle reads the picture itself (/65535),
    not through the smallest bit depth holding its maximum (10 bits: 0.98); a range the user sets wins.
    (slicer-core reads no PNG, so the volume is made from the picture's pixels, as Slicer's PNG reader gives them.)"""
    from PIL import Image

    pixels = (np.arange(72 * 64).reshape(72, 64) % 1001).astype(np.uint16)
    png = tmp_path / "sixteen.png"
    Image.fromarray(pixels).save(png)
    volume = slicer.util.addVolumeFromArray(np.asarray(Image.open(png))[None], name="picture")
    assert source_dicom(volume) is None
    image, _ = prepare(volume, None, tmp_path / "in")
    assert image.suffix == ".nrrd" and b"saliency_trust_intensity_range:=0.0 65535.0" in image.read_bytes()[:2000]
    notes: list[str] = []
    got, _ = read_input(image, notes=notes)
    want, _ = read_image(png)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert got.max() == pytest.approx(1000 / 65535) and "intensity range [0, 65535]" in notes[0]
    volume.SetAttribute(INTENSITY_ATTRIBUTE, "0 4095")
    image, _ = prepare(volume, None, tmp_path / "user")
    assert read_input(image)[0].max() == pytest.approx(1000 / 4095)
    volume.SetAttribute(INTENSITY_ATTRIBUTE, "4095 0")
    with pytest.raises(InputVolumeError, match="low < high"):
        prepare(volume, None, tmp_path / "bad")


def test_a_ct_dicom_is_refused_in_one_sentence_and_the_override_runs_it(scene, tmp_path):
    """The module hands the bundle the file, the bundle refuses a CT with a sentence naming the override, and the
    Request's accept_any_input passes that override on the command line."""
    dicom = _dim_twelve_bit(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(dicom)
    ds.Modality = "CT"
    ds.save_as(dicom)
    image, _ = prepare(_load(scene, dicom), None, tmp_path / "in")
    with pytest.raises(Exception, match="modality CT: the model explains one frontal chest radiograph; set "
                                        "accept_any_input to run it anyway"):
        read_input(image)
    notes: list[str] = []
    read_input(image, accept_any=True, notes=notes)
    assert "accept_any_input" in notes[0] and "modality CT" in notes[0]
    request = Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(tmp_path), accept_any_input=True)
    assert request.command(image, tmp_path / "out")[-2:] == ["--accept_any_input", "True"]


def test_a_picture_loaded_in_colour_reaches_the_bundle_and_grey_content_is_read_as_luminance(scene, tmp_path):
    """A published case image loaded in Slicer is an RGB vector volume: the module sends it (NRRD, 0-255 stated)
    and the bundle reads a grey radiograph with a coloured arrow as luminance with a note; real colour is refused
    by the bundle, a two-component volume by the module."""
    from saliency_trust.data.errors import DataError

    grey = (np.random.default_rng(3).random((64, 72)) * 200).astype(np.uint8)
    rgb = np.dstack([grey] * 3)
    rgb[10:16, 10:16] = (250, 30, 30)  # an arrow head on 0.8 % of the pixels
    volume = slicer.util.addVolumeFromArray(rgb[None], name="case", nodeClassName="vtkMRMLVectorVolumeNode")
    image, _ = prepare(volume, None, tmp_path / "in")
    notes: list[str] = []
    got, _ = read_input(image, notes=notes)
    assert "coloured annotation" in notes[0] and "intensity range [0, 255]" in notes[1]
    np.testing.assert_array_equal(got[20:], grey[20:] / np.float32(255))
    colour = slicer.util.addVolumeFromArray(np.random.default_rng(4).integers(0, 255, (1, 64, 72, 3), np.uint8),
                                            name="photo", nodeClassName="vtkMRMLVectorVolumeNode")
    image, _ = prepare(colour, None, tmp_path / "colour")
    with pytest.raises(DataError, match="colour image"):
        read_input(image)
    two = slicer.util.addVolumeFromArray(np.zeros((1, 32, 32, 2), np.uint8), name="two",
                                         nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputVolumeError, match="2 components per voxel"):
        check_input_volume(two)


def test_the_readers_notes_are_said_beside_the_prediction(scene):
    """prediction.json's input.notes reach the panel's prediction line."""
    prediction = {"probabilities": [0.2, 0.8], "predicted_class": 1, "task": "lung opacity", "preset": "quick",
                  "model": {"arch": "densenet121", "replicate": 0},
                  "input": {"notes": ["RGB picture of a grey radiograph with a coloured annotation on 0.78% of the "
                                      "pixels: read as luminance"]}}
    line = RunOutput(prediction, {}, None, {}, Path(".")).summary()
    assert line.startswith("Lung opacity: predicted present (p = 0.800)")
    assert line.endswith("quick preset. Input: RGB picture of a grey radiograph with a coloured annotation on 0.78% "
                         "of the pixels: read as luminance.")
