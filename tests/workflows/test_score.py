"""``score()`` on fabricated maps: the verdicts, values and records of the four criteria with no model at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from saliency_trust.criteria import RandomizationCurve, per_image_chance, random_pair_ssim
from saliency_trust.results import Results
from saliency_trust.settings import AssessmentSettings
from saliency_trust.workflows.assess import Cohort, Maps, ModelState, Plan, Roles, score
from sklearn.metrics import auc, precision_recall_curve

N, H = 10, 24
METHODS = ["grad", "sg"]


def _masks() -> torch.Tensor:
    m = torch.zeros((N, H, H), dtype=torch.bool)
    for i in range(N):  # one square lesion per image, in a different place each time
        y, x = 2 + (i * 5) % 14, 3 + (i * 7) % 13
        m[i, y : y + 6, x : x + 6] = True
    return m


def _plan(tmp_path, **settings) -> Plan:
    s = AssessmentSettings(dataset_dir=tmp_path, output_dir=tmp_path / "out", classifiers=("unused",),
                           methods=tuple(METHODS), preset="quick", n_images=N, pairs_per_image=5, **settings)
    masks = _masks()
    images = torch.rand((N, H, H), generator=torch.Generator().manual_seed(1))
    cohort = Cohort(ids=[f"img{i}" for i in range(N)], images01=images.numpy(), images=images, masks=masks,
                    prior=masks.double().mean(0), example=0)
    models = [ModelState(folder=None, replicate=k, sha256=c * 64, path=f"/w/{c}.pt", arch=arch)
              for k, c, arch in ((0, "a", "net_a"), (1, "b", "net_a"), (0, "c", "net_b"))]
    facts = {"cam_grids": {}, "ground_truth": "masks", "pretrained": {}, "normalization": {}, "ig_baseline": {},
             "primary": "net_a", "second": "net_b", "localizers": [], "finding_class": 1, "trained_on": [],
             "training_images_included": False, "randomize": None, "method_notes": {},
             "verdict_block_source": {"net_a": "family default"}}
    data = {"grid": [H, H], "prior": "mean of 40 training/validation masks", "methods_left_out": {}}
    return Plan(settings=s, device=torch.device("cpu"), cohort=cohort, models=models, localizers=[],
                roles=Roles(randomized=(0,), replicate_pair=(0, 1), second_arch=2), methods=list(METHODS),
                not_run={}, facts=facts, data=data, config={"fabricated": True}, key="k")


def _maps(plan: Plan) -> Maps:
    g = torch.Generator().manual_seed(2)
    masks = plan.cohort.masks.float()
    # grad: the lesion itself, blurred a little, for the primary and the second architecture; the primary's
    # second replicate gives noise instead (repeatability fails, reproducibility passes). sg: noise everywhere.
    lesion = torch.nn.functional.avg_pool2d(masks[:, None], 3, 1, 1)[:, 0]
    noise = [torch.rand((N, H, H), generator=g) for _ in range(3)]
    trained = [{"grad": lesion.clone(), "sg": noise[0]}, {"grad": torch.rand((N, H, H), generator=g), "sg": noise[1]},
               {"grad": lesion.clone(), "sg": noise[2]}]
    # Randomization: grad's randomized map still equals the trained one (insensitive: FAIL), sg's is new noise.
    rand_sg = torch.rand((N, H, H), generator=g)
    baseline = {m: random_pair_ssim(trained[0][m], 5, data_range=1.0, seed=0) for m in METHODS}
    # The verdict state is the second row; the first (the head alone randomized) says the opposite.
    ssim = {"grad": torch.stack([torch.zeros(N, dtype=torch.float64), torch.ones(N, dtype=torch.float64)]),
            "sg": torch.stack([torch.ones(N, dtype=torch.float64),  # then just under the random-pair mean:
                               torch.full((N,), float(baseline["sg"].mean()) - 0.005, dtype=torch.float64)])}
    curve = RandomizationCurve(
        states=["logits", "block1"], verdict_state="block1", class_changed=[0, 0], ssim=ssim,
        spearman={m: torch.zeros((2, N), dtype=torch.float64) for m in METHODS},
        undefined={m: [0, 0] for m in METHODS}, spearman_undefined={m: [0, 0] for m in METHODS},
        baseline=baseline, cascade_mean={m: float(ssim[m].mean()) for m in METHODS},
        examples={"grad": lesion[None, :1].expand(2, 1, H, H)[:, 0], "sg": rand_sg[None, :1].expand(2, 1, H, H)[:, 0]})
    return Maps(trained=trained, probs=[torch.full((N, 2), 0.5, dtype=torch.float64)] * 3,
                targets=[torch.ones(N, dtype=torch.long)] * 3, untrained={"grad": noise[1], "sg": noise[2]},
                localizers=[], randomization=[curve])


def test_score_on_fabricated_maps_decides_each_criterion(tmp_path):
    plan = _plan(tmp_path)
    maps = _maps(plan)
    results, scores = score(plan, maps)
    v = results.verdicts
    # Utility: the lesion map beats the average-mask prior on every image; noise does not.
    assert v["grad"]["utility"].passed is True and v["sg"]["utility"].passed is False
    assert v["sg"]["utility"].decided_by == "prior"
    masks = plan.cohort.masks.numpy()
    for m in METHODS:  # the paper's AUPRC: the trapezoid under scikit-learn's precision-recall curve
        curves = [precision_recall_curve(masks[i].ravel(), maps.trained[0][m][i].numpy().ravel()) for i in range(N)]
        assert np.allclose(scores.auprc[m], [auc(r, p) for p, r, _ in curves], atol=1e-6)
    # Reproducibility compares the primary with the second architecture: identical maps (SSIM 1) pass; the
    # primary's two replicates (repeatability) disagree for grad; independent noise never agrees.
    assert v["grad"]["reproducibility"].passed is True and np.allclose(scores.reprod["grad"], 1.0)
    assert v["grad"]["repeatability"].passed is False and v["grad"]["repeatability"].decided_by == "chance"
    assert v["sg"]["repeatability"].passed is False and v["sg"]["reproducibility"].passed is False
    # Randomization: the paper's rule on the verdict state (mean SSIM against the random-pair mean).
    assert v["grad"]["randomization"].passed is False and v["sg"]["randomization"].passed is True
    assert v["grad"]["randomization"].state == "block1" and v["grad"]["randomization"].evidence == "fail"
    assert v["sg"]["randomization"].evidence == "pass"
    assert results.randomization[0]["init_seed"] >= 0 and results.randomization[0]["target"] == "trained"
    # The record is strict JSON, and reads back to the same verdicts.
    again = Results.from_json(results.to_json())
    assert again.verdicts["grad"]["utility"].passed is True
    assert json.loads(results.to_json())["data"]["images_used"]["utility"] == {"min": N, "max": N, "unit": "images"}


def test_score_reads_the_settings_equivalence_margin(tmp_path):
    """A new option (the randomization evidence margin) reaches the verdict through the settings alone."""
    maps = _maps(_plan(tmp_path))
    for m in METHODS:  # SSIM at chance +- 0.05: "pass" within a wide margin, "inconclusive" within a narrow one
        chance = per_image_chance(maps.randomization[0].baseline[m], N).double()
        maps.randomization[0].ssim[m] = (chance + torch.linspace(-0.05, 0.05, N, dtype=torch.float64)).expand(2, N)
    wide = score(_plan(tmp_path, equivalence_margin=0.2), maps)[0].verdicts
    narrow = score(_plan(tmp_path, equivalence_margin=0.01), maps)[0].verdicts
    assert {wide[m]["randomization"].evidence for m in METHODS} == {"pass"}
    assert {narrow[m]["randomization"].evidence for m in METHODS} == {"inconclusive"}


def test_settings_refuse_bad_values_once(tmp_path):
    base = {"dataset_dir": tmp_path, "output_dir": tmp_path, "classifiers": ("m",)}
    for bad, text in (({"explain_class": "lesion"}, "explain_class"), ({"randomization_target": "x"}, "randomization"),
                      ({"n_images": 1}, "n_images"), ({"equivalence_margin": 0}, "equivalence_margin"),
                      ({"recipe_overrides": {"sg_samplez": 3}}, "sg_samplez"), ({"methods": ("gradd",)}, "gradd"),
                      ({"classifiers": ()}, "no classifiers")):
        with pytest.raises((ValueError, TypeError), match=text):
            AssessmentSettings(**{**base, **bad})
    s = AssessmentSettings(**base, recipe_overrides={"sg_samples": 3})
    with pytest.raises(TypeError, match="frozen"):
        s.recipe_overrides["sg_samples"] = 4
    with pytest.raises(TypeError, match="frozen"):
        s.recipe_overrides |= {"ig_steps": 2}
    assert AssessmentSettings(**base, recipe_overrides={"xrai_scales": [50, 100]}).recipe_overrides["xrai_scales"] \
        == (50, 100)  # nested values are immutable too
    for bad in ({"seed": True}, {"block": True}, {"methods": ()}, {"report": "no"}):
        with pytest.raises(ValueError):
            AssessmentSettings(**{**base, **bad})
    from saliency_trust.workflows.assess import plan_assessment

    with pytest.raises(TypeError, match="beside an AssessmentSettings"):
        plan_assessment(s, n_images=2)  # never silently dropped
    assert s.ssim_data_range == 2.0 and s.target_rule == "own"  # the paper preset's defaults
    q = AssessmentSettings(**base, preset="quick", explain_class="finding", randomization_target="own")
    assert q.ssim_data_range == 1.0 and q.own_target == "own" and q.target_rule == "trained"
    assert q.to_config()["randomization_target"] == "own" and "report" not in q.to_config()
    with pytest.raises(TypeError, match="unknown assessment option"):
        AssessmentSettings.from_options(tmp_path, tmp_path, ["m"], n_imagez=3)
