"""Metrics benchmark: batched SSIM / AUPRC / Spearman vs scikit-image, scikit-learn and scipy.

Same maps for both sides; the JSON holds per-pair times, speedups and the largest difference.

    python bench/metrics_bench.py --out bench/results [--device cuda] [--size 320] [--pairs 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from saliency_trust.metrics import auprc, spearman, ssim
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from sklearn.metrics import auc, precision_recall_curve


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev: torch.device, repeat: int = 3) -> float:
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--pairs", type=int, default=None, help="default 512 on CUDA, 64 on CPU")
    p.add_argument("--reference-pairs", type=int, default=16)
    a = p.parse_args()
    dev = torch.device(a.device)
    n = a.pairs or (512 if dev.type == "cuda" else 64)
    rng = np.random.default_rng(0)
    # Saliency-like maps: smooth blobs, clipped at the 99th percentile (large tie blocks at 1.0).
    base = torch.nn.functional.avg_pool2d(torch.tensor(rng.random((2 * n, 1, a.size, a.size))), 9, 1, 4)[:, 0]
    q = torch.quantile(base.flatten(1), 0.99, dim=1).view(-1, 1, 1)
    maps = ((base - base.amin((1, 2), keepdim=True)) / (q - base.amin((1, 2), keepdim=True))).clamp(0, 1)
    x, y = maps[:n].to(dev), maps[n:].to(dev)
    masks = torch.zeros_like(x, dtype=torch.bool)
    masks[:, a.size // 4 : a.size // 2, a.size // 3 : a.size // 2 + 20] = True
    k = min(a.reference_pairs, n)
    xs, ys, ms = x[:k].cpu().numpy(), y[:k].cpu().numpy(), masks[:k].cpu().numpy()
    res = {"device": str(dev), "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "size": a.size, "pairs": n, "reference_pairs": k, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    for name, ours, ref in (
        ("ssim", lambda: ssim(x, y, 1.0),
         lambda: [structural_similarity(xs[i], ys[i], data_range=1.0) for i in range(k)]),
        ("auprc", lambda: auprc(x, masks),
         lambda: [auc(*precision_recall_curve(ms[i].ravel(), xs[i].ravel())[1::-1]) for i in range(k)]),
        ("spearman", lambda: spearman(x, y),
         lambda: [spearmanr(xs[i].ravel(), ys[i].ravel()).statistic for i in range(k)]),
    ):
        t_ours = _time(ours, dev) / n
        t0 = time.perf_counter()
        ref_vals = np.array(ref())
        t_ref = (time.perf_counter() - t0) / k
        diff = float(np.abs(ours()[:k].cpu().numpy() - ref_vals).max())
        res[name] = {"us_per_pair": 1e6 * t_ours, "reference_us_per_pair": 1e6 * t_ref,
                     "speedup": t_ref / t_ours, "max_abs_diff": diff}
        print(name, res[name], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metrics_{dev.type}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
