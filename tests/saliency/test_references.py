"""Each method against an independent reference on the same model and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import saliency.core as pair
import torch
from captum.attr import GuidedBackprop, IntegratedGradients, LayerGradCam
from saliency_trust.saliency import explain, postprocess, smoothing_noise
from saliency_trust.saliency.explain import default_cam_layer, upsample_cam
from saliency_trust.saliency.guided import LayerCapture
from saliency_trust.saliency.hostwork import weights_fingerprint
from saliency_trust.saliency.presets import get_recipe

from tests.saliency.models import images, tiny

TOL = 1e-10  # float64 models and inputs


def _pair_fn(model, target, layer=None):
    """PAIR's call_model_function for a torch model (inputs arrive as [N, C, H, W] numpy)."""

    def call(x_batch, call_model_args=None, expected_keys=None):
        x = torch.tensor(np.asarray(x_batch), dtype=torch.float64, requires_grad=True)
        if layer is None:
            out = model(x)[:, target].sum()
            (g,) = torch.autograd.grad(out, x)
            return {pair.INPUT_OUTPUT_GRADIENTS: g.numpy()}
        with LayerCapture(layer) as cap:
            out = model(x)[:, target].sum()
        a = cap.activation
        (ga,) = torch.autograd.grad(out, a)
        return {pair.CONVOLUTION_LAYER_VALUES: a.detach().permute(0, 2, 3, 1).numpy(),
                pair.CONVOLUTION_OUTPUT_GRADIENTS: ga.permute(0, 2, 3, 1).numpy()}

    return call


