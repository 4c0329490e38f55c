"""The engine on volumes ``[B, C, D, H, W]``: all eight methods on a 3-D MONAI DenseNet121, each against an
independent reference on the same volume (Captum, scikit-image, PAIR's XRAI greedy, autograd by hand)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import saliency.core as pair
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, IntegratedGradients, Saliency
from saliency_trust.saliency import (
    METHODS,
    VOLUME_CAM_DEVIATION,
    VOLUME_XRAI_DEVIATION,
    degenerate,
    explain,
    get_recipe,
    postprocess,
    smoothing_noise,
    volume_deviations,
    volume_noise,
)
from saliency_trust.saliency.engine import auto_max_rows
from saliency_trust.saliency.explain import _BUILDERS, _NoisyVolumes, upsample_cam
from saliency_trust.saliency.hostwork import weights_fingerprint
from saliency_trust.saliency.postprocess import row_quantile
from saliency_trust.saliency.xrai import (
    SegmentCache,
    atoms_from_labels,
    atoms_from_masks,
    ball_offsets,
    greedy_by_updates,
    masks_from_labels,
    segment_grid,
    segment_labels,
    xrai_greedy,
)
from skimage.transform import resize

from tests.saliency.models import images, tiny3d, volumes

TOL = 1e-10  # float64 models and volumes
pytestmark = [pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations"),
              pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")]


@pytest.fixture(scope="module")
def densenet3d() -> torch.nn.Module:
    """MONAI DenseNet121, 3-D, one input channel, two classes (random weights; every ReLU an nn.ReLU(inplace))."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()


@pytest.fixture(scope="module")
def densenet3d_f64(densenet3d) -> torch.nn.Module:
    return copy.deepcopy(densenet3d).double()


def _pair_alphas(steps: int) -> tuple[list[float], list[float]]:
    """PAIR's IG path as Captum takes it: ``linspace(0, 1, steps)`` with both ends, each step weighted 1/steps."""
    return [1.0 / steps] * steps, list(np.linspace(0, 1, steps))


def test_every_method_on_a_3d_densenet(densenet3d):
    x = volumes(1, (32, 32, 32), dtype=torch.float32)
    # At 32^3 DenseNet's last features are 1 x 1 x 1 (a blank Grad-CAM whatever the weights): the CAM is
    # taken on the third dense block (2 x 2 x 2), a layer a user may name.
    out = explain(densenet3d, x, preset="quick", cam_layer="features.denseblock3", segment_cache=SegmentCache(),
                  sg_samples=3, sig_samples=2, sig_steps=3, ig_steps=4, xrai_steps=4)
    assert list(out) == list(METHODS) and set(_BUILDERS) == set(METHODS)
    for m, v in out.items():
        assert v.shape == (1, 32, 32, 32) and v.dtype == torch.float32, m
        assert bool(torch.isfinite(v).all()), m
        assert float(v.min()) == 0.0 and float(v.max()) == 1.0, m  # in [0, 1] and spanning it
        assert not bool(degenerate(v).any()) and float(v.std()) > 0.01, m  # not blank


def test_grad_equals_captum_saliency_on_volumes(densenet3d_f64):
    x = volumes(2, (32, 32, 32))
    ours = explain(densenet3d_f64, x, methods="grad", targets=[1, 0], raw=True)["grad"]
    ref = Saliency(densenet3d_f64).attribute(x, target=[1, 0], abs=False)
    assert ours.shape == x.shape
    assert torch.allclose(ours, ref, rtol=0, atol=TOL)


def test_ig_equals_captum_with_pair_alphas_on_a_volume(densenet3d_f64):
    x = volumes(1, (32, 32, 32), seed=3)
    steps = 5
    ours = explain(densenet3d_f64, x, methods="ig", targets=[1], raw=True, ig_steps=steps, max_rows=3)["ig"]
    (ref,) = IntegratedGradients(densenet3d_f64)._attribute((x,), baselines=(torch.full_like(x, -1.0),), target=1,
                                                             n_steps=steps, step_sizes_and_alphas=_pair_alphas(steps))
    assert float(ours.abs().max()) > 0
    assert torch.allclose(ours, ref, rtol=0, atol=TOL)


