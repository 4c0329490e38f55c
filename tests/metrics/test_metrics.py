"""Metrics against scikit-image, scikit-learn and scipy on the same inputs (float64, 1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.metrics import auprc, otsu_iou, otsu_threshold, pointing_game, spearman, ssim
from scipy.stats import rankdata, spearmanr
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity
from sklearn.metrics import auc, average_precision_score, precision_recall_curve

TOL = 1e-9


def _maps(rng, n=6, h=40, w=36, ties=False):
    m = rng.random((n, h, w))
    if ties:
        m = np.round(m * 5) / 5  # heavy ties, like percentile-clipped maps
        m[0] = np.clip(m[0] * 3, 0, 1)  # a map with a big block at exactly 1.0
    return m


@pytest.mark.parametrize("data_range", [1.0, 2.0])
@pytest.mark.parametrize("ties", [False, True])
def test_ssim_equals_skimage(data_range, ties):
    rng = np.random.default_rng(1)
    a, b = _maps(rng, ties=ties), _maps(rng, ties=ties)
    b[1] = a[1]  # identical pair
    ours = ssim(torch.tensor(a), torch.tensor(b), data_range=data_range).numpy()
    ref = [structural_similarity(a[i], b[i], data_range=data_range) for i in range(len(a))]
    assert np.allclose(ours, ref, rtol=0, atol=TOL)
    assert ours[1] == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_maps_and_explicit_range():
    z, o = torch.zeros(1, 20, 20, dtype=torch.float64), torch.ones(1, 20, 20, dtype=torch.float64)
    ours = ssim(z, o, 1.0).numpy()
    assert np.allclose(ours, [structural_similarity(z[0].numpy(), o[0].numpy(), data_range=1.0)], atol=TOL)
    assert float(ssim(z, z, 1.0)) == 1.0
    with pytest.raises(ValueError, match="data_range"):
        ssim(z, o, None)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5), 1.0)


@pytest.mark.parametrize("ties", [False, True])
def test_auprc_equals_sklearn_trapezoid_and_ap(ties):
    rng = np.random.default_rng(2)
    m = _maps(rng, ties=ties)
    masks = np.zeros(m.shape, bool)
    for i in range(len(m)):
        y0, x0 = rng.integers(0, 20, size=2)
        masks[i, y0 : y0 + 12, x0 : x0 + 9] = True
    masks[2] = rng.random(m.shape[1:]) < 0.3  # scattered
    m[3] = 0.7  # constant map
    tm, tk = torch.tensor(m), torch.tensor(masks)
    trap, ap = auprc(tm, tk).numpy(), auprc(tm, tk, mode="ap").numpy()
    for i in range(len(m)):
        p, r, _ = precision_recall_curve(masks[i].ravel(), m[i].ravel())
        assert trap[i] == pytest.approx(auc(r, p), abs=TOL)
        assert ap[i] == pytest.approx(average_precision_score(masks[i].ravel(), m[i].ravel()), abs=TOL)


def test_auprc_empty_mask_is_nan_not_a_number_in_a_mean():
    m = torch.rand(2, 10, 10, dtype=torch.float64)
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[1, :3] = True
    out = auprc(m, masks)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    with pytest.raises(ValueError):
        auprc(m, masks[:, :5])


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_equals_scipy(ties):
    rng = np.random.default_rng(3)
    a, b = _maps(rng, ties=ties), _maps(rng, ties=ties)
    ours = spearman(torch.tensor(a), torch.tensor(b)).numpy()
    for i in range(len(a)):
        assert ours[i] == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic, abs=TOL)
    from saliency_trust.metrics import average_ranks

    assert np.allclose(average_ranks(torch.tensor(a[0].ravel())).numpy(), rankdata(a[0].ravel()), atol=TOL)
    assert torch.isnan(spearman(torch.zeros(1, 4, 4), torch.rand(1, 4, 4)))[0]


def test_pointing_game_counts_tied_maxima():
    m = torch.zeros(3, 8, 8)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, :2, :2] = True
    m[0, 0, 0] = 1  # inside
    m[1, 5, 5] = 1  # outside
    m[2, 5, 5] = m[2, 1, 1] = 1  # tie, one inside
    assert pointing_game(m, masks).tolist() == [1.0, 0.0, 1.0]


def test_otsu_matches_skimage_and_iou():
    rng = np.random.default_rng(4)
    m = np.concatenate([rng.normal(0.2, 0.05, (3, 400)), rng.normal(0.8, 0.1, (3, 200))], 1).reshape(3, 20, 30)
    m[2] = np.round(m[2], 1)
    ours = otsu_threshold(torch.tensor(m)).numpy()
    for i in range(3):
        assert ours[i] == pytest.approx(threshold_otsu(m[i]), abs=TOL)
    masks = torch.tensor(m > 0.5)
    seg = m > ours[:, None, None]
    iou = (seg & masks.numpy()).sum((1, 2)) / (seg | masks.numpy()).sum((1, 2))
    assert np.allclose(otsu_iou(torch.tensor(m), masks).numpy(), iou)
