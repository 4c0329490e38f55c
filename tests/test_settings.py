"""The inference request: validated once, built by inference.json, equal to the older call form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from saliency_trust.settings import MAP_FORMATS, InferenceRequest

REPO = Path(__file__).resolve().parents[1]


def test_inference_request_refuses_bad_options_by_name(tmp_path):
    base = {"image": tmp_path / "x.dcm", "output_dir": tmp_path / "out", "model_dir": tmp_path}
    for bad, text in (({"map_format": "jpeg"}, "map_format"), ({"methods": ["gradd"]}, "gradd"),
                      ({"preset": "fast"}, "preset"), ({"replicate": -1}, "replicate"),
                      ({"intensity_range": [5, 1]}, "intensity_range"), ({"image": None}, "image is required"),
                      ({"image_size": 3}, "image_size")):
        with pytest.raises(ValueError, match=text):
            InferenceRequest(**{**base, **bad})
    r = InferenceRequest(**base, methods="grad", replicate="2", intensity_range=[0, 4095])
    assert r.methods == ("grad",) and r.replicate == 2 and r.intensity_range == (0.0, 4095.0)
    assert json.dumps(r.to_config())  # JSON as it is
    with pytest.raises(AttributeError):
        r.preset = "quick"  # frozen


def test_map_formats_are_the_writers():
    from saliency_trust.data.imageio import MAP_FORMATS as WRITTEN

    assert set(MAP_FORMATS) == set(WRITTEN)


def test_inference_json_and_trust_json_build_the_settings_objects():
    """The configs' _target_ blocks name the settings classes and pass every field they declare."""
    from dataclasses import fields

    from saliency_trust.settings import AssessmentSettings

    for name, cls, block, entry in (("inference.json", InferenceRequest, "request", "inference"),
                                    ("trust.json", AssessmentSettings, "settings", "assessment")):
        cfg = json.loads((REPO / "monai_bundle" / "configs" / name).read_text())
        assert cfg[block]["_target_"] == f"saliency_trust.settings.{cls.__name__}"
        assert cfg[entry][block] == f"@{block}"
        given = set(cfg[block]) - {"_target_"}
        known = {f.name for f in fields(cls)}
        assert given <= known, given - known
        # Every option a user sets on the command line is a top-level key the block reads.
        assert all(cfg[block][k] == f"@{k}" for k in given if k not in ("cache_networks",))
