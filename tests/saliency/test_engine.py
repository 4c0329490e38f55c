"""Engine properties: batching, chunking, targets, no model mutation, bf16 and compile parity."""

from __future__ import annotations

import pytest
import torch
from saliency_trust.saliency import METHODS, explain, get_recipe

from tests.saliency.models import images, tiny

QUICK = {"preset": "quick", "cam_layer": "block"}


def test_batched_equals_per_image_for_every_method():
    model, x = tiny(), images(3, size=64)
    batch = explain(model, x, targets=[1, 0, 1], **QUICK)
    for b, t in enumerate([1, 0, 1]):
        single = explain(model, x[b : b + 1], targets=[t], **QUICK)
        for m in METHODS:
            assert torch.allclose(batch[m][b], single[m][0], atol=1e-6), m


def test_chunk_size_does_not_change_results():
    model, x = tiny(), images(2, size=24)
    kw = {"methods": ["ig", "sg", "sig"], "targets": [0, 1], "raw": True, "sig_samples": 3, "sig_steps": 7}
    small = explain(model, x, max_rows=3, **kw)  # groups of 7 and 10 steps straddle 3-row chunks
    large = explain(model, x, max_rows=500, **kw)
    for m in kw["methods"]:
        assert torch.allclose(small[m], large[m], rtol=1e-10, atol=1e-12), m


def test_targets_default_to_prediction_and_are_per_image():
    model, x = tiny(), images(4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    auto = explain(model, x, methods="grad", raw=True)["grad"]
    given = explain(model, x, methods="grad", targets=pred.tolist(), raw=True)["grad"]
    other = explain(model, x, methods="grad", targets=(1 - pred).tolist(), raw=True)["grad"]
    assert torch.equal(auto, given) and not torch.allclose(auto, other)


def test_model_is_left_untouched():
    model = tiny(functional=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    explain(model, images(2), methods=["grad", "sg", "ig", "sig", "gbp", "xrai"], preset="quick")
    with pytest.raises(RuntimeError, match="did not run"):  # F.relu model never calls its 'block' module
        explain(model, images(1), methods="gradcam", cam_layer="block")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == modules_before
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_maps_are_in_unit_range_and_shaped():
    out = explain(tiny(), images(2, size=32), **QUICK)
    for m, v in out.items():
        assert v.shape == (2, 32, 32) and v.dtype == torch.float32, m
        assert float(v.min()) >= 0 and float(v.max()) <= 1, m


def test_seeded_noise_is_reproducible():
    model, x = tiny(), images(2)
    a = explain(model, x, methods=["sg", "sig"], preset="quick", raw=True)
    b = explain(model, x, methods=["sg", "sig"], preset="quick", raw=True)
    c = explain(model, x, methods=["sg", "sig"], preset="quick", raw=True, seed=7)
    assert torch.equal(a["sg"], b["sg"]) and torch.equal(a["sig"], b["sig"])
    assert not torch.allclose(a["sg"], c["sg"])


def test_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="unknown method"):
        explain(model, images(1), methods=["lime"])
    with pytest.raises(ValueError, match="unknown preset"):
        explain(model, images(1), preset="fast")
    with pytest.raises(TypeError, match="unknown saliency setting"):
        explain(model, images(1), ig_stepz=3)
    with pytest.raises(ValueError, match="no default Grad-CAM layer"):
        explain(model, images(1), methods="gradcam")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        explain(model, images(1), methods="gradcam", cam_layer="nope")


def test_passes_per_image_counts_the_paper_recipe():
    assert get_recipe("paper").passes_per_image() == 487
    assert get_recipe("paper").passes_per_image(["gradcam"]) == 1


def test_bf16_autocast_parity_with_fp32():
    torch.manual_seed(0)
    model, x = tiny(dtype=torch.float32), images(2, size=32, dtype=torch.float32)
    kw = {"methods": ["grad", "ig", "gradcam", "gbp"], "targets": [0, 1], "cam_layer": "block"}
    ref = explain(model, x, **kw)
    bf = explain(model, x, dtype="bfloat16", **kw)
    for m in kw["methods"]:
        err = (ref[m] - bf[m]).abs().mean()
        corr = torch.corrcoef(torch.stack([ref[m].flatten(), bf[m].flatten()]))[0, 1]
        assert err < 0.03 and corr > 0.97, (m, float(err), float(corr))


@pytest.mark.slow
def test_torch_compile_parity_with_eager():
    model, x = tiny(dtype=torch.float32), images(3, size=24, dtype=torch.float32)
    kw = {"methods": ["ig", "sg"], "targets": [0, 1, 1], "raw": True, "max_rows": 8, "ig_steps": 4, "sg_samples": 3}
    eager = explain(model, x, **kw)
    compiled = explain(model, x, compile=True, **kw)
    for m in kw["methods"]:
        assert torch.allclose(eager[m], compiled[m], rtol=1e-4, atol=1e-6), m


def test_guided_graph_hooks_equal_the_function_mode_on_torchvision_networks():
    """The engine's GBP (hooks on the recorded ReLU nodes) vs an independent ReLU-replacing mode."""
    from saliency_trust.networks import get_network
    from saliency_trust.saliency.guided import guide_relus

    from tests.saliency.models import ReluMode

    for arch, relus in (("densenet121", 121), ("inception_v3", 94)):
        torch.manual_seed(0)
        net = get_network(arch).eval()
        x = images(2, size=96, dtype=torch.float32)
        t = torch.tensor([1, 0])
        xi = x.clone().requires_grad_(True)
        with ReluMode():
            ref = torch.autograd.grad(net(xi).gather(1, t[:, None]).sum(), xi)[0]
        xi = x.clone().requires_grad_(True)
        score = net(xi).gather(1, t[:, None]).sum()
        assert guide_relus(score) == relus  # every ReLU, module or functional, in place or not
        ours = torch.autograd.grad(score, xi)[0]
        assert torch.allclose(ours, ref, rtol=1e-6, atol=0), arch
        assert torch.allclose(explain(net, x, methods="gbp", targets=t, raw=True)["gbp"], ref, rtol=1e-6, atol=0)
        plain = explain(net, x, methods="grad", targets=t, raw=True)["grad"]
        assert not torch.allclose(ours, plain, rtol=0.1)


def test_guided_backprop_refuses_a_network_without_relus():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="needs ReLUs"):
        explain(net, images(1), methods="gbp", targets=[0])


