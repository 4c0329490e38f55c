"""CUDA parity: the engine and the metrics give the CPU results on the GPU (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.metrics import auprc, spearman, ssim
from saliency_trust.saliency import METHODS, explain

from tests.saliency.models import images, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_explain_cuda_equals_cpu_float64():
    model, x = tiny(), images(3, size=48)
    kw = {"preset": "quick", "cam_layer": "block", "targets": [0, 1, 1], "raw": True}
    cpu = explain(model, x, **kw)
    gpu = explain(model.cuda(), x.cuda(), **kw)
    for m in METHODS:
        if m in ("sg", "sig"):
            continue  # the device's generator draws other noise; checked below with the noise fixed
        assert torch.allclose(cpu[m], gpu[m].cpu(), rtol=1e-9, atol=1e-11), m


def test_noise_methods_cuda_equal_cpu_with_the_same_noise(monkeypatch):
    import sys

    ex = sys.modules["saliency_trust.saliency.explain"]  # the module, not the function of that name

    def cpu_noise(image, samples, sigma_frac, seed, state=None, model_key="", _orig=ex.smoothing_noise):
        return _orig(image.cpu(), samples, sigma_frac, seed, state=state, model_key=model_key).to(image.device)

    monkeypatch.setattr(ex, "smoothing_noise", cpu_noise)
    model, x = tiny(), images(2, size=32)
    kw = {"methods": ["sg", "sig"], "preset": "quick", "targets": [1, 0], "raw": True}
    cpu = explain(model, x, **kw)
    gpu = explain(model.cuda(), x.cuda(), **kw)
    for m in kw["methods"]:
        assert torch.allclose(cpu[m], gpu[m].cpu(), rtol=1e-9, atol=1e-12), m


def test_densenet_and_inception_float32_cuda_close_to_cpu():
    from saliency_trust.networks import get_network

    for arch in ("densenet121", "inception_v3"):
        torch.manual_seed(0)
        net = get_network(arch).eval()
        x = images(2, size=160, dtype=torch.float32)
        kw = {"methods": ["grad", "ig", "gradcam", "gbp", "ggcam", "xrai"], "preset": "quick", "targets": [1, 0]}
        torch.backends.cudnn.allow_tf32 = False
        cpu = explain(net, x, **kw)
        gpu = explain(net.cuda(), x.cuda(), **kw)
        for m in kw["methods"]:
            # fp32 on two devices: summation orders differ, so compare maps, not bits.
            diff = (cpu[m] - gpu[m].cpu()).abs()
            corr = torch.corrcoef(torch.stack([cpu[m].flatten(), gpu[m].cpu().flatten()]))[0, 1]
            assert float(diff.mean()) < 1e-2 and float(corr) > 0.99, (arch, m, float(diff.mean()), float(corr))


def test_metrics_cuda_equal_cpu():
    rng = np.random.default_rng(0)
    a = torch.tensor(np.round(rng.random((8, 64, 64)), 1))
    b = torch.tensor(rng.random((8, 64, 64)))
    m = torch.tensor(rng.random((8, 64, 64)) < 0.2)
    assert torch.allclose(ssim(a, b, 1.0), ssim(a.cuda(), b.cuda(), 1.0).cpu(), atol=1e-12)
    assert torch.allclose(auprc(a, m), auprc(a.cuda(), m.cuda()).cpu(), atol=1e-12)
    assert torch.allclose(spearman(a, b), spearman(a.cuda(), b.cuda()).cpu(), atol=1e-12)


def test_auto_rows_probe_once_and_fit_half_the_free_memory():
    from saliency_trust.saliency.engine import _PER_ROW, auto_max_rows

    model, x = tiny(dtype=torch.float32).cuda(), images(2, size=64, dtype=torch.float32).cuda()
    rows = auto_max_rows(model, x, None, "float32")
    assert 1 <= rows <= 1024 and len(_PER_ROW[model]) == 1
    assert auto_max_rows(model, x, 1, "float32") <= rows  # a 1 MB budget: fewer rows, same probe
    assert len(_PER_ROW[model]) == 1
