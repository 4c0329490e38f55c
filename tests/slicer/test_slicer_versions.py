"""What Slicer ships: the module's Slicer-side paths on pydicom 2.4.4 with numpy 2.0.2 / scipy 1.13.1
(Slicer 5.10) and numpy 1.26.4 (Slicer 5.8), and one sentence on a Slicer too old for the bundle.

The pinned packages live in folders of their own (see the Makefile); ``slicer_side.py`` runs with
one first on PYTHONPATH, and so do the bundle processes the Lib starts from it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.extras import SLICER_58, SLICER_510, extra

pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
SIDE = Path(__file__).with_name("slicer_side.py")
LIB = REPO / "SaliencyTrust" / "SaliencyTrustLib"


def _side(pins: Path, out: Path, what: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pins), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep))
    r = subprocess.run([sys.executable, str(SIDE), str(out), what], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_sample_study_and_the_libs_run_on_slicer_510s_pydicom_numpy_and_scipy(tmp_path):
    """Sample Data's study written by the bundle and read back, then the Lib's whole local run, on Slicer 5.10's
    pydicom 2.4.4, numpy 2.0.2 and scipy 1.13.1: the same file and the same maps as on pydicom 3 / numpy 2.x."""
    from saliency_trust.workflows.infer import run_inference
    from saliency_trust.workflows.sample import make_study

    got = _side(extra(SLICER_510), tmp_path / "slicer", "run")
    assert (got["pydicom"], got["numpy"], got["scipy"]) == ("2.4.4", "2.0.2", "1.13.1")
    # The sample study: byte for byte what this environment (pydicom 3) writes, read back the same by the
    # bundle's reader and by Slicer's storage node (ITK / GDCM).
    here = make_study(tmp_path / "here")
    assert Path(got["study"]).read_bytes() == here.read_bytes()
    from saliency_trust.data.dicom import read_dicom

    np.testing.assert_array_equal(np.load(tmp_path / "slicer" / "study_image.npy"), read_dicom(here)[0])
    assert got["slicer_equals_pydicom"] and got["bits_stored"] == 12 and got["series_uid"].startswith("2.25.")
    assert (got["synth_records"], got["synth_errors"]) == (6, 0)  # Train demo models' data: written, read back
    # The Lib's run: one overlay per method and a table; the maps equal the bundle's here on the same input.
    assert got["methods"] == ["grad", "gradcam"] and got["rows"] == 2
    cmd = got["command"]
    image = cmd[cmd.index("--image") + 1]
    # The study's own file (decoded by pydicom 2.4.4 to check), written back by it without identifying elements.
    import pydicom

    sent, original = pydicom.dcmread(image), pydicom.dcmread(str(here))
    np.testing.assert_array_equal(sent.pixel_array, original.pixel_array)
    assert "PatientName" in original and "PatientName" not in sent and sent.BitsStored == original.BitsStored
    extra_args = {}
    if "--intensity_range" in cmd:
        extra_args["intensity_range"] = json.loads(cmd[cmd.index("--intensity_range") + 1])
    run_inference(image, tmp_path / "out", got["models"], methods=["grad", "gradcam"], preset="quick", checks=False,
                  device="cpu", **extra_args)
    import SimpleITK as sitk

    for m in ("grad", "gradcam"):
        want = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "maps" / f"{m}.nrrd")))[0]
        np.testing.assert_allclose(np.load(tmp_path / "slicer" / f"map_{m}.npy"), want, atol=1e-6)


def test_dicom_write_read_and_the_libs_export_on_slicer_58s_numpy_126(tmp_path):
    """The bundle's DICOM writer and reader and the Lib's checks and export on pydicom 2.4.4 with numpy 1.26.4."""
    from saliency_trust.data.dicom import read_dicom, write_dicom

    got = _side(extra(SLICER_58), tmp_path / "old", "dicom")
    assert (got["pydicom"], got["numpy"]) == ("2.4.4", "1.26.4")
    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096).astype(np.uint16)
    here = write_dicom(tmp_path / "here.dcm", pixels, patient_id="p", study_uid="2.25.1", series_uid="2.25.2",
                       sop_uid="2.25.3", pixel_spacing=(0.5, 0.5), bits_stored=12)
    assert Path(got["dicom"]).read_bytes() == here.read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "old" / "twelve.npy"), read_dicom(here)[0])
    assert Path(got["exported"]).is_file() and got["python_problem"] == ""


def test_a_slicer_too_old_for_the_bundle_is_told_so_before_anything_starts(tmp_path, monkeypatch):
    """Slicer 5.8 (Python 3.9): one sentence naming Slicer 5.10, before any install, generation or launch."""
    sys.path.insert(0, str(LIB.parent))
    from SaliencyTrustLib import deps
    from SaliencyTrustLib.errors import SaliencyTrustError
    from SaliencyTrustLib.process import BundleProcess, Request, TrainProcess, make_fixture_models, make_sample_study

    assert deps.python_problem() == ""
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    sentence = deps.python_problem()
    assert "needs Slicer 5.10 or later" in sentence and "3.9.10" in sentence and sentence.count(". ") == 0
    for call in (lambda: make_sample_study(REPO / "monai_bundle", tmp_path / "study", python=sys.executable),
                 lambda: make_fixture_models(REPO / "monai_bundle", tmp_path / "models", python=sys.executable),
                 lambda: TrainProcess(REPO / "monai_bundle", tmp_path / "train", python=sys.executable).start(),
                 lambda: BundleProcess(Request(str(REPO / "monai_bundle"), str(tmp_path), python=sys.executable),
                                         tmp_path / "x.nrrd", tmp_path / "out").start()):
        with pytest.raises(SaliencyTrustError, match="needs Slicer 5.10 or later"):
            call()
    assert list(tmp_path.iterdir()) == []  # nothing was generated or launched


def test_the_lib_parses_on_python_39_so_slicer_58_can_say_what_it_needs():
    """Slicer 5.8 imports the Lib with Python 3.9: no 3.10 syntax, annotations never evaluated, no zip(strict=)."""
    for path in sorted(LIB.glob("*.py")):
        tree = ast.parse(path.read_text(), feature_version=(3, 9))
        futures = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"
                   for a in n.names}
        annotated = any(isinstance(n, ast.AnnAssign | ast.FunctionDef) for n in ast.walk(tree))
        assert not annotated or "annotations" in futures, f"{path.name}: annotations would be evaluated on 3.9"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert not [n.lineno for n in calls if any(k.arg == "strict" for k in n.keywords)], path.name
    ast.parse((LIB.parent / "SaliencyTrust.py").read_text(), feature_version=(3, 9))  # the module file loads too
