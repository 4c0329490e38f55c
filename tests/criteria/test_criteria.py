"""Randomization curves, agreement and verdict rules on small real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.criteria import (
    agreement_verdict,
    map_agreement,
    randomization_curves,
    randomization_verdict,
    utility_verdicts,
)
from saliency_trust.networks import get_network, randomization_blocks
from skimage.metrics import structural_similarity


@pytest.fixture(scope="module")
def densenet_and_images():
    torch.manual_seed(0)
    net = get_network("densenet121").eval()
    g = torch.Generator().manual_seed(1)
    return net, torch.rand((3, 3, 64, 64), generator=g) * 2 - 1


def test_randomization_curves_cover_every_state_and_match_skimage(densenet_and_images):
    net, x = densenet_and_images
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = randomization_curves(net, "densenet121", x, ["grad", "gradcam"], preset="quick", pairs_per_image=4)
    assert out["states"] == [b for b, _ in randomization_blocks("densenet121")]
    for m in ("grad", "gradcam"):
        assert out["ssim"][m].shape == (9, 3) and out["spearman"][m].shape == (9, 3)
        assert out["baseline"][m].shape == (12,)
    # Randomizing the logits layer alone already changes gradient maps.
    assert float(out["ssim"]["grad"][0].mean()) < 0.999
    # Cross-check one state's SSIM with scikit-image, recomputing that state's maps.
    from saliency_trust.networks import randomization_states
    from saliency_trust.saliency import explain, predict

    t = predict(net, x).argmax(1)
    name, state = next(iter(randomization_states(net, "densenet121", "cascading", seed=0)))
    a = explain(state, x, ["grad"], targets=t, preset="quick")["grad"]
    b = out["trained_maps"]["grad"]
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(3)]
    assert np.allclose(out["ssim"]["grad"][0].numpy(), ref, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_map_agreement():
    rng = np.random.default_rng(0)
    a = {"grad": torch.tensor(rng.random((2, 16, 16))), "xrai": torch.tensor(rng.random((2, 16, 16)))}
    b = {"grad": a["grad"].clone(), "sg": torch.tensor(rng.random((2, 16, 16)))}
    out = map_agreement(a, b)
    assert list(out) == ["grad"] and torch.allclose(out["grad"], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError):
        map_agreement({"sg": a["grad"]}, {"ig": a["grad"]})


def test_verdict_rules():
    rng = np.random.default_rng(1)
    prior = rng.uniform(0.05, 0.1, 30)
    good = prior + rng.uniform(0.05, 0.2, 30)
    bad = prior - rng.uniform(0.0, 0.05, 30)
    v = utility_verdicts({"good": good, "bad": bad, "empty": np.full(30, np.nan)}, prior)
    assert v["good"]["passed"] is True and v["bad"]["passed"] is False and v["empty"]["passed"] is None
    assert v["good"]["p_holm"] >= v["good"]["p"] and "Wilcoxon" in v["good"]["rule"]
    r = randomization_verdict(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
    assert r["passed"] is True and r["reference"] == pytest.approx(0.35)
    assert randomization_verdict(np.array([0.5]), np.array([0.3]))["passed"] is False
    a = agreement_verdict(np.array([0.6, 0.7, np.nan]), np.array([0.8]), threshold=0.5)
    assert a["passed"] is True and a["n_excluded"] == 1 and a["reference"] == pytest.approx(0.8)
    assert agreement_verdict(np.array([0.2]), None, criterion="reproducibility")["passed"] is False
