"""The saliency benchmark runs end to end (it is run for real only on lent GPUs, where a crash costs device time)."""

from __future__ import annotations

import json

import torch

from bench import saliency_bench


def test_saliency_bench_runs_and_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(saliency_bench, "PAIRED_BUDGET_S", 0.0)
    monkeypatch.setattr(saliency_bench, "PAIRED_REPEATS", (3, 3))
    res = saliency_bench.run("densenet121", torch.device("cpu"), size=32, batch=2, dtype="float32",
                             preset="quick", compare_images=1, out_dir=tmp_path, references=[],
                             rows_candidates=[8])
    saved = json.loads((tmp_path / "saliency_densenet121_float32_cpu.json").read_text())
    assert saved["methods"].keys() == res["methods"].keys() and len(saved["methods"]) == 8
    for m, entry in saved["methods"].items():
        assert entry["ratio_to_bare"] > 0, m
        if m != "xrai":
            assert entry["floor_paired"]["passes_per_s"] > 0 and entry["repeats"] == 3, m
    assert saved["host_setup_ms"]["content_hashes"] > 0 and saved["host_setup_ms"]["copy_to_host"] >= 0
    for key in ("full_recipe", "full_recipe_cold"):
        assert saved[key]["passes_per_image"] == 66 and saved[key]["s_per_image"] > 0
    # Balanced chunks smaller than the floor's: the floor at the engine's own chunk size is there too.
    assert any("bare_at_rows_used" in e for e in saved["methods"].values())
