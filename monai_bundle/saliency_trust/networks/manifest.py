"""Model folders without torch: ``model.json``, its schema, discovery, the files training writes.

A model folder holds weight files and a manifest ``model.json`` (schema: ``model.schema.json``
beside this file, :data:`SCHEMA`) that says what the network is (a registry name or a MONAI-style
``_target_`` with arguments), which file is which replicate, the input size (an integer for a square
2-D image; ``[D, H, W]`` for a volume, whose network is 3-D, with the HU window ``window_hu`` that
maps the CT to [0, 1] and the ``spacing_mm`` it was trained at), channels and intensity
normalization, the classes and the finding class, the Grad-CAM layer and the randomization blocks
(head first). Fields the manifest leaves out are filled from :data:`FAMILY_DEFAULTS` by the
network's class; a network of another family must name them.

Older folders of ``<arch>_seed<k>.pt`` files (what the bundle's training wrote before manifests)
still load: each architecture in them reads as an implied manifest (registry network, the
paper's [-1, 1] three-channel input, the size from the training record beside the weights).

The file names of a model folder live here and nowhere else: :func:`replicate_file` (what training
writes), :func:`record_file` (the training record beside a weights file), :data:`LEGACY_FILE` (the
old flat layout) and :func:`assessment_path` (the trust assessment's ``results.json`` beside the
model, which inference, the service and the Slicer module read).

This module is the standard library only, and imports nothing of the package at load: the Slicer
module loads it by file path to list model folders without torch. The manifest is checked against
the schema by a small validator of its own (Slicer ships no ``jsonschema``; the tests check that the
two agree). The torch side (building, loading, the input mapping) is
:class:`saliency_trust.networks.modelfolder.ModelFolder`, a subclass of :class:`ModelManifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "model.json"
SCHEMA_VERSION = 1
#: The JSON Schema of ``model.json`` (shipped as package data; the bundle docs link to it).
SCHEMA_FILE = Path(__file__).with_name("model.schema.json")
#: The trust assessment of a model, kept beside its weights (:func:`assessment_path`).
ASSESSMENT = "results.json"
#: Old flat layout: ``<arch>_seed<k>.pt`` beside each other (several architectures per folder).
LEGACY_FILE = re.compile(r"^(?P<arch>[A-Za-z0-9_]+?)_seed(?P<k>[0-9]+)\.pt$")
#: The paper's input: grayscale in [0, 1] mapped to [-1, 1], copied to three channels.
PAPER_INPUT = {"channels": 3, "normalization": {"range": [-1.0, 1.0]}}
#: ImageNet statistics; one channel: the mean of the three (a common grayscale convention).
IMAGENET = {3: ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), 1: ([0.449], [0.226])}
KINDS = ("classifier", "localizer")


class ManifestError(ValueError):
    """A model folder or its manifest is unusable; the message names the file and the field."""


def _load_schema() -> dict[str, Any]:
    try:
        return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{SCHEMA_FILE}: the model.json schema cannot be read ({exc})") from None


#: JSON Schema of ``model.json`` (checked on every load).
SCHEMA: dict[str, Any] = _load_schema()


# ---------------------------------------------------------------------------------------------------
# File names and small files


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


def training_weights(output_dir: str | Path, arch: str, replicate: int) -> str:
    """Where training saves replicate ``replicate`` of ``arch``: ``<output_dir>/<arch>/seed<k>.pt``."""
    return str(Path(output_dir) / arch / replicate_file(replicate))


def assessment_path(folder: str | Path) -> Path:
    """Where the trust assessment of the model in ``folder`` lies (``results.json`` beside its weights),
    whether or not there is one: inference, the service and the Slicer module read the verdicts there."""
    return Path(folder) / ASSESSMENT


def _read_record(weights: Path) -> dict:
    path = record_file(weights)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable training record ({exc})") from None
    return record if isinstance(record, dict) else {}


# ---------------------------------------------------------------------------------------------------
# Network families


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
#: blocks head first, each a list of modules reset together (a bare name: one block per child of that
#: container, last child first, see :func:`expand_blocks`), and the block the randomization verdict
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
    # MONAI DenseNet (DenseNet121 ...; 2-D and 3-D alike, ``spatial_dims`` changes no module name):
    # ``class_layers.relu`` is the ReLU module after norm5.
    "monai.networks.nets.densenet.DenseNet": {
        "cam_layer": "class_layers.relu", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": _densenet_blocks("features.", "class_layers.out")},
    # torchvision ResNet: every stage ends with a ReLU; one block per stage.
    "torchvision.models.resnet.ResNet": {
        "cam_layer": "layer4", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["fc"]}, *_blocks("layer4", "layer3", "layer2",
                                                                                  "layer1", ("conv1", "bn1"))]},
    # MONAI ResNet (resnet10 ... 200, 2-D and 3-D): every block ends with its ``act`` (ReLU by default), so
    # ``layer4``'s output is post-activation; one block per stage, the stem is conv1 + bn1.
    "monai.networks.nets.resnet.ResNet": {
        "cam_layer": "layer4", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["fc"]}, *_blocks("layer4", "layer3", "layer2",
                                                                                  "layer1", ("conv1", "bn1"))]},
    # torchvision EfficientNet (B0-B7, V2): ``features`` ends with conv + BN + SiLU; one block per stage.
    "torchvision.models.efficientnet.EfficientNet": {
        "cam_layer": "features", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["classifier.1"]}, "features"]},
    # MONAI EfficientNetBN (2-D and 3-D): the head's swish (``_swish``, also called on the stem: its last call is
    # the head's).
    "monai.networks.nets.efficientnet.EfficientNet": {
        "cam_layer": "_swish", "cam_post_relu": False, "verdict_keep": 2,
        "randomization_blocks": [{"name": "logits", "modules": ["_fc"]},
                                 {"name": "head", "modules": ["_conv_head", "_bn1"]}, "_blocks",
                                 {"name": "stem", "modules": ["_conv_stem", "_bn0"]}]},
}

#: The registry's networks (``saliency_trust.networks.get_network``) and their classes.
REGISTRY_CLASSES = {
    "inception_v3": "torchvision.models.inception.Inception3",
    "densenet121": "torchvision.models.densenet.DenseNet",
    "resnet50": "torchvision.models.resnet.ResNet",
    "efficientnet_b0": "torchvision.models.efficientnet.EfficientNet",
    "unet": "monai.networks.nets.unet.UNet",
}


def family_defaults(net: Any) -> dict[str, Any]:
    """:data:`FAMILY_DEFAULTS` for ``net``'s class or its nearest listed base class ({} if none)."""
    for cls in type(net).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in FAMILY_DEFAULTS:
            return FAMILY_DEFAULTS[key]
    return {}


