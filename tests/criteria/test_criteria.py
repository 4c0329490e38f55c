"""Randomization curves, agreement and the verdict rules on small real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.criteria import (
    agreement_verdicts,
    map_agreement,
    randomization_curves,
    randomization_verdict,
    utility_verdicts,
)
from saliency_trust.networks import get_network, randomization_blocks, randomization_states, verdict_state
from saliency_trust.saliency import explain, predict
from skimage.metrics import structural_similarity


@pytest.fixture(scope="module")
def densenet_and_images():
    torch.manual_seed(0)
    net = get_network("densenet121").eval()
    g = torch.Generator().manual_seed(1)
    return net, torch.rand((6, 3, 64, 64), generator=g) * 2 - 1


def test_randomization_curves_cover_every_state_and_match_skimage(densenet_and_images):
    net, x = densenet_and_images
    x = x[:3]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = randomization_curves(net, "densenet121", x, ["grad", "gradcam"], preset="quick", pairs_per_image=4,
                               target="trained")
    assert out.states == [b for b, _ in randomization_blocks("densenet121")]
    # The paper's depth: the stem (conv0) and the first block (denseblock1) are never part of the verdict.
    assert out.verdict_state == "transition1" and out.states[-2:] == ["denseblock1", "conv0"]
    for m in ("grad", "gradcam"):
        assert out.ssim[m].shape == (9, 3) and out.spearman[m].shape == (9, 3)
        assert out.baseline[m].shape == (12,) and len(out.undefined[m]) == 9
    # Randomizing the logits layer alone already changes gradient maps.
    assert float(out.ssim["grad"][0].mean()) < 0.999
    # Cross-check one state's SSIM with scikit-image, recomputing that state's maps.
    t = predict(net, x).argmax(1)
    name, state = next(iter(randomization_states(net, "densenet121", "cascading", seed=0)))
    a = explain(state, x, ["grad"], targets=t, preset="quick")["grad"]
    b = out.trained_maps["grad"]
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(3)]
    assert np.allclose(out.ssim["grad"][0].numpy(), ref, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_randomized_model_explains_its_own_argmax_by_default(densenet_and_images):
    """The paper's pipeline: each state explains the class it predicts itself, not the trained model's."""
    net, x = densenet_and_images
    seen: list[torch.Tensor] = []

    def recording(state, targets):
        seen.append(targets.clone())
        return explain(state, x, ["grad"], targets=targets, preset="quick")

    trained = explain(net, x, ["grad"], preset="quick")
    trained_t = predict(net, x).argmax(1)
    out = randomization_curves(net, "densenet121", x, ["grad"], pairs_per_image=2, explain_fn=recording,
                               trained_maps=trained, trained_targets=trained_t)
    assert len(seen) == len(out.states)  # the trained maps were reused: no second explain of the trained model
    own = [predict(s, x).argmax(1) for _, s in randomization_states(net, "densenet121", "cascading", seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(seen, own, strict=True))
    changed = [int((o != trained_t).sum()) for o in own]
    assert out.class_changed == changed and sum(changed) > 0  # else this test could not tell the two apart
    seen.clear()
    randomization_curves(net, "densenet121", x, ["grad"], pairs_per_image=2, explain_fn=recording,
                         trained_maps=trained, trained_targets=trained_t, target="trained")
    assert all(torch.equal(t, trained_t) for t in seen)


def test_inception_verdict_reads_the_papers_last_state():
    states = [b for b, _ in randomization_blocks("inception_v3")]
    assert states[-2:] == ["Mixed_5c", "Mixed_5b"] and verdict_state("inception_v3", states) == "Mixed_5c"
    assert verdict_state("densenet121", ["logits", "conv0"]) == "conv0"  # its depth not reached: the last state
    for arch, want in (("densenet121", "transition1"), ("resnet50", "layer2"), ("efficientnet_b0", "features.2")):
        names = [b for b, _ in randomization_blocks(arch)]
        assert verdict_state(arch, names) == want and names.index(want) == len(names) - 3, arch


def test_map_agreement():
    rng = np.random.default_rng(0)
    a = {"grad": torch.tensor(rng.random((2, 16, 16))), "xrai": torch.tensor(rng.random((2, 16, 16)))}
    b = {"grad": a["grad"].clone(), "sg": torch.tensor(rng.random((2, 16, 16)))}
    out = map_agreement(a, b)
    assert list(out) == ["grad"] and torch.allclose(out["grad"], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError):
        map_agreement({"sg": a["grad"]}, {"ig": a["grad"]})


def test_utility_verdict_against_prior_and_localization_network():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(1)
    n = 30
    prior = rng.uniform(0.05, 0.1, n)
    good = prior + rng.uniform(0.05, 0.2, n)
    bad = prior - rng.uniform(0.0, 0.05, n)
    loc_close = good + rng.normal(0, 0.01, n)  # a localization network about as good as "good"
    v = utility_verdicts({"good": good, "bad": bad, "empty": np.full(n, np.nan)}, prior, loc_close)
    assert v["good"].passed is True and v["bad"].passed is False and v["empty"].passed is None
    assert v["bad"].why == "not above the prior" and v["empty"].n_undefined == n
    c = v["good"].comparisons
    assert set(c) == {"prior", "localization"} and c["prior"]["p_holm"] >= c["prior"]["p"]
    assert c["prior"]["p"] == pytest.approx(wilcoxon(good, prior, alternative="greater").pvalue)
    assert c["localization"]["p"] == pytest.approx(wilcoxon(loc_close, good, alternative="greater").pvalue)
    # The paper's headline: a much better localization network makes every method fail utility.
    strong = good + 0.3
    w = utility_verdicts({"good": good, "bad": bad}, prior, strong)
    assert w["good"].passed is False and w["good"].why == "the localization network is better"
    assert "Wilcoxon" in w["good"].rule and w["good"].plain and w["good"].paper_rule
    # Without a localization network: judged against the prior only, and the verdict says so.
    only = utility_verdicts({"good": good}, prior)["good"]
    assert only.passed is True and "localization" not in only.comparisons and only.deviation


def test_randomization_verdict_is_the_papers_rule_with_evidence_beside_it():
    rng = np.random.default_rng(2)
    n = 40
    chance = rng.uniform(0.25, 0.35, n)
    pairs = np.repeat(chance, 5)
    degraded = chance - rng.uniform(0.05, 0.15, n)
    v = randomization_verdict(degraded, chance, "Mixed_5c", pairs)
    diff = v.comparisons["chance"]
    assert v.passed is True and v.state == "Mixed_5c" and diff["difference_ci95"][1] < 0
    assert v.evidence == "pass" and v.decided_by == ""
    assert diff["difference"] == pytest.approx((degraded - chance).mean())
    assert v.value == pytest.approx(degraded.mean()) and v.reference == pytest.approx(pairs.mean())
    stuck = chance + rng.uniform(0.2, 0.4, n)  # e.g. guided backprop: barely changes
    s = randomization_verdict(stuck, chance, "Mixed_5c", pairs)
    assert s.passed is False and s.evidence == "fail" and s.decided_by == "chance"
    assert s.comparisons["chance"]["difference_ci95"][0] > 0
    with pytest.raises(ValueError):
        randomization_verdict(stuck[:3], chance, "x", pairs)
    assert randomization_verdict(np.full(n, np.nan), chance, "x", pairs).passed is None


def test_above_chance_with_a_ci_straddling_zero_does_not_pass():
    """The review's case: mean 0.385 vs chance 0.294, CI of the difference about [-0.004, 0.195]. The old rule
    ("the CI reaches 0") passed it; the paper's rule (mean below the baseline) fails it, and the evidence is
    inconclusive, not a pass."""
    n = 12
    chance = np.full(n, 0.294)
    d = np.array([0.50, -0.10, 0.32, -0.11, 0.28, 0.02, 0.36, -0.09, 0.05, 0.21, -0.10, 0.19])
    d = d - d.mean() + 0.091  # mean SSIM 0.385
    v = randomization_verdict(chance + d, chance, "Mixed_5c", np.full(600, 0.294))
    lo, hi = v.comparisons["chance"]["difference_ci95"]
    assert lo < 0 < hi and hi > 0.05, (lo, hi)
    assert v.value == pytest.approx(0.385) and v.passed is False and v.evidence == "inconclusive"


def test_randomization_counts_images_not_replicate_image_pairs():
    """Three replicates of 10 images are 10 images: replicates are averaged per image before the bootstrap."""
    rng = np.random.default_rng(5)
    r, n = 3, 10
    chance = rng.uniform(0.2, 0.3, (r, n))
    ssim = chance + rng.normal(0.0, 0.05, (r, n))
    pairs = [rng.uniform(0.2, 0.3, 50) for _ in range(r)]
    v = randomization_verdict(ssim, chance, "Mixed_5c", pairs, cascade_mean=[0.6, 0.5, 0.55])
    assert v.n == n and v.comparisons["chance"]["n_pairs"] == n
    per_image = ssim.mean(0) - chance.mean(0)
    assert v.comparisons["chance"]["difference"] == pytest.approx(per_image.mean())
    from saliency_trust.criteria.statistics import bootstrap_ci

    assert v.comparisons["chance"]["difference_ci95"] == pytest.approx(list(bootstrap_ci(per_image)))
    reps = v.comparisons["replicates"]
    assert reps["n_replicates"] == 3 and reps["means"] == pytest.approx(list(ssim.mean(1)))
    assert reps["sd"] == pytest.approx(ssim.mean(1).std(ddof=1))
    assert v.value == pytest.approx(ssim.mean(1).mean())
    assert v.reference == pytest.approx(np.mean([p.mean() for p in pairs]))
    assert v.comparisons["cascade"]["mean_ssim_over_states"] == pytest.approx(0.55) and v.deviation == ""
    one = randomization_verdict(ssim[:1], chance[:1], "x", pairs[:1])
    assert "1 randomized replicate" in one.deviation
    # A replicate blank on an image drops out of that image's SSIM and of its chance alike (paired).
    gappy = ssim.copy()
    gappy[0, 0] = np.nan
    g = randomization_verdict(gappy, chance, "x", pairs)
    want = np.concatenate([[gappy[1:, 0].mean() - chance[1:, 0].mean()], (ssim.mean(0) - chance.mean(0))[1:]])
    assert g.comparisons["chance"]["difference"] == pytest.approx(want.mean())


def test_only_legs_whose_rejection_passes_are_holm_corrected():
    """Review example: a localization leg with raw p 0.049 became Holm 0.31 and passed. Uncorrected, it fails."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(11)
    n = 20
    prior = rng.uniform(0.05, 0.1, n)
    values = {f"m{k}": prior + rng.uniform(0.1, 0.2, n) for k in range(7)}
    base = prior + rng.uniform(0.1, 0.2, n)
    # The localization network beats "edge" on most images, by a margin just significant before correction.
    d = np.array([0.04, 0.03, -0.02, 0.05, 0.01, -0.03, 0.02, 0.06, -0.01, 0.03,
                  0.02, -0.04, 0.05, 0.01, -0.02, 0.03, 0.04, -0.015, 0.02, 0.01])
    loc = base + d
    p = wilcoxon(loc, base, alternative="greater").pvalue
    assert 0.01 < p < 0.05, p
    values["edge"] = base
    v = utility_verdicts(values, prior, loc)
    c = v["edge"].comparisons["localization"]
    from saliency_trust.criteria.statistics import holm

    raw = [v[m].comparisons["localization"]["p"] for m in values]
    assert holm(raw)[list(values).index("edge")] > 0.05  # Holm would have let "edge" pass
    assert c["p"] == pytest.approx(p) and c["p_holm"] is None and c["correction"] == "none"
    assert v["edge"].passed is False and v["edge"].decided_by == "localization"
    assert v["edge"].comparisons["prior"]["correction"] == "holm"
    # Paired: the reference on the same images, the paired difference and its CI.
    both = np.isfinite(base) & np.isfinite(loc)
    assert c["reference_mean"] == pytest.approx(loc[both].mean()) and c["method_mean"] == pytest.approx(base.mean())
    assert c["difference"] == pytest.approx((base - loc).mean()) and len(c["difference_ci95"]) == 2


