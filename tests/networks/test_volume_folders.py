"""Model folders of 3-D networks: ``input.size`` ``[D, H, W]`` with its HU window and spacing, each bad volume
field refused by name, the 5-D probe, the input mapping and resize of volumes, the family defaults of MONAI's
3-D DenseNet121, ResNet and EfficientNetBN checked on the real networks, a 3-D localizer, the Explainer on
volumes, and the manifest training writes for a volume model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from saliency_trust.data.volumes import resample_volume
from saliency_trust.explainer import Explainer
from saliency_trust.networks import ManifestError, ModelFolder, randomization_states
from saliency_trust.networks.manifest import write_training_manifest
from saliency_trust.saliency import explain

#: A narrow MONAI DenseNet121 (the 121-layer topology, fewer channels: fast on a CPU), 3-D, one channel.
DN3 = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
       "init_features": 8, "growth_rate": 4}
VOLUME_INPUT = {"size": [32, 32, 32], "channels": 1, "normalization": {"range": [-1.0, 1.0]},
                "window_hu": [-1000.0, 400.0], "spacing_mm": [8.0, 12.5, 12.5]}


def _manifest(**changes) -> dict:
    m = {"schema_version": 1, "name": "ct densenet", "network": dict(DN3), "weights": "w.pt",
         "input": copy.deepcopy(VOLUME_INPUT), "classes": ["no nodule", "nodule"], "finding_class": 1}
    m.update(changes)
    return m


def _folder(root: Path, manifest: dict, name: str = "m") -> Path:
    """A model folder with ``manifest`` and weights of its network (seed 0)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = ModelFolder(folder, manifest)._construct()
    for f in [manifest["weights"]] if "weights" in manifest else manifest["replicates"].values():
        torch.save(net.state_dict(), folder / f)
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


def test_a_volume_manifest_loads_with_its_grid_window_and_spacing(tmp_path):
    folder = ModelFolder.open(_folder(tmp_path, _manifest()))
    assert folder.is_volume and folder.spatial_dims == 3 and folder.input_size == (32, 32, 32)
    assert folder.window_hu == (-1000.0, 400.0) and folder.spacing_mm == (8.0, 12.5, 12.5)
    with pytest.raises(ManifestError, match=r"a volume model \(input.size \[32, 32, 32\]\) has no square image size"):
        _ = folder.image_size
    net = folder.load()  # the probe is a [2, 1, 32, 32, 32] volume
    assert folder.spec(net)["cam_layer"] == "class_layers.relu" and folder.unavailable(net) == {}
    v = torch.rand(2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    x = folder.to_input(v)
    assert x.shape == (2, 1, 32, 32, 32)
    torch.testing.assert_close(x[:, 0], v * 2 - 1)
    torch.testing.assert_close(folder.to_input(v[:, None]), x)
    # network_input resamples another grid as the volume readers do, then maps it.
    other = torch.rand(1, 40, 36, 30, generator=torch.Generator().manual_seed(2))
    want = resample_volume(other[0].numpy(), (32, 32, 32))[0]
    np.testing.assert_allclose(folder.network_input(other)[0, 0].numpy(), want * 2 - 1, rtol=0, atol=1e-6)
    assert folder.network_input(other, size=(36, 40, 40)).shape == (1, 1, 36, 40, 40)
    for bad in (v[0], v[:, :8, 0]):  # one volume without the batch axis; a 2-D batch
        with pytest.raises(ValueError, match=r"expected volumes \[B, D, H, W\]"):
            folder.to_input(bad)
    # A 2-D folder is unchanged: its size is an int, input_size a square.
    flat = {**_manifest(), "network": {**DN3, "spatial_dims": 2},
            "input": {"size": 64, "channels": 1, "normalization": {"range": [-1.0, 1.0]}}}
    two = ModelFolder.open(_folder(tmp_path, flat, "flat"))
    assert not two.is_volume and two.image_size == 64 and two.input_size == (64, 64) and two.window_hu is None


def _with_input(**changes) -> dict:
    m = _manifest()
    for k, v in changes.items():
        if v is None:
            del m["input"][k]
        else:
            m["input"][k] = v
    return m


BAD_VOLUME = {
    "window on a 2-D model": (_with_input(size=64), "field 'input.window_hu' is for volume models"),
    "spacing on a 2-D model": (_with_input(size=64, window_hu=None), "field 'input.spacing_mm' is for volume models"),
    "no window": (_with_input(window_hu=None), "field 'input.window_hu' is required for a volume model"),
    "empty window": (_with_input(window_hu=[400, -1000]), "field 'input.window_hu' is [400, -1000]; it needs lo < hi"),
    "zero spacing": (_with_input(spacing_mm=[8, 0, 12.5]), "every spacing must be positive"),
    "two sizes": (_with_input(size=[32, 32]), "field 'input.size'"),
    "thin volume": (_with_input(size=[4, 32, 32]), "field 'input.size.0'"),
    "window of three": (_with_input(window_hu=[-1000, 0, 400]), "field 'input.window_hu'"),
    "spacing of two": (_with_input(spacing_mm=[1, 1]), "field 'input.spacing_mm'"),
    "too small for the network": (_with_input(size=[16, 32, 32]),
                                  "the network fails on a [2, 1, 16, 32, 32] input (fields 'input.size'"),
}


@pytest.mark.parametrize("case", sorted(BAD_VOLUME))
def test_each_bad_volume_field_is_refused_with_its_name(tmp_path, case):
    manifest, words = BAD_VOLUME[case]
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({}, folder / "w.pt")
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="model.json") as err:
        ModelFolder.open(folder).build()
    assert words in str(err.value), str(err.value)


