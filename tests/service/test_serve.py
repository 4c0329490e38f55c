"""The HTTP service end to end: a real uvicorn on localhost, real uploads, maps equal to the local bundle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import REPO

httpx = pytest.importorskip("httpx")
TOKEN = "test-token-5b1f"
METHODS = ["grad", "gradcam"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_bundle, tmp_path_factory):
    port = _free_port()
    work = tmp_path_factory.mktemp("serve")
    log = (work / "server.log").open("w")
    import torch

    env = dict(os.environ, SALIENCY_TRUST_TOKEN=TOKEN, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "saliency_trust.serve", "--bundle", str(REPO / "monai_bundle"), "--models-dir",
         str(trained_bundle["models"]), "--port", str(port), "--max-upload-mb", "1", "--ttl", "86400",
         "--work-dir", str(work / "results"), "--device", "cpu"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.time() + 600  # a generous limit for a loaded machine; success does not wait for it
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/info", headers=auth, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        assert proc.poll() is None, (work / "server.log").read_text()
    else:
        proc.kill()
        pytest.fail("service did not start: " + (work / "server.log").read_text())
    yield {"url": url, "auth": auth, "work": work / "results", "proc": proc, "log": work / "server.log"}
    proc.terminate()
    proc.wait(10)
    log.close()


def _post(server, path: Path, methods=METHODS, **extra):
    files = {"image": ("whatever.bin", path.read_bytes(), "application/octet-stream")}
    data = {"methods": ",".join(methods), "preset": "quick", "checks": "false", **extra}
    return httpx.post(f"{server['url']}/infer/densenet121", files=files, data=data, headers=server["auth"], timeout=300)


def _local(trained_bundle, image: Path, out: Path, methods=METHODS, checks=False) -> dict:
    from saliency_trust.workflows.infer import run_inference

    run_inference(image, out, trained_bundle["model"], arch="densenet121", methods=methods, preset="quick",
                  checks=checks, device="cpu")
    return {m: sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / f"{m}.nrrd"))) for m in methods}


def _download(server, result: dict) -> dict[str, np.ndarray]:
    maps = {}
    for m, link in result["maps"].items():
        r = httpx.get(server["url"] + link, headers=server["auth"], timeout=60)
        assert r.status_code == 200, r.text
        path = server["work"].parent / f"dl-{result['id']}-{m}.nii.gz"
        path.write_bytes(r.content)
        maps[m] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return maps


def _dicoms(trained_bundle, n: int) -> list[Path]:
    return sorted((trained_bundle["data"] / "stage_2_train_images").glob("*.dcm"))[:n]


@pytest.mark.slow
def test_upload_dicom_gives_the_local_maps_and_info_lists_the_model(server, trained_bundle, tmp_path):
    info = httpx.get(f"{server['url']}/info", headers=server["auth"]).json()
    model = info["models"]["densenet121"]
    assert model["architecture"] == "densenet121" and model["replicates"] == [0, 1]
    assert set(model["verdicts"]["gradcam"]) == {"utility", "randomization", "repeatability", "reproducibility"}
    assert "quick" in info["presets"] and info["methods"][0] == "grad"
    assert httpx.get(f"{server['url']}/openapi.json", headers=server["auth"]).json()["paths"]["/infer/{model}"]

    r = _post(server, trained_bundle["dicom"], checks="true")
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["probabilities"]) == 2 and {"repeatability", "randomization"} <= set(res["checks"])
    assert res["verdicts"]["methods"]["grad"] is not None
    got = _download(server, res)
    want = _local(trained_bundle, trained_bundle["dicom"], tmp_path / "local")
    for m in METHODS:
        np.testing.assert_array_equal(got[m], want[m])  # same process settings: bitwise the same maps
    ref = sitk.ReadImage(str(trained_bundle["dicom"]))
    nii = sitk.ReadImage(str(next(server["work"].parent.glob(f"dl-{res['id']}-grad.nii.gz"))))
    assert nii.GetSize() == ref.GetSize()
    np.testing.assert_allclose(nii.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    # Nothing identifying in the log: no file name, no DICOM UIDs.
    text = server["log"].read_text()
    assert trained_bundle["dicom"].stem not in text and "whatever.bin" not in text


@pytest.mark.slow
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(server, trained_bundle, tmp_path):
    url, auth = server["url"], server["auth"]
    dicom = trained_bundle["dicom"]
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.post(f"{url}/infer/densenet121", files={"image": ("a.dcm", dicom.read_bytes())},
                   headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "token" in r.json()["detail"]

    big = dicom.read_bytes() + os.urandom(1_200_000)  # over the 1 MiB limit, read in full
    r = httpx.post(f"{url}/infer/densenet121", files={"image": ("big.dcm", big)}, headers=auth, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    huge = b"\0" * 4_000_000  # over the limit by Content-Length alone
    r = httpx.post(f"{url}/infer/densenet121", files={"image": ("huge.dcm", huge)}, headers=auth, timeout=60)
    assert r.status_code == 413

    r = httpx.post(f"{url}/infer/densenet121", files={"image": ("scan.dcm", b"patient notes, not an image\n" * 20)},
                   headers=auth)
    assert r.status_code == 415 and "checked by content" in r.json()["detail"]
    raw = dicom.read_bytes()
    for broken, words in ((raw[:600], "DICOM has no pixel data"), (raw[: len(raw) - 3000], "truncated")):
        r = httpx.post(f"{url}/infer/densenet121", files={"image": ("x.png", broken)}, headers=auth, timeout=60)
        assert r.status_code == 422 and r.json()["detail"].startswith("uploaded image: "), r.text
        assert words in r.json()["detail"] and str(server["work"]) not in r.json()["detail"], r.text
    assert _post(server, dicom, methods=["nope"]).status_code == 422
    assert httpx.post(f"{url}/infer/nomodel", files={"image": ("a", dicom.read_bytes())},
                      headers=auth).status_code == 404
    assert httpx.get(f"{url}/results/{'0' * 32}/prediction.json", headers=auth).status_code == 404
    assert httpx.get(f"{url}/results/..%2F..%2Fetc/passwd", headers=auth).status_code == 404

    r = _post(server, dicom)
    assert r.status_code == 200, r.text  # still serving after all of that
    assert server["proc"].poll() is None


def test_every_corpus_image_is_refused_with_a_reason_or_served(server, tmp_path):
    """The broken / hostile corpus (tests/corpus/make_corpus.py) through real uploads."""
    from tests.corpus.make_corpus import make_images

    url, auth = server["url"], server["auth"]
    cases = make_images(tmp_path / "corpus")
    statuses = {}
    for name, expect in cases.items():
        upload = (tmp_path / "corpus" / name).read_bytes()
        r = httpx.post(f"{url}/infer/densenet121", files={"image": ("upload", upload)},
                       data={"methods": "grad", "preset": "quick", "checks": "false"}, headers=auth, timeout=300)
        statuses[name] = r.status_code
        if expect == "refused" or name.endswith(".jpg"):  # the service takes DICOM, PNG, NIfTI and NRRD
            assert r.status_code in (400, 413, 415, 422), (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert detail and len(detail) < 400 and str(server["work"]) not in detail, (name, detail)
        else:
            assert r.status_code == 200, (name, r.text)
    assert server["proc"].poll() is None, statuses
    assert sum(s == 422 for s in statuses.values()) >= 15, statuses  # most are refused by the readers, by name


@pytest.mark.slow
def test_twenty_concurrent_requests_all_return_their_own_correct_maps(server, trained_bundle, tmp_path):
    images = _dicoms(trained_bundle, 4)
    want = {p: _local(trained_bundle, p, tmp_path / p.stem) for p in images}
    jobs = [images[i % 4] for i in range(20)]
    out: list = [None] * 20

    def call(i: int) -> None:
        r = _post(server, jobs[i])
        out[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(o is not None and o[0] == 200 for o in out), [o and o[0] for o in out]
    assert len({o[1]["id"] for o in out}) == 20
    for i, (_, res) in enumerate(out):
        got = _download(server, res)
        for m in METHODS:
            np.testing.assert_array_equal(got[m], want[jobs[i]][m])


class _Clock:
    """A clock the test moves by hand: expiry is checked without waiting on the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _in_process(trained_bundle, work: Path, timeout: float = 600.0, ttl: float = 60.0, clock=None):
    from saliency_trust.serve import State, create_app, discover_models

    work.mkdir(parents=True, exist_ok=True)
    state = State(REPO / "monai_bundle", discover_models(REPO / "monai_bundle", trained_bundle["models"]), work,
                  None, 2**20, timeout, ttl, 4, "cpu")
    if clock is not None:
        state.clock = clock
    return state, create_app(state)