def test_a_leg_without_data_is_undetermined_never_a_pass():
    rng = np.random.default_rng(12)
    n = 15
    prior = rng.uniform(0.05, 0.1, n)
    good = prior + rng.uniform(0.1, 0.2, n)
    v = utility_verdicts({"good": good}, prior, np.full(n, np.nan))["good"]
    assert v.comparisons["localization"]["n_pairs"] == 0 and v.comparisons["localization"]["significant"] is None
    assert v.passed is None and v.decided_by == "localization"
    chance = rng.uniform(0.1, 0.2, n)
    a = agreement_verdicts({"m": chance + 0.3}, {"m": chance}, np.full(n, np.nan), "repeatability")["m"]
    assert a.passed is None
    # A leg that fails still decides, whatever the other leg lacks.
    bad = agreement_verdicts({"m": chance}, {"m": chance + 0.2}, np.full(n, np.nan), "repeatability")["m"]
    assert bad.passed is False and bad.decided_by == "chance"


def test_agreement_verdicts_against_chance_and_localization_networks():
    rng = np.random.default_rng(3)
    n = 30
    chance = rng.uniform(0.1, 0.2, n)
    loc = rng.uniform(0.6, 0.7, n)
    values = {"high": loc + rng.normal(0, 0.01, n), "mid": chance + 0.2, "low": chance + rng.normal(0, 0.01, n)}
    ch = {m: chance for m in values}
    v = agreement_verdicts(values, ch, loc, "repeatability", undefined={"high": 0, "mid": 0, "low": 0})
    assert v["high"].passed is True
    assert v["mid"].passed is False and v["mid"].why == "localization networks agree better"
    assert v["mid"].decided_by == "localization" and v["low"].decided_by == "chance"
    assert v["low"].passed is False and v["low"].why == "not above chance"
    # The 0.5 line is a reference only: "mid" is above 0.5 nowhere, "high" everywhere; neither decides.
    assert v["high"].threshold == 0.5 and "reference" in v["high"].threshold_role
    no_loc = agreement_verdicts(values, ch, None, "reproducibility")
    assert no_loc["mid"].passed is True and no_loc["mid"].deviation
    with pytest.raises(ValueError):
        agreement_verdicts(values, ch, loc, "utility")
