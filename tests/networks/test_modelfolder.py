"""Model folders: the manifest (valid, each bad field refused by name), family defaults on four
network families, guided backprop through functional ReLUs, and a MONAI DenseNet121 trained outside
the bundle taken end to end through trust.json, inference.json, the service and the Slicer Lib."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from saliency_trust.networks import ManifestError, ModelFolder, find_models, get_network, randomization_states
from saliency_trust.saliency import explain
from torch import nn

from tests.conftest import REPO

MONAI_DN = {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}
IMAGENET_GRAY = {"size": 64, "channels": 1, "normalization": {"preset": "imagenet"}}


def _folder(tmp_path: Path, manifest: dict, net: nn.Module | None = None, name: str = "m") -> Path:
    """A model folder with ``manifest`` and the weights ``net`` (built from the manifest when None)."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    files = [manifest["weights"]] if "weights" in manifest else list(manifest.get("replicates", {}).values())
    if net is None:
        torch.manual_seed(0)  # fixed weights: a random draw can give a blank Grad-CAM (ReLU of a negative map)
        net = ModelFolder(folder, manifest)._construct()
    for f in files:
        torch.save(net.state_dict(), folder / f)
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


def _valid() -> dict:
    return {"schema_version": 1, "name": "hospital densenet", "network": MONAI_DN, "weights": "w.pt",
            "input": dict(IMAGENET_GRAY), "classes": ["normal", "pneumothorax"], "finding_class": 1,
            "task": "pneumothorax"}


def test_a_valid_manifest_loads_with_its_input_scale(tmp_path):
    folder = ModelFolder.open(_folder(tmp_path, _valid()))
    assert not folder.implied and folder.network_label == "DenseNet121" and folder.replicates == {0: folder.weights()}
    assert folder.task == "pneumothorax" and folder.image_size == 64 and folder.channels == 1
    x = torch.tensor([[[0.0, 1.0], [0.449, 0.5]]])
    np.testing.assert_allclose(folder.to_input(x)[0, 0].numpy(), ((x[0] - 0.449) / 0.226).numpy(), rtol=1e-6)
    assert folder.black() == pytest.approx(-0.449 / 0.226)
    net = folder.load()
    assert folder.spec(net)["cam_layer"] == "class_layers.relu" and folder.unavailable(net) == {}


def _drop(d: dict, *path: str) -> dict:
    d = copy.deepcopy(d)
    parent = d
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return d


def _set(d: dict, value, *path: str) -> dict:
    d = copy.deepcopy(d)
    parent = d
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return d


