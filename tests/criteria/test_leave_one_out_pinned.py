"""``leave_one_out_priors`` pinned on a hand-written stack, and against a plain loop over images and pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency_trust.criteria.baselines import average_mask_prior, leave_one_out_priors

# Four 3 x 4 masks, written out.
MASKS = torch.tensor([
    [[1, 1, 0, 0],
     [1, 1, 0, 0],
     [0, 0, 0, 0]],
    [[0, 1, 1, 0],
     [0, 1, 1, 0],
     [0, 0, 0, 0]],
    [[0, 0, 0, 0],
     [0, 1, 1, 1],
     [0, 1, 1, 1]],
    [[0, 0, 0, 0],
     [0, 0, 0, 0],
     [0, 0, 0, 0]],  # an image without a lesion still has a prior: the mean of the other three
], dtype=torch.uint8)

# Image i's prior: how many of the *other three* masks cover each pixel, divided by 3 (computed by hand).
EXPECTED_COUNTS = [
    [[0, 1, 1, 0],
     [0, 2, 2, 1],
     [0, 1, 1, 1]],
    [[1, 1, 0, 0],
     [1, 2, 1, 1],
     [0, 1, 1, 1]],
    [[1, 2, 1, 0],
     [1, 2, 1, 0],
     [0, 0, 0, 0]],
    [[1, 2, 1, 0],
     [1, 3, 2, 1],
     [0, 1, 1, 1]],
]
EXPECTED = torch.tensor(EXPECTED_COUNTS, dtype=torch.float64) / 3


def _loop_priors(masks: np.ndarray) -> np.ndarray:
    """The definition, one image and one pixel at a time: the mean over the other images' masks."""
    n, h, w = masks.shape
    out = np.empty((n, h, w))
    for i in range(n):
        for y in range(h):
            for x in range(w):
                out[i, y, x] = sum(float(masks[j, y, x]) for j in range(n) if j != i) / (n - 1)
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32], ids=["uint8", "bool", "float32"])
def test_leave_one_out_priors_pinned(dtype):
    masks = MASKS.to(dtype)
    before = masks.clone()
    priors = leave_one_out_priors(masks)
    assert priors.dtype == torch.float64 and priors.shape == (4, 3, 4)
    assert torch.equal(priors, EXPECTED)  # integer counts / 3: both sides round the same quotient
    assert torch.equal(masks, before)  # the input is not modified
    # literally, a few values
    assert priors[3, 1, 1].item() == 1.0 and priors[0, 0, 0].item() == 0.0 and priors[2, 0, 1].item() == 2 / 3
    # the priors average back to the average-mask prior of the whole stack
    assert torch.allclose(priors.mean(0), average_mask_prior(masks), rtol=0, atol=1e-15)


def test_two_masks_each_prior_is_the_other_mask():
    a = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=torch.bool)
    priors = leave_one_out_priors(a)
    assert torch.equal(priors, torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64))


def test_leave_one_out_priors_equal_the_loop_definition():
    rng = np.random.default_rng(5)
    stack = (rng.random((7, 9, 11)) < 0.35).astype(np.uint8)
    stack[2] = 0  # an empty mask
    stack[4] = 1  # a full one
    priors = leave_one_out_priors(torch.from_numpy(stack)).numpy()
    np.testing.assert_allclose(priors, _loop_priors(stack), rtol=0, atol=1e-15)
    np.testing.assert_allclose(_loop_priors(MASKS.numpy()), EXPECTED.numpy(), rtol=0, atol=1e-15)
    soft = rng.random((5, 4, 6))  # soft (resampled) masks in [0, 1]: the same definition
    np.testing.assert_allclose(leave_one_out_priors(torch.from_numpy(soft)).numpy(), _loop_priors(soft),
                               rtol=0, atol=1e-14)


def test_a_single_mask_has_no_leave_one_out_prior():
    with pytest.raises(ValueError):
        leave_one_out_priors(MASKS[:1])