def expand_blocks(net: Any, blocks: list) -> list[dict]:
    """Blocks given as a container's name become one block per child of ``net``'s container, last child first."""
    out = []
    for b in blocks:
        if isinstance(b, str):
            children = list(net.get_submodule(b).named_children())
            out += [{"name": f"{b}.{n}", "modules": [f"{b}.{n}"]} for n, _ in reversed(children)]
        else:
            out.append(b)
    return out


# ---------------------------------------------------------------------------------------------------
# The schema, checked without jsonschema


@dataclass(frozen=True)
class SchemaProblem:
    """One way an instance fails the schema: where (the path of keys), which keyword, and why."""

    path: tuple
    keyword: str
    message: str
    detail: Any = None  # the missing name (required), the unexpected names (additionalProperties)


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}
#: Keywords that only annotate; every other keyword of the schema must be one :func:`schema_problems` checks.
_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":  # JSON has one number type: 64.0 is an integer (as JSON Schema says)
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                              and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "null":
        return value is None
    return isinstance(value, _TYPES[name])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _resolve(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local references are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


@dataclass(frozen=True)
class _At:
    """Where a keyword is checked: the root schema (for ``$ref``), the instance's path, the schema holding it."""

    root: dict
    path: tuple
    schema: dict

    def problem(self, keyword: str, message: str, detail: Any = None) -> list[SchemaProblem]:
        return [SchemaProblem(self.path, keyword, message, detail)]

    def sub(self, value: Any, subschema: dict, *key: Any) -> list[SchemaProblem]:
        return schema_problems(value, subschema, _root=self.root, _path=(*self.path, *key))


def _check_ref(instance: Any, rule: str, at: _At) -> list[SchemaProblem]:
    return at.sub(instance, _resolve(rule, at.root))


def _check_type(instance: Any, rule: str, at: _At) -> list[SchemaProblem]:
    return [] if _is_type(instance, rule) else at.problem("type", f"{instance!r} is not of type {rule!r}")


def _check_enum(instance: Any, rule: list, at: _At) -> list[SchemaProblem]:
    return [] if any(_same(instance, v) for v in rule) else at.problem("enum", f"{instance!r} is not one of {rule!r}")


def _check_const(instance: Any, rule: Any, at: _At) -> list[SchemaProblem]:
    return [] if _same(instance, rule) else at.problem("const", f"{rule!r} was expected")


def _check_not(instance: Any, rule: dict, at: _At) -> list[SchemaProblem]:
    return at.problem("not", f"{instance!r} should not be valid under {rule!r}") if not at.sub(instance, rule) else []


def _check_one_of(instance: Any, rule: list, at: _At) -> list[SchemaProblem]:
    results = [at.sub(instance, branch) for branch in rule]
    matched = sum(not r for r in results)
    if matched == 1:
        return []
    if matched > 1:
        return at.problem("oneOf", f"{instance!r} is valid under each of {rule!r}")
    # One branch of the instance's type: its own problems say more than "none matched".
    typed = [r for branch, r in zip(rule, results, strict=True)
             if "type" in branch and _is_type(instance, branch["type"])]
    return typed[0] if len(typed) == 1 else at.problem("oneOf", f"{instance!r} is not valid under any of the given "
                                                                "schemas")


def _bound(keyword: str, kind: str, fails: Any, says: str) -> Any:
    """A checker of a size or value bound that applies to instances of JSON type ``kind`` only."""

    def check(instance: Any, rule: Any, at: _At) -> list[SchemaProblem]:
        if not _is_type(instance, kind) or not fails(instance, rule):
            return []
        return at.problem(keyword, says.format(instance=instance, rule=rule))

    return check


def _check_pattern(instance: Any, rule: str, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, str) or re.search(rule, instance) is not None:
        return []
    return at.problem("pattern", f"{instance!r} does not match {rule!r}")


def _check_items(instance: Any, rule: dict, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, list):
        return []
    return [p for i, item in enumerate(instance) for p in at.sub(item, rule, i)]


def _check_required(instance: Any, rule: list, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, dict):
        return []
    return [p for name in rule if name not in instance for p in at.problem("required", f"{name!r} is a required "
                                                                                       "property", name)]


def _check_properties(instance: Any, rule: dict, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, dict):
        return []
    return [p for name, sub in rule.items() if name in instance for p in at.sub(instance[name], sub, name)]


def _check_pattern_properties(instance: Any, rule: dict, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, dict):
        return []
    return [p for pattern, sub in rule.items() for name, value in instance.items() if re.search(pattern, name)
            for p in at.sub(value, sub, name)]


def _check_additional(instance: Any, rule: bool | dict, at: _At) -> list[SchemaProblem]:
    if not isinstance(instance, dict):
        return []
    known = set(at.schema.get("properties", {}))
    patterns = list(at.schema.get("patternProperties", {}))
    extra = [n for n in instance if n not in known and not any(re.search(p, n) for p in patterns)]
    if rule is False and extra:
        names = ", ".join(map(repr, extra))
        return at.problem("additionalProperties", f"Additional properties are not allowed ({names} "
                                                  f"{'was' if len(extra) == 1 else 'were'} unexpected)", extra)
    if isinstance(rule, dict):
        return [p for name in extra for p in at.sub(instance[name], rule, name)]
    return []


#: Each keyword the model.json schema uses, with its check (JSON Schema draft 2020-12's meaning; a size or
#: value bound applies only to instances of its type, as the draft says).
_KEYWORDS = {
    "$ref": _check_ref, "type": _check_type, "enum": _check_enum, "const": _check_const, "not": _check_not,
    "oneOf": _check_one_of, "pattern": _check_pattern, "items": _check_items, "required": _check_required,
    "properties": _check_properties, "patternProperties": _check_pattern_properties,
    "additionalProperties": _check_additional,
    "minLength": _bound("minLength", "string", lambda v, r: len(v) < r, "{instance!r} is too short"),
    "maxLength": _bound("maxLength", "string", lambda v, r: len(v) > r, "{instance!r} is too long"),
    "minimum": _bound("minimum", "number", lambda v, r: v < r, "{instance!r} is less than the minimum of {rule!r}"),
    "maximum": _bound("maximum", "number", lambda v, r: v > r,
                      "{instance!r} is greater than the maximum of {rule!r}"),
    "minItems": _bound("minItems", "array", lambda v, r: len(v) < r, "{instance!r} is too short"),
    "maxItems": _bound("maxItems", "array", lambda v, r: len(v) > r, "{instance!r} is too long"),
    "minProperties": _bound("minProperties", "object", lambda v, r: len(v) < r,
                            "{instance!r} should have at least {rule} properties"),
}


def schema_problems(instance: Any, schema: dict | None = None, *, _root: dict | None = None,
                    _path: tuple = ()) -> list[SchemaProblem]:
    """Every way ``instance`` fails ``schema`` (default :data:`SCHEMA`), as JSON Schema draft 2020-12 would
    report them, for the keywords the model.json schema uses (a schema using another keyword is refused)."""
    schema = SCHEMA if schema is None else schema
    at = _At(schema if _root is None else _root, _path, schema)
    out: list[SchemaProblem] = []
    for key, rule in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key not in _KEYWORDS:
            raise ValueError(f"the schema uses the keyword {key!r}, which this validator does not check")
        out += _KEYWORDS[key](instance, rule, at)
    return out


def _schema_problem(problem: SchemaProblem) -> str:
    """One sentence naming the field a schema problem is about."""
    where = ".".join(str(p) for p in problem.path)
    if problem.keyword == "additionalProperties":
        names = ", ".join(f"'{'.'.join([where, e]) if where else e}'" for e in problem.detail)
        return f"field {names} is not a model.json field"
    if problem.keyword == "required":
        return f"field '{'.'.join([where, problem.detail]) if where else problem.detail}' is required"
    if problem.keyword == "oneOf" and not where:
        return "give exactly one of the fields 'weights' (one file) and 'replicates' ({\"0\": file, ...})"
    if problem.keyword == "oneOf" and where == "input.normalization":
        return "field 'input.normalization' needs exactly one of 'range', 'mean' + 'std', or 'preset'"
    return f"field '{where or '(top)'}': {problem.message}"


# ---------------------------------------------------------------------------------------------------
# The manifest


@dataclass
class ModelManifest:
    """A network and its replicates as ``model.json`` describes them (or an implied one, for old flat folders):
    everything that needs no torch. :class:`~saliency_trust.networks.modelfolder.ModelFolder` adds the network."""

    folder: Path
    manifest: dict[str, Any]
    implied: bool = False
    arch: str | None = None  # the architecture of an implied manifest

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, arch: str | None = None) -> ModelManifest:
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
    def _implied(cls, folder: Path, arch: str, only: tuple[int, str] | None = None) -> ModelManifest:
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
        where = self.folder / MANIFEST
        problems = sorted(schema_problems(self.manifest), key=lambda p: (len(p.path), [str(x) for x in p.path]))
        if problems:
            raise ManifestError(f"{where}: {_schema_problem(problems[0])}")
        m = self.manifest
        if self.kind == "classifier":
            if "classes" not in m:
                raise ManifestError(f"{where}: field 'classes' is required for a classifier")
            if self.finding_class >= len(self.classes):
                raise ManifestError(f"{where}: field 'finding_class' is {self.finding_class}, "
                                    f"but there are {len(self.classes)} classes")
        if isinstance(m.get("network"), dict):
            for key in ("channels", "normalization"):
                if key not in self.input:
                    raise ManifestError(f"{where}: field 'input.{key}' is required for a '_target_' network")
        self._validate_volume(where)
        norm = self.input.get("normalization", {})
        for key in ("mean", "std"):
            if key in norm and len(norm[key]) not in (1, self.channels):
                raise ManifestError(f"{where}: field 'input.normalization.{key}' has "
                                    f"{len(norm[key])} values for {self.channels} channel(s)")
        if any(s == 0 for s in norm.get("std", [])):
            raise ManifestError(f"{where}: field 'input.normalization.std' has a zero")
        for key in ("range", "window"):
            if key in norm and norm[key][0] == norm[key][1]:
                raise ManifestError(f"{where}: field 'input.normalization.{key}' is empty")
        names = [b["name"] for b in m.get("randomization_blocks", [])]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where}: field 'randomization_blocks' repeats a block name")
        if "verdict_block" in m and "randomization_blocks" in m and m["verdict_block"] not in names:
            raise ManifestError(f"{where}: field 'verdict_block' names {m['verdict_block']!r}, "
                                f"not one of the randomization blocks {names}")
        field_name = "weights" if "weights" in m else "replicates"
        for k, path in self.replicates.items():
            if not path.is_file():
                raise ManifestError(f"{where}: field '{field_name}' names {path.name} "
                                    f"(replicate {k}), which is not in the folder")

    def _validate_volume(self, where: Path) -> None:
        """The volume fields: ``window_hu`` (required for a volume, lo < hi) and ``spacing_mm`` (positive) belong
        to a model whose ``input.size`` is ``[D, H, W]``."""
        given = [k for k in ("window_hu", "spacing_mm") if k in self.input]
        if not self.is_volume:
            if given:
                raise ManifestError(f"{where}: field 'input.{given[0]}' is for volume models; give 'input.size' as "
                                    "[D, H, W] (a 3-D network), or leave it out")
            return
        if "window_hu" not in self.input:
            raise ManifestError(f"{where}: field 'input.window_hu' is required for a volume model (input.size "
                                "[D, H, W]): the HU window [lo, hi] that maps the CT to [0, 1]")
        lo, hi = self.input["window_hu"]
        if not lo < hi:
            raise ManifestError(f"{where}: field 'input.window_hu' is [{lo}, {hi}]; it needs lo < hi (HU)")
        if any(v <= 0 for v in self.input.get("spacing_mm", [])):
            raise ManifestError(f"{where}: field 'input.spacing_mm' is {self.input['spacing_mm']}; every spacing "
                                "must be positive (mm)")

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
        """The manifest's ``input``: size, channels and normalization."""
        return self.manifest["input"]

    @property
    def is_volume(self) -> bool:
        """Whether the network takes volumes (``input.size`` is ``[D, H, W]``: a 3-D network)."""
        return isinstance(self.input.get("size"), list)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return 3 if self.is_volume else 2

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """The grid the network was trained at: ``(S, S)`` for a 2-D model, ``(D, H, W)`` for a volume model
        (None: not recorded, an old folder without record)."""
        size = self.input.get("size")
        if isinstance(size, list):
            return tuple(int(s) for s in size)
        return (int(size), int(size)) if size else None

    @property
    def image_size(self) -> int | None:
        """The square input size a 2-D network was trained at (None: not recorded, an old folder without record).

        A volume model has no one size: asking for it raises :class:`ManifestError` (use :attr:`input_size`),
        so no caller silently treats a volume model as a 2-D one.
        """
        size = self.input.get("size")
        if isinstance(size, list):
            raise ManifestError(f"{self.folder / MANIFEST}: a volume model (input.size {size}) has no square image "
                                "size; read input_size (D, H, W)")
        return int(size) if size else None

    @property
    def window_hu(self) -> tuple[float, float] | None:
        """A volume model's HU window ``(lo, hi)`` (CT -> [0, 1] before the normalization); None for a 2-D model."""
        w = self.input.get("window_hu")
        return (float(w[0]), float(w[1])) if w else None

    @property
    def spacing_mm(self) -> tuple[float, float, float] | None:
        """The voxel spacing ``(z, y, x)`` in mm a volume model was trained at, when recorded."""
        s = self.input.get("spacing_mm")
        return (float(s[0]), float(s[1]), float(s[2])) if s else None

    @property
    def channels(self) -> int:
        """Input channels (the grayscale image is copied to each)."""
        return int(self.input.get("channels", PAPER_INPUT["channels"]))

    @property
    def normalization(self) -> dict[str, Any]:
        """How the image in [0, 1] becomes the network's input (the paper's [-1, 1] when not given)."""
        return self.input.get("normalization", PAPER_INPUT["normalization"])

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the network's outputs."""
        return list(self.manifest.get("classes", []))

    @property
    def finding_class(self) -> int:
        """The class that is the finding (1 when not given)."""
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

    @property
    def assessment_file(self) -> Path:
        """Where this model's trust assessment lies (:func:`assessment_path`), whether or not there is one."""
        return assessment_path(self.folder)

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