BAD = {
    "unknown field": (_set(_valid(), 1, "colour"), "'colour' is not a model.json field"),
    "no network": (_drop(_valid(), "network"), "field 'network' is required"),
    "unknown registry name": (_set(_valid(), "vgg16", "network"), "field 'network'"),
    "target not importable": (_set(_valid(), {"_target_": "monai.networks.nets.NoSuchNet"}, "network"),
                              "field 'network._target_' names 'monai.networks.nets.NoSuchNet'"),
    "bad target arguments": (_set(_valid(), {**MONAI_DN, "wings": 2}, "network"), "field 'network'"),
    "no input size": (_drop(_valid(), "input", "size"), "field 'input.size' is required"),
    "tiny input": (_set(_valid(), 8, "input", "size"), "field 'input.size'"),
    "channels": (_set(_valid(), 2, "input", "channels"), "field 'input.channels'"),
    "target without channels": (_drop(_valid(), "input", "channels"), "field 'input.channels' is required"),
    "two normalizations": (_set(_valid(), {"range": [0, 1], "preset": "imagenet"}, "input", "normalization"),
                           "field 'input.normalization' needs exactly one of"),
    "mean without std": (_set(_valid(), {"mean": [0.5]}, "input", "normalization"),
                         "field 'input.normalization' needs exactly one of"),
    "zero std": (_set(_valid(), {"mean": [0.5], "std": [0.0]}, "input", "normalization"),
                 "field 'input.normalization.std' has a zero"),
    "mean per channel": (_set(_valid(), {"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "input", "normalization"),
                         "field 'input.normalization.mean' has 2 values for 1 channel"),
    "weights and replicates": (_set(_valid(), {"0": "w.pt"}, "replicates"), "exactly one of the fields 'weights'"),
    "weights path escapes": (_set(_valid(), "../w.pt", "weights"), "field 'weights'"),
    "weights file absent": (_set(_valid(), {"0": "w.pt", "1": "gone.pt"}, "replicates"), "names gone.pt"),
    "one class": (_set(_valid(), ["x"], "classes"), "field 'classes'"),
    "finding class": (_set(_valid(), 2, "finding_class"), "field 'finding_class' is 2"),
    "verdict block": (_set(_set(_valid(), [{"name": "head", "modules": ["class_layers.out"]}],
                                "randomization_blocks"), "tail", "verdict_block"), "field 'verdict_block'"),
    "schema version": (_set(_valid(), 2, "schema_version"), "field 'schema_version'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_field_is_refused_with_its_name(tmp_path, case):
    manifest, words = BAD[case]
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({}, folder / "w.pt")
    if case == "weights file absent":  # replicates only, one of them missing
        manifest = _drop(manifest, "weights")
    (folder / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="model.json") as err:
        ModelFolder.open(folder).load()
    assert words in str(err.value), str(err.value)


@pytest.mark.parametrize("target", ["subprocess.run", "os.system", "builtins.exec", "torch.save", "numpy.save"])
def test_a_target_that_is_not_a_module_class_is_never_called(tmp_path, target):
    """model.json names a callable with arguments that would create a file: refused before any call (a standard
    library one before its module is even imported; torch's and NumPy's by the Module check)."""
    marker = tmp_path / "created"
    args = {"subprocess.run": {"args": ["touch", str(marker)]},
            "os.system": {"command": f"touch {marker}"},
            "builtins.exec": {"source": f"open({str(marker)!r}, 'w').close()"},
            "torch.save": {"obj": 1, "f": str(marker)},
            "numpy.save": {"file": str(marker), "arr": [1]}}[target]
    manifest = _set(_valid(), {"_target_": target, **args}, "network")
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "w.pt").write_bytes(b"")
    (folder / "model.json").write_text(json.dumps(manifest))
    for attempt in (lambda f: f.build(), lambda f: f.load()):
        with pytest.raises(ManifestError, match="not a torch.nn.Module class"):
            attempt(ModelFolder.open(folder))
    assert not marker.exists() and not (tmp_path / "created.npy").exists()
    # torchvision's registered builders and Module classes stay allowed.
    ok = _set(_valid(), {"_target_": "torchvision.models.resnet18", "num_classes": 2}, "network")
    ok["input"] = {"size": 64, "channels": 3, "normalization": {"preset": "imagenet"}}
    assert ModelFolder.open(_folder(tmp_path, ok, name="builder")).load() is not None


def test_a_standard_library_target_is_not_even_imported(tmp_path):
    """``this`` prints a poem when imported: a manifest naming it is refused before the import."""
    assert "this" not in sys.modules
    folder = _folder(tmp_path, _set(_valid(), {"_target_": "this.s"}, "network"),
                     ModelFolder(tmp_path, _valid())._construct())
    with pytest.raises(ManifestError, match="standard library; nothing was imported or called"):
        ModelFolder.open(folder).load()
    assert "this" not in sys.modules


def test_layers_and_outputs_are_checked_when_the_network_is_built(tmp_path):
    cases = {
        "cam_layer": (_set(_valid(), "features.nowhere", "cam_layer"), "field 'cam_layer' names 'features.nowhere'"),
        "blocks": (_set(_valid(), [{"name": "head", "modules": ["class_layers.fc"]}], "randomization_blocks"),
                   "block 'head' names 'class_layers.fc'"),
        "classes": (_set(_valid(), ["a", "b", "c"], "classes"), "returns [2, 2] for a batch of 2, expected [2, 3]"),
        "unknown family": (_set(_valid(), {"_target_": "torchvision.models.vgg11", "num_classes": 2}, "network"),
                           "field 'cam_layer' is required for a VGG"),
    }
    for name, (manifest, words) in cases.items():
        if name == "unknown family":
            manifest["input"] = {"size": 64, "channels": 3, "normalization": {"range": [-1, 1]}}
        folder = _folder(tmp_path, manifest, ModelFolder(tmp_path, _valid())._construct() if name != "unknown family"
                         else None, name=name)
        with pytest.raises(ManifestError) as err:
            ModelFolder.open(folder).load()
        assert words in str(err.value), (name, str(err.value))
    # A network whose output is not a [B, classes] tensor.
    manifest = {"schema_version": 1, "network": {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2,
                                                 "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                                                 "strides": [2]},
                "weights": "w.pt", "input": dict(IMAGENET_GRAY), "classes": ["a", "b"], "cam_layer": "model",
                "randomization_blocks": [{"name": "all", "modules": ["model"]}]}
    with pytest.raises(ManifestError, match=r"returns \[2, 2, 64, 64\] for a batch of 2, expected \[2, 2\]"):
        ModelFolder.open(_folder(tmp_path, manifest, name="unet")).load()


FAMILIES = {
    "torchvision ResNet-50": ({"network": "resnet50"}, "layer4", ["logits", "layer4", "layer3", "layer2", "layer1",
                                                                  "conv1"]),
    "torchvision EfficientNet-B0": ({"network": "efficientnet_b0"}, "features",
                                    ["logits", *[f"features.{k}" for k in range(8, -1, -1)]]),
    "MONAI DenseNet121": ({"network": MONAI_DN, "input": IMAGENET_GRAY}, "class_layers.relu",
                          ["logits", "denseblock4", "transition3", "denseblock3", "transition2", "denseblock2",
                           "transition1", "denseblock1", "conv0"]),
    "MONAI EfficientNet-B0": ({"network": {"_target_": "monai.networks.nets.EfficientNetBN",
                                           "model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 1,
                                           "num_classes": 2, "pretrained": False},
                               "input": {"size": 64, "channels": 1, "normalization": {"mean": [0.5], "std": [0.25]}}},
                              "_swish", ["logits", "head", *[f"_blocks.{k}" for k in range(6, -1, -1)], "stem"]),
    "InceptionV3 (ours)": ({"network": "inception_v3", "input": {"size": 96}}, "Mixed_7c", None),
    "DenseNet121 (ours)": ({"network": "densenet121"}, "features", None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_defaults_give_grad_cam_and_randomization_blocks(tmp_path, family):
    extra, cam, names = FAMILIES[family]
    manifest = {"schema_version": 1, "weights": "w.pt", "input": {"size": 64}, "classes": ["no", "yes"], **extra}
    folder = ModelFolder.open(_folder(tmp_path, manifest))
    net = folder.load()
    assert folder.spec(net)["cam_layer"] == cam
    blocks = folder.randomization_blocks(net)
    assert blocks[0][0] == "logits" and (names is None or [b for b, _ in blocks] == names)
    modules = dict(net.named_modules())
    flat = [m for _, ms in blocks for m in ms]
    assert len(flat) == len(set(flat)) and all(any(p.numel() for p in modules[m].parameters()) for m in flat)
    # Each cascading state changes exactly the parameters of the blocks randomized so far.
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for k, (name, state) in enumerate(randomization_states(net, blocks, seed=3)):
        changed = {n for n, v in state.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v,
                                                                                                          before[n])}
        done = tuple(m for _, ms in blocks[: k + 1] for m in ms)
        assert changed and all(n.startswith(tuple(f"{m}." for m in done)) for n in changed), name
    # Grad-CAM through the family's layer: a map that is not blank; guided backprop where the family has ReLUs.
    x = folder.to_input(torch.rand(2, folder.image_size, folder.image_size, generator=torch.Generator().manual_seed(0)))
    gone = folder.unavailable(net)
    assert set(gone) == ({"gbp", "ggcam"} if "EfficientNet" in family else set())
    maps = explain(net, x, [m for m in ("grad", "gradcam", "gbp") if m not in gone], preset="quick",
                   **folder.explain_settings(net))
    if "Inception" not in family:  # 96 px leaves InceptionV3 a 1 x 1 Mixed_7c map: constant by construction
        assert float(maps["gradcam"].std()) > 0
    assert float(maps["grad"].std()) > 0


class _FunctionalBottleneck(nn.Module):
    """torchvision's Bottleneck with its ReLUs as ``F.relu`` calls (no nn.ReLU left to hook)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.b = block

    def forward(self, x):
        b = self.b
        out = F.relu(b.bn1(b.conv1(x)))
        out = F.relu(b.bn2(b.conv2(out)))
        out = b.bn3(b.conv3(out))
        return F.relu(out + (b.downsample(x) if b.downsample is not None else x))


class _FunctionalResNet(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(net, name)
            for i in range(len(layer)):
                layer[i] = _FunctionalBottleneck(layer[i])

    def forward(self, x):
        n = self.net
        x = n.maxpool(F.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(torch.flatten(n.avgpool(x), 1))


def test_guided_backprop_through_functional_relus_equals_captum_on_the_module_form():
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    modules = get_network("resnet50").double().eval()
    functional = _FunctionalResNet(copy.deepcopy(modules)).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    calls = []
    relus = [m for m in functional.modules() if isinstance(m, nn.ReLU)]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in relus]
    functional(x)
    for h in hooks:
        h.remove()
    assert hooks and not calls  # no nn.ReLU module runs: module hooks (Captum's way) would see nothing
    target = modules(x).argmax(1)
    ours = explain(functional, x, ["gbp"], targets=target, raw=True)["gbp"]
    ref = captum.GuidedBackprop(modules).attribute(x.clone().requires_grad_(True), target=target)
    plain = explain(functional, x, ["grad"], targets=target, raw=True)["grad"]
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ours, plain)  # guided, not the plain gradient


def test_old_flat_folders_read_as_implied_manifests(tmp_path):
    for name in ("densenet121_seed0.pt", "densenet121_seed1.pt", "unet_seed0.pt"):
        torch.save(get_network(name.split("_seed")[0]).state_dict(), tmp_path / name)
    (tmp_path / "densenet121_seed0.metrics.json").write_text(json.dumps({"image_size": 64, "task": "pneumothorax"}))
    found = find_models(tmp_path)
    assert set(found) == {"densenet121", "unet"}
    dn = found["densenet121"]
    assert dn.implied and dn.replicates == {0: tmp_path / "densenet121_seed0.pt", 1: tmp_path / "densenet121_seed1.pt"}
    assert dn.image_size == 64 and dn.task == "pneumothorax" and dn.black() == -1.0
    assert found["unet"].kind == "localizer"
    with pytest.raises(ManifestError, match="holds several architectures"):
        ModelFolder.open(tmp_path)
    assert ModelFolder.open(tmp_path / "densenet121_seed1.pt").replicates == {1: tmp_path / "densenet121_seed1.pt"}


# ---------------------------------------------------------------------------------------------------
# A model brought from outside: MONAI DenseNet121, one input channel, ImageNet-style normalization,
# trained in plain PyTorch on SynthCXR, then through every entry point of the bundle.


def _train_outside(data: Path, folder: Path) -> None:
    """What a researcher does without our configs: read images, normalize, train, save state dicts + model.json."""
    from monai.networks.nets import DenseNet121
    from saliency_trust.data import load_dataset

    ds = load_dataset(data, image_size=64)
    train = [r for r in ds.records if r.split == "train"]
    x = torch.tensor(np.stack([r.image for r in train]))[:, None]
    y = torch.tensor([r.label for r in train])
    x = (x - 0.449) / 0.226
    folder.mkdir(parents=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for _ in range(2):
            for i in range(0, len(x), 16):
                opt.zero_grad()
                F.cross_entropy(net(x[i : i + 16]), y[i : i + 16]).backward()
                opt.step()
        torch.save(net.state_dict(), folder / f"hospital_dn121_run{seed}.pt")
    (folder / "model.json").write_text(json.dumps({
        "schema_version": 1, "name": "hospital DenseNet121", "network": MONAI_DN,
        "replicates": {"0": "hospital_dn121_run0.pt", "1": "hospital_dn121_run1.pt"},
        "input": IMAGENET_GRAY, "classes": ["no opacity", "lung opacity"], "finding_class": 1,
        "task": "lung opacity"}))


def _manual_maps(folder: Path, images01: torch.Tensor, methods: list[str], **kw) -> tuple[torch.Tensor, dict]:
    """The same weights through the Python API with every setting spelled out (no manifest involved)."""
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    net.load_state_dict(torch.load(folder / "hospital_dn121_run0.pt", weights_only=True))
    net.eval()
    # (x - mean) / std written as x * (1 / std) - mean / std, the float operations the manifest's affine
    # uses: IG moves by up to 4e-3 after post-processing when inputs differ by one float32 ulp (measured),
    # so the comparison below is about the settings, not about rounding.
    x = (images01 * (1 / 0.226) + (-0.449 / 0.226))[:, None]
    with torch.no_grad():
        probs = torch.softmax(net(x).float(), 1)
    maps = explain(net, x, methods, cam_layer="class_layers.relu", ig_baseline=-0.449 / 0.226, **kw)
    return probs, maps


# The bundle CLI in a child process, reporting at exit how many threads torch used there.
_BUNDLE_CLI = ("import atexit, runpy, sys, torch; atexit.register(lambda: print(f'child torch threads "
               "{torch.get_num_threads()}', file=sys.stderr)); runpy.run_module('monai.bundle', run_name='__main__', "
               "alter_sys=True)")


def _env() -> dict:
    """The children run on this process's thread count.

    CPU float32 kernels split their sums by thread, so the same maps computed on 1 and on 2 threads
    differ in the last bits (measured on a MONAI DenseNet121 at 64 px with random weights: up to
    1.6e-6 on the post-processed gradient map; this test's inference maps, child on 1 thread and
    parent on 2, once differed by 1.1e-4 and failed ``make test`` on a 2-core machine), while on the
    same count a child reproduces the parent's maps bit for bit (measured: 0 on the probabilities and
    every method, at 1 and at 2 threads). So the tolerances below measure settings, not thread
    scheduling. The children report the count torch really used (it can differ from
    OMP_NUM_THREADS: torch caps it at the number of cores), and the test checks it.
    """
    threads = str(torch.get_num_threads())
    return dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                PYTHONPATH=os.pathsep.join([str(REPO / "monai_bundle"), os.environ.get("PYTHONPATH", "")]))


def _child_threads(stderr: str) -> int:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("child torch threads ")]
    assert lines, stderr[-3000:]
    return int(lines[-1].split()[-1])


@pytest.mark.slow
def test_an_external_monai_densenet_end_to_end(tmp_path_factory, monkeypatch):
    from saliency_trust.data.groundtruth import resize_image
    from saliency_trust.data.imageio import read_input
    from saliency_trust.data.synth import generate
    from saliency_trust.results import load_results
    from saliency_trust.workflows.assess import run_assessment

    root = tmp_path_factory.mktemp("external")
    data = generate(root / "data", "opacity", n=48, size=64, seed=21, progress=False)
    folder = root / "hospital_model"
    _train_outside(data, folder)
    methods = ["grad", "ig", "gradcam", "gbp"]
    cfg = REPO / "monai_bundle" / "configs"
    threads = torch.get_num_threads()
    # Children that inherit this environment (the Slicer Lib's) get the same count as those given _env().
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    monkeypatch.setenv("MKL_NUM_THREADS", str(threads))
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert int(probe.stdout.strip()) == threads, probe.stdout + probe.stderr

    # trust.json with the model folder as the only classifier, against the Python API on the same folder.
    r = subprocess.run(
        [sys.executable, "-c", _BUNDLE_CLI, "run", "--config_file", str(cfg / "trust.json"),
         "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
         "--dataset_dir", str(data), "--output_dir", str(root / "trust"), "--classifiers", f"['{folder}']",
         "--localizers", "[]", "--methods", json.dumps(methods), "--preset", "quick", "--n_images", "4",
         "--pairs_per_image", "2", "--device", "cpu", "--report", "False"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _child_threads(r.stderr) == threads == torch.get_num_threads()
    cli = load_results(root / "trust" / "results.json")
    api = run_assessment(data, root / "api", [folder], [], methods=methods, preset="quick", n_images=4,
                         pairs_per_image=2, device="cpu", report=False, progress=False)
    for m in methods:  # the child ran on this process's thread count (see _env)
        assert cli.utility[m]["mean"] == pytest.approx(api.utility[m]["mean"], abs=1e-6)
        assert cli.repeatability[m]["mean"] == pytest.approx(api.repeatability[m]["mean"], abs=1e-6)
    assert cli.randomization[0]["states"][:2] == ["logits", "denseblock4"]
    assert cli.provenance["config"]["models"][str(folder)]["input"]["normalization"] == {"preset": "imagenet"}
    # The assessment explained what the manual settings explain: the first replicate's trained maps.
    steps = torch.load(root / "api" / ".steps" / "maps_0.pt", weights_only=True)["value"]
    ids = api.data["ids"]
    from saliency_trust.data import load_dataset

    recs = {rr.id: rr for rr in load_dataset(data, image_size=64).records}
    imgs = torch.tensor(np.stack([recs[i].image for i in ids]))
    _, manual = _manual_maps(folder, imgs, methods, preset="quick", seed=0)
    for m in methods:
        diff = float((steps["maps"][m] - manual[m]).abs().max())
        assert diff < 1e-5, (m, diff)

    # inference.json on one DICOM, the same through the Slicer Lib and the service.
    shutil_copy = __import__("shutil").copy
    shutil_copy(root / "trust" / "results.json", folder / "results.json")
    dicom = sorted((data / "stage_2_train_images").glob("*.dcm"))[0]
    r = subprocess.run(
        [sys.executable, "-c", _BUNDLE_CLI, "run", "--config_file", str(cfg / "inference.json"),
         "--meta_file", str(cfg / "metadata.json"), "--bundle_root", str(REPO / "monai_bundle"),
         "--image", str(dicom), "--model_dir", str(folder), "--output_dir", str(root / "infer"),
         "--methods", json.dumps(methods), "--preset", "quick", "--checks", "False", "--device", "cpu"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _child_threads(r.stderr) == threads == torch.get_num_threads()
    pred = json.loads((root / "infer" / "prediction.json").read_text())
    img, _ = read_input(dicom)
    probs, manual = _manual_maps(folder, torch.from_numpy(resize_image(img, (64, 64)))[None], methods,
                                 preset="quick", seed=0, cam_resize="half_pixel")
    np.testing.assert_allclose(pred["probabilities"], probs[0].numpy(), rtol=0, atol=1e-6)
    assert pred["task"] == "lung opacity" and pred["model"]["name"] == "hospital DenseNet121"
    assert pred["verdicts"]["these_weights_assessed"] is True
    import SimpleITK as sitk

    for m in methods:
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "infer" / pred["maps"][m])))
        want = np.clip(resize_image(manual[m][0].numpy(), img.shape), 0, 1)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=1e-5)

    sys.path.insert(0, str(REPO / "SaliencyTrust"))
    try:
        from SaliencyTrustLib import controller
        from SaliencyTrustLib.process import Request, run_bundle
    finally:
        sys.path.remove(str(REPO / "SaliencyTrust"))
    choices = controller.model_choices(root)
    assert choices["hospital_model"].arch == "DenseNet121" and choices["hospital_model"].replicates == [0, 1]
    req = Request(bundle_dir=str(REPO / "monai_bundle"), model_dir=choices["hospital_model"].folder,
                    arch=choices["hospital_model"].arch, methods=methods, preset="quick", device="cpu", checks=False,
                    python=sys.executable)
    out = run_bundle(req, dicom, root / "slicer", timeout=600)
    slicer_pred = json.loads((out / "prediction.json").read_text())
    assert slicer_pred["probabilities"] == pred["probabilities"]

    import asyncio

    import httpx
    from saliency_trust.serve import State, create_app, discover_models

    state = State(REPO / "monai_bundle", discover_models(REPO / "monai_bundle", root), root / "work", None, 2**24,
                  600.0, 60.0, 4, "cpu")
    assert set(state.models) == {"hospital_model"}

    async def go() -> dict:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            info = (await client.get("/info")).json()["models"]["hospital_model"]
            assert info["architecture"] == "DenseNet121" and info["task"] == "lung opacity"
            r = await client.post("/infer/hospital_model", files={"image": ("a", dicom.read_bytes())},
                                  data={"methods": ",".join(methods), "preset": "quick", "checks": "false"})
            assert r.status_code == 200, r.text
            res = r.json()
            nii = await client.get(res["maps"]["gradcam"])
            (root / "gradcam.nii.gz").write_bytes(nii.content)
            return res

    served = asyncio.run(go())
    assert served["probabilities"] == pred["probabilities"]
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "gradcam.nii.gz")))
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "infer" / pred["maps"]["gradcam"])))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
