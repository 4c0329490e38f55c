"""Saliency engine benchmark: throughput per method vs a bare fwd+input-grad loop, PAIR and plain Captum.

Writes one JSON file per (architecture, dtype) run under ``--out``; every ratio is against a
baseline measured in the same run, on the same model, batch, dtype and device.

    python bench/saliency_bench.py --out bench/results                 # CPU defaults (small)
    python bench/saliency_bench.py --device cuda --size 320 --batch 32 --rows 64 128  # GPU, paper recipe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from saliency_trust.networks import get_network
from saliency_trust.saliency import METHODS, SegmentCache, explain, get_recipe
from saliency_trust.saliency.engine import auto_max_rows
from saliency_trust.saliency.explain import default_cam_layer
from saliency_trust.saliency.guided import LayerCapture, find_module, guide_relus
from saliency_trust.saliency.hostwork import content_hashes, host_threads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], object], device: torch.device, repeat: int = 1,
            warmup: Callable[[], object] | None = None) -> float:
    """Median seconds of ``repeat`` runs, each synchronized, after one warm-up run."""
    (warmup or fn)()  # allocator, cudnn autotune for the chunk shapes, compiled kernels
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: Alternate timing of short calls: about this many seconds per method, within these repeats.
PAIRED_BUDGET_S, PAIRED_REPEATS = 2.0, (10, 40)


def _paired(fn: Callable[[], object], floor: Callable[[], object], device: torch.device) -> tuple[float, float, int]:
    """Median seconds of ``fn`` and of ``floor``, run alternately (after one warm-up each).

    Alternating cancels drift between the two (clocks, other tenants), which matters for calls
    of a few tens of milliseconds; the pair repeats until about ``PAIRED_BUDGET_S`` is spent.
    """
    t_fn = _timeit(fn, device)
    t_floor = _timeit(floor, device)
    lo, hi = PAIRED_REPEATS
    repeat = max(lo, min(hi, int(PAIRED_BUDGET_S / max(t_fn + t_floor, 1e-6))))
    a, b = [], []
    for _ in range(repeat):
        for f, acc in ((fn, a), (floor, b)):
            t0 = time.perf_counter()
            f()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b), repeat


def bare_loop(model, x, targets, dtype: str, rows: int, n_rows: int) -> Callable[[], None]:
    """The floor we compare against: forward + input-only gradient over n_rows rows, nothing else."""
    dev = x.device
    reps = x.repeat((n_rows + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:n_rows]
    t = targets.repeat((n_rows + x.shape[0] - 1) // x.shape[0])[:n_rows]
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else None

    def run() -> None:
        for i in range(0, n_rows, rows):
            xi = reps[i : i + rows].detach().requires_grad_(True)
            if ctx:
                with ctx():
                    out = model(xi)
            else:
                out = model(xi)
            (g,) = torch.autograd.grad(out.float().gather(1, t[i : i + rows, None]).sum(), xi)
        return None

    return run


def pair_recipe(model, x, targets, recipe, cam: tuple[str, bool], n_images: int) -> float:
    """Seconds per image for the full recipe through PAIR core, one image per call (the paper's way)."""
    import saliency.core as pair

    dev = x.device
    layer, post_relu = find_module(model, cam[0]), cam[1]

    def make_fn(t: int, guided: bool = False):
        def call(xb, call_model_args=None, expected_keys=None):
            xt = torch.tensor(np.asarray(xb), dtype=torch.float32, device=dev)
            hwc = xt.ndim == 4 and xt.shape[-1] == 3 and xt.shape[1] != 3
            if hwc:
                xt = xt.permute(0, 3, 1, 2)
            xt = xt.contiguous().requires_grad_(True)
            want_cam = expected_keys and pair.CONVOLUTION_LAYER_VALUES in expected_keys
            cap = LayerCapture(layer, post_relu) if want_cam else contextlib.nullcontext()
            with cap:
                out = model(xt)[:, t].sum()
            if guided:
                guide_relus(out)
            if want_cam:
                act = cap.activation
                ga = torch.autograd.grad(out, act)[0]
                return {pair.CONVOLUTION_LAYER_VALUES: act.detach().permute(0, 2, 3, 1).cpu().numpy(),
                        pair.CONVOLUTION_OUTPUT_GRADIENTS: ga.permute(0, 2, 3, 1).cpu().numpy()}
            g = torch.autograd.grad(out, xt)[0]
            if hwc:
                g = g.permute(0, 2, 3, 1)
            return {pair.INPUT_OUTPUT_GRADIENTS: g.cpu().numpy()}

        return call

    t0 = time.perf_counter()
    for b in range(n_images):
        xi = x[b].cpu().numpy()
        hwc = xi.transpose(1, 2, 0)
        t = int(targets[b])
        fn, gfn = make_fn(t), make_fn(t, guided=True)
        base = np.full_like(xi, recipe.ig_baseline)
        pair.GradientSaliency().GetMask(xi, fn)
        pair.GradientSaliency().GetSmoothedMask(xi, fn, stdev_spread=recipe.sg_sigma, nsamples=recipe.sg_samples)
        pair.IntegratedGradients().GetMask(xi, fn, x_baseline=base, x_steps=recipe.ig_steps)
        pair.IntegratedGradients().GetSmoothedMask(xi, fn, stdev_spread=recipe.sg_sigma, nsamples=recipe.sig_samples,
                                                   x_baseline=base, x_steps=recipe.sig_steps)
        pair.GradCam().GetMask(hwc, fn, should_resize=True, three_dims=False)
        pair.GradientSaliency().GetMask(xi, gfn)  # guided backprop (PAIR core has no GBP of its own)
        pair.XRAI().GetMask(hwc, fn, extra_parameters=pair.XRAIParameters(steps=recipe.xrai_steps))
    _sync(dev)
    return (time.perf_counter() - t0) / n_images


def captum_recipe(model, x, targets, recipe, cam: tuple[str, bool], internal_batch: int) -> float:
    """Seconds per image for the same recipe with Captum used the plain way (plus PAIR's XRAI regions)."""
    import saliency.core as pair
    from captum.attr import (
        GuidedBackprop,
        GuidedGradCam,
        IntegratedGradients,
        LayerGradCam,
        NoiseTunnel,
        Saliency,
    )

    layer = find_module(model, cam[0])  # Captum's plain way: the module output as it is
    t = targets.tolist()
    t0 = time.perf_counter()
    sigma = float(recipe.sg_sigma * (x.max() - x.min()))  # Captum takes one absolute sigma per call
    base = torch.full_like(x, recipe.ig_baseline)
    Saliency(model).attribute(x, target=t, abs=False)
    NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad_sq", nt_samples=recipe.sg_samples,
                                           nt_samples_batch_size=max(1, internal_batch // x.shape[0]),
                                           stdevs=sigma, target=t, abs=False)
    ig = IntegratedGradients(model)
    ig.attribute(x, baselines=base, target=t, n_steps=recipe.ig_steps, internal_batch_size=internal_batch)
    NoiseTunnel(ig).attribute(x, nt_type="smoothgrad_sq", nt_samples=recipe.sig_samples, nt_samples_batch_size=1,
                              stdevs=sigma, target=t, baselines=base, n_steps=recipe.sig_steps,
                              internal_batch_size=internal_batch)
    LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    GuidedBackprop(model).attribute(x, target=t)
    GuidedGradCam(model, layer).attribute(x, target=t)
    lo = torch.full_like(x, 0) + x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = torch.full_like(x, 0) + x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    a = (ig.attribute(x, baselines=lo, target=t, n_steps=recipe.xrai_steps, internal_batch_size=internal_batch)
         + ig.attribute(x, baselines=hi, target=t, n_steps=recipe.xrai_steps, internal_batch_size=internal_batch)) / 2
    for b in range(x.shape[0]):
        pair.XRAI().GetMask(x[b].permute(1, 2, 0).cpu().numpy(), None,
                            base_attribution=a[b].permute(1, 2, 0).detach().cpu().numpy())
    _sync(x.device)
    return (time.perf_counter() - t0) / x.shape[0]


def run(arch: str, device: torch.device, size: int, batch: int, dtype: str, preset: str,
        compare_images: int, out_dir: Path, references: list[str], rows_candidates: list[int]) -> dict:
    torch.manual_seed(0)
    model = get_network(arch).to(device).eval()
    x = (torch.rand((batch, 3, size, size), device=device) * 2 - 1)
    with torch.no_grad():
        targets = model(x).argmax(1)
    recipe = get_recipe(preset, dtype=dtype)
    cam = default_cam_layer(model)
    res: dict = {
        "arch": arch, "device": str(device), "card": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "size": size, "batch": batch,
        "dtype": dtype, "preset": preset, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
        "timing": "median of repeated synchronized runs after a warm-up; calls of <= 2000 passes are "
                  "timed alternately with their floor (floor_paired)",
    }
    # The floor: forward + input-only gradient in chunks of `rows`. Each candidate chunk size (those
    # asked for, and explain's own default) is measured; the recipe then runs with the fastest, and
    # every ratio is against that floor.
    res["auto_rows_default_budget"] = auto_max_rows(model, x, recipe.memory_budget_mb, dtype)
    res["bare_candidates"] = {}
    for r in dict.fromkeys([*rows_candidates, res["auto_rows_default_budget"]]):
        n = r * 8
        t_r = _timeit(bare_loop(model, x, targets, dtype, r, n), device, repeat=3)
        res["bare_candidates"][str(r)] = {"passes_per_s": n / t_r, "ms_per_pass": 1e3 * t_r / n}
    rows = int(max(res["bare_candidates"], key=lambda r: res["bare_candidates"][r]["passes_per_s"]))
    res["rows_per_chunk"] = rows
    res["bare"] = dict(res["bare_candidates"][str(rows)], rows=rows)
    recipe = recipe.with_overrides(max_rows=rows)
    # Single-pass methods run the batch as one chunk: their floor is one chunk of that size.
    single = min(batch, rows)
    t_single = _timeit(bare_loop(model, x, targets, dtype, single, batch), device, repeat=10)
    res["bare_batch"] = {"passes_per_s": batch / t_single, "ms_per_pass": 1e3 * t_single / batch, "rows": single}
    # Host work on the critical path of SG, SIG and XRAI calls (before their first pass is queued):
    # the images' copy to the host and their content hashes.
    host = x.cpu()
    res["host_setup_ms"] = {
        "copy_to_host": 1e3 * _timeit(lambda: x.cpu(), device, repeat=5),
        "content_hashes": 1e3 * _timeit(lambda: content_hashes(host), device, repeat=5),
        "host_threads": host_threads(),
    }
    res["methods"] = {}
    cache = SegmentCache()
    for m in METHODS:
        p = recipe.passes_per_image([m])

        def call(n: int, m: str = m) -> None:
            explain(model, x[:n], methods=[m], targets=targets[:n], preset=recipe, segment_cache=cache)

        floor = res["bare"] if p > 2 else res["bare_batch"]
        entry: dict = {"passes_per_image": p}
        if m == "xrai":
            # The warm-up segments every image (not timed): this row is XRAI for a later model state.
            t = _timeit(lambda call=call: call(batch), device)
        elif p * batch <= 2000:
            # Short calls: timed alternately with the floor over the same passes, so that the ratio
            # does not carry the drift between this measurement and the floor's at the start.
            floor_fn = bare_loop(model, x, targets, dtype, floor["rows"], p * batch)
            t, t_floor, reps = _paired(lambda call=call: call(batch), floor_fn, device)
            floor = {"passes_per_s": p * batch / t_floor, "rows": floor["rows"]}
            entry.update(floor_paired=floor, repeats=reps)
        else:
            t = _timeit(lambda call=call: call(batch), device, warmup=lambda call=call: call(2))
        entry["images_per_s"] = batch / t
        if p:
            entry["passes_per_s"] = batch * p / t
            entry["ratio_to_bare"] = entry["passes_per_s"] / floor["passes_per_s"]
            # Diagnostic: the floor at the chunk size the engine picked for this call (balanced
            # chunks can be smaller than the best floor's), to tell chunk size from overhead.
            used = min(p * batch, rows) if p <= 2 else math.ceil(p * batch / math.ceil(p * batch / rows))
            if p > 2 and used != rows:
                n_rows = min(p * batch, used * 4)
                t_used = _timeit(bare_loop(model, x, targets, dtype, used, n_rows), device, repeat=3)
                entry["bare_at_rows_used"] = {"rows": used, "passes_per_s": n_rows / t_used}
        res["methods"][m] = entry
        print(arch, dtype, m, {k: round(v, 3) for k, v in entry.items() if isinstance(v, float | int)}, flush=True)
    P = recipe.passes_per_image()

    def full(cache: SegmentCache) -> Callable[[], None]:
        return lambda: explain(model, x, targets=targets, preset=recipe, segment_cache=cache)

    # Cold: the first model state, which also segments every image for XRAI (on the host's
    # threads, while the device runs the passes). Cached: every later state of the study.
    for key, seg_cache in (("full_recipe_cold", SegmentCache()), ("full_recipe", cache)):
        t_full = _timeit(full(seg_cache), device, warmup=lambda: explain(
            model, x[:2], targets=targets[:2], preset=recipe, segment_cache=SegmentCache()))
        res[key] = {"passes_per_image": P, "s_per_image": t_full / batch, "images_per_s": batch / t_full,
                    "passes_per_s": batch * P / t_full,
                    "ratio_to_bare": batch * P / t_full / res["bare"]["passes_per_s"],
                    "segments_cached": key == "full_recipe"}
        print(arch, dtype, key, res[key], flush=True)
    _write(out_dir, res)
    if dtype == "float32" and references:
        n = min(compare_images, batch)
        if "pair" in references:
            res["pair"] = {"s_per_image": pair_recipe(model, x[:n], targets[:n], recipe, cam, n), "images": n}
            res["pair"]["speedup"] = res["pair"]["s_per_image"] / res["full_recipe"]["s_per_image"]
            res["pair"]["speedup_cold"] = res["pair"]["s_per_image"] / res["full_recipe_cold"]["s_per_image"]
            print(arch, "pair", res["pair"], flush=True)
            _write(out_dir, res)
        if "captum" in references:
            nb = min(batch, max(compare_images * 2, 2))
            res["captum"] = {"s_per_image": captum_recipe(model, x[:nb], targets[:nb], recipe, cam, rows),
                             "images": nb}
            res["captum"]["speedup"] = res["captum"]["s_per_image"] / res["full_recipe"]["s_per_image"]
            res["captum"]["speedup_cold"] = res["captum"]["s_per_image"] / res["full_recipe_cold"]["s_per_image"]
            print(arch, "captum", res["captum"], flush=True)
            _write(out_dir, res)
    return res


def _write(out_dir: Path, res: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"saliency_{res['arch']}_{res['dtype']}_{res['device'].split(':')[0]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", nargs="+", default=["densenet121", "inception_v3"])
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--size", type=int, default=None, help="default 320 on CUDA, 96 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    p.add_argument("--preset", default=None, help="default paper on CUDA, quick on CPU")
    p.add_argument("--compare-images", type=int, default=2, help="images for the PAIR / Captum runs")
    p.add_argument("--references", nargs="*", default=["pair", "captum"], choices=["pair", "captum"],
                   help="the libraries to compare with (none: --references)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="chunk sizes to try for the floor; the fastest is used (default 64 on CUDA, 16 on CPU)")
    a = p.parse_args()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    for arch in a.arch:
        for dtype in a.dtype:
            run(arch, dev, a.size or (320 if gpu else 96), a.batch or (32 if gpu else 4), dtype,
                a.preset or ("paper" if gpu else "quick"), a.compare_images, Path(a.out), a.references,
                a.rows or [64 if gpu else 16])


if __name__ == "__main__":
    main()