# ---------------------------------------------------------------------------------------------------
# Discovery


def legacy_architectures(folder: Path) -> dict[str, dict[int, str]]:
    """Architecture -> {replicate: file name} of the ``<arch>_seed<k>.pt`` files in ``folder``."""
    found: dict[str, dict[int, str]] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    for name in names:
        m = LEGACY_FILE.match(name)
        if m and (Path(folder) / name).is_file():
            found.setdefault(m["arch"], {})[int(m["k"])] = name
    return found


def find_models(root: str | Path, depth: int = 2, *,
                model_class: type[ModelManifest] = ModelManifest) -> dict[str, Any]:
    """Every model under ``root`` (itself and sub-folders to ``depth`` levels), by a name relative to it.

    A folder with ``model.json`` is one model, named by its path under ``root`` (``root``'s own
    name for ``root`` itself); an old flat folder gives one model per architecture, named
    ``<path>/<arch>`` (``<arch>`` in ``root``). Each is a ``model_class`` (the torch side passes
    :class:`~saliency_trust.networks.modelfolder.ModelFolder`); a broken manifest appears as its
    :class:`ManifestError`, so a listing can say what is wrong with it.
    """
    root = Path(root)
    out: dict[str, Any] = {}

    def visit(folder: Path, level: int) -> None:
        rel = folder.relative_to(root).as_posix()
        if (folder / MANIFEST).is_file():
            try:
                out[root.name if rel == "." else rel] = model_class.open(folder)
            except ManifestError as exc:
                out[root.name if rel == "." else rel] = exc
            return
        for arch in legacy_architectures(folder):
            name = arch if rel == "." else f"{rel}/{arch}"
            try:
                out[name] = model_class.open(folder, arch)
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


