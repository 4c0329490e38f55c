"""What the inference reader takes and refuses: grey radiographs stored as RGB(A) read as luminance with a note,
real colour refused; DICOMs a radiograph model was not made for (CT, lateral, multi-frame) refused in one
sentence unless accept_any_input; a volume header's intensity range used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from saliency_trust.data.dicom import write_dicom
from saliency_trust.data.errors import DataError
from saliency_trust.data.imageio import read_image, read_input


def _radiograph(h: int = 96, w: int = 80) -> np.ndarray:
    """A grey chest-radiograph-like picture: smooth lungs, a bright spine, some texture (uint8)."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.35 + 0.4 * np.exp(-((x - 0.5) / 0.08) ** 2) + 0.15 * np.sin(12 * y) * np.cos(9 * x)
    img += np.random.default_rng(1).normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _noisy_rgb(grey: np.ndarray) -> np.ndarray:
    """The grey picture on three channels off by a few grey levels in slowly varying blotches, as colour
    re-encoding leaves them (finer chroma noise would not survive JPEG's chroma subsampling)."""
    y, x = np.mgrid[0:grey.shape[0], 0:grey.shape[1]]
    tint = np.stack([3 * np.sin(x / 7), 2 * np.cos(y / 9), -3 * np.sin((x + y) / 11)], axis=-1)
    return np.clip(grey[..., None] + np.rint(tint), 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def test_a_grey_radiograph_saved_as_rgb_jpeg_is_read_as_luminance_with_a_note(tmp_path):
    """A grey radiograph re-encoded in colour JPEG (as published case images are) carries a few grey levels of
    chroma noise: read as luminance, said in a note."""
    grey = _radiograph()
    path = _save(tmp_path / "case.jpg", _noisy_rgb(grey), quality=70)
    rgb = np.asarray(Image.open(path))
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])  # the noise is really there
    notes: list[str] = []
    img, _ = read_input(path, notes=notes)
    luminance = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(img, luminance, atol=1e-6)
    assert np.abs(img - grey / 255).mean() < 0.03 and "colour noise" in notes[0] and "luminance" in notes[0]


@pytest.mark.parametrize("channels", [3, 4])
def test_a_grey_radiograph_with_a_burned_in_coloured_arrow_is_read_with_a_note(tmp_path, channels):
    grey = _radiograph()
    arr = np.dstack([grey] * 3 + ([np.full_like(grey, 255)] if channels == 4 else []))
    arr[20:30, 10:20, :3] = (255, 40, 40)  # a red arrow head on 1.3 % of the pixels
    notes: list[str] = []
    img, _ = read_image(_save(tmp_path / "case.png", arr), notes)
    assert "coloured annotation on 1.30% of the pixels" in notes[0] and ("RGBA" in notes[0]) == (channels == 4)
    np.testing.assert_array_equal(img[40:], grey[40:] / np.float32(255))  # grey elsewhere: its own values


def test_an_image_in_colour_is_refused_in_one_sentence(tmp_path):
    y, x = np.mgrid[0:64, 0:64]
    arr = np.dstack([x * 4, y * 4, 255 - x * 2]).astype(np.uint8)  # colour everywhere
    with pytest.raises(DataError, match=r"colour image \(\d+\.\d% of its pixels are in colour\); a radiograph"):
        read_input(_save(tmp_path / "photo.png", arr))
    grey = np.dstack([_radiograph()] * 3)
    grey[:, :20] = (200, 30, 30)  # a coloured quarter is content, not an annotation
    with pytest.raises(DataError, match="colour image"):
        read_input(_save(tmp_path / "overlay.png", grey))


def _dicom(path: Path, frames: int = 1, **tags) -> Path:
    pixels = (_radiograph().astype(np.uint16) * 16)
    write_dicom(path, pixels, patient_id="p", study_uid="2.25.1", series_uid="2.25.2", sop_uid="2.25.3",
                pixel_spacing=(0.5, 0.5), bits_stored=12)
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = np.stack([pixels + k for k in range(frames)]).astype(np.uint16).tobytes()
    ds.save_as(path)
    return path


@pytest.mark.parametrize(("tags", "frames", "words"), [
    ({"Modality": "CT"}, 1, "modality CT"),
    ({"ViewPosition": "LL"}, 1, "a lateral view (ViewPosition LL)"),
    ({}, 3, "a multi-frame image (3 frames)"),
])
def test_a_dicom_the_model_was_not_made_for_is_refused_unless_accepted(tmp_path, tags, frames, words):
    path = _dicom(tmp_path / "x.dcm", frames, **tags)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)") + ": the model explains one "
                       "frontal chest radiograph; set accept_any_input to run it anyway"):
        read_input(path)
    notes: list[str] = []
    img, ref = read_input(path, accept_any=True, notes=notes)
    assert words in notes[0] and "accept_any_input" in notes[0]
    assert img.shape == (96, 80) and ref.GetSize()[:2] == (80, 96)
    if frames > 1:
        assert "first frame" in notes[0]
        np.testing.assert_allclose(img, _radiograph().astype(np.float32) * 16 / 4095, atol=1e-6)


