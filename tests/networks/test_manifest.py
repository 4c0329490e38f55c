"""The manifest part of model folders (standard library only): its schema file, its own validator checked
against ``jsonschema`` on the same manifests, the schema as package data and in the docs, the files beside
a model."""

from __future__ import annotations

import copy
import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
from saliency_trust.networks import manifest as mf

from tests.conftest import REPO
from tests.networks.test_modelfolder import BAD, _valid


def _jsonschema_problems(instance) -> list:
    return list(jsonschema.Draft202012Validator(mf.SCHEMA).iter_errors(instance))


def _first(paths: list[tuple]) -> tuple:
    return min(paths, key=lambda p: (len(p), [str(x) for x in p]))


def _cases() -> dict[str, object]:
    """Valid and broken manifests: the model-folder tests' bad fields and more of every keyword the schema uses."""
    def changed(path: tuple, value) -> dict:
        m = copy.deepcopy(_valid())
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return m

    cases: dict[str, object] = {f"bad: {k}": v[0] for k, v in BAD.items()}
    cases.update({
        "valid": _valid(),
        "valid registry": {"schema_version": 1, "network": "densenet121", "replicates": {"0": "a.pt", "12": "b.pt"},
                           "input": {"size": 64.0}, "classes": ["a", "b"], "finding_class": 1.0},
        "valid blocks": changed(("randomization_blocks",), [{"name": "head", "modules": ["fc"]}]),
        "not an object": [],
        "channels true": changed(("input", "channels"), True),
        "channels 1.0": changed(("input", "channels"), 1.0),
        "size 64.5": changed(("input", "size"), 64.5),
        "size as text": changed(("input", "size"), "64"),
        "no replicate": {**{k: v for k, v in _valid().items() if k != "weights"}, "replicates": {}},
        "replicate key": {**{k: v for k, v in _valid().items() if k != "weights"}, "replicates": {"first": "w.pt"}},
        "weights dot": changed(("weights",), "."),
        "weights in a folder": changed(("weights",), "sub/w.pt"),
        "long name": changed(("name",), "x" * 201),
        "empty class name": changed(("classes",), ["a", ""]),
        "range of three": changed(("input", "normalization"), {"range": [0, 1, 2]}),
        "window alone": changed(("input", "normalization"), {"window": [0.1, 0.9]}),
        "window and preset": changed(("input", "normalization"), {"window": [0.1, 0.9], "preset": "imagenet"}),
        "four means": changed(("input", "normalization"), {"mean": [0.1] * 4, "std": [0.2]}),
        "block without modules": changed(("randomization_blocks",), [{"name": "head"}]),
        "block extra field": changed(("randomization_blocks",), [{"name": "h", "modules": ["fc"], "k": 1}]),
        "target not a dotted name": changed(("network",), {"_target_": "os"}),
        "target a number": changed(("network",), {"_target_": 5}),
        "network a list": changed(("network",), ["densenet121"]),
        "negative finding class": changed(("finding_class",), -1),
        "post relu 1": changed(("cam_post_relu",), 1),
        "training a list": changed(("training",), []),
        "kind": changed(("kind",), "segmenter"),
        "format": changed(("format",), "onnx"),
        "huge size": changed(("input", "size"), 5000),
        "input extra": changed(("input", "spacing"), [1, 1]),
        "valid volume": changed(("input",), {"size": [32, 48, 48.0], "channels": 1, "normalization": {"range": [-1, 1]},
                                             "window_hu": [-1000, 400], "spacing_mm": [8, 8.3, 8.3]}),
        "volume size of two": changed(("input", "size"), [32, 48]),
        "volume size of four": changed(("input", "size"), [1, 32, 48, 48]),
        "volume size fraction": changed(("input", "size"), [32, 48.5, 48]),
        "volume too thin": changed(("input", "size"), [4, 48, 48]),
        "window of one": changed(("input", "window_hu"), [-1000]),
        "window as text": changed(("input", "window_hu"), "lung"),
        "spacing as text": changed(("input", "spacing_mm"), ["1", "1", "1"]),
    })
    return cases


@pytest.mark.parametrize("case", sorted(_cases()))
def test_the_validator_agrees_with_jsonschema(case):
    """Valid for one, valid for the other; the problem named first is at jsonschema's first place or inside it."""
    instance = _cases()[case]
    ours = mf.schema_problems(instance)
    theirs = _jsonschema_problems(instance)
    assert bool(ours) == bool(theirs), (ours, [e.message for e in theirs])
    if theirs:
        mine, want = _first([p.path for p in ours]), _first([tuple(e.absolute_path) for e in theirs])
        assert mine[: len(want)] == want, (mine, want)
    assert (case in SCHEMA_VALID) != bool(ours)


#: The cases the schema accepts (the other checks of a manifest, and the network's, refuse the "bad:" ones).
SCHEMA_VALID = {"valid", "valid registry", "valid blocks", "valid volume", "channels 1.0", "bad: bad target arguments",
                "bad: finding class", "bad: mean per channel", "bad: target not importable",
                "bad: target without channels", "bad: verdict block", "bad: zero std", "window and preset"}


def test_the_validator_refuses_a_schema_keyword_it_does_not_check():
    with pytest.raises(ValueError, match="'uniqueItems'"):
        mf.schema_problems([1], {"type": "array", "uniqueItems": True})


def test_the_schema_file_matches_the_code_and_ships_with_the_package():
    schema = json.loads(mf.SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["schema_version"]["const"] == mf.SCHEMA_VERSION
    assert props["network"]["oneOf"][0]["enum"] == sorted(mf.REGISTRY_CLASSES)
    assert props["kind"]["enum"] == list(mf.KINDS)
    # Package data: the wheel carries it (pyproject), the Slicer extension installs it (CMake glob).
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    rel = mf.SCHEMA_FILE.relative_to(REPO / "monai_bundle" / "saliency_trust").as_posix()
    assert any(fnmatch(rel, pattern) for pattern in data["saliency_trust"]), data
    # The bundle docs link to the file (relative to docs/README.md).
    docs = (REPO / "monai_bundle" / "docs" / "README.md").read_text()
    assert "(../saliency_trust/networks/model.schema.json)" in docs
    assert (REPO / "monai_bundle" / "docs" / "../saliency_trust/networks/model.schema.json").resolve() == \
        mf.SCHEMA_FILE.resolve()


def test_the_files_beside_a_model_are_named_here(tmp_path):
    assert mf.replicate_file(3) == "seed3.pt"
    assert mf.record_file(tmp_path / "seed3.pt") == tmp_path / "seed3.metrics.json"
    assert Path(mf.training_weights(tmp_path, "densenet121", 2)) == tmp_path / "densenet121" / "seed2.pt"
    assert mf.assessment_path(tmp_path) == tmp_path / "results.json"
    (tmp_path / "seed0.pt").write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps({"schema_version": 1, "network": "densenet121", "weights":
                                                     "seed0.pt", "input": {"size": 64}, "classes": ["a", "b"]}))
    opened = mf.ModelManifest.open(tmp_path)
    assert opened.assessment_file == tmp_path / "results.json" and opened.normalization == {"range": [-1.0, 1.0]}
