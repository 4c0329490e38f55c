"""Model folders: a network and its replicates, described by ``model.json``, the one way models come in.

A model folder holds weight files and a manifest ``model.json`` (schema: :data:`SCHEMA`, in the bundle
docs) that says what the network is (a registry name or a MONAI-style ``_target_`` with arguments),
which file is which replicate, the input size, channels and intensity normalization, the classes
and the finding class, the Grad-CAM layer and the randomization blocks (head first). Fields the
manifest leaves out are filled from :data:`FAMILY_DEFAULTS` by the network's class (torchvision
InceptionV3 / DenseNet / ResNet / EfficientNet, MONAI DenseNet / EfficientNetBN); a network of
another family must name them.

Older folders of ``<arch>_seed<k>.pt`` files (what the bundle's training wrote before manifests)
still load: each architecture in them reads as an implied manifest (registry network, the
paper's [-1, 1] three-channel input, the size from the training record beside the weights).

The replicate file names live here and nowhere else: :func:`replicate_file` (what training
writes into a model folder) and :data:`LEGACY_FILE` (the old flat layout).

This module imports only the standard library at load (jsonschema and torch inside the methods
that need them), so the Slicer module reads model folders without loading the engine.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "model.json"
SCHEMA_VERSION = 1
#: Old flat layout: ``<arch>_seed<k>.pt`` beside each other (several architectures per folder).
LEGACY_FILE = re.compile(r"^(?P<arch>[A-Za-z0-9_]+?)_seed(?P<k>[0-9]+)\.pt$")
#: The paper's input: grayscale in [0, 1] mapped to [-1, 1], copied to three channels.
PAPER_INPUT = {"channels": 3, "normalization": {"range": [-1.0, 1.0]}}
#: ImageNet statistics; one channel: the mean of the three (a common grayscale convention).
IMAGENET = {3: ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), 1: ([0.449], [0.226])}
KINDS = ("classifier", "localizer")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (model hashes for provenance)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replicate_file(k: int) -> str:
    """The weights file of replicate ``k`` in a model folder the bundle's training writes."""
    return f"seed{int(k)}.pt"


def record_file(weights: str | Path) -> Path:
    """The training record beside a weights file (``<stem>.metrics.json``)."""
    return Path(weights).with_suffix(".metrics.json")


def _blocks(*names: str | tuple[str, ...]) -> list[dict]:
    out = []
    for n in names:
        members = (n,) if isinstance(n, str) else n
        out.append({"name": members[0].rsplit(".", 1)[-1], "modules": list(members)})
    return out


def _densenet_blocks(prefix: str, head: str) -> list[dict]:
    blocks = [{"name": "logits", "modules": [head]},
              {"name": "denseblock4", "modules": [f"{prefix}denseblock4", f"{prefix}norm5"]}]
    for k in (3, 2, 1):
        blocks += _blocks(f"{prefix}transition{k}", f"{prefix}denseblock{k}")
    return blocks + [{"name": "conv0", "modules": [f"{prefix}conv0", f"{prefix}norm0"]}]