@pytest.mark.slow
def test_results_expire_on_the_servers_clock_and_their_files_are_removed(trained_bundle, tmp_path):
    """The app in process with an injected clock: a result is served until its lifetime passes, then 404 and gone."""
    import asyncio

    clock = _Clock()
    state, app = _in_process(trained_bundle, tmp_path / "work", ttl=60.0, clock=clock)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            files = {"image": ("a", trained_bundle["dicom"].read_bytes())}
            r = await client.post("/infer/densenet121", files=files, data={"methods": "grad", "preset": "quick"})
            assert r.status_code == 200, r.text
            res = r.json()
            assert res["expires_in_s"] == 60.0
            folder = state.work / res["id"]
            assert folder.is_dir()
            clock.now += 59.0  # one second before the end of its life: still there
            assert (await client.get(res["maps"]["grad"])).status_code == 200
            assert folder.is_dir()
            clock.now += 1.0  # its lifetime has passed
            gone = await client.get(res["maps"]["grad"])
            assert gone.status_code == 404 and "expired" in gone.json()["detail"]
            assert not folder.exists()
            assert state.results == {}

    try:
        asyncio.run(go())
    finally:
        state.executor.shutdown(wait=True)


@pytest.mark.slow
def test_worker_faults_and_a_full_disk_fail_one_request_and_the_service_goes_on(trained_bundle, tmp_path, monkeypatch):
    """A worker exception gives 500 with a short reason, a full work folder 507; neither leaves files behind."""
    import asyncio
    import errno

    import saliency_trust.workflows.infer as infer

    state, app = _in_process(trained_bundle, tmp_path / "work")
    real_write = infer.write_map

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async def post():
                files = {"image": ("a", trained_bundle["dicom"].read_bytes())}
                return await client.post("/infer/densenet121", files=files, data={"methods": "grad", "preset": "quick"})

            monkeypatch.setattr(infer, "predict", crash)  # the worker's first use of the network
            r = await post()
            assert r.status_code == 500 and "RuntimeError" in r.json()["detail"], r.text
            assert "illegal memory" not in r.json()["detail"]  # a short reason, not the internals
            monkeypatch.undo()
            monkeypatch.setattr(infer, "write_map", full_disk)
            r = await post()
            assert r.status_code == 507 and "full" in r.json()["detail"], r.text
            monkeypatch.setattr(infer, "write_map", real_write)
            assert list(state.work.iterdir()) == [], "a failed request leaves nothing in the work folder"
            r = await post()
            assert r.status_code == 200, r.text  # the next request works
            assert (await client.get(r.json()["maps"]["grad"])).status_code == 200
            assert state.pending == 0

    try:
        asyncio.run(go())
    finally:
        state.executor.shutdown(wait=True)


