"""Broken and hostile inputs (tests/corpus/make_corpus.py): each is refused with a clear error naming it, or read."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from saliency_trust.data import load_dataset
from saliency_trust.data.errors import DataError
from saliency_trust.data.imageio import MIN_SIDE, read_input

from tests.conftest import REPO
from tests.corpus.make_corpus import make_corpus

HUGE = ("large_10000.png", "huge_20000.png", "bomb_60000.png", "huge_header.dcm")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def test_the_corpus_is_large_enough(corpus):
    _, manifest = corpus
    assert len(manifest["images"]) + len(manifest["datasets"]) >= 30
    assert sum(v == "read" for v in manifest["images"].values()) >= 3


def test_each_image_is_refused_naming_it_or_read_correctly(corpus):
    root, manifest = corpus
    for name, expect in manifest["images"].items():
        path = root / "images" / name
        if expect == "refused":
            with pytest.raises(DataError) as err:
                read_input(path)
            assert name in str(err.value), (name, str(err.value))
            assert len(str(err.value)) < 400, name  # one sentence, not a dump
        else:
            img, _ = read_input(path)
            assert img.dtype == np.float32 and min(img.shape) >= MIN_SIDE, name
            assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1 and img.std() > 0, name


def test_each_broken_dataset_is_reported_by_file_or_row_and_never_raises_anything_else(corpus):
    root, manifest = corpus
    for name in manifest["datasets"]:
        folder = root / "datasets" / name
        try:
            ds = load_dataset(folder)
        except DataError as exc:  # only for a file that stops the whole load
            assert str(folder) in str(exc), (name, str(exc))
            continue
        assert not ds.records, name
        assert ds.errors and all(str(folder) in str(e) for e in ds.errors), (name, [str(e) for e in ds.errors])
        if "path_traversal" in name:
            assert "outside the dataset folder" in str(ds.errors[0]), name


def test_inference_json_refuses_each_bad_image_with_an_error_file(corpus, tmp_path):
    from saliency_trust.workflows.infer import run_inference
    from saliency_trust.workflows.sample import make_fixture_models

    root, manifest = corpus
    models = make_fixture_models(tmp_path / "models")
    for k, (name, expect) in enumerate(manifest["images"].items()):
        out = tmp_path / f"out{k}"
        if expect == "refused":
            with pytest.raises(DataError):
                run_inference(root / "images" / name, out, models, arch="densenet121", methods=["grad"],
                              preset="quick", checks=False, device="cpu")
            error = json.loads((out / "error.json").read_text())
            assert error["problem"] and not (out / "prediction.json").exists(), name
        else:
            res = run_inference(root / "images" / name, out, models, arch="densenet121", methods=["grad"],
                                preset="quick", checks=False, device="cpu")
            assert (out / res["maps"]["grad"]).is_file(), name


def test_huge_images_are_refused_from_their_headers_within_a_memory_limit(corpus):
    """In a process capped at 1 GiB of address space: the reader never allocates the pixels."""
    root, _ = corpus
    paths = [str(root / "images" / n) for n in HUGE]
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from saliency_trust.data.errors import DataError
        from saliency_trust.data.imageio import read_input
        for p in {paths!r}:
            try:
                read_input(p)
            except DataError as e:
                print("refused", e)
            else:
                sys.exit("read " + p)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("refused") == len(HUGE), r.stdout