def test_chunks_are_balanced_and_fixed_when_compiled():
    from saliency_trust.saliency.engine import GradientEngine

    eng = GradientEngine(tiny(), max_rows=64)
    assert eng.chunk_rows(400) == 58  # 7 chunks of <= 58 rows, not 6 x 64 + 16
    assert eng.chunk_rows(128) == 64 and eng.chunk_rows(16) == 16 and eng.chunk_rows(65) == 33
    assert GradientEngine(tiny(), max_rows=64, compile=True).chunk_rows(400) == 64


def test_segments_split_over_threads_equal_serial_segmentation():
    import numpy as np
    from saliency_trust.saliency.xrai import SegmentCache, _Pending, segment_labels

    recipe = get_recipe("quick", xrai_segment_size=64)
    hwc = images(2, size=48).permute(0, 2, 3, 1).numpy()
    serial = segment_labels(hwc[0], recipe)
    for parts in (1, 4, 6):
        assert np.array_equal(_Pending(hwc[0], recipe, parts).result(), serial), parts
    cache = SegmentCache()
    cache.prefetch(list(hwc), recipe)  # returns at once; atoms_batch picks the running tasks up
    got = cache.atoms_batch(list(hwc), recipe, torch.device("cpu"))
    fresh = [SegmentCache().atoms(im, recipe, torch.device("cpu")) for im in hwc]
    for a, b in zip(got, fresh, strict=True):
        assert torch.equal(a.membership, b.membership) and torch.equal(a.inverse, b.inverse)
    assert cache.misses == 2 and cache.hits == 0
    cache.atoms_batch(list(hwc), recipe, torch.device("cpu"))
    assert cache.hits == 2


def test_each_modules_mode_is_restored():
    model = tiny()
    model.train()
    model.relu1.eval()  # a mixed model: model.train(was_training) would flip this one
    explain(model, images(1), methods="grad", targets=[0])
    assert model.training and model.conv1.training and not model.relu1.training


def test_segmentation_pool_works_in_a_forked_child():
    import multiprocessing as mp

    from saliency_trust.saliency.hostwork import pool

    pool("xrai-segments").submit(int).result()  # the parent's pool exists and has threads
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        assert p.apply_async(_segment_in_child).get(timeout=600) == 6


def _segment_in_child() -> int:
    from saliency_trust.saliency.xrai import _Pending

    hwc = images(1, size=32).permute(0, 2, 3, 1).numpy()[0]
    # One task: with the parent's executor it would wait forever for a thread the child lacks.
    # The timeout is a deadlock guard, not a speed check.
    return _Pending(hwc, get_recipe("quick", xrai_segment_size=32), 1).result(timeout=300).shape[0]


def test_noise_seed_is_sha256_of_the_float32_bytes_then_the_seed():
    import hashlib

    from saliency_trust.saliency.explain import image_seed

    x = images(1, size=24)[0]  # float64: hashed as float32, [C, H, W] order
    ref = hashlib.sha256(x.float().numpy().tobytes() + b"7").digest()
    assert image_seed(x, 7) == int.from_bytes(ref[:8], "little") & (2**63 - 1)
    ref = hashlib.sha256(x.float().numpy().tobytes() + b"7|abc").digest()
    assert image_seed(x, 7, "abc") == int.from_bytes(ref[:8], "little") & (2**63 - 1)


