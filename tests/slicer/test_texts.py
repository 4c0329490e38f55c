"""The panel's method names are the bundle's own table (``saliency_trust/methods.py`` loaded by path), not a copy;
a bundle without a readable table is said in one sentence."""

from __future__ import annotations

import shutil
import sys

import pytest
from saliency_trust.methods import LABELS, METHODS

from tests.conftest import REPO

LIB = REPO / "SaliencyTrust" / "SaliencyTrustLib"
sys.path.insert(0, str(LIB.parent))

from SaliencyTrustLib import bundle, texts  # noqa: E402
from SaliencyTrustLib.errors import BundleError  # noqa: E402


def _bundle(tmp_path, methods_source: str | None):
    """A bundle folder whose saliency_trust/methods.py is ``methods_source`` (None: no such file)."""
    root = tmp_path / "bundle"
    (root / "saliency_trust").mkdir(parents=True)
    if methods_source is not None:
        (root / "saliency_trust" / "methods.py").write_text(methods_source)
    return root


def test_the_names_are_the_bundles_table_in_its_order():
    assert texts.METHODS == METHODS and dict(LABELS) == texts.METHOD_NAMES
    assert list(texts.method_names(REPO / "monai_bundle")) == list(METHODS)


def test_a_bundle_with_another_table_gives_its_names(tmp_path):
    source = (REPO / "monai_bundle" / "saliency_trust" / "methods.py").read_text()
    changed = source.replace('Method("grad", "Gradient"', 'Method("grad", "Vanilla gradient"')
    assert changed != source
    names = texts.method_names(_bundle(tmp_path, changed))
    assert names["grad"] == "Vanilla gradient" and list(names) == list(METHODS)


@pytest.mark.parametrize(("source", "words"), [
    (None, "(it has no saliency_trust/methods.py), so the saliency methods are unknown."),
    ("def broken(:\n", "could not be loaded, so the saliency methods are unknown (SyntaxError"),
])
def test_a_missing_or_broken_table_is_one_sentence(tmp_path, source, words):
    root = _bundle(tmp_path, source)
    with pytest.raises(BundleError) as err:
        texts.method_names(root)
    message = str(err.value)
    assert words in message and str(root) in message, message
    assert message.count(". ") == 0 and message.endswith(")." if source else "unknown.")


def test_the_lib_holds_no_copy_of_the_method_table():
    sources = {p.name: p.read_text() for p in LIB.glob("*.py")}
    for label in LABELS.values():
        if label in ("Gradient", "XRAI"):  # words that also occur in ordinary sentences
            continue
        holders = [name for name, text in sources.items() if f'"{label}"' in text]
        assert not holders, (label, holders)
    assert bundle.METHODS_MODULE == "saliency_trust/methods.py"
    assert (REPO / "monai_bundle" / bundle.METHODS_MODULE).is_file()
    assert (REPO / "monai_bundle" / bundle.MANIFEST_MODULE).is_file()


def test_the_module_loads_the_bundle_files_once_per_bundle(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "monai_bundle" / "saliency_trust", copy / "saliency_trust",
                    ignore=shutil.ignore_patterns("__pycache__"))
    ours = bundle.methods_module(REPO / "monai_bundle")
    assert bundle.methods_module(REPO / "monai_bundle") is ours
    other = bundle.methods_module(copy)
    assert other is not ours and other.__file__ == str(copy / "saliency_trust" / "methods.py")