#: Per network family (the class, or a base class, by ``module.QualName``): the Grad-CAM layer, whether
#: the model applies a ReLU right after it (Grad-CAM then reads the post-ReLU map), the randomization
#: blocks head first, each a list of modules reset together, and the block the randomization verdict
#: reads. The paper's cascade stopped at InceptionV3's mixed1 and never randomized mixed0 or the stem,
#: so every family's verdict reads the same depth: the state that keeps the stem and the first block
#: (``verdict_keep``: 2 blocks kept at the end of the list; InceptionV3 names ``Mixed_5c`` itself, its
#: list having no stem). Grad-CAM layers are each family's last post-activation feature map, as the
#: paper's Keras layers (InceptionV3 mixed10, DenseNet's final relu).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # torchvision InceptionV3: the paper's Logits, mixed10 ... mixed0 (torchvision Mixed_5b = Keras
    # mixed0). The paper stopped at mixed1 = Mixed_5c, where the verdict reads; Mixed_5b is added so
    # the curve reaches the first Inception block. The stem is never randomized, as in the paper.
    "torchvision.models.inception.Inception3": {
        "cam_layer": "Mixed_7c", "cam_post_relu": False, "verdict_block": "Mixed_5c",
        "randomization_blocks": [{"name": "logits", "modules": ["fc"]}, *_blocks(
            "Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b", "Mixed_6a",
            "Mixed_5d", "Mixed_5c", "Mixed_5b")]},
    # torchvision DenseNet (121/161/169/201): ``features`` ends at norm5 and forward applies F.relu.
    "torchvision.models.densenet.DenseNet": {
        "cam_layer": "features", "cam_post_relu": True, "verdict_keep": 2,
        "randomization_blocks": _densenet_blocks("features.", "classifier")},
    # MONAI DenseNet (DenseNet121 ...): ``class_layers.relu`` is the ReLU module after norm5.
    "monai.networks.nets.densenet.DenseNet": {
        "cam_layer": "class_layers.relu", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": _densenet_blocks("features.", "class_layers.out")},
    # torchvision ResNet: every stage ends with a ReLU; one block per stage.
    "torchvision.models.resnet.ResNet": {
        "cam_layer": "layer4", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["fc"]}, *_blocks("layer4", "layer3", "layer2",
                                                                                  "layer1", ("conv1", "bn1"))]},
    # torchvision EfficientNet (B0-B7, V2): ``features`` ends with conv + BN + SiLU; one block per stage.
    "torchvision.models.efficientnet.EfficientNet": {
        "cam_layer": "features", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["classifier.1"]}, "features"]},
    # MONAI EfficientNetBN: the head's swish (``_swish``, also called on the stem: its last call is the head's).
    "monai.networks.nets.efficientnet.EfficientNet": {
        "cam_layer": "_swish", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["_fc"]},
                                 {"name": "head", "modules": ["_conv_head", "_bn1"]}, "_blocks",
                                 {"name": "stem", "modules": ["_conv_stem", "_bn0"]}]},
}
#: A block spec given as a container's name expands to one block per child, last child first.
_EXPANDS = "expand"

#: The registry's networks (``saliency_trust.networks.get_network``) and their classes.
REGISTRY_CLASSES = {
    "inception_v3": "torchvision.models.inception.Inception3",
    "densenet121": "torchvision.models.densenet.DenseNet",
    "resnet50": "torchvision.models.resnet.ResNet",
    "efficientnet_b0": "torchvision.models.efficientnet.EfficientNet",
    "unet": "monai.networks.nets.unet.UNet",
}

_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
_FILE = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[^/\\]+$", "not": {"enum": [".", ".."]}}
_NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3}

#: JSON Schema of ``model.json`` (checked with ``jsonschema`` on every load).
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "SaliencyTrust model folder manifest (model.json)",
    "type": "object",
    "additionalProperties": False,
    "required": ["schema_version", "network", "input"],
    "oneOf": [{"required": ["weights"]}, {"required": ["replicates"]}],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "name": _NAME,
        "description": {"type": "string"},
        "kind": {"enum": list(KINDS)},
        "network": {"oneOf": [
            {"type": "string", "enum": sorted(REGISTRY_CLASSES)},
            {"type": "object", "required": ["_target_"],
             "properties": {"_target_": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$"}}}]},
        "weights": _FILE,
        "replicates": {"type": "object", "minProperties": 1, "additionalProperties": False,
                       "patternProperties": {"^[0-9]{1,6}$": _FILE}},
        "format": {"enum": ["state_dict", "torchscript"]},
        "input": {
            "type": "object", "additionalProperties": False, "required": ["size"],
            "properties": {
                "size": {"type": "integer", "minimum": 16, "maximum": 4096},
                "channels": {"enum": [1, 3]},
                "normalization": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "window": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                        "range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                        "mean": _NUMBERS, "std": _NUMBERS, "preset": {"enum": ["imagenet"]}},
                    "oneOf": [{"required": ["range"]}, {"required": ["mean", "std"]}, {"required": ["preset"]}]}}},
        "classes": {"type": "array", "items": _NAME, "minItems": 2},
        "finding_class": {"type": "integer", "minimum": 0},
        "task": _NAME,
        "cam_layer": _NAME,
        "cam_post_relu": {"type": "boolean"},
        "randomization_blocks": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "modules"],
            "properties": {"name": _NAME, "modules": {"type": "array", "items": _NAME, "minItems": 1}}}},
        "verdict_block": _NAME,
        "training": {"type": "object"},
    },
}


