"""The criteria on volumes ``[N, D, H, W]``, on fabricated maps and masks, against independent references:
the average-mask prior by hand, random-pair chance against scikit-image's 3-D SSIM, utility against
scikit-learn's PR curve per volume, blank volumes undefined, and a cascading-randomization curve on a small
3-D network whose every value is recomputed from the randomized states with scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.criteria import (
    average_mask_prior,
    defined_ssim,
    leave_one_out_priors,
    map_agreement,
    per_image_chance,
    random_pair_ssim,
    randomization_curves,
    utility_scores,
)
from saliency_trust.networks import randomization_states
from saliency_trust.saliency import explain
from skimage.metrics import structural_similarity
from sklearn.metrics import auc, precision_recall_curve
from torch import nn

SHAPE = (4, 9, 10, 11)  # N volumes of D x H x W, every side at least SSIM's 7-voxel window


def _volumes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(SHAPE, generator=g, dtype=torch.float64)
    masks = torch.zeros(SHAPE, dtype=torch.bool)
    for i in range(SHAPE[0]):  # a box lesion per volume, at a different place each
        masks[i, 1 + i : 4 + i, 2 : 5 + i, 3 + i : 7] = True
    return maps, masks


def test_average_mask_prior_and_leave_one_out_on_voxel_masks():
    _, masks = _volumes()
    prior = average_mask_prior(masks)
    want = np.mean(masks.numpy().astype(np.float64), axis=0)
    assert prior.shape == SHAPE[1:] and prior.dtype == torch.float64
    np.testing.assert_array_equal(prior.numpy(), want)
    loo = leave_one_out_priors(masks)
    assert loo.shape == SHAPE
    for i in range(SHAPE[0]):
        others = np.delete(masks.numpy(), i, axis=0).astype(np.float64).mean(0)
        np.testing.assert_allclose(loo[i].numpy(), others, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"\[N, H, W\] or \[N, D, H, W\]"):
        average_mask_prior(masks[0, 0, 0])
    with pytest.raises(ValueError, match=r"\[N, H, W\] or \[N, D, H, W\]"):
        leave_one_out_priors(masks[None])


def test_random_pair_chance_on_volumes_is_skimage_ssim_between_different_volumes():
    maps, _ = _volumes(1)
    other = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pairs = 5
    for second in (maps, other):
        values = random_pair_ssim(maps, pairs, data_range=1.0, seed=3, other=second)
        assert values.shape == (SHAPE[0] * pairs,)
        for i in range(SHAPE[0]):
            candidates = {j: structural_similarity(maps[i].numpy(), second[j].numpy(), data_range=1.0)
                          for j in range(SHAPE[0]) if j != i}
            for v in values[i * pairs : (i + 1) * pairs].tolist():  # each value is one partner j != i
                assert min(abs(v - c) for c in candidates.values()) < 1e-8, (i, v, candidates)
        chance = per_image_chance(values, SHAPE[0])
        np.testing.assert_allclose(chance.numpy(), values.reshape(SHAPE[0], pairs).mean(1).numpy(), rtol=1e-12)


def test_utility_on_volumes_is_sklearn_per_volume_and_blank_volumes_are_undefined():
    maps, masks = _volumes(4)
    maps[2] = 0.5  # a blank volume: no ranking
    scores = utility_scores(maps, masks)
    assert scores["constant_map"] == 1 and scores["constant_map_index"] == [2] and scores["empty_mask"] == 0
    for i in range(SHAPE[0]):
        if i == 2:
            assert np.isnan(float(scores["auprc"][i]))
            continue
        p, r, _ = precision_recall_curve(masks[i].numpy().ravel(), maps[i].numpy().ravel())
        assert float(scores["auprc"][i]) == pytest.approx(auc(r, p), abs=1e-12)
    # Agreement between two models' volume maps: skimage 3-D SSIM per volume, NaN where either is blank.
    other = torch.rand(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    agree = map_agreement({"grad": maps}, {"grad": other}, data_range=1.0)["grad"]
    for i in range(SHAPE[0]):
        want = np.nan if i == 2 else structural_similarity(maps[i].numpy(), other[i].numpy(), data_range=1.0)
        np.testing.assert_allclose(float(agree[i]), want, rtol=0, atol=1e-9)
    assert torch.isnan(defined_ssim(maps[2:3], maps[2:3], 1.0)).all()


class _Tiny3D(nn.Module):
    """Two 3-D conv layers with ReLUs and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, padding=1),
                                      nn.ReLU())
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3, 4)))


def test_cascading_randomization_curve_on_a_3d_network_against_skimage():
    torch.manual_seed(0)
    net = _Tiny3D().eval()
    x = torch.rand(3, 1, 8, 10, 12, generator=torch.Generator().manual_seed(6)) * 2 - 1
    blocks = [("logits", ("fc",)), ("conv2", ("features.2",)), ("conv1", ("features.0",))]
    methods = ["grad", "gradcam"]
    kw = {"preset": "quick", "cam_layer": "features", "cam_post_relu": False}
    curve = randomization_curves(net, blocks, x, methods, seed=0, data_range=1.0, pairs_per_image=4,
                                 examples=[1], target="trained", init_seed=7, verdict_block="conv2",
                                 full_cascade=True, **kw)
    assert curve.states == ["logits", "conv2", "conv1"] and curve.verdict_state == "conv2"
    trained = explain(net, x, methods, **kw)
    targets = net(x).argmax(1)
    for s, (name, state) in enumerate(randomization_states(net, blocks, seed=7)):
        assert name == curve.states[s]
        maps = explain(state, x, methods, targets=targets, **kw)
        for m in methods:
            assert curve.examples[m].shape == (3, 1, 8, 10, 12)
            torch.testing.assert_close(curve.examples[m][s, 0], maps[m][1])
            for i in range(3):
                a, b = maps[m][i].double().numpy(), trained[m][i].double().numpy()
                want = np.nan if a.max() == a.min() or b.max() == b.min() else structural_similarity(
                    a, b, data_range=1.0)
                np.testing.assert_allclose(float(curve.ssim[m][s, i]), want, rtol=0, atol=1e-8)
    for m in methods:
        assert curve.ssim[m].shape == (3, 3) and curve.baseline[m].shape == (3 * 4,)
        assert torch.isfinite(curve.ssim[m]).all(), m  # real 3-D maps, none blank


def test_random_pairs_in_chunks_give_the_same_values(monkeypatch):
    """Pairs compared a few at a time (memory bounded) give exactly the values of one call."""
    from saliency_trust.criteria import baselines

    maps, _ = _volumes(7)
    maps[1] = 0.0  # a blank volume: its pairs are NaN either way
    whole = random_pair_ssim(maps, 5, data_range=1.0, seed=2)
    monkeypatch.setattr(baselines, "SSIM_CHUNK", 3 * maps[0].numel())  # three pairs per call
    chunked = random_pair_ssim(maps, 5, data_range=1.0, seed=2)
    assert torch.equal(torch.isnan(whole), torch.isnan(chunked)) and torch.isnan(whole).any()
    assert torch.equal(torch.nan_to_num(whole), torch.nan_to_num(chunked))
