"""The four-criteria assessment behind ``configs/trust.json``: results file, per-image CSV, resume.

Each step's output is saved atomically under ``<output_dir>/.steps/`` with a key made of every
input that decides it (data, model hashes, methods, preset, seeds); a rerun with the same inputs
loads finished steps and computes only what is missing, so an interrupted run ends with the same
results as an uninterrupted one. ``results.json``, ``per_image.csv``, ``figures/*.png`` and the
self-contained ``report.html`` are written last, each through a temporary file and a rename.

Under ``torchrun`` (``configs/multi_gpu_trust.json``) every map computation is sharded: each
process explains a contiguous slice of the images, the slices are gathered, and every process
then computes the same metrics on the whole set; only rank 0 writes. Noise is seeded by image
content and the maps of a batch equal the maps of its images one by one, so the results equal a
single-process run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_trust.criteria import (
    agreement_verdict,
    average_mask_prior,
    map_agreement,
    output_agreement,
    randomization_curves,
    randomization_verdict,
    summarize,
    utility_scores,
    utility_verdicts,
)
from saliency_trust.data import load_dataset
from saliency_trust.networks import file_sha256, get_network, load_weights, to_network_input
from saliency_trust.saliency import METHODS, SegmentCache, explain
from saliency_trust.workflows.train import atomic_write_bytes, code_fingerprint, split_of, versions

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded(fn: Callable[[slice], dict[str, torch.Tensor]], n: int, block: int = 16) -> dict[str, torch.Tensor]:
    """``fn`` over fixed blocks of ``range(n)``; under ``torchrun`` each process takes a contiguous run
    of blocks and the results are gathered in order on every process.

    The blocks are the same whatever the number of processes, so every map is computed in the same
    batch as in a single-process run and the results are bitwise the same on one kind of device.
    """
    blocks = [slice(i, min(i + block, n)) for i in range(0, n, block)]
    rank, world = _world()
    bounds = [round(i * len(blocks) / world) for i in range(world + 1)]
    parts = [{k: v.cpu() for k, v in fn(b).items()} for b in blocks[bounds[rank] : bounds[rank + 1]]]
    mine = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None
    if world == 1:
        return mine
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    done = [g for g in gathered if g is not None]
    return {k: torch.cat([g[k] for g in done]) for k in done[0]}


class Steps:
    """Named, keyed, atomically saved intermediate results (the resume mechanism)."""

    def __init__(self, folder: Path, key: str, write: bool = True) -> None:
        self.folder = folder
        self.key = key
        self.write = write
        folder.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Load step ``name`` if it was finished with the same key, else compute and save it."""
        path = self.folder / f"{name}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == self.key:
                log.info("step %s: resumed from %s", name, path)
                return saved["value"]
        value = fn()
        if self.write:
            buf = io.BytesIO()
            torch.save({"key": self.key, "value": value}, buf)
            atomic_write_bytes(path, buf.getvalue())
        return value


def _load_model(arch: str, path: str | Path, device: torch.device) -> torch.nn.Module:
    return load_weights(get_network(arch), path).to(device).eval()


def _unet_output(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    net = load_weights(get_network("unet"), path).to(images.device).eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(images[i : i + 16]))[:, 0] for i in range(0, len(images), 16)])


def _to_lists(d: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: v.double().cpu().tolist() for k, v in d.items()}