def test_a_volume_header_states_its_intensity_range(tmp_path):
    import SimpleITK as sitk

    arr = np.zeros((1, 32, 32), np.uint16)
    arr[0, 10:20, 10:20] = 1000
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "v.nrrd"))
    assert read_input(tmp_path / "v.nrrd")[0].max() == pytest.approx(1000 / 1023)  # guessed: 10 bits
    data = (tmp_path / "v.nrrd").read_bytes()
    end = data.find(b"\n\n")
    (tmp_path / "h.nrrd").write_bytes(data[:end] + b"\nsaliency_trust_intensity_range:=0 4095" + data[end:])
    notes: list[str] = []
    assert read_input(tmp_path / "h.nrrd", notes=notes)[0].max() == pytest.approx(1000 / 4095)
    assert notes == ["intensity range [0, 4095] from the file's header"]
    assert read_input(tmp_path / "h.nrrd", [0, 2000])[0].max() == pytest.approx(0.5)  # the caller's range wins
    (tmp_path / "bad.nrrd").write_bytes(data[:end] + b"\nsaliency_trust_intensity_range:=9 1" + data[end:])
    with pytest.raises(DataError, match="is empty"):
        read_input(tmp_path / "bad.nrrd")


def test_inference_writes_the_readers_notes_and_takes_the_override(tmp_path):
    """run_inference (inference.json, the service) puts the notes in prediction.json and passes accept_any_input."""
    from saliency_trust.workflows.infer import run_inference
    from saliency_trust.workflows.sample import make_fixture_models

    models = make_fixture_models(tmp_path / "models", seeds=(0,))
    grey = _radiograph()
    buf = io.BytesIO()
    Image.fromarray(_noisy_rgb(grey)).save(buf, format="JPEG", quality=70)
    (tmp_path / "case.jpg").write_bytes(buf.getvalue())
    res = run_inference(tmp_path / "case.jpg", tmp_path / "out", models, methods=["grad"], preset="quick",
                        checks=False, device="cpu")
    assert "luminance" in res["input"]["notes"][0]
    ct = _dicom(tmp_path / "ct.dcm", Modality="CT")
    with pytest.raises(DataError, match="modality CT"):
        run_inference(ct, tmp_path / "out_ct", models, methods=["grad"], preset="quick", checks=False, device="cpu")
    assert "accept_any_input" in (tmp_path / "out_ct" / "error.json").read_text()
    res = run_inference(ct, tmp_path / "out_ct", models, methods=["grad"], preset="quick", checks=False,
                        device="cpu", accept_any_input=True)
    assert "modality CT" in res["input"]["notes"][0]


def test_rgb_dicom_and_rgb_volumes_of_grey_radiographs_are_read_as_luminance(tmp_path):
    """The same rule for a secondary-capture RGB DICOM and an RGB(A) volume (a picture loaded in Slicer)."""
    import SimpleITK as sitk

    grey = _radiograph()
    rgb = np.dstack([grey] * 3)
    rgb[20:30, 10:20] = (255, 40, 40)
    path = write_dicom(tmp_path / "sc.dcm", grey, patient_id="p", study_uid="2.25.1", series_uid="2.25.2",
                       sop_uid="2.25.3", pixel_spacing=(0.5, 0.5))
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(path)
    notes: list[str] = []
    img, _ = read_input(path, notes=notes)
    assert "coloured annotation on 1.30%" in notes[0]
    np.testing.assert_array_equal(img[40:], grey[40:] / np.float32(255))
    for channels in (3, 4):
        arr = np.dstack([rgb] + ([np.full_like(grey, 255)] if channels == 4 else []))
        sitk.WriteImage(sitk.GetImageFromArray(arr[None], isVector=True), str(tmp_path / f"v{channels}.nrrd"))
        notes = []
        img, ref = read_input(tmp_path / f"v{channels}.nrrd", notes=notes)
        assert "coloured annotation" in notes[0] and ref.GetNumberOfComponentsPerPixel() == 1
        np.testing.assert_array_equal(img[40:], grey[40:] / np.float32(255))
    colour = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(colour[None], isVector=True), str(tmp_path / "colour.nrrd"))
    with pytest.raises(DataError, match="colour image"):
        read_input(tmp_path / "colour.nrrd")
