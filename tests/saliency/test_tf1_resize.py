"""Grad-CAM's ``cam_resize="tf1_legacy"`` against real TensorFlow.

The golden file holds outputs of TensorFlow's ``tf.compat.v1.image.resize_bilinear`` with
``align_corners=False, half_pixel_centers=False`` (the TF1 default the paper's PAIR Grad-CAM used),
written once by ``golden/make_tf1_resize_golden.py`` in a throwaway virtualenv; TensorFlow is not a
dependency of the project.

Tolerance: 1e-6 absolute, on inputs in [0, 1). TensorFlow's kernel casts to float32 and computes the
source coordinate, the lerp weights and both lerps in float32 whatever the input dtype, so its
output is exact only to a few float32 ulps (eps = 1.19e-7 at 1.0); the largest difference measured
over all cases, with the engine in float64 or float32, is 3.6e-7 (3 ulps). 1e-6 (8 ulps) is above
that and five orders of magnitude below the nearest wrong resize (half-pixel centres: >= 0.1 off on
every case), which the test also checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from saliency_trust.saliency import explain
from saliency_trust.saliency.explain import bilinear_matrix, upsample_cam

GOLDEN = Path(__file__).with_name("golden") / "tf1_resize_golden.npz"
ATOL = 1e-6  # a few float32 ulps of TensorFlow's float32 arithmetic (see the module docstring)


def _cases() -> list[dict]:
    with np.load(GOLDEN, allow_pickle=False) as g:
        return [{"input": g[f"c{k}_input"], "size": tuple(int(s) for s in g[f"c{k}_size"]),
                 "rows": g[f"c{k}_rows"].astype(np.int64), "cols": g[f"c{k}_cols"].astype(np.int64),
                 "output": g[f"c{k}_output"]} for k in range(int(g["n_cases"]))]


CASES = _cases()
IDS = [f"{c['input'].shape[1]}x{c['input'].shape[2]}->{c['size'][0]}x{c['size'][1]}" for c in CASES]


def _engine(case: dict, mode: str, dtype: torch.dtype) -> np.ndarray:
    out = upsample_cam(torch.from_numpy(case["input"]).to(dtype), case["size"], mode)
    assert out.dtype == dtype and tuple(out.shape) == (case["input"].shape[0], *case["size"])
    return out.double().numpy()[:, case["rows"]][:, :, case["cols"]]


def test_the_golden_file_is_what_the_test_expects():
    assert len(CASES) == 10
    shapes = {(c["input"].shape[1:], c["size"]) for c in CASES}
    assert ((8, 8), (320, 320)) in shapes and ((3, 5), (7, 13)) in shapes and ((8, 8), (7, 13)) in shapes
    for c in CASES:
        assert c["input"].dtype == np.float64 and c["output"].dtype == np.float32
        assert c["output"].shape == (c["input"].shape[0], c["rows"].size, c["cols"].size)
        assert c["rows"][-1] == c["size"][0] - 1 and c["cols"][-1] == c["size"][1] - 1  # the clamped edge is kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tf1_legacy_equals_tensorflow_resize_bilinear(case, dtype):
    got = _engine(case, "tf1_legacy", dtype)
    np.testing.assert_allclose(got, case["output"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_other_resizes_do_not_match_tensorflow(case):
    """The comparison can fail: the half-pixel mode, align_corners=True and PyTorch's resize are all far off."""
    x = torch.from_numpy(case["input"])
    H, W = case["size"]
    rows, cols = case["rows"], case["cols"]
    half = _engine(case, "half_pixel", torch.float64)
    assert np.abs(half - case["output"]).max() > 0.1

    def corners(n_in: int, n_out: int) -> torch.Tensor:  # align_corners=True: i * (n_in - 1) / (n_out - 1)
        src = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = src - i0
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), i0] += 1 - frac
        m[torch.arange(n_out), i1] += frac
        return m

    aligned = (corners(x.shape[1], H) @ x @ corners(x.shape[2], W).T).numpy()[:, rows][:, :, cols]
    torch_bilinear = F.interpolate(x[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    for wrong in (aligned, torch_bilinear.numpy()[:, rows][:, :, cols]):
        assert np.abs(wrong - case["output"]).max() > 1e-2


def test_a_hand_checked_example():
    """[[0, 1], [2, 3]] to 4 x 4: TensorFlow printed exactly this (every value is dyadic, so exact in float32)."""
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]], dtype=torch.float64)
    want = torch.tensor([[0.0, 0.5, 1.0, 1.0],
                         [1.0, 1.5, 2.0, 2.0],
                         [2.0, 2.5, 3.0, 3.0],
                         [2.0, 2.5, 3.0, 3.0]], dtype=torch.float64)
    assert torch.equal(upsample_cam(x, (4, 4), "tf1_legacy")[0], want)
    # the 1-D weights: output i reads input i * 2 / 4, the upper neighbour clamped to the last row
    assert torch.equal(bilinear_matrix(2, 4, "tf1_legacy"),
                       torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))


def test_explain_gradcam_is_the_legacy_resize_of_the_cam():
    """Through the public API: raw Grad-CAM at ``cam_resize="tf1_legacy"`` is the (golden-checked) legacy
    resize of the 8 x 8 CAM, computed here with Captum and divided by its max as PAIR did."""
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=4, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    x = torch.rand(2, 1, 32, 32)
    ours = explain(net, x, ["gradcam"], targets=[0, 1], raw=True, cam_layer="1", cam_resize="tf1_legacy",
                   preset="quick")["gradcam"]
    cam = LayerGradCam(net, net[1]).attribute(x, target=[0, 1], relu_attributions=True)[:, 0].detach()
    assert cam.shape == (2, 8, 8) and bool((cam.flatten(1).max(1).values > 0).all())
    want = upsample_cam(cam / cam.flatten(1).max(1).values.view(-1, 1, 1), (32, 32), "tf1_legacy")
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    assert float((ours - upsample_cam(cam / cam.flatten(1).max(1).values.view(-1, 1, 1), (32, 32),
                                      "half_pixel")).abs().max()) > 1e-2
