"""POST /cancel/{request_id}: a client stops its job on the server, not only its own wait for it.

The app runs in process (ASGI transport); the worker's job is a stand-in that blocks until released,
so the test sees a job queued and a job running at the moment they are cancelled.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from tests.conftest import REPO

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from saliency_trust.workflows.sample import make_fixture_models

    return make_fixture_models(tmp_path_factory.mktemp("cancel-models")).parent


def test_a_queued_job_never_runs_and_a_running_ones_result_is_dropped(models, tmp_path, monkeypatch):
    import saliency_trust.serve as serve

    state = serve.State(REPO / "monai_bundle", serve.discover_models(REPO / "monai_bundle", models), tmp_path / "w",
                        None, 2**20, 600.0, 60.0, 4, "cpu")
    state.work.mkdir()
    app = serve.create_app(state)
    started, release = threading.Event(), threading.Event()
    ran = []

    def job(m, request):  # serve._run's signature: the model and the InferenceRequest
        ran.append(request.image.parent.parent.name)
        started.set()
        release.wait(60)
        (request.output_dir / "maps").mkdir(parents=True)
        return {"maps": {}}

    monkeypatch.setattr(serve, "_run", job)
    png = (REPO / "docs" / "slicer_overlay.png").read_bytes()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            def post(rid):
                return client.post("/infer/densenet121", files={"image": ("x", png)},
                                   data={"methods": "grad", "request_id": rid})

            async def until(done, what: str) -> None:
                # A generous bound that only a failure reaches: the worker raising instead of starting the
                # job left this loop waiting forever.
                for _ in range(30000):
                    if done():
                        return
                    if first.done():
                        pytest.fail(f"the first request ended ({first.result().status_code}) before {what}")
                    await asyncio.sleep(0.01)
                pytest.fail(f"never {what}")

            first = asyncio.create_task(post("job-a-0001"))
            await until(started.is_set, "the worker started the first job")
            second = asyncio.create_task(post("job-b-0001"))
            await until(lambda: "job-b-0001" in state.jobs, "the second job was queued")
            # The queued one: cancelled before it runs.
            r = await client.post("/cancel/job-b-0001")
            assert r.status_code == 200 and r.json()["cancelled"], r.text
            r = await second
            assert r.status_code == 409 and "cancelled" in r.json()["detail"]
            # The running one: its client is answered at once, while the worker is still on it.
            r = await client.post("/cancel/job-a-0001")
            assert r.status_code == 200, r.text
            r = await first
            assert r.status_code == 409
            assert not release.is_set()
            assert (await client.post("/cancel/job-a-0001")).status_code == 404  # gone
            bad = await client.post("/infer/densenet121", files={"image": ("x", png)},
                                    data={"methods": "grad", "request_id": "../x"})
            assert bad.status_code == 422

    try:
        asyncio.run(go())
    finally:
        release.set()
        state.executor.shutdown(wait=True)
    assert len(ran) == 1  # the queued job never ran
    assert state.jobs == {} and state.pending == 0 and state.results == {}
    assert not any(state.work.iterdir())  # the running job's folder went when it ended


def test_the_slicer_client_cancel_never_raises():
    sys.path.insert(0, str(REPO / "SaliencyTrust"))
    from SaliencyTrustLib import client

    assert client.cancel("http://127.0.0.1:9", "job-a-0001", timeout=2) is False