def test_weights_fingerprint_is_a_sha256_of_the_state_and_follows_in_place_changes():
    import hashlib

    from saliency_trust.saliency.hostwork import weights_fingerprint

    model = tiny()
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode() + t.contiguous().numpy().tobytes())
    assert weights_fingerprint(model) == h.hexdigest()
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    assert weights_fingerprint(twin) == weights_fingerprint(model)
    with torch.no_grad():
        next(twin.parameters()).add_(1e-3)  # in place: the cached fingerprint must not be reused
    assert weights_fingerprint(twin) != weights_fingerprint(model)


def test_smoothgrad_noise_depends_on_the_model_weights_not_only_the_image(monkeypatch):
    """Identical weights: identical noise and maps. Different weights: different noise (checked on the noise)."""
    import sys

    ex = sys.modules["saliency_trust.saliency.explain"]
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        noise = orig(*args, **kwargs)
        drawn.append(noise.clone())
        return noise

    orig = ex.smoothing_noise
    monkeypatch.setattr(ex, "smoothing_noise", recording)
    a, x = tiny(), images(2, size=16)
    twin = tiny()
    twin.load_state_dict(a.state_dict())
    other = tiny(seed=5)
    kw = {"methods": ["sg", "sig"], "targets": [0, 1], "preset": "quick", "raw": True}
    maps_a = explain(a, x, **kw)
    noise_a = list(drawn)
    drawn.clear()
    maps_twin = explain(twin, x, **kw)
    noise_twin = list(drawn)
    drawn.clear()
    explain(other, x, **kw)
    noise_other = list(drawn)
    assert len(noise_a) == len(noise_other) == 4  # SG and SIG, two images each
    assert all(torch.equal(p, q) for p, q in zip(noise_a, noise_twin, strict=True))
    assert all(torch.equal(maps_a[m], maps_twin[m]) for m in kw["methods"])
    assert not any(torch.equal(p, q) for p, q in zip(noise_a, noise_other, strict=True))
    # Batched equals per image, with the model's key in the seed.
    one = explain(a, x[1:], methods=["sg"], targets=[1], preset="quick", raw=True)["sg"]
    assert torch.equal(one[0], maps_a["sg"][1])


def test_hashes_on_threads_equal_serial_hashes_and_keys_agree():
    from saliency_trust.saliency.hostwork import content_hash, content_hashes
    from saliency_trust.saliency.xrai import SegmentCache

    x = images(5, size=24)
    threaded = [h.hexdigest() for h in content_hashes(x)]
    assert threaded == [content_hash(im).hexdigest() for im in x]
    assert len(set(threaded)) == 5
    recipe = get_recipe("quick")
    hwc = x.permute(0, 2, 3, 1).numpy()
    assert SegmentCache.key(hwc[2], recipe) == SegmentCache.key_from(content_hash(x[2]), recipe)
    assert SegmentCache.key(hwc[2], recipe) != SegmentCache.key(hwc[2], get_recipe("quick", xrai_dilation=3))


def test_each_image_is_hashed_once_per_call(monkeypatch):
    from saliency_trust.saliency import hostwork

    calls = []

    def counting(image, _orig=hostwork.content_hash):
        calls.append(1)
        return _orig(image)

    monkeypatch.setattr(hostwork, "content_hash", counting)
    x = images(3, size=32)
    out = explain(tiny(), x, methods=["sg", "sig", "xrai"], preset="quick", targets=[0, 1, 0])
    assert len(calls) == 3  # SG's and SIG's seeds and XRAI's keys all come from one hash per image
    monkeypatch.undo()
    again = explain(tiny(), x, methods=["sg", "sig", "xrai"], preset="quick", targets=[0, 1, 0])
    for m in out:
        assert torch.equal(out[m], again[m]), m


def test_uncollected_segmentations_are_bounded_by_the_cache_capacity():
    from saliency_trust.saliency.xrai import SegmentCache

    recipe = get_recipe("quick", xrai_segment_size=32, xrai_scales=(50,))
    cache = SegmentCache(capacity=2)
    hwc = list(images(3, size=32).permute(0, 2, 3, 1).numpy())
    keys = cache.prefetch(hwc, recipe)  # never collected
    assert list(cache._pending) == keys[1:]
    atoms = cache.atoms(hwc[2], recipe, torch.device("cpu"))  # still picked up when asked for
    assert cache.misses == 1 and atoms.inverse.numel() == 32 * 32 and len(cache._pending) == 1


def test_segments_of_a_batch_start_together_when_keys_are_given(monkeypatch):
    from saliency_trust.saliency import xrai
    from saliency_trust.saliency.xrai import SegmentCache

    recipe = get_recipe("quick", xrai_segment_size=32, xrai_scales=(50,))
    hwc = list(images(3, size=32).permute(0, 2, 3, 1).numpy())
    cache = SegmentCache()
    keys = [cache.key(im, recipe) for im in hwc]
    started = []
    monkeypatch.setattr(cache, "atoms", lambda im, r, d, key=None: started.append(len(cache._pending)) or key)
    assert cache.atoms_batch(hwc, recipe, torch.device("cpu"), keys) == keys
    assert started[0] == 3  # all three images were segmenting before the first was collected
    assert isinstance(next(iter(cache._pending.values())), xrai._Pending)