class ManifestError(ValueError):
    """A model folder or its manifest is unusable; the message names the file and the field."""


def _schema_problem(error: Any) -> str:
    """One sentence naming the field a jsonschema error is about."""
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        names = ", ".join(f"'{'.'.join([where, e]) if where else e}'" for e in extra)
        return f"field {names} is not a model.json field"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"field '{'.'.join([where, missing]) if where else missing}' is required"
    if error.validator == "oneOf" and not where:
        return "give exactly one of the fields 'weights' (one file) and 'replicates' ({\"0\": file, ...})"
    if error.validator == "oneOf" and where == "input.normalization":
        return "field 'input.normalization' needs exactly one of 'range', 'mean' + 'std', or 'preset'"
    return f"field '{where or '(top)'}': {error.message}"


@dataclass
class ModelFolder:
    """A network and its replicates: an explicit ``model.json`` or an implied one (old flat folders)."""

    folder: Path
    manifest: dict[str, Any]
    implied: bool = False
    arch: str | None = None  # the architecture of an implied manifest
    _probe: dict | None = field(default=None, repr=False, compare=False)  # what check()'s forward pass saw

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, arch: str | None = None) -> ModelFolder:
        """The model at ``path``: a folder with ``model.json``, that file, an old flat folder of
        ``<arch>_seed<k>.pt`` files (``arch`` picks one when it holds several) or one such file.

        The manifest is checked against :data:`SCHEMA` and its weight files must exist; a problem
        raises :class:`ManifestError` naming the file and the field.
        """
        path = Path(path)
        if path.is_file() and path.name == MANIFEST:
            path = path.parent
        elif path.is_file():  # one weights file: <arch>_seed<k>.pt, or any name with the architecture given
            m = LEGACY_FILE.match(path.name)
            if m and arch is not None and arch != m["arch"]:
                raise ManifestError(f"{path}: the file name says architecture {m['arch']!r}, not {arch!r}")
            if not m and arch is None:
                raise ManifestError(f"{path}: not a model folder, a {MANIFEST} or an <arch>_seed<k>.pt file; "
                                    "give its architecture")
            return cls._implied(path.parent, m["arch"] if m else arch, only=(int(m["k"]) if m else 0, path.name))
        if not path.is_dir():
            raise ManifestError(f"{path}: no such model folder")
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ManifestError(f"{manifest}: not readable JSON ({exc})") from None
            folder = cls(path, data)
            folder.validate()
            if arch is not None and arch not in (folder.network_label, folder.arch):
                raise ManifestError(f"{manifest}: the folder holds {folder.network_label}, not {arch!r}")
            return folder
        archs = legacy_architectures(path)
        if not archs:
            raise ManifestError(f"{path}: no {MANIFEST} and no <arch>_seed<k>.pt weight files")
        if arch is None:
            if len(archs) > 1:
                raise ManifestError(f"{path}: holds several architectures {sorted(archs)}; name one")
            arch = next(iter(archs))
        if arch not in archs:
            raise ManifestError(f"{path}: no {arch}_seed<k>.pt files (it holds {sorted(archs)})")
        return cls._implied(path, arch)

    @classmethod
    def _implied(cls, folder: Path, arch: str, only: tuple[int, str] | None = None) -> ModelFolder:
        files = legacy_architectures(folder).get(arch, {}) if only is None else {only[0]: only[1]}
        if arch not in REGISTRY_CLASSES:
            raise ManifestError(f"{folder}: {arch}_seed<k>.pt files of an architecture the registry does not "
                                f"know; add a {MANIFEST}")
        records = {k: _read_record(folder / f) for k, f in files.items()}
        first = records[min(records)]
        kind = "localizer" if arch == "unet" or "val_dice" in first else "classifier"
        size = first.get("image_size")
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "network": arch, "kind": kind,
            "replicates": {str(k): f for k, f in sorted(files.items())},
            "input": {"size": int(size), **PAPER_INPUT} if size else dict(PAPER_INPUT)}
        if kind == "classifier":
            task = first.get("task")
            manifest.update(classes=["no finding", task or "finding"], finding_class=1)
            if task:
                manifest["task"] = task
        return cls(folder, manifest, implied=True, arch=arch)

    def validate(self) -> None:
        """Check the manifest against :data:`SCHEMA` and the files it names (no network is built)."""
        try:
            import jsonschema
        except ImportError:  # the Slicer module lists folders before the engine's dependencies are in
            jsonschema = None
        if jsonschema is not None:
            errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(self.manifest),
                            key=lambda e: (len(e.absolute_path), list(e.absolute_path)))
            if errors:
                raise ManifestError(f"{self.folder / MANIFEST}: {_schema_problem(errors[0])}")
        m = self.manifest
        if self.kind == "classifier":
            if "classes" not in m:
                raise ManifestError(f"{self.folder / MANIFEST}: field 'classes' is required for a classifier")
            if self.finding_class >= len(self.classes):
                raise ManifestError(f"{self.folder / MANIFEST}: field 'finding_class' is {self.finding_class}, "
                                    f"but there are {len(self.classes)} classes")
        if isinstance(m.get("network"), dict):
            for key in ("channels", "normalization"):
                if key not in self.input:
                    raise ManifestError(f"{self.folder / MANIFEST}: field 'input.{key}' is required for a "
                                        "'_target_' network")
        norm = self.input.get("normalization", {})
        for key in ("mean", "std"):
            if key in norm and len(norm[key]) not in (1, self.channels):
                raise ManifestError(f"{self.folder / MANIFEST}: field 'input.normalization.{key}' has "
                                    f"{len(norm[key])} values for {self.channels} channel(s)")
        if any(s == 0 for s in norm.get("std", [])):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'input.normalization.std' has a zero")
        for key in ("range", "window"):
            if key in norm and norm[key][0] == norm[key][1]:
                raise ManifestError(f"{self.folder / MANIFEST}: field 'input.normalization.{key}' is empty")
        names = [b["name"] for b in m.get("randomization_blocks", [])]
        if len(set(names)) != len(names):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'randomization_blocks' repeats a block name")
        if "verdict_block" in m and "randomization_blocks" in m and m["verdict_block"] not in names:
            raise ManifestError(f"{self.folder / MANIFEST}: field 'verdict_block' names {m['verdict_block']!r}, "
                                f"not one of the randomization blocks {names}")
        field_name = "weights" if "weights" in m else "replicates"
        for k, path in self.replicates.items():
            if not path.is_file():
                raise ManifestError(f"{self.folder / MANIFEST}: field '{field_name}' names {path.name} "
                                    f"(replicate {k}), which is not in the folder")

    # -- what the manifest says ------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``classifier`` or ``localizer``."""
        return self.manifest.get("kind", "classifier")

    @property
    def network(self) -> str | dict:
        """The registry name or the ``_target_`` spec."""
        return self.manifest["network"]

    @property
    def network_label(self) -> str:
        """The registry name, or the ``_target_``'s class name."""
        net = self.network
        return net if isinstance(net, str) else net["_target_"].rsplit(".", 1)[-1]

    @property
    def format(self) -> str:
        """``state_dict`` or ``torchscript``."""
        return self.manifest.get("format", "state_dict")

    @property
    def replicates(self) -> dict[int, Path]:
        """Replicate number -> weights file, in order."""
        m = self.manifest
        files = {0: m["weights"]} if "weights" in m else {int(k): v for k, v in m.get("replicates", {}).items()}
        return {k: self.folder / files[k] for k in sorted(files)}

    @property
    def input(self) -> dict[str, Any]:
        return self.manifest["input"]

    @property
    def image_size(self) -> int | None:
        """The input size the network was trained at (None: not recorded, an old folder without record)."""
        size = self.input.get("size")
        return int(size) if size else None

    @property
    def channels(self) -> int:
        return int(self.input.get("channels", PAPER_INPUT["channels"]))

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def finding_class(self) -> int:
        return int(self.manifest.get("finding_class", 1))

    @property
    def task(self) -> str | None:
        """The finding the model detects (``task``, else the finding class's name)."""
        if self.manifest.get("task"):
            return str(self.manifest["task"])
        classes = self.classes
        return classes[self.finding_class] if len(classes) > self.finding_class else None

    @property
    def name(self) -> str:
        """A display name: the manifest's, else the folder's (and the architecture, for an implied one)."""
        if self.manifest.get("name"):
            return str(self.manifest["name"])
        return f"{self.folder.name}/{self.arch}" if self.implied else self.folder.name

    def weights(self, replicate: int | None = None) -> Path:
        """The weights file of ``replicate`` (None: the first)."""
        reps = self.replicates
        k = next(iter(reps)) if replicate is None else int(replicate)
        if k not in reps:
            raise ManifestError(f"{self.folder}: no replicate {k} (it has {list(reps)})")
        return reps[k]

    def record(self, replicate: int | None = None) -> dict:
        """The training record beside a replicate's weights ({} when there is none)."""
        return _read_record(self.weights(replicate))

    def sha256(self, replicate: int | None = None) -> str:
        """SHA-256 of a replicate's weights file."""
        return file_sha256(self.weights(replicate))

    def describe(self) -> dict:
        """What the provenance of a result records about this model."""
        return {"folder": str(self.folder), "network": self.network, "implied_manifest": self.implied,
                "input": self.input, "classes": self.classes, "finding_class": self.finding_class,
                "format": self.format}

    # -- the network (torch from here on) -------------------------------------------------------------
    def build(self) -> Any:
        """The network with fresh weights (what the untrained baseline explains), checked (:meth:`check`)."""
        if self.format == "torchscript":
            raise ManifestError(f"{self.folder / MANIFEST}: a TorchScript model has no untrained form to build")
        net = self._construct()
        self.check(net)
        return net

    def load(self, replicate: int | None = None, device: Any = "cpu") -> Any:
        """Replicate ``replicate`` (None: the first) with its weights, on ``device``, in eval mode, checked."""
        import torch

        path = self.weights(replicate)
        if self.format == "torchscript":
            try:
                net = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ManifestError(f"{path}: cannot load TorchScript ({type(exc).__name__}: {exc})") from None
        else:
            net = self._construct()
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ManifestError(f"{path}: cannot load weights ({type(exc).__name__}: {exc})") from None
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            if not isinstance(state, dict):
                raise ManifestError(f"{path}: not a state dict (a {type(state).__name__})")
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
                raise ManifestError(f"{path}: the weights do not fit the network of field 'network' ({first})") \
                    from None
        self.check(net)
        return net.to(device).eval()

    def _construct(self) -> Any:
        net_spec = self.network
        if isinstance(net_spec, str):
            from saliency_trust.networks.registry import get_network

            return get_network(net_spec, num_classes=max(len(self.classes), 2))
        target = net_spec["_target_"]
        module_name, _, attr = target.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' names {target!r}, which "
                                f"cannot be imported ({type(exc).__name__}: {exc})") from None
        if not _safe_factory(factory):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' names {target!r}, which is not a "
                                "torch.nn.Module class (nor a torchvision model builder); nothing else is called")
        kwargs = {k: v for k, v in net_spec.items() if k != "_target_"}
        try:
            net = factory(**kwargs)
        except Exception as exc:
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network': {target}(**{kwargs}) failed "
                                f"({type(exc).__name__}: {exc})") from None
        import torch

        if not isinstance(net, torch.nn.Module):
            raise ManifestError(f"{self.folder / MANIFEST}: field 'network._target_' made a "
                                f"{type(net).__name__}, not a torch.nn.Module")
        return net

    def spec(self, net: Any) -> dict[str, Any]:
        """The Grad-CAM layer, randomization blocks and verdict block: the manifest's, else the family's."""
        family = family_defaults(net)
        out = {"cam_layer": None, "cam_post_relu": False, "randomization_blocks": None, "verdict_block": None}
        out.update({k: v for k, v in family.items() if k in out})
        if "randomization_blocks" in family:
            out["randomization_blocks"] = expand_blocks(net, family["randomization_blocks"])
            keep = family.get("verdict_keep")
            if keep and out["verdict_block"] is None and len(out["randomization_blocks"]) > keep:
                out["verdict_block"] = out["randomization_blocks"][-keep - 1]["name"]
        given = {k: self.manifest[k] for k in out if k in self.manifest}
        if "cam_layer" in given and "cam_post_relu" not in given:
            given["cam_post_relu"] = False
        if "randomization_blocks" in given and "verdict_block" not in given:
            given["verdict_block"] = None  # the family's verdict block belongs to the family's blocks
        out.update(given)
        return out

    def check(self, net: Any) -> None:
        """Refuse a network whose named layers are missing or whose output is not ``[B, classes]``."""
        import torch

        where = self.folder / MANIFEST
        spec = self.spec(net)
        modules = dict(net.named_modules())
        if self.kind == "classifier" and self.format != "torchscript":
            if spec["cam_layer"] is None:
                raise ManifestError(f"{where}: field 'cam_layer' is required for a {type(net).__name__} "
                                    "(no default for its family)")
            if spec["cam_layer"] not in modules:
                raise ManifestError(f"{where}: field 'cam_layer' names {spec['cam_layer']!r}, which the network "
                                    "does not have")
            if spec["randomization_blocks"] is None:
                raise ManifestError(f"{where}: field 'randomization_blocks' is required for a "
                                    f"{type(net).__name__} (no default for its family)")
            for b in spec["randomization_blocks"]:
                missing = [n for n in b["modules"] if n not in modules]
                if missing:
                    raise ManifestError(f"{where}: field 'randomization_blocks': block {b['name']!r} names "
                                        f"{missing[0]!r}, which the network does not have")
            names = [b["name"] for b in spec["randomization_blocks"]]
            if spec["verdict_block"] is not None and spec["verdict_block"] not in names:
                raise ManifestError(f"{where}: field 'verdict_block' names {spec['verdict_block']!r}, which is not one "
                                    f"of the randomization blocks {names}")
        if self._probe is not None:  # one architecture per folder: its replicates and copies need no new probe
            return
        size = self.image_size or 96
        dev = next((p.device for p in net.parameters()), torch.device("cpu"))
        x = torch.zeros((2, self.channels, size, size), device=dev, requires_grad=True)
        was = net.training
        net.eval()
        try:
            y = net(x)
        except Exception as exc:
            raise ManifestError(f"{where}: the network fails on a [2, {self.channels}, {size}, {size}] input "
                                f"(fields 'input.size', 'input.channels'): {type(exc).__name__}: {exc}") from None
        finally:
            net.train(was)
        want = (2, len(self.classes)) if self.kind == "classifier" else (2, 1, size, size)
        if not isinstance(y, torch.Tensor):
            raise ManifestError(f"{where}: the network returns a {type(y).__name__}, not a tensor of shape "
                                f"[B, {want[1]}]")
        if tuple(y.shape) != want:
            field_name = "classes" if self.kind == "classifier" else "kind"
            raise ManifestError(f"{where}: the network returns {list(y.shape)} for a batch of 2, expected "
                                f"{list(want)} (field '{field_name}')")
        from saliency_trust.networks.activations import has_relu, other_activations

        self._probe = {"relu": has_relu(y), "other": other_activations(y)}

    def unavailable(self, net: Any) -> dict[str, str]:
        """Methods this network cannot give, each with the reason in one sentence."""
        self.check(net)
        out = {}
        if not self._probe["relu"]:
            why = (f"guided backprop is defined for ReLU networks and {self.name} uses no ReLU "
                   "(its activations are of another kind)")
            out.update(gbp=why, ggcam=why)
        if self.format == "torchscript":
            why = "Grad-CAM reads a layer through a forward hook, which a TorchScript model does not run"
            out.update(gradcam=why, ggcam=why)
        return out

    def method_notes(self, net: Any) -> dict[str, str]:
        """Methods computed with a caveat the output must state (guided backprop on a partly-ReLU network)."""
        self.check(net)
        if self._probe["relu"] and self._probe["other"]:
            why = (f"guided backprop guides only the ReLUs of {self.name}; its other activations "
                   f"({', '.join(self._probe['other'])}) pass the gradient unguided")
            return {"gbp": why, "ggcam": why}
        return {}

    def to_input(self, images01: Any) -> Any:
        """Images in [0, 1] (``[B, H, W]`` or ``[B, 1, H, W]``) -> the network's input ``[B, C, H, W]``."""
        import torch

        x = images01[:, None] if images01.ndim == 3 else images01
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grayscale [B, H, W] or [B, 1, H, W] images, got {tuple(images01.shape)}")
        x = x.float() if not x.is_floating_point() else x
        norm = self.input.get("normalization", PAPER_INPUT["normalization"])
        if "window" in norm:
            lo, hi = norm["window"]
            x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        x = x.expand(-1, self.channels, -1, -1)
        scale, shift = self._affine()
        return (x * torch.tensor(scale, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                + torch.tensor(shift, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)).contiguous()

    def _affine(self) -> tuple[list[float], list[float]]:
        """Per channel ``(scale, shift)``: network input = scale * x01 + shift (after any window)."""
        norm = self.input.get("normalization", PAPER_INPUT["normalization"])
        c = self.channels
        if "range" in norm:
            lo, hi = norm["range"]
            return [hi - lo] * c, [lo] * c
        mean, std = IMAGENET[c] if norm.get("preset") == "imagenet" else (norm["mean"], norm["std"])
        mean = list(mean) * (c if len(mean) == 1 else 1)
        std = list(std) * (c if len(std) == 1 else 1)
        return [1.0 / s for s in std], [-m / s for m, s in zip(mean, std, strict=True)]

    def black(self) -> float | tuple[float, ...]:
        """A black pixel in the network's input scale (IG's baseline), per channel when they differ."""
        _, shift = self._affine()
        return shift[0] if len(set(shift)) == 1 else tuple(shift)

    def explain_settings(self, net: Any) -> dict[str, Any]:
        """The ``explain`` settings this model needs: its Grad-CAM layer and IG's black baseline."""
        spec = self.spec(net)
        return {"cam_layer": spec["cam_layer"], "cam_post_relu": spec["cam_post_relu"], "ig_baseline": self.black()}

    def randomization_blocks(self, net: Any) -> list[tuple[str, tuple[str, ...]]]:
        """``(name, modules)`` blocks, head first, for cascading randomization."""
        return [(b["name"], tuple(b["modules"])) for b in self.spec(net)["randomization_blocks"]]

    def verdict_block(self, net: Any) -> str:
        """The block whose randomized state the verdict reads: the manifest's, the family's (the paper's
        depth: stem and first block kept), else the last given block (the whole given cascade)."""
        spec = self.spec(net)
        return spec["verdict_block"] or spec["randomization_blocks"][-1]["name"]

    def verdict_block_source(self, net: Any) -> str:
        """Where :meth:`verdict_block` comes from, in words (for the output)."""
        if "verdict_block" in self.manifest:
            return "model.json's verdict_block"
        if "randomization_blocks" in self.manifest:
            return "the last of model.json's randomization_blocks (no verdict_block given: the whole given cascade)"
        if family_defaults(net).get("verdict_keep"):
            return "the paper's depth for this family: the stem and the first block are never randomized"
        return "the paper's final state (InceptionV3 mixed1 = Mixed_5c; mixed0 and the stem kept)"


def _safe_factory(factory: Any) -> bool:
    """Whether ``model.json`` may call ``factory``: a ``torch.nn.Module`` subclass, or one of torchvision's
    registered model builders (``torchvision.models.list_models()``). Checked before anything is called,
    so a manifest naming ``subprocess.run`` or ``os.system`` runs nothing."""
    import torch

    if isinstance(factory, type):
        return issubclass(factory, torch.nn.Module)
    try:
        from torchvision import models

        return any(models.get_model_builder(name) is factory for name in models.list_models())
    except (ImportError, AttributeError, ValueError):
        return False


def family_defaults(net: Any) -> dict[str, Any]:
    """:data:`FAMILY_DEFAULTS` for ``net``'s class or its nearest listed base class ({} if none)."""
    for cls in type(net).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in FAMILY_DEFAULTS:
            return FAMILY_DEFAULTS[key]
    return {}


def expand_blocks(net: Any, blocks: list) -> list[dict]:
    """Blocks given as a container's name become one block per child, last child first."""
    out = []
    for b in blocks:
        if isinstance(b, str):
            children = list(net.get_submodule(b).named_children())
            out += [{"name": f"{b}.{n}", "modules": [f"{b}.{n}"]} for n, _ in reversed(children)]
        else:
            out.append(b)
    return out


def _read_record(weights: Path) -> dict:
    path = record_file(weights)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable training record ({exc})") from None
    return record if isinstance(record, dict) else {}


def legacy_architectures(folder: Path) -> dict[str, dict[int, str]]:
    """Architecture -> {replicate: file name} of the ``<arch>_seed<k>.pt`` files in ``folder``."""
    found: dict[str, dict[int, str]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    for name in names:
        m = LEGACY_FILE.match(name)
        if m and (folder / name).is_file():
            found.setdefault(m["arch"], {})[int(m["k"])] = name
    return found


def find_models(root: str | Path, depth: int = 2) -> dict[str, ModelFolder | ManifestError]:
    """Every model under ``root`` (itself and sub-folders to ``depth`` levels), by a name relative to it.

    A folder with ``model.json`` is one model, named by its path under ``root`` (``root``'s own
    name for ``root`` itself); an old flat folder gives one model per architecture, named
    ``<path>/<arch>`` (``<arch>`` in ``root``). A broken manifest appears as its
    :class:`ManifestError`, so a listing can say what is wrong with it.
    """
    root = Path(root)
    out: dict[str, ModelFolder | ManifestError] = {}

    def visit(folder: Path, level: int) -> None:
        rel = folder.relative_to(root).as_posix()
        if (folder / MANIFEST).is_file():
            try:
                out[root.name if rel == "." else rel] = ModelFolder.open(folder)
            except ManifestError as exc:
                out[root.name if rel == "." else rel] = exc
            return
        for arch in legacy_architectures(folder):
            name = arch if rel == "." else f"{rel}/{arch}"
            try:
                out[name] = ModelFolder.open(folder, arch)
            except ManifestError as exc:
                out[name] = exc
        if level < depth:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                return
            for child in children:
                visit(child, level + 1)

    if root.is_dir():
        visit(root, 0)
    return out


def write_training_manifest(folder: str | Path, arch: str, replicate: int, image_size: int, task: str | None,
                            kind: str = "classifier") -> Path:
    """Add replicate ``replicate`` (file :func:`replicate_file`) to the ``model.json`` training writes.

    The manifest is rewritten atomically. A manifest whose network or input differs from this
    training's loses its other replicates (they were trained otherwise); the files stay.
    """
    from saliency_trust.data.imageio import atomic_write_bytes

    folder = Path(folder)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "name": f"{arch}" + (f" ({task})" if task else ""), "kind": kind,
        "network": arch, "replicates": {}, "input": {"size": int(image_size), **PAPER_INPUT}}
    if kind == "classifier":
        manifest.update(classes=["no finding", task or "finding"], finding_class=1)
        if task:
            manifest["task"] = task
    path = folder / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            old = {}
        same = all(old.get(k) == manifest.get(k) for k in ("network", "input", "kind", "classes"))
        if same:
            manifest["replicates"] = {k: v for k, v in old.get("replicates", {}).items() if (folder / v).is_file()}
    manifest["replicates"][str(int(replicate))] = replicate_file(replicate)
    manifest["replicates"] = dict(sorted(manifest["replicates"].items(), key=lambda kv: int(kv[0])))
    atomic_write_bytes(path, json.dumps(manifest, indent=2).encode())
    return path


def training_weights(output_dir: str | Path, arch: str, replicate: int) -> str:
    """Where training saves replicate ``replicate`` of ``arch``: ``<output_dir>/<arch>/seed<k>.pt``."""
    return str(Path(output_dir) / arch / replicate_file(replicate))
