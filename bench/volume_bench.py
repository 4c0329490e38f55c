"""Volume benchmark: time and peak memory per method, a 2-D image against a 3-D volume, in one run.

The same architecture in both forms (MONAI DenseNet121, ``spatial_dims=2`` and ``3``, one input
channel, two classes, random weights), one image ``[1, 1, S, S]`` and one volume ``[1, 1, S, S, S]``,
the same recipe (``quick`` by default). Each (form, method) runs in its own child process, forked from
a parent that has only imported the libraries, so that its memory figure is its own:

* CPU: the child's peak resident memory during the ``explain`` call (read from /proc every
  millisecond), minus its resident memory just before it (model and input built, a warm-up call on
  a small input done), with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, set by the
  bench for itself) so that freed tensors leave the resident set. ``tracemalloc`` does not see
  torch's allocations; this does.
* CUDA: ``torch.cuda.max_memory_allocated`` during the call, minus what was allocated before it.

Time is the wall time of one ``explain`` call (synchronized on CUDA), the first in the process
(XRAI includes segmenting the image), and the CPU time the process spent in it (user + system,
all threads): on a shared machine the CPU time moves far less than the wall time. Ratios 3-D /
2-D are of figures measured in the same run.

    python bench/volume_bench.py --out bench/results                    # CPU, 112 px vs 48^3 (about 1 min)
    python bench/volume_bench.py --device cuda --size2d 320 --size3d 128 --out bench/results

The parent never touches CUDA before the last child has finished (a forked child may not use a CUDA
context its parent made).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

FORMS = ("2d", "3d")


def _rss_mb() -> float:
    """Resident memory of this process now, from /proc (Linux), in MiB."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (host threads that segment for XRAI too)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _RssSampler(threading.Thread):
    """Highest resident memory seen while running, read from /proc every millisecond (torch releases the GIL)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.001)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_mb())


def run_one(form: str, method: str, size: int, preset: str, device: str, threads: int) -> dict:
    """Explain one image or volume with one method in this process; time and memory of the call.

    A warm-up call on a small input first (32 px / 32^3, the same method) so that one-time set-up
    (kernels, thread pools, autograd's threads) is not counted as the method's memory or time.
    """
    import torch
    from monai.networks.nets import DenseNet121
    from saliency_trust.saliency import SegmentCache, explain, get_recipe
    from saliency_trust.saliency.engine import auto_max_rows

    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    dims = 2 if form == "2d" else 3
    net = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval().to(dev)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand((1, 1, *([size] * dims)), generator=g) * 2 - 1).to(dev)
    recipe = get_recipe(preset, cam_resize="half_pixel")
    explain(net, x.new_zeros((1, 1, *([32] * dims))) + 0.5, methods=method, targets=[1], preset=recipe,
            segment_cache=SegmentCache())
    rows = auto_max_rows(net, x, recipe.memory_budget_mb, recipe.dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base_dev = torch.cuda.memory_allocated(dev)
    base_rss, base_peak = _rss_mb(), _peak_rss_mb()
    sampler = _RssSampler()
    sampler.start()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    out = explain(net, x, methods=method, targets=[1], preset=recipe, segment_cache=SegmentCache())[method]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    sampled = sampler.stop()
    peak = _peak_rss_mb()
    rec = {"form": form, "method": method, "shape": list(x.shape), "elements": x.numel(), "seconds": seconds,
           "cpu_seconds": cpu, "rows_per_chunk": rows, "passes_per_image": recipe.passes_per_image([method]),
           "rss_before_mb": base_rss,
           # The call's peak resident memory above what the process held just before it, sampled every ms.
           "call_rss_mb": sampled - base_rss,
           # Cross-check from the kernel's high-water mark (exact, but only when the call set a new peak).
           "maxrss_after_mb": peak, "maxrss_set_by_call": peak > base_peak,
           "map_ok": bool(torch.isfinite(out).all()) and float(out.max()) == 1.0}
    if dev.type == "cuda":
        rec["call_device_mb"] = (torch.cuda.max_memory_allocated(dev) - base_dev) / 2**20
    return rec


def _child(args: argparse.Namespace, form: str, method: str, size: int) -> dict:
    """:func:`run_one` in a forked child (the parent has imported everything and run nothing), so that each
    figure is one process's own and no child pays the imports again."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report through the pipe, leave without running the parent's exit code
        code = 0
        try:
            payload = json.dumps(run_one(form, method, size, args.preset, args.device, args.threads))
        except BaseException as exc:  # noqa: BLE001 - any failure goes back to the parent as text
            payload, code = json.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        with os.fdopen(write, "w") as f:
            f.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        payload = f.read()
    os.waitpid(pid, 0)
    rec = json.loads(payload)
    if "error" in rec:
        raise RuntimeError(f"{form} {method} failed: {rec['error']}")
    return rec


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size2d", type=int, default=112)
    ap.add_argument("--size3d", type=int, default=48)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (1: steadiest on a shared CPU)")
    ap.add_argument("--methods", nargs="*", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        # glibc keeps freed heap memory resident and raises its mmap threshold as large blocks are
        # freed, so a warm-up's memory would hide the measured call's. With a fixed threshold every
        # large tensor is its own mapping, returned on free: resident memory follows live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                   *(sys.argv[1:] if argv is None else argv)], env)
    import monai.networks.nets  # noqa: F401 - imported once here, before the children are forked
    import saliency_trust.saliency  # noqa: F401
    import torch
    from saliency_trust.methods import METHODS

    torch.set_num_threads(args.threads)

    methods = args.methods or list(METHODS)
    load = list(os.getloadavg())  # other work on the machine: CPU time is the steadier figure then
    started = time.perf_counter()
    per_method = {}
    for m in methods:
        two, three = (_child(args, form, m, args.size2d if form == "2d" else args.size3d) for form in FORMS)
        ratio = {"time": three["seconds"] / two["seconds"], "cpu_time": three["cpu_seconds"] / two["cpu_seconds"],
                 "elements": three["elements"] / two["elements"]}
        key = "call_device_mb" if args.device.startswith("cuda") else "call_rss_mb"
        if two[key] > 0:
            ratio["memory"] = three[key] / two[key]
        per_method[m] = {"2d": two, "3d": three, "ratio_3d_over_2d": ratio}
        print(f"{m:8s} 2-D {two['seconds']:7.2f} s ({two['cpu_seconds']:6.2f} s CPU) {two[key]:7.1f} MiB | "
              f"3-D {three['seconds']:7.2f} s ({three['cpu_seconds']:6.2f} s CPU) {three[key]:7.1f} MiB | "
              f"x{ratio['time']:.1f} wall, x{ratio['cpu_time']:.1f} CPU, "
              f"memory x{ratio.get('memory', float('nan')):.1f}",
              flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else _cpu_model()
    result = {
        "bench": "volume_bench", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "device": args.device,
                    "device_name": device_name, "cores": os.cpu_count(), "threads": args.threads,
                    "load_average_at_start": load},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": "monai DenseNet121 (in_channels=1, out_channels=2, random weights), spatial_dims 2 and 3",
        "inputs": {"2d": [1, 1, args.size2d, args.size2d], "3d": [1, 1, args.size3d, args.size3d, args.size3d]},
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "preset": args.preset, "memory_measure": ("CUDA max_memory_allocated above the allocation before the call"
                                                  if args.device.startswith("cuda") else
                                                  "peak RSS of the child process during the call (sampled every "
                                                  "ms from /proc) above its RSS before it"),
        "methods": per_method, "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    path = out / f"volume_{tag}_{args.size2d}px_{args.size3d}cube.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path} ({result['wall_seconds']:.0f} s)")
    return path


if __name__ == "__main__":
    main()