#: Family -> (network spec, Grad-CAM layer, randomization block names head first, verdict block, GBP available).
FAMILIES_3D = {
    "MONAI DenseNet121 3-D": (DN3, "class_layers.relu",
                              ["logits", "denseblock4", "transition3", "denseblock3", "transition2", "denseblock2",
                               "transition1", "denseblock1", "conv0"], "transition1", True),
    "MONAI ResNet 3-D": ({"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
                          "block_inplanes": [8, 16, 32, 64], "spatial_dims": 3, "n_input_channels": 1,
                          "num_classes": 2}, "layer4", ["logits", "layer4", "layer3", "layer2", "layer1", "conv1"],
                         "layer2", True),
    "MONAI EfficientNetBN 3-D": ({"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0",
                                  "spatial_dims": 3, "in_channels": 1, "num_classes": 2, "pretrained": False},
                                 "_swish", ["logits", "head", *[f"_blocks.{k}" for k in range(6, -1, -1)], "stem"],
                                 "_blocks.1", False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES_3D))
def test_family_defaults_on_real_3d_networks(tmp_path, family):
    spec, cam, names, verdict, relu = FAMILIES_3D[family]
    # 64 x 64 across: a DenseNet121 or an EfficientNet divides by 32, so Grad-CAM has a 1 x 2 x 2 grid (a 32^3
    # volume would leave one cell, a constant map by construction).
    grid = [32, 64, 64]
    folder = ModelFolder.open(_folder(tmp_path, _manifest(network=spec, input={**VOLUME_INPUT, "size": grid})))
    net = folder.load()
    assert type(net).__module__.startswith("monai.networks.nets")
    assert folder.spec(net)["cam_layer"] == cam and cam in dict(net.named_modules())
    blocks = folder.randomization_blocks(net)
    assert [b for b, _ in blocks] == names
    # The paper's depth: the stem and the first block are never randomized (verdict_keep 2).
    assert folder.verdict_block(net) == verdict == names[-3]
    modules = dict(net.named_modules())
    flat = [m for _, ms in blocks for m in ms]
    assert len(flat) == len(set(flat)) and all(any(p.numel() for p in modules[m].parameters()) for m in flat)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for k, (name, state) in enumerate(randomization_states(net, blocks[:3], seed=3)):
        changed = {n for n, v in state.state_dict().items() if v.dtype.is_floating_point
                   and not torch.equal(v, before[n])}
        done = tuple(m for _, ms in blocks[: k + 1] for m in ms)
        assert changed and all(n.startswith(tuple(f"{m}." for m in done)) for n in changed), name
    # Grad-CAM through the family's 3-D layer is a volume and not blank; GBP only where there are ReLUs.
    gone = folder.unavailable(net)
    assert set(gone) == (set() if relu else {"gbp", "ggcam"})
    x = folder.to_input(torch.rand(2, *grid, generator=torch.Generator().manual_seed(0)))
    maps = explain(net, x, [m for m in ("grad", "gradcam", "gbp") if m not in gone], preset="quick",
                   **folder.explain_settings(net))
    for m, v in maps.items():
        assert v.shape == (2, *grid) and torch.isfinite(v).all() and float(v.std()) > 0, m


