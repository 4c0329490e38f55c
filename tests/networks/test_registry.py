"""Network registry: shapes, randomization blocks, local weights only."""

from __future__ import annotations

import pytest
import torch
from saliency_trust.networks import (
    CAM_LAYERS,
    get_network,
    load_weights,
    randomization_blocks,
    to_network_input,
)
from torch import nn


@pytest.mark.parametrize("name", ["inception_v3", "densenet121", "resnet50", "efficientnet_b0"])
def test_classifier_shapes(name):
    net = get_network(name, num_classes=2).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 96, 96))
    assert out.shape == (2, 2)


def test_unet_shape():
    net = get_network("unet").eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("name", ["inception_v3", "densenet121"])
def test_randomization_blocks_exist_and_cover_head_to_bottom(name):
    net = get_network(name)
    modules = dict(net.named_modules())
    blocks = randomization_blocks(name)
    assert blocks[0][0] == "logits"
    for _, members in blocks:
        for m in members:
            assert m in modules and any(p.numel() for p in modules[m].parameters()), m
    names = [b for b, _ in blocks]
    if name == "inception_v3":
        assert names[1] == "Mixed_7c" and names[-1] == "Mixed_5b" and len(names) == 12
    else:
        assert names[1] == "denseblock4" and names[-1] == "conv0" and len(names) == 9
    # Blocks are disjoint.
    flat = [m for _, ms in blocks for m in ms]
    assert len(flat) == len(set(flat))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown network"):
        get_network("vgg16")
    with pytest.raises(ValueError, match="no randomization blocks"):
        randomization_blocks("unet")
    assert set(CAM_LAYERS) == {"inception_v3", "densenet121", "resnet50", "efficientnet_b0"}


def test_local_pretrained_weights_skip_mismatched_head(tmp_path):
    src = get_network("densenet121", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pt")
    net = get_network("densenet121", num_classes=2, pretrained=tmp_path / "imagenet.pt")
    a, b = src.state_dict(), net.state_dict()
    assert torch.equal(a["features.conv0.weight"], b["features.conv0.weight"])
    assert b["classifier.weight"].shape == (2, 1024)
    # Weights whose keys do not fit (an older naming, another network) are refused, never half-loaded: a
    # "pretrained" network that is mostly random would be a silent lie in the deviations.
    renamed = {k.replace("norm1", "norm.1"): v for k, v in src.state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match="only the classification head may differ"):
        get_network("densenet121", pretrained=tmp_path / "renamed.pt")
    torch.save(get_network("resnet50", num_classes=1000).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match="do not load"):
        get_network("densenet121", pretrained=tmp_path / "resnet.pt")


def test_weights_only_refuses_pickled_objects(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "evil.pt")  # a pickled module, not tensors
    with pytest.raises(ValueError, match="evil.pt"):
        load_weights(nn.Linear(2, 2), tmp_path / "evil.pt")


def test_to_network_input_scale():
    x = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    y = to_network_input(x)
    assert y.shape == (1, 3, 2, 2) and y.min() == -1 and y.max() == 1
    assert torch.equal(y[:, 0], y[:, 2])
    with pytest.raises(ValueError):
        to_network_input(torch.zeros(2))