def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_the_server_keeps_serving(server, trained_bundle):
    host, port = server["url"].removeprefix("http://").split(":")
    body = trained_bundle["dicom"].read_bytes()
    boundary = "cut-short-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    request = (f"POST /infer/densenet121 HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: {server['auth']['Authorization']}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(head) + len(body) + 100}\r\n\r\n").encode()
    before = set(server["work"].iterdir()) if server["work"].is_dir() else set()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request + head + body[: len(body) // 2])  # half the image, then the client is gone
    r = _post(server, trained_bundle["dicom"])
    assert r.status_code == 200, r.text
    assert server["proc"].poll() is None
    after = set(server["work"].iterdir())
    new = after - before
    assert all((p / "out").is_dir() for p in new), "only finished results are kept, no half-uploaded request"


@pytest.mark.slow
def test_slicer_server_mode_builds_the_same_scene_as_local_mode(server, trained_bundle, tmp_path):
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(REPO / "SaliencyTrust"))
    from SaliencyTrustLib import client
    from SaliencyTrustLib import logic as L

    from tests.slicer.test_module import load_dicom, matrix, table_rows

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    volume = load_dicom(scene, trained_bundle["dicom"])
    req = L.Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=str(trained_bundle["model"]),
                    arch="densenet121", methods=("grad", "gradcam"), preset="quick", device="cpu",
                    python=sys.executable)
    local = L.run_local(scene, volume, req, tmp_path / "local", timeout=600)
    local_nodes = {m: slicer.util.arrayFromVolume(n).copy() for m, n in local.map_nodes.items()}
    local_matrix = {m: matrix(n) for m, n in local.map_nodes.items()}
    local_rows = table_rows(local.table_node)
    # The widget's server path: the model is chosen from the server's /info by architecture (the
    # service names models by their folder under --models-dir, "densenet121" here), the HTTP work
    # runs in a worker thread.
    from SaliencyTrustLib import controller

    run = controller.Run(controller.Settings(volume, None, req, use_server=True, server_url=server["url"],
                                             token=TOKEN), tmp_path / "srv").start()
    run._thread.join(600)
    remote = run.finish(scene)
    assert run.model_name == "densenet121"
    assert set(remote.map_nodes) == set(local_nodes)
    for m in local_nodes:
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(remote.map_nodes[m]), local_nodes[m])
        np.testing.assert_allclose(matrix(remote.map_nodes[m]), local_matrix[m], atol=1e-5)
    assert table_rows(remote.table_node) == local_rows
    assert remote.prediction["probabilities"] == local.prediction["probabilities"]
    assert remote.prediction["server"]["model"] == "densenet121"
    # The service's /info says the model learnt from SynthCXR images: the panel warns over its maps.
    assert "synthetic SynthCXR images" in remote.training_note
    # The server run replaced the local run's nodes for this input (one run's nodes per input).
    assert not any(scene.IsNodePresent(n) for n in local.map_nodes.values())
    image, mask = L.prepare(volume, None, tmp_path / "srv_in")
    # A cancelled server run ends quietly and adds nothing.
    before = scene.GetNumberOfNodes()
    cancelled = controller.Run(controller.Settings(volume, None, req, use_server=True, server_url=server["url"],
                                                   token=TOKEN), tmp_path / "srv2").start()
    cancelled.cancel()
    assert cancelled.poll() == ([], True)
    with pytest.raises(L.CancelledError):
        cancelled.finish(scene)
    assert scene.GetNumberOfNodes() == before
    with pytest.raises(L.BundleError, match="HTTP 401"):
        client.infer(server["url"], "densenet121", image, tmp_path / "bad", req, token="wrong")
    json.dumps(remote.prediction)