def test_a_3d_localizer_and_its_probe(tmp_path):
    unet = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
            "channels": [4, 8], "strides": [2], "num_res_units": 0}
    manifest = {k: v for k, v in _manifest(network=unet, kind="localizer").items()
                if k not in ("classes", "finding_class")}
    folder = ModelFolder.open(_folder(tmp_path, manifest))
    net = folder.load()
    with torch.no_grad():
        assert net(folder.to_input(torch.zeros(1, 32, 32, 32))).shape == (1, 1, 32, 32, 32)
    # The same U-Net as a classifier is refused by its output shape.
    wrong = _folder(tmp_path, {**_manifest(network=unet), "cam_layer": "model",
                               "randomization_blocks": [{"name": "all", "modules": ["model"]}]}, "wrong")
    with pytest.raises(ManifestError, match=r"returns \[2, 1, 32, 32, 32\] for a batch of 2, expected \[2, 2\]"):
        ModelFolder.open(wrong).load()


def test_the_explainer_on_volumes(tmp_path):
    folder = ModelFolder.open(_folder(tmp_path, _manifest()))
    bound = Explainer(folder, folder.load(), 0)
    v = torch.rand(2, 32, 32, 32, generator=torch.Generator().manual_seed(4))
    maps = bound(v, ["grad", "gradcam"], preset="quick")
    long_way = explain(bound.net, folder.to_input(v), ["grad", "gradcam"], preset="quick",
                       **folder.explain_settings(bound.net))
    for m in maps:
        assert maps[m].shape == (2, 32, 32, 32) and float(maps[m].min()) >= 0 and float(maps[m].max()) <= 1
        torch.testing.assert_close(maps[m], long_way[m])
    # One volume on another grid: the maps come back on its grid (resampled as the readers resample).
    other = torch.rand(36, 40, 40, generator=torch.Generator().manual_seed(5))
    one = bound(other.numpy(), "grad", preset="quick")["grad"]
    net_grid = bound(other, "grad", preset="quick", grid="network")["grad"]
    assert one.shape == (1, 36, 40, 40) and net_grid.shape == (1, 32, 32, 32)
    np.testing.assert_allclose(one[0].numpy(), np.clip(resample_volume(net_grid[0].numpy(), (36, 40, 40))[0], 0, 1),
                               rtol=0, atol=1e-6)
    assert bound.probabilities(v).shape == (2, 2)
    with pytest.raises(ValueError, match=r"\[D, H, W\], \[B, D, H, W\] or \[B, 1, D, H, W\] volumes"):
        bound(torch.rand(32, 32), "grad")


def test_training_writes_a_volume_manifest(tmp_path):
    folder = tmp_path / "densenet121_3d"
    folder.mkdir()
    for k in (0, 1):
        torch.manual_seed(k)
        torch.save(ModelFolder(folder, _manifest())._construct().state_dict(), folder / f"seed{k}.pt")
        write_training_manifest(folder, "densenet121_3d", k, VOLUME_INPUT["size"], task="nodule", network=DN3,
                                input_spec=VOLUME_INPUT)
    opened = ModelFolder.open(folder)
    assert opened.is_volume and opened.network == DN3 and list(opened.replicates) == [0, 1]
    assert opened.task == "nodule" and opened.window_hu == (-1000.0, 400.0)
    opened.load(1)
    with pytest.raises(ManifestError, match="training would write an invalid manifest: field 'input.size'"):
        write_training_manifest(folder, "densenet121_3d", 2, [32, 32], task="nodule", network=DN3,
                                input_spec={**VOLUME_INPUT, "size": [32, 32]})
    with pytest.raises(ValueError, match="give both network and input_spec"):
        write_training_manifest(folder, "x", 0, 64, task=None, network=DN3)


def test_guided_backprop_through_monai_resnet_3d_inplace_relus_equals_captum():
    """MONAI's 3-D ResNet applies in-place ReLU modules (the second architecture of the CT study): the guided
    gradient through them is Captum's GuidedBackprop on the same network, not the plain gradient."""
    captum = pytest.importorskip("captum.attr")
    from monai.networks.nets import ResNet

    torch.manual_seed(0)
    net = ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 32], spatial_dims=3, n_input_channels=1, num_classes=2,
                 conv1_t_size=3, conv1_t_stride=2).double().eval()
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in net.modules())
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = net(x).argmax(1)
    ours = explain(net, x, ["gbp"], targets=target, raw=True, cam_layer="layer4")["gbp"]
    ref = captum.GuidedBackprop(net).attribute(x.clone().requires_grad_(True), target=target).detach()
    plain = explain(net, x, ["grad"], targets=target, raw=True, cam_layer="layer4")["grad"]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ours, plain)