def run_assessment(
    dataset_dir: str | Path,
    output_dir: str | Path,
    classifiers: Sequence[dict],
    localizers: Sequence[str | Path],
    methods: Sequence[str] | None = None,
    preset: str = "paper",
    n_images: int = 100,
    image_size: int | None = None,
    seed: int = 0,
    data_range: float | None = None,
    pairs_per_image: int = 50,
    agreement_threshold: float = 0.5,
    device: str | None = None,
    randomize: int | None = None,
    recipe_overrides: dict | None = None,
    block: int = 16,
    report: bool = True,
    progress: bool = True,
) -> dict:
    """Score every method on the four criteria; returns the results written to ``results.json``.

    ``classifiers`` are ``{"arch", "path"}`` dicts: the first two of the first architecture are
    the replicates (repeatability), the first of another architecture gives reproducibility, and
    every classifier of the first architecture goes through cascading randomization.
    ``localizers`` are U-Net weight files: the first gives the high utility baseline, the first two
    the agreement baseline. ``data_range`` for SSIM defaults to 2.0 with the ``paper`` preset (what
    scikit-image <= 0.19 silently used on the paper's float maps) and to 1.0 otherwise.
    ``randomize`` limits cascading randomization to the first that many replicates (all when None);
    ``recipe_overrides`` change preset fields (recorded in the provenance). Under ``torchrun`` the
    map computations are sharded across processes by blocks of ``block`` images (the batch of one
    ``explain`` call, whatever the number of processes) and only rank 0 writes files.
    """
    t0 = time.time()
    out_dir = Path(output_dir)
    methods = list(methods or METHODS)
    overrides = dict(recipe_overrides or {})
    rank, world = _world()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{rank % torch.cuda.device_count()}" if world > 1 else "cuda"
    dev = torch.device(device or "cpu")
    data_range = data_range if data_range is not None else (2.0 if preset == "paper" else 1.0)
    ds = load_dataset(dataset_dir, image_size=image_size)
    positives = sorted((r for r in ds if r.label == 1 and split_of(r.id, r.split) == "test"), key=lambda r: r.id)
    if not positives:
        positives = sorted((r for r in ds if r.label == 1), key=lambda r: r.id)
    positives = positives[:n_images]
    if len(positives) < 2:
        raise ValueError(f"{dataset_dir}: need at least two lesion-positive images to assess, found {len(positives)}")
    prior_masks = [r.mask for r in ds if r.label == 1 and split_of(r.id, r.split) in ("train", "val")]
    if not prior_masks:
        raise ValueError(f"{dataset_dir}: no training/validation masks for the average-mask prior")
    images = to_network_input(torch.tensor(np.stack([r.image for r in positives]))).to(dev)
    masks = torch.tensor(np.stack([r.mask for r in positives])).to(dev)
    prior = average_mask_prior(torch.tensor(np.stack(prior_masks))).to(dev)

    models = [dict(c, sha256=file_sha256(c["path"])) for c in classifiers]
    locs = [{"path": str(p), "sha256": file_sha256(p)} for p in localizers]
    primary = models[0]["arch"]
    rep = [i for i, m in enumerate(models) if m["arch"] == primary]
    replicates = [models[i] for i in rep][: randomize if randomize is not None else None]
    others = [m for m in models if m["arch"] != primary]
    config = {"dataset_dir": str(Path(dataset_dir).resolve()), "image_size": image_size, "n_images": len(positives),
              "ids": [r.id for r in positives], "methods": methods, "preset": preset, "seed": seed,
              "data_range": data_range, "pairs_per_image": pairs_per_image, "agreement_threshold": agreement_threshold,
              "recipe_overrides": overrides, "randomized_replicates": len(replicates), "block": block,
              "classifiers": [{k: str(v) for k, v in m.items()} for m in models], "localizers": locs,
              "code": code_fingerprint()}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    steps = Steps(out_dir / ".steps", key, write=rank == 0)
    cache = SegmentCache()
    n = len(positives)
    example = int(np.argmax([r.mask.sum() for r in positives]))  # the largest lesion: the clearest figure

    def explain_sharded(net: torch.nn.Module, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        def part(s: slice) -> dict[str, torch.Tensor]:
            t = targets[s] if targets is not None else None
            maps = explain(net, images[s], methods, targets=t, preset=preset, segment_cache=cache, seed=seed,
                           **overrides)
            return {k: v.cpu() for k, v in maps.items()}

        return sharded(part, n, block)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models) + 1 + len(replicates), desc="assessment", unit="model")

    def counted(value: Any) -> Any:
        if bar is not None:
            bar.update()
        return value

    def maps_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
        return explain_sharded(net)

    def untrained_net() -> torch.nn.Module:
        torch.manual_seed(seed)
        return get_network(primary).to(dev).eval()

    trained = [counted(steps.run(f"maps_{i}", lambda m=m: maps_of(_load_model(m["arch"], m["path"], dev))))
               for i, m in enumerate(models)]
    untrained = counted(steps.run("maps_untrained", lambda: maps_of(untrained_net())))
    loc_out = [steps.run(f"localizer_{i}", lambda p=p: _unet_output(p["path"], images).cpu())
               for i, p in enumerate(locs)]

    mcpu = masks.cpu()
    util = {m: utility_scores(trained[0][m], mcpu) for m in methods}
    util_untrained = {m: utility_scores(untrained[m], mcpu) for m in methods}
    util_prior = utility_scores(prior.cpu().expand_as(mcpu).contiguous(), mcpu)
    util_loc = utility_scores(loc_out[0], mcpu) if loc_out else None

    def curves(m: dict) -> dict:
        net = _load_model(m["arch"], m["path"], dev)
        c = randomization_curves(net, m["arch"], images, methods, preset=preset, seed=seed, data_range=data_range,
                                 pairs_per_image=pairs_per_image, segment_cache=cache, explain_fn=explain_sharded,
                                 examples=[example], progress=bar is not None, **overrides)
        return {"states": c["states"], "ssim": {k: v.cpu() for k, v in c["ssim"].items()},
                "spearman": {k: v.cpu() for k, v in c["spearman"].items()},
                "baseline": {k: v.cpu() for k, v in c["baseline"].items()},
                "examples": {k: v[:, 0].cpu() for k, v in c["examples"].items()}}

    rand = [counted(steps.run(f"randomization_{i}", lambda m=m: curves(m))) for i, m in enumerate(replicates)]
    if bar is not None:
        bar.close()
    repeat = map_agreement(trained[rep[0]], trained[rep[1]], data_range) if len(rep) >= 2 else {}
    j = models.index(others[0]) if others else None
    reprod = map_agreement(trained[0], trained[j], data_range) if j is not None else {}
    loc_agree = output_agreement(loc_out[0], loc_out[1], data_range) if len(loc_out) >= 2 else None

    verdicts: dict[str, dict] = {m: {} for m in methods}
    uv = utility_verdicts({m: util[m]["auprc"].numpy() for m in methods}, util_prior["auprc"].numpy())
    for m in methods:
        verdicts[m]["utility"] = uv[m]
        if rand:
            final = torch.cat([r["ssim"][m][-1] for r in rand]).numpy()
            base = torch.cat([r["baseline"][m] for r in rand]).numpy()
            verdicts[m]["randomization"] = randomization_verdict(final, base)
        else:
            verdicts[m]["randomization"] = {"passed": None, "rule": "not run (randomize=0)", "why": "not run"}
        la = loc_agree.numpy() if loc_agree is not None else None
        verdicts[m]["repeatability"] = (agreement_verdict(repeat[m].numpy(), la, agreement_threshold, "repeatability")
                                        if repeat else {"passed": None, "why": "needs two replicates"})
        verdicts[m]["reproducibility"] = (agreement_verdict(reprod[m].numpy(), la, agreement_threshold,
                                                            "reproducibility")
                                          if reprod else {"passed": None, "why": "needs a second architecture"})

    results = {
        "schema_version": SCHEMA_VERSION,
        "provenance": {"versions": versions(), "config": config, "device": str(dev),
                       "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                       "seconds": round(time.time() - t0, 1)},
        "methods": methods,
        "utility": {m: {**summarize(util[m]["auprc"].numpy()), "empty_mask": util[m]["empty_mask"],
                        "constant_map": util[m]["constant_map"]} for m in methods},
        "randomization": [{"model": str(r_m["path"]), "states": r["states"],
                           "ssim_mean": {m: r["ssim"][m].nanmean(1).tolist() for m in methods},
                           "spearman_mean": {m: r["spearman"][m].nanmean(1).tolist() for m in methods},
                           "baseline_mean": {m: float(r["baseline"][m].nanmean()) for m in methods}}
                          for r, r_m in zip(rand, replicates, strict=True)],
        "repeatability": {m: summarize(v.numpy()) for m, v in repeat.items()},
        "reproducibility": {m: summarize(v.numpy()) for m, v in reprod.items()},
        "baselines": {
            "utility_prior": summarize(util_prior["auprc"].numpy()),
            "utility_localization": summarize(util_loc["auprc"].numpy()) if util_loc else None,
            "utility_untrained": {m: summarize(util_untrained[m]["auprc"].numpy()) for m in methods},
            "agreement_localization": summarize(loc_agree.numpy()) if loc_agree is not None else None,
        },
        "verdicts": verdicts,
    }
    if rank != 0:
        return results
    _write_outputs(out_dir, results, positives, methods, util, util_untrained, util_prior, util_loc, repeat,
                   reprod, rand)
    if report:
        from saliency_trust.report import ReportInputs, write_report

        columns = {Path(m["path"]).stem: trained[i] for i, m in enumerate(models)}
        inputs = ReportInputs(
            ids=[r.id for r in positives], images=np.stack([r.image for r in positives]),
            masks=mcpu.numpy().astype(bool), methods=methods,
            auprc={m: util[m]["auprc"].numpy() for m in methods},
            auprc_untrained={m: util_untrained[m]["auprc"].numpy() for m in methods},
            auprc_prior=util_prior["auprc"].numpy(),
            auprc_localization=util_loc["auprc"].numpy() if util_loc else None,
            trained_maps={m: trained[0][m].numpy() for m in methods}, states=rand[0]["states"] if rand else [],
            state_ssim={m: rand[0]["ssim"][m].numpy() for m in methods} if rand else {},
            state_baseline={m: float(rand[0]["baseline"][m].nanmean()) for m in methods} if rand else {},
            state_examples={m: rand[0]["examples"][m].numpy() for m in methods} if rand else {},
            repeat={m: v.numpy() for m, v in repeat.items()}, reprod={m: v.numpy() for m, v in reprod.items()},
            agreement_baseline=loc_agree.numpy() if loc_agree is not None else None,
            agreement_examples={name: {m: maps[m][example].numpy() for m in methods}
                                for name, maps in columns.items()},
            threshold=agreement_threshold, example=example)
        path = write_report(out_dir, results, inputs)
        log.info("report: %s", path)
    return results


def _write_outputs(out_dir, results, positives, methods, util, util_untrained, util_prior, util_loc, repeat,
                   reprod, rand) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "results.json", json.dumps(results, indent=2, allow_nan=True).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "method", "auprc", "auprc_untrained", "auprc_prior", "auprc_localization",
                "repeatability_ssim", "reproducibility_ssim", "randomized_ssim"])
    for i, r in enumerate(positives):
        for m in methods:
            w.writerow([r.id, m, float(util[m]["auprc"][i]), float(util_untrained[m]["auprc"][i]),
                        float(util_prior["auprc"][i]), float(util_loc["auprc"][i]) if util_loc else "",
                        float(repeat[m][i]) if repeat else "", float(reprod[m][i]) if reprod else "",
                        float(rand[0]["ssim"][m][-1][i]) if rand else ""])
    atomic_write_bytes(out_dir / "per_image.csv", buf.getvalue().encode())