@pytest.mark.slow
def test_a_request_over_the_time_limit_gets_504_and_its_files_go(trained_bundle, tmp_path):
    """The app in process (ASGI transport) with a 10 ms limit: 504, then the worker's folder is removed."""
    import asyncio

    state, app = _in_process(trained_bundle, tmp_path / "work", timeout=0.01)
    work = state.work

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            files = {"image": ("a", trained_bundle["dicom"].read_bytes())}
            return await client.post("/infer/densenet121", files=files, data={"methods": "grad", "preset": "quick"})

    r = asyncio.run(go())
    assert r.status_code == 504 and "no result within" in r.json()["detail"]
    assert state.pending == 0
    # The job's done-callback removes its folder in the worker thread; waiting for the worker is enough.
    state.executor.shutdown(wait=True)
    assert not any(work.iterdir())


def _monai_label_client():
    """MONAI Label 0.8.5's own client module (its package installed apart, without its dependencies)."""
    from tests.extras import MONAILABEL, extra

    folder = str(extra(MONAILABEL))
    if folder not in sys.path:
        sys.path.append(folder)  # last: the wheel also carries a top-level 'tests' package
    from monailabel.client import client

    return client


@pytest.mark.slow
def test_monai_labels_own_client_gets_info_and_an_inference_with_its_map(server, trained_bundle, tmp_path):
    """MONAILabelClient (the client of MONAI Label's scripts and Slicer module) against the service: /info/, then
    infer(model, image_id, params, file=...) gets the map file and the JSON params back in one multipart reply."""
    ml = _monai_label_client()
    client = ml.MONAILabelClient(server["url"], tmpdir=str(tmp_path / "client"))
    (tmp_path / "client").mkdir()
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    info = client.info()
    model = info["models"]["densenet121"]
    assert model["architecture"] == "densenet121" and model["type"] == "others" and model["dimension"] == 2
    assert model["labels"] == info["models"]["densenet121"]["classes"] and info["name"] == "SaliencyTrust"

    dicom = trained_bundle["dicom"]
    params = {"methods": METHODS, "method": "gradcam", "preset": "quick", "checks": False}
    image_out, reply = client.infer("densenet121", "case-0001", params, file=str(dicom))
    assert reply["methods"] == METHODS and reply["file"]["method"] == "gradcam" and len(reply["probabilities"]) == 2
    assert Path(image_out).name == reply["file"]["name"] and Path(image_out).parent == tmp_path / "client"
    want = _local(trained_bundle, dicom, tmp_path / "local")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(image_out)), want["gradcam"])
    assert sitk.ReadImage(image_out).GetSize() == sitk.ReadImage(str(dicom)).GetSize()
    # The other maps stay downloadable by the links in the params, as for our own clients.
    np.testing.assert_array_equal(_download(server, reply)["grad"], want["grad"])
    # Without params the first method's map comes back; an image id never uploaded is refused in one sentence.
    image_out, reply = client.infer("densenet121", "case-0001", {"methods": "grad", "checks": False}, file=str(dicom))
    assert reply["file"]["method"] == "grad" and Path(image_out).is_file()
    with pytest.raises(ml.MONAILabelClientException) as refused:
        client.infer("densenet121", "case-0001", {"methods": ["grad"]})
    assert "Status: 422" in refused.value.msg and "never uploaded" in refused.value.msg
    # MONAI Label's two ways of sending the image ahead: its datastore upload (then infer by image id), and a
    # session (what its Slicer module does with a volume loaded in Slicer). A fresh client per call, as its Slicer
    # module makes them: the client's multipart calls leave their Content-Type and -Length in its auth headers.
    def fresh():
        c = ml.MONAILabelClient(server["url"], tmpdir=str(tmp_path / "client"))
        c.update_auth({"token_type": "Bearer", "access_token": TOKEN})
        return c

    assert fresh().upload_image(str(dicom), image_id="case-0001")["image"] == "case-0001"
    image_out, reply = fresh().infer("densenet121", "case-0001", {"methods": ["gradcam"], "checks": False})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(image_out)), want["gradcam"])
    session = fresh().create_session(str(dicom))["session_id"]
    assert fresh().get_session(session)["session_id"] == session
    image_out, reply = fresh().infer("densenet121", "ignored", {"methods": ["grad"], "checks": False},
                                     session_id=session)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(image_out)), want["grad"])
    assert fresh().remove_session(session)["removed"]
    with pytest.raises(ml.MONAILabelClientException) as gone:
        fresh().infer("densenet121", "ignored", {"methods": ["grad"]}, session_id=session)
    assert "Status: 422" in gone.value.msg and "no such session" in gone.value.msg
    other = ml.MONAILabelClient(server["url"], tmpdir=str(tmp_path / "client"))
    with pytest.raises(ml.MONAILabelClientException) as unauthorized:
        other.info()
    assert "Status: 401" in unauthorized.value.msg
    # MONAI Label's ?output=json and ?output=image, and its 'label' upload as our mask.
    url, auth = server["url"], server["auth"]
    form = {"params": json.dumps({"methods": ["grad"], "checks": False})}
    r = httpx.post(f"{url}/infer/densenet121?image=x&output=json", files={"file": ("a.dcm", dicom.read_bytes())},
                   data=form, headers=auth, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and r.json()["file"]["method"]
    r = httpx.post(f"{url}/infer/densenet121?output=image", files={"file": ("a.dcm", dicom.read_bytes())},
                   data=form, headers=auth, timeout=300)
    assert r.status_code == 200 and r.content[:2] == b"\x1f\x8b"
    mask = tmp_path / "mask.nii.gz"
    ref = sitk.ReadImage(str(dicom))
    box = np.zeros(sitk.GetArrayFromImage(ref).shape, np.uint8)
    box[..., 10:30, 20:40] = 1
    out = sitk.GetImageFromArray(box)
    out.CopyInformation(ref)
    sitk.WriteImage(out, str(mask))
    r = httpx.post(f"{url}/infer/densenet121?output=json", data=form, headers=auth, timeout=300,
                   files={"file": ("a.dcm", dicom.read_bytes()), "label": ("m.nii.gz", mask.read_bytes())})
    assert r.status_code == 200 and r.json()["checks"]["mask_pixels"] == 400, r.text
