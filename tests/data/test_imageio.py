"""One home for image I/O: one mask rule for every caller, atomic writes, imports that go one way."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import saliency_trust
from PIL import Image
from saliency_trust.data import load_dataset
from saliency_trust.data.errors import DataError
from saliency_trust.data.imageio import atomic_write_bytes, read_mask, sniff
from saliency_trust.provenance import code_fingerprint

PACKAGE = Path(saliency_trust.__file__).parent


def _generic_set(root: Path, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "m.png")
    (root / "labels.csv").write_text("file,mask\nimages/a.png,m.png\n")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
def test_one_mask_rule_for_the_dataset_reader_and_inference(tmp_path, mode):
    want = np.zeros((16, 16), bool)
    want[4:9, 6:12] = True
    if mode == "L":
        arr = want.astype(np.uint8) * 255
    elif mode == "RGB":  # drawn in green only: channel 0 is zero everywhere
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[..., 1] = want * 200
    elif mode == "RGBA":  # opaque everywhere: the alpha channel must not count as lesion
        arr = np.zeros((16, 16, 4), np.uint8)
        arr[..., 2] = want * 50
        arr[..., 3] = 255
    else:
        arr = np.zeros((16, 16, 2), np.uint8)
        arr[..., 0] = want * 1
        arr[..., 1] = 255
    _generic_set(tmp_path, arr)
    direct = read_mask(tmp_path / "m.png", (16, 16))
    np.testing.assert_array_equal(direct, want)
    ds = load_dataset(tmp_path)
    assert not ds.errors
    np.testing.assert_array_equal(ds.records[0].mask, want)


def test_a_mask_of_another_size_is_refused_naming_the_file_and_the_csv(tmp_path):
    _generic_set(tmp_path, np.ones((8, 8), np.uint8))
    ds = load_dataset(tmp_path)
    assert not ds.records and len(ds.errors) == 1
    text = str(ds.errors[0])
    assert "m.png" in text and "8x8" in text and "16x16" in text and "labels.csv" in text


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(self, other):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_sniff_reads_the_content_not_the_name():
    assert sniff(b"\0" * 128 + b"DICM" + b"\0" * 10) == "dicom"
    assert sniff(b"\x89PNG\r\n\x1a\n" + b"\0" * 10) == "png"
    assert sniff(b"NRRD0004\n") == "nrrd"
    assert sniff(b"GIF89a") is None
    with pytest.raises(DataError):
        read_mask(Path("/nonexistent/mask.png"), (4, 4))


def test_code_fingerprint_covers_every_module_of_the_package(tmp_path):
    copy = tmp_path / "saliency_trust"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_fingerprint(copy)
    assert before == code_fingerprint(PACKAGE)
    for rel in ("serve.py", "workflows/demo.py", "report/__init__.py", "results.py"):
        f = copy / rel
        original = f.read_bytes()
        f.write_bytes(original + b"\n# changed\n")
        assert code_fingerprint(copy) != before, rel
        f.write_bytes(original)
    assert code_fingerprint(copy) == before


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saliency_trust"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith("saliency_trust"))
    return out


def test_imports_go_one_way_and_no_module_borrows_a_private_name():
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE).as_posix()
        for module, names in _imports(f):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{rel} imports private {private} from {module}"
            if rel.startswith("data/"):
                assert not module.startswith("saliency_trust.workflows"), f"{rel} imports {module}"
    infer = dict(_imports(PACKAGE / "workflows" / "infer.py"))
    assert {"read_input", "read_mask", "write_map"} <= set(infer["saliency_trust.data.imageio"])
    assert "saliency_trust.workflows.train" not in infer