def _hand_gradcam(net: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Grad-CAM by hand: hooked 3-D features, autograd, mean over (d, h, w), weighted sum, ReLU, / max."""
    seen: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("a", out))
    try:
        logits = net(x)
    finally:
        handle.remove()
    a = seen["a"]
    (ga,) = torch.autograd.grad(logits[torch.arange(len(targets)), targets].sum(), a)
    cam = torch.relu((ga.mean((2, 3, 4), keepdim=True) * a).sum(1)).detach().double()
    peak = cam.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return cam / torch.where(peak > 0, peak, 1.0)


def test_gradcam_equals_a_hand_computed_weighted_sum_of_the_hooked_features(densenet3d):
    """Default layer (MONAI DenseNet's class_layers.relu, 2 x 2 x 2 at 64^3), trilinear upsampling.

    The reference upsamples with scikit-image's order-1 ``resize`` (half-pixel centres, mirror border), the
    rule the engine's separable matrices follow on every axis. ``F.interpolate(mode="trilinear",
    align_corners=False)`` has the same half-pixel centres but clamps at the border, so it agrees with both
    wherever a voxel's source lies inside the feature grid and differs within half a feature cell of the edge.
    """
    x = volumes(1, (64, 64, 64), dtype=torch.float32, seed=5)
    ours = explain(densenet3d, x, methods="gradcam", targets=[1], raw=True, cam_resize="half_pixel")["gradcam"]
    cam = _hand_gradcam(densenet3d, densenet3d.class_layers.relu, x, [1])
    assert cam.shape == (1, 2, 2, 2) and float(cam.max()) == 1.0 and float(cam.min()) < 1.0
    ref = resize(cam[0].numpy(), (64, 64, 64), order=1)
    assert ours.shape == (1, 64, 64, 64)
    assert np.allclose(ours[0].double().numpy(), ref, rtol=0, atol=1e-6)
    tri = F.interpolate(cam[:, None], size=(64, 64, 64), mode="trilinear", align_corners=False)[:, 0]
    inner = (slice(None), slice(16, 48), slice(16, 48), slice(16, 48))  # sources inside the 2-cell grid
    assert torch.allclose(ours[inner].double(), tri[inner], rtol=0, atol=1e-6)
    assert not torch.allclose(ours.double(), tri, rtol=0, atol=1e-3)  # the border rule differs


def test_gradcam_on_an_anisotropic_volume_keeps_the_axis_order(densenet3d):
    x = volumes(2, (32, 48, 40), dtype=torch.float32, seed=7)
    layer = "features.denseblock2"  # 4 x 6 x 5 features
    ours = explain(densenet3d, x, methods="gradcam", targets=[0, 1], raw=True, cam_layer=layer,
                   preset="paper")["gradcam"]  # paper preset: the TF1 legacy resize is not applied to volumes
    cam = _hand_gradcam(densenet3d, densenet3d.get_submodule(layer), x, [0, 1])
    assert cam.shape == (2, 4, 6, 5)
    ref = np.stack([resize(c.numpy(), (32, 48, 40), order=1) for c in cam])
    assert np.allclose(ours.double().numpy(), ref, rtol=0, atol=1e-6)


def test_gbp_equals_captum_guided_backprop_on_monai_densenet(densenet3d_f64):
    assert any(isinstance(m, torch.nn.ReLU) for m in densenet3d_f64.modules())  # Captum hooks nn.ReLU modules
    x = volumes(1, (32, 32, 32), seed=2)
    r = explain(densenet3d_f64, x, methods=["gbp", "grad"], targets=[1], raw=True)
    ref = GuidedBackprop(densenet3d_f64).attribute(x, target=1)
    assert torch.allclose(r["gbp"], ref, rtol=0, atol=TOL)
    assert not torch.allclose(r["gbp"], r["grad"], rtol=0.1)


def test_smoothgrad_and_sig_on_volumes_equal_a_hand_loop_with_the_same_noise():
    net, x = tiny3d(), volumes(2, (12, 14, 10))
    n_sg, n_sig, steps = 4, 3, 4
    ours = explain(net, x, methods=["sg", "sig"], targets=[1, 0], raw=True, sg_samples=n_sg, sig_samples=n_sig,
                   sig_steps=steps, max_rows=5)
    key = weights_fingerprint(net)
    ig = IntegratedGradients(net)
    for b, t in enumerate([1, 0]):
        sg_noise = volume_noise(x[b], range(n_sg), 0.15, 0, model_key=key)
        grads = []
        for noise in sg_noise:
            p = (x[b] + noise)[None].requires_grad_(True)
            grads.append(torch.autograd.grad(net(p)[0, t], p)[0][0])
        assert torch.allclose(ours["sg"][b], torch.stack(grads).pow(2).mean(0), rtol=0, atol=TOL)
        sig_noise = volume_noise(x[b], range(n_sig), 0.15, 1, model_key=key)  # SIG: the recipe seed + 1
        runs = [ig._attribute(((x[b] + noise)[None],), baselines=(torch.full_like(x[b : b + 1], -1.0),), target=t,
                              n_steps=steps, step_sizes_and_alphas=_pair_alphas(steps))[0][0] for noise in sig_noise]
        assert torch.allclose(ours["sig"][b], torch.stack(runs).pow(2).mean(0), rtol=0, atol=TOL)


def test_volume_noise_is_per_sample_reproducible_and_independent_of_chunking():
    net, x = tiny3d(), volumes(2, (16, 16, 16))
    kw = {"methods": ["sg", "sig", "ig"], "targets": [0, 1], "raw": True, "sg_samples": 5, "sig_samples": 3,
          "sig_steps": 4, "ig_steps": 3}
    one = explain(net, x, max_rows=1, **kw)
    large = explain(net, x, max_rows=500, **kw)
    for m in kw["methods"]:
        assert torch.allclose(one[m], large[m], rtol=1e-10, atol=1e-14), m
    v = x[0]
    some = volume_noise(v, [4, 1], 0.15, 0, model_key="k")
    full = volume_noise(v, range(5), 0.15, 0, model_key="k")
    assert torch.equal(some, full[[4, 1]]) and torch.equal(full, smoothing_noise(v, 5, 0.15, 0, model_key="k"))
    assert not torch.equal(full, volume_noise(v, range(5), 0.15, 1, model_key="k"))
    assert not torch.equal(full, volume_noise(v, range(5), 0.15, 0, model_key="other"))
    assert not torch.equal(full[0], full[1])
    assert float(full.std()) == pytest.approx(0.15 * float(v.max() - v.min()), rel=0.02)


def test_smoothgrad_on_a_volume_holds_one_chunk_of_noisy_samples(monkeypatch):
    """SG with 10 samples in chunks of 3 rows: never more than 3 noisy volumes at once (not 10)."""
    held: list[int] = []
    orig = _NoisyVolumes.prepare

    def recording(self, first, last):
        orig(self, first, last)
        held.append(self._stack.shape[0])

    monkeypatch.setattr(_NoisyVolumes, "prepare", recording)
    explain(tiny3d(), volumes(2, (12, 12, 12)), methods=["sg", "sig"], targets=[0, 1], sg_samples=10, sig_samples=4,
            sig_steps=5, max_rows=3)
    assert held and max(held) <= 3
    assert len(held) == -(-2 * 10 // 3) + -(-2 * 4 * 5 // 3)  # one prepare per chunk


def test_batched_volumes_equal_per_volume_calls_and_the_model_is_left_untouched():
    net = tiny3d(functional=True)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = volumes(2, (16, 18, 14))
    kw = {"preset": "quick", "cam_layer": "conv2", "segment_cache": SegmentCache(), "xrai_volume_segment_size": 12}
    batch = explain(net, x, targets=[1, 0], **kw)
    for b, t in enumerate([1, 0]):
        single = explain(net, x[b : b + 1], targets=[t], **kw)
        for m in METHODS:
            assert torch.allclose(batch[m][b], single[m][0], atol=1e-6), m
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_upsample_cam_on_volumes_equals_skimage_and_refuses_the_2d_legacy_resize():
    rng = np.random.default_rng(0)
    for d, h, w, D, H, W in ((2, 2, 2, 16, 16, 16), (3, 5, 4, 17, 40, 9), (1, 1, 1, 4, 4, 4), (4, 3, 2, 4, 3, 2)):
        a = rng.random((d, h, w))
        ours = upsample_cam(torch.tensor(a)[None], (D, H, W))[0].numpy()
        assert np.allclose(ours, resize(a, (D, H, W), order=1), rtol=0, atol=1e-12), (d, h, w)
    with pytest.raises(ValueError, match="2-D Grad-CAM detail"):
        upsample_cam(torch.zeros(1, 2, 2, 2), (8, 8, 8), "tf1_legacy")
    with pytest.raises(ValueError, match="upsample_cam takes"):
        upsample_cam(torch.zeros(1, 2, 2, 2), (8, 8))


def test_deviations_on_volumes_are_stated():
    assert volume_deviations("paper", ["grad", "ig"]) == []
    said = volume_deviations("paper")
    assert said == [VOLUME_CAM_DEVIATION, VOLUME_XRAI_DEVIATION]
    assert "trilinear" in VOLUME_CAM_DEVIATION and "legacy" in VOLUME_CAM_DEVIATION
    assert "SLIC" in VOLUME_XRAI_DEVIATION and "8/27/64/125/216" in VOLUME_XRAI_DEVIATION
    other = volume_deviations(get_recipe("quick", xrai_volume_segments=[10, 20]), "xrai")[0]
    assert "10/20 segments" in other


def test_ball_offsets_are_skimage_footprints():
    from skimage.morphology import ball, disk

    for r in (0, 1, 2, 3):
        ours = np.zeros((2 * r + 1,) * 3, bool)
        ours[tuple((ball_offsets(r) + r).T)] = True
        assert np.array_equal(ours, ball(r).astype(bool)), r
        flat = np.zeros((2 * r + 1,) * 2, bool)
        flat[tuple((ball_offsets(r, 2) + r).T)] = True
        assert np.array_equal(flat, disk(r).astype(bool)), r


def test_packed_atoms_equal_the_mask_atoms_in_2d():
    """The volume path's bit-packed atoms are the 2-D path's atoms on the same labels (bit for bit)."""
    recipe = get_recipe("quick", xrai_segment_size=48)
    hwc = images(1, size=48).permute(0, 2, 3, 1).numpy()[0]
    labels = torch.from_numpy(segment_labels(hwc, recipe))
    for r in (0, 1, 3):
        ref = atoms_from_masks(masks_from_labels(labels, r))
        ours = atoms_from_labels(labels, ball_offsets(r, 2))
        assert torch.equal(ours.membership, ref.membership) and torch.equal(ours.inverse, ref.inverse)
        assert torch.equal(ours.sizes, ref.sizes)


def test_greedy_by_updates_equals_the_batched_greedy():
    """The volume greedy (running counts and sums) against the image greedy (recounted each step, tested
    against PAIR in test_references) on the same atoms and attributions, including early stops."""
    recipe = get_recipe("quick", xrai_segment_size=48)
    hwc = images(2, size=48).permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(3)
    for i in range(2):
        atoms = atoms_from_labels(torch.from_numpy(segment_labels(hwc[i], recipe)), ball_offsets(2, 2))
        attr = torch.tensor(rng.normal(size=(1, 48, 48)) + np.linspace(0, 2, 48)[:, None])
        for min_diff, area in ((50, 1.0), (5, 0.4), (400, 1.0)):
            ref = xrai_greedy(attr, [atoms], min_diff, area)[0]
            ours = greedy_by_updates(attr[0], atoms, min_diff, area)
            assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (i, min_diff, area)


def test_xrai_on_a_volume_equals_pairs_greedy_on_slic_masks():
    """End to end on a volume: attributions from Captum IG (min and max baselines), masks from SLIC on the
    documented copy, dilated by scipy with skimage's ball and repeated onto the volume's grid, PAIR's greedy."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import ball
    from skimage.segmentation import slic

    net = tiny3d()
    x = volumes(1, (24, 32, 28), seed=4)
    recipe = get_recipe("quick", xrai_steps=4, xrai_volume_segment_size=16)  # a 12 x 16 x 14 grid: factor 2
    ours = explain(net, x, methods="xrai", targets=[1], raw=True, preset=recipe, segment_cache=SegmentCache())["xrai"]
    # The segmentation: scikit-image's SLIC on the copy the recipe describes.
    v = x[0, 0].numpy()
    v = (v - v.min()) / (v.max() - v.min()) * 2 - 1
    grid = segment_grid(v.shape, 16)
    assert grid == (12, 16, 14)
    small = resize(v, grid, order=1, mode="edge", anti_aliasing=True)
    labels = [slic(small, n_segments=n, compactness=0.1, sigma=0.8, channel_axis=None, start_label=0)
              for n in recipe.xrai_volume_segments]
    assert np.array_equal(np.stack(labels), segment_labels(x[0].permute(1, 2, 3, 0).numpy(), recipe))
    masks = []
    for seg in labels:
        for k in range(seg.min(), seg.max() + 1):
            m = binary_dilation(seg == k, structure=ball(recipe.xrai_volume_dilation))
            masks.append(m.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    # The attribution: IG from the volume's min and max, averaged, max over channels.
    steps = recipe.xrai_steps
    ig = IntegratedGradients(net)
    attr = sum(ig._attribute((x,), baselines=(torch.full_like(x, float(end)),), target=1, n_steps=steps,
                             step_sizes_and_alphas=_pair_alphas(steps))[0] for end in (x.min(), x.max())) / 2
    attr = attr[0].max(0).values.numpy()
    ref, _ = pair.XRAI._xrai(attr, masks, area_perc_th=1.0, min_pixel_diff=50, integer_segments=False)
    assert ours.shape == (1, 24, 32, 28)
    assert np.allclose(ours[0].numpy(), ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_volume_segments_are_cached_per_content_and_volume_settings():
    recipe = get_recipe("quick", xrai_volume_segment_size=12)
    x = volumes(2, (12, 12, 12))
    hwc = list(x.permute(0, 2, 3, 4, 1).numpy())
    cache = SegmentCache()
    first = cache.atoms_batch(hwc, recipe, torch.device("cpu"))
    assert cache.misses == 2 and first[0].inverse.numel() == 12**3
    cache.atoms_batch(hwc, recipe, torch.device("cpu"))
    assert cache.hits == 2
    key = cache.key(hwc[0], recipe)
    assert key == cache.key(hwc[0], get_recipe("quick", xrai_volume_segment_size=12, xrai_scales=(50,)))  # 2-D only
    assert key != cache.key(hwc[0], get_recipe("quick", xrai_volume_segment_size=12, xrai_volume_dilation=1))
    assert key != cache.key(hwc[0], get_recipe("quick", xrai_volume_segment_size=12, xrai_volume_segments=(8,)))
    assert key != cache.key(hwc[1], recipe)


def test_postprocessing_on_volumes_is_per_volume_over_all_voxels():
    rng = np.random.default_rng(1)
    attr = rng.normal(size=(2, 3, 6, 7, 8))
    attr[1] = np.round(attr[1], 1)  # ties
    ours = postprocess(torch.tensor(attr), spatial_dims=3).double().numpy()
    for b in range(2):
        m = np.abs(attr[b]).sum(0)
        lo, hi = m.min(), np.percentile(m, 99)
        v = np.clip((m - lo) / (hi - lo), 0, 1)
        assert np.allclose(ours[b], (v - v.min()) / (v.max() - v.min()), atol=1e-6)  # float32 output
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        postprocess(torch.zeros(2, 5, 5), spatial_dims=3)
    # Volumes too big for torch.quantile: image by image, or by kthvalue; the same values.
    flat = torch.tensor(rng.normal(size=(3, 1001)))
    ref = torch.quantile(flat, 0.99, dim=1)
    assert torch.allclose(row_quantile(flat, 0.99, limit=1500), ref, rtol=0, atol=1e-12)
    assert torch.allclose(row_quantile(flat, 0.99, limit=500), ref, rtol=0, atol=1e-12)


def test_chunk_rows_on_the_cpu_follow_the_volume_size():
    net = tiny3d()
    assert auto_max_rows(net, images(1, size=32), None, "float32") == 32  # 2-D: as it always was
    small = auto_max_rows(net, volumes(1, (16, 16, 16)), 8, "float32")
    big = auto_max_rows(net, volumes(1, (48, 48, 48)), 8, "float32")
    assert 1 <= big < small <= 32
    assert auto_max_rows(net, volumes(1, (48, 48, 48)), 0, "float32") == 1


def test_bad_volume_input_is_refused_clearly():
    net = tiny3d()
    for bad in (volumes(1, (8, 8, 8))[None], volumes(1, (8, 8, 8))[0, 0]):  # 6-D, and one volume without B, C
        with pytest.raises(ValueError, match=r"volumes \[B, C, D, H, W\]"):
            explain(net, bad, methods="grad")
    with pytest.raises(ValueError, match="spatial axes"):
        explain(net, volumes(1, (8, 8, 8)), methods="gradcam", cam_layer="fc")
    with pytest.raises(ValueError, match="xrai_volume_segments"):
        get_recipe("quick", xrai_volume_segments=(0, 8))
