"""The module's Slicer-side paths, run by tests/slicer/test_slicer_versions.py in a Python whose pydicom,
numpy (and scipy) are the ones a Slicer release ships (its folder first on PYTHONPATH).

    python tests/slicer/slicer_side.py <out> study   # sample study written and read back, through the Lib
    python tests/slicer/slicer_side.py <out> run     # ... then the Lib's local run of the bundle
    python tests/slicer/slicer_side.py <out> dicom   # bundle's DICOM write and read, the Lib's checks and export

Writes ``<out>/report.json`` (versions, what was read) and the arrays the test compares.
The bundle processes the Lib starts inherit PYTHONPATH, so they see the same packages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SaliencyTrust"))
sys.path.insert(0, str(REPO / "monai_bundle"))
BUNDLE = str(REPO / "monai_bundle")


def _scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return slicer, scene


def study(out: Path, report: dict) -> tuple:
    """The sample study through the Lib (bundle child process), read by the bundle's reader and Slicer's."""
    from saliency_trust.data.dicom import read_dicom
    from SaliencyTrustLib.inputs import dicom_series_uid
    from SaliencyTrustLib.process import make_sample_study

    path = make_sample_study(BUNDLE, out / "study", python=sys.executable)
    img, geometry = read_dicom(path)
    np.save(out / "study_image.npy", img)
    slicer, scene = _scene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CXR")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")  # as loadVolume leaves it
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(volume):
        raise RuntimeError("Slicer's storage node could not read the sample study")
    raw = pydicom.dcmread(path).pixel_array
    report.update(study=str(path), series_uid=dicom_series_uid(path), bits_stored=geometry["bits_stored"],
                  slicer_equals_pydicom=bool(np.array_equal(slicer.util.arrayFromVolume(volume)[0], raw)))
    return slicer, scene, volume


def training_data(out: Path, report: dict) -> None:
    """What *Train demo models* starts with: SynthCXR DICOMs written, then read back as a dataset."""
    from saliency_trust.data import load_dataset
    from saliency_trust.data.synth import generate

    data = generate(out / "synth", "opacity", n=6, size=64, seed=5, progress=False)
    dataset = load_dataset(data)
    report.update(synth_records=len(dataset.records), synth_errors=len(dataset.errors))


def run(out: Path, report: dict) -> None:
    """The sample study, fixture models and the Lib's whole local run (bundle out of process), and the
    demo training's data."""
    from SaliencyTrustLib.controller import run_local
    from SaliencyTrustLib.process import Request, make_fixture_models

    training_data(out, report)
    slicer, scene, volume = study(out, report)
    models = make_fixture_models(BUNDLE, out / "models", python=sys.executable)
    request = Request(bundle_dir=BUNDLE, model_dir=str(models), methods=("grad", "gradcam"), preset="quick",
                        device="cpu", checks=False, python=sys.executable)
    results = run_local(scene, volume, request, out / "work", timeout=600)
    for m, node in results.map_nodes.items():
        np.save(out / f"map_{m}.npy", slicer.util.arrayFromVolume(node)[0])
    sent = next((out / "work" / "input").glob("input.*"))  # what the Lib handed the bundle
    report.update(models=str(models), methods=sorted(results.map_nodes), rows=results.table_node.GetNumberOfRows(),
                  command=request.command(sent, out / "work" / "output"))


def dicom(out: Path, report: dict) -> None:
    """The bundle's DICOM writer and reader, and the Lib's input checks and export, on these packages."""
    from saliency_trust.data.dicom import read_dicom, write_dicom
    from SaliencyTrustLib import deps
    from SaliencyTrustLib.inputs import check_input_volume, prepare

    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096).astype(np.uint16)
    path = write_dicom(out / "twelve.dcm", pixels, patient_id="p", study_uid="2.25.1", series_uid="2.25.2",
                       sop_uid="2.25.3", pixel_spacing=(0.5, 0.5), bits_stored=12)
    img, _ = read_dicom(path)
    np.save(out / "twelve.npy", img)
    slicer, scene = _scene()
    volume = slicer.util.addVolumeFromArray(pixels[None], name="CXR")
    check_input_volume(volume)
    image, _ = prepare(volume, None, out / "input")
    report.update(dicom=str(path), exported=str(image), python_problem=deps.python_problem())


def main(argv: list[str]) -> int:
    out, what = Path(argv[0]), argv[1]
    out.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    report = {"pydicom": pydicom.__version__, "numpy": np.__version__, "scipy": version("scipy")}
    {"study": study, "run": run, "dicom": dicom}[what](out, report)
    (out / "report.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
