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
    assert out["states"] == [b for b, _ in randomization_blocks("densenet121")]
    assert out["verdict_state"] == "conv0"  # no paper end state for DenseNet: the whole cascade
    for m in ("grad", "gradcam"):
        assert out["ssim"][m].shape == (9, 3) and out["spearman"][m].shape == (9, 3)
        assert out["baseline"][m].shape == (12,) and len(out["undefined"][m]) == 9
    # Randomizing the logits layer alone already changes gradient maps.
    assert float(out["ssim"]["grad"][0].mean()) < 0.999
    # Cross-check one state's SSIM with scikit-image, recomputing that state's maps.
    t = predict(net, x).argmax(1)
    name, state = next(iter(randomization_states(net, "densenet121", "cascading", seed=0)))
    a = explain(state, x, ["grad"], targets=t, preset="quick")["grad"]
    b = out["trained_maps"]["grad"]
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(3)]
    assert np.allclose(out["ssim"]["grad"][0].numpy(), ref, atol=1e-6)
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
    assert len(seen) == len(out["states"])  # the trained maps were reused: no second explain of the trained model
    own = [predict(s, x).argmax(1) for _, s in randomization_states(net, "densenet121", "cascading", seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(seen, own, strict=True))
    changed = [int((o != trained_t).sum()) for o in own]
    assert out["class_changed"] == changed and sum(changed) > 0  # else this test could not tell the two apart
    seen.clear()
    randomization_curves(net, "densenet121", x, ["grad"], pairs_per_image=2, explain_fn=recording,
                         trained_maps=trained, trained_targets=trained_t, target="trained")
    assert all(torch.equal(t, trained_t) for t in seen)


def test_inception_verdict_reads_the_papers_last_state():
    states = [b for b, _ in randomization_blocks("inception_v3")]
    assert states[-2:] == ["Mixed_5c", "Mixed_5b"] and verdict_state("inception_v3", states) == "Mixed_5c"
    assert verdict_state("densenet121", ["logits", "conv0"]) == "conv0"


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
    assert v["good"]["passed"] is True and v["bad"]["passed"] is False and v["empty"]["passed"] is None
    assert v["bad"]["why"] == "not above the prior" and v["empty"]["n_undefined"] == n
    c = v["good"]["comparisons"]
    assert set(c) == {"prior", "localization"} and c["prior"]["p_holm"] >= c["prior"]["p"]
    assert c["prior"]["p"] == pytest.approx(wilcoxon(good, prior, alternative="greater").pvalue)
    assert c["localization"]["p"] == pytest.approx(wilcoxon(loc_close, good, alternative="greater").pvalue)
    # The paper's headline: a much better localization network makes every method fail utility.
    strong = good + 0.3
    w = utility_verdicts({"good": good, "bad": bad}, prior, strong)
    assert w["good"]["passed"] is False and w["good"]["why"] == "the localization network is better"
    assert "Wilcoxon" in w["good"]["rule"] and w["good"]["plain"] and w["good"]["paper_rule"]
    # Without a localization network: judged against the prior only, and the verdict says so.
    only = utility_verdicts({"good": good}, prior)["good"]
    assert only["passed"] is True and "localization" not in only["comparisons"] and only["deviation"]


def test_randomization_verdict_uses_the_paired_difference_ci():
    rng = np.random.default_rng(2)
    n = 40
    chance = rng.uniform(0.25, 0.35, n)
    pairs = np.repeat(chance, 5)
    degraded = chance - rng.uniform(0.05, 0.15, n)
    v = randomization_verdict(degraded, chance, "Mixed_5c", pairs)
    diff = v["comparisons"]["chance"]
    assert v["passed"] is True and v["state"] == "Mixed_5c" and diff["difference_ci95"][1] < 0
    assert diff["difference"] == pytest.approx((degraded - chance).mean())
    stuck = chance + rng.uniform(0.2, 0.4, n)  # e.g. guided backprop: barely changes
    s = randomization_verdict(stuck, chance, "Mixed_5c", pairs)
    assert s["passed"] is False and s["comparisons"]["chance"]["difference_ci95"][0] > 0
    # At chance within uncertainty: the curve reached its baseline, as the paper reads it.
    at = chance + rng.normal(0, 0.02, n)
    assert randomization_verdict(at, chance, "x", pairs)["passed"] is True
    # Two bare means would call this a pass (0.301 < 0.30 + tiny) or fail on noise; the CI decides, and it
    # needs both sides to pair up per image.
    with pytest.raises(ValueError):
        randomization_verdict(at[:3], chance, "x", pairs)
    assert randomization_verdict(np.full(n, np.nan), chance, "x", pairs)["passed"] is None


def test_agreement_verdicts_against_chance_and_localization_networks():
    rng = np.random.default_rng(3)
    n = 30
    chance = rng.uniform(0.1, 0.2, n)
    loc = rng.uniform(0.6, 0.7, n)
    values = {"high": loc + rng.normal(0, 0.01, n), "mid": chance + 0.2, "low": chance + rng.normal(0, 0.01, n)}
    ch = {m: chance for m in values}
    v = agreement_verdicts(values, ch, loc, "repeatability", undefined={"high": 0, "mid": 0, "low": 0})
    assert v["high"]["passed"] is True
    assert v["mid"]["passed"] is False and v["mid"]["why"] == "localization networks agree better"
    assert v["low"]["passed"] is False and v["low"]["why"] == "not above chance"
    # The 0.5 line is a reference only: "mid" is above 0.5 nowhere, "high" everywhere; neither decides.
    assert v["high"]["threshold"] == 0.5 and "reference" in v["high"]["threshold_role"]
    no_loc = agreement_verdicts(values, ch, None, "reproducibility")
    assert no_loc["mid"]["passed"] is True and no_loc["mid"]["deviation"]
    with pytest.raises(ValueError):
        agreement_verdicts(values, ch, loc, "utility")