def test_grad_matches_finite_differences():
    model, x = tiny(), images(2)
    g = explain(model, x, methods="grad", targets=[1, 0], raw=True)["grad"]
    eps = 1e-6
    rng = np.random.default_rng(0)
    for b, t in ((0, 1), (1, 0)):
        for _ in range(8):
            c, i, j = rng.integers(3), rng.integers(20), rng.integers(20)
            xp, xm = x[b : b + 1].clone(), x[b : b + 1].clone()
            xp[0, c, i, j] += eps
            xm[0, c, i, j] -= eps
            with torch.no_grad():
                fd = (model(xp)[0, t] - model(xm)[0, t]) / (2 * eps)
            assert float(g[b, c, i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)


def test_ig_matches_captum_with_pair_alphas_and_pair_core():
    model, x = tiny(), images(3)
    ours = explain(model, x, methods="ig", targets=[0, 1, 1], raw=True)["ig"]
    steps = 10
    alphas = list(np.linspace(0, 1, steps))
    weights = [1.0 / steps] * steps
    base = torch.full_like(x, -1.0)
    (cap,) = IntegratedGradients(model)._attribute((x,), baselines=(base,), target=[0, 1, 1], n_steps=steps,
                                                  step_sizes_and_alphas=(weights, alphas))
    assert torch.allclose(ours, cap, rtol=0, atol=TOL)
    for b, t in enumerate([0, 1, 1]):
        ref = pair.IntegratedGradients().GetMask(x[b].numpy(), _pair_fn(model, t), x_baseline=base[b].numpy(),
                                                  x_steps=steps, batch_size=4)
        # PAIR accumulates gradients in float32.
        assert np.allclose(ours[b].numpy(), ref, rtol=1e-5, atol=1e-7)


def _replay(noises):
    """Stand-in for np.random.normal that hands PAIR our noise, sample after sample."""
    it = iter(noises)
    return lambda loc, scale, size: next(it)


@pytest.mark.parametrize("method", ["sg", "sig"])
def test_smoothgrad_and_sig_match_pair_core_with_the_same_noise(method, monkeypatch):
    model, x = tiny(), images(2)
    n, steps = 6, 5
    kw = {"sg_samples": n} if method == "sg" else {"sig_samples": n, "sig_steps": steps}
    ours = explain(model, x, methods=method, targets=[1, 0], raw=True, **kw)[method]
    for b, t in enumerate([1, 0]):
        seed = 0 if method == "sg" else 1  # the recipe seed, +1 for SIG (independent noise)
        noise = smoothing_noise(x[b], n, 0.15, seed, model_key=weights_fingerprint(model)).numpy()
        monkeypatch.setattr(np.random, "normal", _replay(list(noise)))
        if method == "sg":
            ref = pair.GradientSaliency().GetSmoothedMask(x[b].numpy(), _pair_fn(model, t), stdev_spread=0.15,
                                                           nsamples=n, magnitude=True)
        else:
            ref = pair.IntegratedGradients().GetSmoothedMask(
                x[b].numpy(), _pair_fn(model, t), stdev_spread=0.15, nsamples=n, magnitude=True,
                x_baseline=np.full(x[b].shape, -1.0), x_steps=steps, batch_size=steps)
        scale = np.abs(ref).max()
        assert np.allclose(ours[b].numpy() / scale, ref / scale, rtol=0, atol=5e-7)  # PAIR sums in float32


def test_sg_noise_is_15_percent_of_each_images_range():
    x = images(1)[0] * 0.5
    noise = smoothing_noise(x, 4000, 0.15, 0)
    assert float(noise.std()) == pytest.approx(0.15 * float(x.max() - x.min()), rel=0.02)
    assert torch.equal(noise, smoothing_noise(x, 4000, 0.15, 0))
    assert not torch.equal(noise, smoothing_noise(x, 4000, 0.15, 1))


def test_gradcam_matches_pair_core_and_captum():
    model, x = tiny(), images(3, size=24)
    # PAIR core today resizes with skimage (half-pixel centres): compare in that mode.
    ours = explain(model, x, methods="gradcam", targets=[0, 1, 0], raw=True, cam_layer="block",
                   cam_resize="half_pixel")["gradcam"]
    for b, t in enumerate([0, 1, 0]):
        fn = _pair_fn(model, t, model.block)

        def hwc_fn(x_batch, call_model_args=None, expected_keys=None, fn=fn):
            return fn(np.asarray(x_batch).transpose(0, 3, 1, 2), call_model_args, expected_keys)

        ref = pair.GradCam().GetMask(x[b].permute(1, 2, 0).numpy(), hwc_fn, should_resize=True, three_dims=False)
        # PAIR divides by the max before resizing; our raw map keeps that division too.
        assert np.allclose(ours[b].numpy(), ref, rtol=0, atol=1e-6)
    # Captum at the feature map's resolution (its upsampler is nearest/plain F.interpolate, not skimage's).
    cap = LayerGradCam(model, model.block).attribute(x, target=[0, 1, 0], relu_attributions=True)[:, 0]
    low = explain(model, x, methods="gradcam", targets=[0, 1, 0], raw=True, cam_layer="block",
                  cam_resize="half_pixel")
    peak = cap.flatten(1).max(1).values.view(-1, 1, 1).detach()
    assert (peak == 0).any() and (peak > 0).any()  # one all-zero CAM: it must stay zero, not NaN
    expected = upsample_cam(cap.detach() / torch.where(peak > 0, peak, 1.0), (24, 24))
    assert torch.allclose(expected, low["gradcam"], rtol=0, atol=TOL)


def _tf1_legacy_resize(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False), written out from its definition."""
    h, w = a.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        y = i * h / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = j * w / out_w
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = a[y0, x0] + (a[y0, x1] - a[y0, x0]) * fx
            bottom = a[y1, x0] + (a[y1, x1] - a[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_legacy_resize_equals_tf1_formula_and_differs_from_half_pixel():
    rng = np.random.default_rng(1)
    for h, w, H, W in ((8, 8, 320, 320), (3, 5, 17, 40), (2, 2, 9, 7), (1, 1, 4, 4)):
        a = rng.random((h, w))
        ours = upsample_cam(torch.tensor(a)[None], (H, W), "tf1_legacy")[0].numpy()
        assert np.allclose(ours, _tf1_legacy_resize(a, H, W), rtol=0, atol=1e-6), (h, w, H, W)
    # One 8 x 8 peak at 320 px: the legacy map sits about half a cell (20 px) up and left.
    cam = np.zeros((8, 8))
    cam[4, 4] = 1.0
    legacy = upsample_cam(torch.tensor(cam)[None], (320, 320), "tf1_legacy")[0].numpy()
    centred = upsample_cam(torch.tensor(cam)[None], (320, 320), "half_pixel")[0].numpy()
    ly, lx = np.unravel_index(legacy.argmax(), legacy.shape)
    cy, cx = np.unravel_index(centred.argmax(), centred.shape)
    assert (ly, lx) == (160, 160) and (cy, cx) in ((179, 179), (180, 180), (179, 180), (180, 179))
    assert np.abs(legacy - centred).max() > 0.3
    with pytest.raises(ValueError):
        upsample_cam(torch.tensor(cam)[None], (16, 16), "nearest")


def test_paper_preset_uses_the_legacy_resize_and_half_pixel_is_available():
    model, x = tiny(), images(2, size=24)
    legacy = explain(model, x, methods="gradcam", targets=[0, 1], raw=True, cam_layer="block")["gradcam"]
    centred = explain(model, x, methods="gradcam", targets=[0, 1], raw=True, cam_layer="block",
                      cam_resize="half_pixel")["gradcam"]
    assert get_recipe("paper").cam_resize == "tf1_legacy"
    assert not torch.allclose(legacy, centred)
    with pytest.raises(ValueError):
        get_recipe("paper", cam_resize="bicubic")


def test_upsample_equals_skimage_resize():
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    for h, w, H, W in ((2, 2, 128, 128), (8, 8, 320, 320), (3, 5, 17, 40), (1, 1, 4, 4)):
        a = rng.random((h, w))
        ours = upsample_cam(torch.tensor(a)[None], (H, W))[0].numpy()
        assert np.allclose(ours, resize(a, (H, W)), rtol=0, atol=1e-12), (h, w, H, W)


def test_gradcam_on_inception_matches_captum_on_mixed_7c():
    from saliency_trust.networks import get_network

    torch.manual_seed(0)
    net = get_network("inception_v3").double().eval()
    x = images(2, size=160)
    ours = explain(net, x, methods="gradcam", targets=[1, 0], raw=True, cam_resize="half_pixel")["gradcam"]
    cap = LayerGradCam(net, net.Mixed_7c).attribute(x, target=[1, 0], relu_attributions=True)[:, 0].detach()
    assert cap.shape[-1] == 3
    peak = cap.flatten(1).max(1).values.view(-1, 1, 1)
    expected = upsample_cam(cap / torch.where(peak > 0, peak, 1.0), (160, 160))
    assert torch.allclose(ours, expected, rtol=0, atol=TOL)


def test_gradcam_on_densenet_uses_the_post_relu_map():
    from saliency_trust.networks import get_network

    torch.manual_seed(0)
    net = get_network("densenet121").double().eval()
    x = images(2, size=64)
    assert default_cam_layer(net) == ("features", True)
    ours = explain(net, x, methods="gradcam", targets=[1, 1], raw=True)["gradcam"]  # paper preset: legacy resize
    # Independent: rebuild DenseNet's head by hand on the post-ReLU features.
    feats = torch.relu(net.features(x)).detach().requires_grad_(True)
    logits = net.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(feats, 1), 1))
    (ga,) = torch.autograd.grad(logits[:, 1].sum(), feats)
    cam = torch.relu((ga.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    cam = cam / cam.flatten(1).max(1).values.view(-1, 1, 1, 1)
    cam = torch.tensor(np.stack([_tf1_legacy_resize(c, 64, 64) for c in cam[:, 0].detach().numpy()]))
    assert torch.allclose(ours, cam, rtol=0, atol=TOL)


def test_gbp_matches_captum_on_relu_modules_and_guides_functional_relus():
    modules, functional = tiny(False), tiny(True)
    functional.load_state_dict(modules.state_dict())
    x = images(3)
    cap = GuidedBackprop(modules).attribute(x, target=[1, 0, 1])
    ours_mod = explain(modules, x, methods="gbp", targets=[1, 0, 1], raw=True)["gbp"]
    ours_fun = explain(functional, x, methods="gbp", targets=[1, 0, 1], raw=True)["gbp"]
    assert torch.allclose(ours_mod, cap, rtol=0, atol=TOL)
    assert torch.allclose(ours_fun, cap, rtol=0, atol=TOL)
    # Captum on the functional model silently returns the plain gradient: the trap we avoid.
    cap_fun = GuidedBackprop(functional).attribute(x, target=[1, 0, 1])
    plain = explain(functional, x, methods="grad", targets=[1, 0, 1], raw=True)["grad"]
    assert torch.allclose(cap_fun, plain, atol=TOL) and not torch.allclose(ours_fun, plain, atol=1e-3)


def test_gbp_on_torchvision_inception_differs_from_gradient():
    from saliency_trust.networks import get_network

    torch.manual_seed(0)
    net = get_network("inception_v3").eval()
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    x = images(2, size=96, dtype=torch.float32)
    r = explain(net, x, methods=["grad", "gbp"], raw=True)
    rel = float((r["gbp"] - r["grad"]).norm() / r["grad"].norm())
    assert rel > 0.5
    # Guided gradients are what the ReLU rule leaves: every guided map is a different direction.
    cos = torch.nn.functional.cosine_similarity(r["gbp"].flatten(1), r["grad"].flatten(1))
    assert (cos < 0.9).all()


def test_ggcam_is_the_product_of_visualized_gbp_and_gradcam():
    model, x = tiny(), images(2, size=24)
    out = explain(model, x, methods=["gbp", "gradcam", "ggcam"], targets=[1, 0], cam_layer="block")
    raw = explain(model, x, methods=["gbp", "gradcam"], targets=[1, 0], cam_layer="block", raw=True)
    g = np.stack([pair.VisualizeImageGrayscale(raw["gbp"][b].permute(1, 2, 0).numpy()) for b in range(2)])
    c = np.stack([pair.VisualizeImageGrayscale(raw["gradcam"][b][..., None].numpy()) for b in range(2)])
    prod = g * c
    prod = (prod - prod.min((1, 2), keepdims=True)) / np.ptp(prod, axis=(1, 2), keepdims=True)
    assert np.allclose(out["ggcam"].numpy(), prod, atol=1e-6)


def test_postprocessing_matches_pair_visualization_then_minmax():
    rng = np.random.default_rng(0)
    attr = rng.normal(size=(4, 3, 30, 30))
    attr[1] = np.round(attr[1], 1)  # heavy ties
    ours = postprocess(torch.tensor(attr)).double().numpy()
    for b in range(4):
        v = pair.VisualizeImageGrayscale(attr[b].transpose(1, 2, 0))
        v = (v - v.min()) / (v.max() - v.min())
        assert np.allclose(ours[b], v, atol=1e-7)  # float32 output
    assert torch.equal(postprocess(torch.zeros(1, 3, 5, 5)), torch.zeros(1, 5, 5))


def test_xrai_matches_pair_full_algorithm_given_the_same_attribution():
    from saliency_trust.data.synth import render
    from saliency_trust.saliency.presets import get_recipe
    from saliency_trust.saliency.xrai import SegmentCache, xrai_greedy

    recipe = get_recipe("paper")
    cache = SegmentCache()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = render("opacity", i, 80, seed=0).pixels / 4095.0 * 2 - 1
        hwc = np.repeat(img[..., None], 3, axis=2)
        attr = rng.normal(size=(80, 80, 3)) + (np.arange(80)[:, None, None] / 40.0)
        ref = pair.XRAI().GetMask(hwc, None, base_attribution=attr)
        atoms = cache.atoms(hwc, recipe, torch.device("cpu"))
        ours = xrai_greedy(torch.tensor(attr.max(-1))[None], [atoms])[0].numpy()
        assert np.allclose(ours, ref, rtol=0, atol=1e-12)
    assert cache.misses == 3 and cache.hits == 0
    cache.atoms(hwc, recipe, torch.device("cpu"))
    assert cache.hits == 1


def test_xrai_end_to_end_matches_pair_with_its_own_ig():
    from saliency_trust.data.synth import render

    model = tiny()
    img = torch.tensor(render("pneumothorax", 0, 64, seed=0, positive=True).pixels / 4095.0 * 2 - 1)
    x = img[None, None].expand(1, 3, 64, 64).contiguous()
    ours = explain(model, x, methods="xrai", targets=[1], raw=True, xrai_steps=6)["xrai"][0].numpy()
    params = pair.XRAIParameters(steps=6)
    hwc = x[0].permute(1, 2, 0).numpy()

    def fn(x_batch, call_model_args=None, expected_keys=None):
        out = _pair_fn(model, 1)(np.asarray(x_batch).transpose(0, 3, 1, 2))
        return {pair.INPUT_OUTPUT_GRADIENTS: out[pair.INPUT_OUTPUT_GRADIENTS].transpose(0, 2, 3, 1)}

    ref = pair.XRAI().GetMask(hwc, fn, extra_parameters=params, batch_size=6)
    # PAIR sums IG in float32; region gains then agree to that precision.
    assert np.allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
