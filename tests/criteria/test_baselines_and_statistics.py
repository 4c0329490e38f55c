"""Criteria building blocks: baselines, utility scoring with degenerate counts, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.criteria import (
    average_mask_prior,
    bootstrap_ci,
    holm,
    leave_one_out_priors,
    random_pair_ssim,
    summarize,
    utility_scores,
    wilcoxon_greater,
)
from scipy.stats import wilcoxon
from skimage.metrics import structural_similarity
from sklearn.metrics import auc, precision_recall_curve

from tests.conftest import shared_set


def test_leave_one_out_prior_equals_the_mean_of_the_others():
    rng = np.random.default_rng(0)
    masks = torch.tensor(rng.random((5, 12, 10)) < 0.3)
    loo = leave_one_out_priors(masks)
    for i in range(5):
        others = torch.cat([masks[:i], masks[i + 1 :]]).double().mean(0)
        assert torch.allclose(loo[i], others, atol=1e-15)
    assert torch.allclose(average_mask_prior(masks), masks.double().mean(0))
    with pytest.raises(ValueError):
        leave_one_out_priors(masks[:1])


def test_utility_scores_match_sklearn_and_count_degenerate_cases():
    rng = np.random.default_rng(1)
    maps = rng.random((4, 16, 16))
    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:8, 3:9] = masks[1, 8:, 8:] = masks[3, :4] = True
    maps[3] = 0.5  # constant map
    out = utility_scores(torch.tensor(maps), torch.tensor(masks))
    assert out["empty_mask"] == 1 and out["constant_map"] == 1 and out["constant_map_index"] == [3]
    assert torch.isnan(out["auprc"][2])
    for i in (0, 1):
        p, r, _ = precision_recall_curve(masks[i].ravel(), maps[i].ravel())
        assert float(out["auprc"][i]) == pytest.approx(auc(r, p), abs=1e-12)
    # A blank map has no ranking: undefined, although the trapezoid would give it about (1 + prevalence) / 2.
    p, r, _ = precision_recall_curve(masks[3].ravel(), maps[3].ravel())
    assert auc(r, p) == pytest.approx((1 + masks[3].mean()) / 2) and torch.isnan(out["auprc"][3])


def test_a_blank_map_is_counted_and_does_not_move_a_mean():
    """All-zero Grad-CAMs on some images: undefined AUPRC / SSIM, counted, mean = mean over the other images."""
    from saliency_trust.criteria import map_agreement, randomization_verdict, utility_verdicts

    rng = np.random.default_rng(5)
    n = 12
    masks = np.zeros((n, 24, 24), bool)
    masks[:, 6:14, 8:16] = True
    maps = rng.random((n, 24, 24))
    maps[:, 6:14, 8:16] += 0.5
    maps /= maps.max()
    blanked = maps.copy()
    blanked[[2, 7]] = 0.0
    full = utility_scores(torch.tensor(maps), torch.tensor(masks))["auprc"].numpy()
    out = utility_scores(torch.tensor(blanked), torch.tensor(masks))
    keep = np.setdiff1d(np.arange(n), [2, 7])
    assert out["constant_map"] == 2 and np.isnan(out["auprc"][[2, 7]].numpy()).all()
    prior = np.full(n, 0.2)
    v = utility_verdicts({"gradcam": out["auprc"].numpy()}, prior)["gradcam"]
    assert v.n == n - 2 and v.n_undefined == 2
    assert v.value == pytest.approx(full[keep].mean(), abs=1e-12)
    assert v.comparisons["prior"]["n_pairs"] == n - 2
    # SSIM: a blank map against another blank map would score 1.0; it is undefined instead.
    other = maps.copy()
    other[[2, 7]] = 0.0
    agree = map_agreement({"gradcam": torch.tensor(blanked)}, {"gradcam": torch.tensor(other)})["gradcam"].numpy()
    assert np.isnan(agree[[2, 7]]).all() and np.isfinite(agree[keep]).all()
    ref = [structural_similarity(blanked[i], other[i], data_range=1.0) for i in (2, 7)]
    assert ref == [1.0, 1.0]  # what skimage says, and what must not enter a mean
    r = randomization_verdict(agree, np.full(n, 0.5), "logits", np.full(3 * n, 0.5), n_undefined=2)
    assert r.n == n - 2 and r.value == pytest.approx(agree[keep].mean())
    # Spearman of a constant map is undefined too (scipy says nan).
    from saliency_trust.metrics import spearman

    assert torch.isnan(spearman(torch.tensor(blanked[[2]]), torch.tensor(maps[[2]])))[0]


def test_random_pair_ssim_uses_other_images_only():
    from saliency_trust.criteria import per_image_chance

    rng = np.random.default_rng(2)
    maps = torch.tensor(rng.random((4, 20, 20)))
    vals = random_pair_ssim(maps, pairs_per_image=6, seed=3)
    assert vals.shape == (24,) and bool((vals < 0.99).all())  # never an image with itself
    g = torch.Generator().manual_seed(3)
    partner = torch.randint(0, 3, (4, 6), generator=g)
    partner = partner + (partner >= torch.arange(4)[:, None]).long()
    ref = [structural_similarity(maps[i].numpy(), maps[j].numpy(), data_range=1.0)
           for i in range(4) for j in partner[i].tolist()]
    assert np.allclose(vals.numpy(), ref, atol=1e-12)
    chance = per_image_chance(vals, 4).numpy()
    assert np.allclose(chance, np.asarray(ref).reshape(4, 6).mean(1), atol=1e-12)
    # Between two models: image i of the first against other images of the second.
    second = torch.tensor(rng.random((4, 20, 20)))
    cross = random_pair_ssim(maps, 6, seed=3, other=second)
    ref = [structural_similarity(maps[i].numpy(), second[j].numpy(), data_range=1.0)
           for i in range(4) for j in partner[i].tolist()]
    assert np.allclose(cross.numpy(), ref, atol=1e-12)


def test_statistics():
    rng = np.random.default_rng(3)
    a = rng.normal(0.3, 0.1, 40)
    b = a - rng.normal(0.05, 0.02, 40)
    assert wilcoxon_greater(a, b) == pytest.approx(wilcoxon(a, b, alternative="greater").pvalue)
    assert wilcoxon_greater(b, a) > 0.5 and wilcoxon_greater(a, a) == 1.0
    s = summarize(np.append(a, [np.nan, np.inf]))
    assert s["n"] == 40 and s["n_excluded"] == 2 and s["ci95"][0] < s["mean"] < s["ci95"][1]
    assert bootstrap_ci(a, seed=1) == bootstrap_ci(a, seed=1)
    assert np.isnan(summarize([np.nan])["mean"])
    # Holm by hand: sorted p x (m - rank), running max, capped at 1, back in input order.
    p = np.array([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(holm([0.5, 0.9]), [1.0, 1.0])


@pytest.mark.parametrize("name", ["rsna_pneumonia_qtim100", "siim_pneumothorax_qtim100"])
def test_leave_one_out_average_mask_prior_on_the_real_sets(name, capsys):
    from saliency_trust.data import load_dataset

    ds = load_dataset(shared_set(name))
    masks = torch.tensor(np.stack([r.mask for r in ds]))
    priors = leave_one_out_priors(masks)
    out = utility_scores(priors, masks)
    stats = summarize(out["auprc"].numpy())
    assert out["empty_mask"] == 0 and stats["n"] == 100
    assert 0.0 < stats["mean"] < 0.6
    with capsys.disabled():
        print(f"\n{name}: leave-one-out average-mask prior, mean AUPRC {stats['mean']:.4f} "
              f"(95% CI {stats['ci95'][0]:.4f}-{stats['ci95'][1]:.4f}, n={stats['n']})")
