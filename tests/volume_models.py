"""Small real inputs for the volume tests: a SynthCT case and a folder of tiny untrained 3-D MONAI DenseNets.

The networks are not trained (training is not what these tests check); their batch-norm statistics are
taken from a few SynthCT volumes (one forward pass in training mode, cumulative averages) so that their
outputs and maps depend on the input, as a trained network's do. A freshly initialized tiny DenseNet
without that has all-negative features before its last ReLU: a constant output and blank maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: The networks' input: [D, H, W] voxels, the HU window, and the spacing their SynthCT volumes had.
NETWORK_SIZE = (32, 32, 32)
WINDOW_HU = (-1000.0, 400.0)
#: The CT the tests explain: SynthCT's geometry at this size (256 / 16, 400 / 32, 400 / 32 mm).
CT_SIZE = (16, 32, 32)
NETWORK = {"_target_": "monai.networks.nets.DenseNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
           "init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1], "bn_size": 2}


def ct_case(index: int = 0, positive: bool = True):
    """A SynthCT nodule case at :data:`CT_SIZE` (HU int16, geometry, lesion mask)."""
    from saliency_trust.data.synthct import render_ct

    return render_ct("nodule", index, CT_SIZE, positive=positive)


def make_ct_models(root: str | Path, replicates: tuple[int, ...] = (0, 1), name: str = "ct3d") -> Path:
    """A model folder ``root/name`` with tiny 3-D DenseNet replicates (``seed<k>.pt``) and its ``model.json``
    (input ``[D, H, W]``, ``window_hu``, ``spacing_mm``; Grad-CAM on ``features.denseblock2``, a 4^3 map)."""
    import torch
    from monai.networks.nets import DenseNet
    from saliency_trust.data.volumes import resample_volume, window_hu

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    volumes = []
    for i in range(4):
        case = ct_case(10 + i, positive=bool(i % 2))
        resampled, spacing = resample_volume(case.hu, NETWORK_SIZE, case.geometry.spacing)
        volumes.append(window_hu(resampled, WINDOW_HU) * 2.0 - 1.0)  # the [-1, 1] range of the manifest
    calibration = torch.from_numpy(np.stack(volumes))[:, None]
    for k in replicates:
        torch.manual_seed(1000 + k)
        net = DenseNet(**{key: (tuple(v) if isinstance(v, list) else v) for key, v in NETWORK.items()
                          if key != "_target_"})
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # a cumulative average over the calibration batch
        net.train()
        with torch.no_grad():
            net(calibration)
        torch.save(net.state_dict(), folder / f"seed{k}.pt")
    manifest = {
        "schema_version": 1, "name": f"{name} (nodule)", "kind": "classifier", "network": NETWORK,
        "replicates": {str(k): f"seed{k}.pt" for k in replicates},
        "input": {"size": list(NETWORK_SIZE), "channels": 1, "normalization": {"range": [-1.0, 1.0]},
                  "window_hu": list(WINDOW_HU), "spacing_mm": [float(s) for s in spacing]},
        "classes": ["no nodule", "nodule"], "finding_class": 1, "task": "nodule",
        "cam_layer": "features.denseblock2", "cam_post_relu": False,
        "training": {"note": "untrained: batch-norm statistics from four SynthCT volumes (tests)"}}
    (folder / "model.json").write_text(json.dumps(manifest, indent=2))
    return folder


def make_2d_model(root: str | Path, name: str = "tiny2d") -> Path:
    """A model folder ``root/name`` with one tiny untrained 2-D MONAI DenseNet (64 px): a model of the other kind."""
    import torch
    from monai.networks.nets import DenseNet

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**NETWORK, "spatial_dims": 2}
    torch.manual_seed(7)
    torch.save(DenseNet(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "_target_"})
               .state_dict(), folder / "seed0.pt")
    (folder / "model.json").write_text(json.dumps({
        "schema_version": 1, "network": spec, "replicates": {"0": "seed0.pt"},
        "input": {"size": 64, "channels": 1, "normalization": {"range": [-1.0, 1.0]}},
        "classes": ["no finding", "opacity"], "cam_layer": "features.denseblock2", "cam_post_relu": False}))
    return folder
