"""Explaining through a model folder in one call (``saliency_trust.explainer``): the same maps as the long way
(the folder's input mapping by hand, then ``explain`` with its settings), on small real networks built here,
one of them ImageNet-normalized; the paper's [-1, 1] input given to that model is a different input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from saliency_trust.data.groundtruth import resize_image
from saliency_trust.explainer import Explainer, explainer
from saliency_trust.networks import ManifestError, ModelFolder, randomization_states, to_network_input
from saliency_trust.saliency import explain
from torch import nn

METHODS = ["grad", "ig", "gradcam", "gbp", "ggcam"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyCNN(nn.Module):
    """Two conv blocks and a linear head: a real network that runs in milliseconds."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, act: str = "relu") -> None:
        super().__init__()
        make = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), make(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), make())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _folder(tmp_path: Path, *, normalization: dict | None = None, channels: int = 3, act: str = "relu",
            size: int = 32, name: str = "tiny") -> ModelFolder:
    """A model folder of two TinyCNN replicates (fixed seeds) and its model.json."""
    folder = tmp_path / name
    folder.mkdir()
    for k in (0, 1):
        torch.manual_seed(k)
        torch.save(TinyCNN(channels, act=act).state_dict(), folder / f"r{k}.pt")
    manifest = {"schema_version": 1, "name": "tiny", "replicates": {"0": "r0.pt", "1": "r1.pt"},
                "network": {"_target_": f"{__name__}.TinyCNN", "in_channels": channels, "act": act},
                "input": {"size": size, "channels": channels,
                          "normalization": normalization or {"preset": "imagenet"}},
                "classes": ["normal", "finding"], "finding_class": 1, "cam_layer": "features",
                "randomization_blocks": [{"name": "logits", "modules": ["fc"]},
                                         {"name": "conv2", "modules": ["features.3"]},
                                         {"name": "conv1", "modules": ["features.0"]}]}
    (folder / "model.json").write_text(json.dumps(manifest))
    return ModelFolder.open(folder)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def _long_way(folder: ModelFolder, net: nn.Module, images01: torch.Tensor, methods: list[str], **kw) -> dict:
    """What a user writes without the explainer: the folder's mapping, then explain with its settings."""
    return explain(net, folder.to_input(images01), methods, **{**folder.explain_settings(net), **kw})


def test_an_imagenet_normalized_folder_gets_imagenet_input_and_the_long_way_maps(tmp_path):
    folder = _folder(tmp_path)
    e = explainer(folder, 1, device="cpu")
    images = _images(3, 32)
    # The input: ImageNet mean/std per channel (torchvision's own formula), not the paper's [-1, 1].
    want = (images[:, None].expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = e.network_input(images)
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)
    assert (x - to_network_input(images)).abs().max() > 0.5  # what the paper's mapping would have fed it
    maps = e(images, METHODS, preset="quick", seed=3)
    net = folder.load(1)
    long = _long_way(folder, net, images, METHODS, preset="quick", seed=3)
    assert set(maps) == set(METHODS)
    for m in METHODS:
        assert maps[m].shape == (3, 32, 32)
        torch.testing.assert_close(maps[m], long[m], rtol=0, atol=0)
    # IG's baseline is black in the network's scale: -mean/std per channel, from the folder.
    assert e.settings["ig_baseline"] == pytest.approx(tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD,
                                                                                  strict=True)))
    wrong = explain(net, to_network_input(images), ["grad"], preset="quick", seed=3, cam_layer="features")
    assert not torch.allclose(wrong["grad"], maps["grad"])


def test_images_of_another_size_are_resized_in_and_the_maps_out(tmp_path):
    """48 px images for a 32 px model: resized as the readers resize, explained, the maps back on 48 px."""
    folder = _folder(tmp_path, normalization={"range": [-1.0, 1.0]}, channels=1)
    e = explainer(folder, device="cpu")
    images = _images(2, 48, seed=1)
    at32 = torch.from_numpy(np.stack([resize_image(i.numpy(), (32, 32)) for i in images]))
    torch.testing.assert_close(e.network_input(images)[:, 0], at32 * 2 - 1, rtol=0, atol=1e-6)
    maps = e(images.numpy(), ["grad", "gradcam"], preset="quick")
    long = _long_way(folder, folder.load(0), at32, ["grad", "gradcam"], preset="quick")
    for m in ("grad", "gradcam"):
        back = np.stack([np.clip(resize_image(v.numpy(), (48, 48)), 0, 1) for v in long[m]])
        assert maps[m].shape == (2, 48, 48)
        np.testing.assert_allclose(maps[m].numpy(), back, rtol=0, atol=1e-6)
    on_network = e(images, ["grad"], preset="quick", grid="network")["grad"]
    torch.testing.assert_close(on_network, long["grad"], rtol=0, atol=1e-6)
    one = e(images[0].numpy(), ["grad"], preset="quick")["grad"]  # a single [H, W] image
    torch.testing.assert_close(one, maps["grad"][:1], rtol=0, atol=1e-6)


def test_targets_the_finding_class_a_given_class_or_the_prediction(tmp_path):
    folder = _folder(tmp_path)
    e = explainer(folder, device="cpu")
    images = _images(4, 32, seed=2)
    predicted = e.probabilities(images).argmax(1)
    net = folder.load(0)
    for target, classes in (("predicted", predicted), ("finding", torch.ones(4, dtype=torch.long)),
                            (0, torch.zeros(4, dtype=torch.long)), (1 - predicted, 1 - predicted)):
        maps = e(images, ["grad", "gradcam"], target=target, preset="quick")
        long = _long_way(folder, net, images, ["grad", "gradcam"], targets=classes, preset="quick")
        for m in maps:
            torch.testing.assert_close(maps[m], long[m], rtol=0, atol=0)
    with pytest.raises(ValueError, match="target must be one of"):
        e(images, ["grad"], target="largest")


def test_a_randomized_state_is_explained_with_the_same_mapping_and_settings(tmp_path):
    folder = _folder(tmp_path)
    e = explainer(folder, device="cpu")
    images = _images(2, 32, seed=4)
    name, state = next(iter(randomization_states(e.net, folder.randomization_blocks(e.net), seed=1)))
    assert name == "logits"
    maps = e.with_network(state)(images, ["grad", "gradcam"], preset="quick")
    long = _long_way(folder, state, images, ["grad", "gradcam"], preset="quick")
    for m in maps:
        torch.testing.assert_close(maps[m], long[m], rtol=0, atol=0)
    assert not torch.equal(maps["grad"], e(images, ["grad"], preset="quick")["grad"])


def test_methods_a_network_cannot_give_are_left_out_or_refused_with_the_reason(tmp_path):
    e = explainer(_folder(tmp_path, act="silu"), device="cpu")
    assert set(e.unavailable) == {"gbp", "ggcam"}
    assert "gbp" not in e.methods() and "grad" in e.methods()
    with pytest.raises(ValueError, match="guided backprop is defined for ReLU networks"):
        e(_images(1, 32), ["grad", "gbp"], preset="quick")


def test_only_a_checked_classifier_is_bound(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(ManifestError, match="returns"):
        Explainer(folder, TinyCNN(3, num_classes=3))  # three outputs for a two-class manifest
    unet = tmp_path / "unet"
    unet.mkdir()
    torch.save({}, unet / "unet_seed0.pt")
    with pytest.raises(ManifestError, match="a localizer, not a classifier"):
        explainer(unet, device="cpu")
