"""The service on CT volumes: a real uvicorn on localhost serving a 3-D and a 2-D model folder. NIfTI, NRRD and
zipped DICOM series uploads give NIfTI maps on the input's geometry, equal to the local bundle's; /info says
which model is 3-D; a volume sent to the 2-D model is refused in one sentence; Slicer's server mode on a CT."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import REPO
from tests.volume_models import ct_case, make_2d_model, make_ct_models

httpx = pytest.importorskip("httpx")
TOKEN = "test-token-ct-77"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from saliency_trust.data.dicom import write_ct_series
    from saliency_trust.data.volumes import VolumeGeometry, write_volume

    root = tmp_path_factory.mktemp("ct-serve")
    models = root / "models"
    make_ct_models(models / "ct")
    make_2d_model(models / "cxr", "tiny")
    case = ct_case(0, positive=True)
    geo = VolumeGeometry(case.geometry.spacing, (-150.0, 80.0, -40.0), DIRECTION)
    series = write_ct_series(root / "series", case.hu, spacing=geo.spacing, origin=geo.origin,
                             direction=geo.direction, patient_id="p", study_uid="2.25.91", series_uid="2.25.92",
                             frame_of_reference_uid="2.25.93", sop_uids=[f"2.25.94{k}" for k in range(16)])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"DICOM/{f.name}")
    files = {"nifti": write_volume(root / "ct.nii.gz", case.hu, geo), "nrrd": write_volume(root / "ct.nrrd", case.hu,
                                                                                           geo)}
    (root / "ct.zip").write_bytes(archive.getvalue())
    files["zip"] = root / "ct.zip"
    port = _free_port()
    log = (root / "server.log").open("w")
    env = dict(os.environ, SALIENCY_TRUST_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "saliency_trust.serve", "--bundle", str(REPO / "monai_bundle"), "--models-dir",
         str(models), "--port", str(port), "--max-upload-mb", "2", "--max-unzipped-mb", "4", "--ttl", "86400",
         "--work-dir", str(root / "results"), "--device", "cpu"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a generous limit for a loaded machine; success does not wait for it
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/info", headers=AUTH, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, (root / "server.log").read_text()
    else:
        proc.kill()
        pytest.fail("service did not start: " + (root / "server.log").read_text())
    yield {"url": url, "proc": proc, "root": root, "models": models, "series": series, "geometry": geo,
           "hu": case.hu, "mask": case.mask, **files}
    proc.terminate()
    proc.wait(10)
    log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(served, data: bytes, model: str = "ct/ct3d", **extra):
    form = {"methods": "grad,gradcam", "preset": "quick", "checks": "false", **extra}
    return httpx.post(f"{served['url']}/infer/{model}", files={"image": ("upload.bin", data)}, data=form,
                      headers=AUTH, timeout=300)


def test_info_says_which_model_is_3d(served):
    info = httpx.get(f"{served['url']}/info", headers=AUTH).json()
    ct, cxr = info["models"]["ct/ct3d"], info["models"]["cxr/tiny"]
    assert (ct["dimension"], cxr["dimension"]) == (3, 2)
    assert ct["input_size"] == [32, 32, 32] and ct["image_size"] is None and ct["window_hu"] == [-1000.0, 400.0]
    assert cxr["input_size"] == [64, 64] and cxr["image_size"] == 64 and cxr["window_hu"] is None


def test_volume_uploads_give_nifti_maps_on_the_inputs_geometry_equal_to_the_local_bundle(served, tmp_path):
    from saliency_trust.workflows.infer import run_inference

    local = run_inference(served["nifti"], tmp_path / "local", served["models"] / "ct" / "ct3d",
                          methods=["grad", "gradcam"], preset="quick", checks=False, device="cpu")
    want = {m: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local" / rel)))
            for m, rel in local["maps"].items()}
    for kind in ("nifti", "nrrd", "zip"):
        r = _post(served, served[kind].read_bytes())
        assert r.status_code == 200, (kind, r.text)
        res = r.json()
        assert res["input"]["kind"] == "volume" and res["model"]["spatial_dims"] == 3
        np.testing.assert_allclose(res["probabilities"], local["probabilities"], atol=1e-5)
        for m, link in res["maps"].items():
            got = httpx.get(served["url"] + link, headers=AUTH, timeout=60)
            assert got.status_code == 200 and link.endswith(".nii.gz")
            path = tmp_path / f"{kind}-{m}.nii.gz"
            path.write_bytes(got.content)
            img = sitk.ReadImage(str(path))
            assert img.GetSize() == (32, 32, 16)
            np.testing.assert_allclose(img.GetSpacing(), served["geometry"].spacing[::-1], rtol=1e-6)
            np.testing.assert_allclose(img.GetOrigin(), served["geometry"].origin, atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-6)
            np.testing.assert_allclose(sitk.GetArrayFromImage(img), want[m], atol=1e-5)
    assert served["proc"].poll() is None
    # Nothing identifying in the log: no DICOM UIDs, no upload names.
    text = (served["root"] / "server.log").read_text()
    assert "2.25.92" not in text and "upload.bin" not in text


def test_a_mask_volume_is_scored_and_bad_volume_uploads_are_refused_in_one_sentence(served, tmp_path):
    from saliency_trust.data.volumes import write_volume

    mask = write_volume(tmp_path / "m.nii.gz", served["mask"].astype(np.uint8), served["geometry"])
    r = httpx.post(f"{served['url']}/infer/ct/ct3d", files={"image": ("a", served["nrrd"].read_bytes()),
                                                            "mask": ("b", mask.read_bytes())},
                   data={"methods": "gradcam", "preset": "quick", "checks": "false"}, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    assert 0 < r.json()["checks"]["auprc"]["gradcam"] <= 1 and r.json()["checks"]["mask_pixels"] == served["mask"].sum()
    r = _post(served, served["zip"].read_bytes(), model="cxr/tiny")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("uploaded image: a zip (a DICOM series), but the model") and "is a 2-D model" in detail
    assert str(served["root"]) not in detail
    # A series with a slice missing: the reader names the gap; the server path is never said.
    cut = io.BytesIO()
    with zipfile.ZipFile(cut, "w") as zf:
        for f in sorted(served["series"].iterdir()):
            if f.name != "CT00005.dcm":
                zf.write(f, f.name)
    r = _post(served, cut.getvalue())
    assert r.status_code == 422 and r.json()["detail"].startswith("uploaded image: "), r.text
    assert str(served["root"]) not in r.json()["detail"]
    # Over the unpacked-size limit (4 MiB here), by the zip's directory: never unpacked.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("CT00001.dcm", bytes(6 * 2**20))
    r = _post(served, bomb.getvalue())
    assert r.status_code == 413 and "over the limit of 4 MiB" in r.json()["detail"], r.text
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.dcm", b"x")
    r = _post(served, evil.getvalue())
    assert r.status_code == 422 and "leaving the folder" in r.json()["detail"], r.text
    assert not (served["root"] / "outside.dcm").exists() and not (REPO / "outside.dcm").exists()
    work = served["root"] / "results"
    assert all((p / "out").is_dir() for p in work.iterdir() if p.name != "uploads"), "refused requests leave nothing"
    assert _post(served, served["nifti"].read_bytes()).status_code == 200  # still serving


def test_slicers_server_mode_on_a_ct_chooses_the_3d_model_and_lays_its_maps_on_the_ct(served, tmp_path):
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(REPO / "SaliencyTrust"))
    from SaliencyTrustLib import controller
    from SaliencyTrustLib.errors import BundleError
    from SaliencyTrustLib.process import Request

    from tests.slicer.test_volume_scene import ijk_to_ras, load_series

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    try:
        ct = load_series(scene, served["series"])
        req = Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(tmp_path), methods=("gradcam",),
                      preset="quick", checks=False)
        run = controller.Run(controller.Settings(ct, None, req, use_server=True, server_url=served["url"],
                                                 token=TOKEN), tmp_path / "srv").start()
        run._thread.join(300)
        res = run.finish(scene)
        assert run.model_name == "ct/ct3d"  # chosen by the input's kind among the server's models
        node = res.map_nodes["gradcam"]
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions() == (32, 32, 16)
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(ct), atol=1e-4)
        # The server's 2-D model named by the user: refused in one sentence before anything is uploaded.
        named = controller.Run(controller.Settings(ct, None, req, use_server=True, server_url=served["url"],
                                                   token=TOKEN, server_model="cxr/tiny"), tmp_path / "srv2").start()
        named._thread.join(300)
        with pytest.raises(BundleError, match=r"^'CT' is a CT volume \(32 x 32 x 16 voxels\) and the model "
                                              r"'cxr/tiny' is a 2-D model"):
            named.finish(scene)
    finally:
        scene.Clear(1)
