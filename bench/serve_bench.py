"""Load test of the HTTP service: throughput and latency under concurrent uploads, against in-process calls.

    python bench/serve_bench.py --models-dir demo_out/models/opacity --image CXR.dcm --out bench/results \
        [--requests 40 --concurrency 8 --methods grad,gradcam --preset quick]

Starts ``python -m saliency_trust.serve`` on a free localhost port, waits for ``/info``, sends
``--requests`` POST /infer uploads from ``--concurrency`` async clients (httpx) and downloads
every map, then runs the same inference the same number of times in this process (the
baseline, no HTTP). Writes ``serve_bench.json``: requests/s, latency percentiles, errors and the
ratio of service throughput to the in-process baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, image: bytes, n: int, concurrency: int, data: dict, model: str) -> tuple[list, int]:
    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one() -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                r = await client.post(f"{url}/infer/{model}", files={"image": ("cxr", image)}, data=data)
                if r.status_code != 200:
                    errors += 1
                    return
                for link in r.json()["maps"].values():
                    if (await client.get(url + link)).status_code != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(one() for _ in range(n)))
    return latencies, errors


def main(argv: list[str] | None = None) -> int:
    """Run the load test; writes the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", required=True, help="a model folder (model.json and its replicates)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--methods", default="grad,gradcam")
    p.add_argument("--preset", default="quick")
    p.add_argument("--checks", action="store_true", help="also the live repeatability/randomization checks")
    a = p.parse_args(argv)
    models = Path(a.models_dir).resolve()
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.pop("SALIENCY_TRUST_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "saliency_trust.serve", "--bundle", str(REPO / "monai_bundle"),
                             "--models-dir", str(models.parent), "--port", str(port), "--max-queue", "1000"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                info = httpx.get(f"{url}/info", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("service did not start") from None
                time.sleep(0.5)
        model = models.name if models.name in info["models"] else next(iter(info["models"]))
        data = {"methods": a.methods, "preset": a.preset, "checks": "true" if a.checks else "false"}
        image = Path(a.image).read_bytes()
        asyncio.run(_load(url, image, 2, 1, data, model))  # warm-up: imports, first network load
        t0 = time.perf_counter()
        lat, errors = asyncio.run(_load(url, image, a.requests, a.concurrency, data, model))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)

    from saliency_trust.workflows.infer import run_inference

    arch = info["models"][model]["architecture"]
    rep = info["models"][model]["replicates"][0]
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"arch": arch, "replicate": rep, "methods": a.methods.split(","), "preset": a.preset,
                  "checks": a.checks, "map_format": "nifti", "cache_networks": True}
        run_inference(a.image, Path(tmp) / "w", models, **kwargs)
        t1 = time.perf_counter()
        for i in range(a.requests):
            run_inference(a.image, Path(tmp) / str(i), models, **kwargs)
        base = time.perf_counter() - t1
    lat_arr = np.array(lat)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "model": model, "arch": arch, "methods": a.methods, "preset": a.preset,
        "checks": a.checks, "requests": a.requests, "concurrency": a.concurrency, "errors": errors,
        "service_requests_per_s": a.requests / wall, "in_process_requests_per_s": a.requests / base,
        "service_vs_in_process": (a.requests / wall) / (a.requests / base),
        "latency_s": {"p50": float(np.percentile(lat_arr, 50)), "p95": float(np.percentile(lat_arr, 95)),
                      "max": float(lat_arr.max())} if len(lat_arr) else None,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