# ---------------------------------------------------------------------------------------------------
# What training writes


def write_training_manifest(folder: str | Path, arch: str, replicate: int, image_size: int | list[int], *,
                            task: str | None, kind: str = "classifier", network: dict | None = None,
                            input_spec: dict | None = None) -> Path:
    """Add replicate ``replicate`` (file :func:`replicate_file`) to the ``model.json`` training writes.

    ``arch`` is a registry name (the network, with the paper's [-1, 1] three-channel input at ``image_size``),
    or with ``network`` (a ``_target_`` spec) and ``input_spec`` (the whole ``input`` block: a volume model's
    ``[D, H, W]`` size, channels, normalization, ``window_hu``, ``spacing_mm``) the name training gave it.
    The manifest is rewritten atomically (the engine's writer, with its fault points: this function runs
    in the bundle's training, never in the Slicer module). A manifest whose network or input differs from
    this training's loses its other replicates (they were trained otherwise); the files stay.
    """
    from saliency_trust.data.imageio import atomic_write_bytes

    folder = Path(folder)
    if (network is None) != (input_spec is None):
        raise ValueError("give both network and input_spec (a _target_ network and its input block), or neither")
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "name": f"{arch}" + (f" ({task})" if task else ""), "kind": kind,
        "network": network if network is not None else arch, "replicates": {},
        "input": dict(input_spec) if input_spec is not None else {"size": int(image_size), **PAPER_INPUT}}
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
    problems = sorted(schema_problems(manifest), key=lambda p: (len(p.path), [str(x) for x in p.path]))
    if problems:  # refused here, at training, not when someone opens the folder later
        raise ManifestError(f"{path}: training would write an invalid manifest: {_schema_problem(problems[0])}")
    atomic_write_bytes(path, json.dumps(manifest, indent=2).encode())
    return path
