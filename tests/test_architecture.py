"""The engine's shape: no import cycle between its subpackages, and a torch-free manifest reader."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "monai_bundle" / "saliency_trust"


def _edges() -> dict[str, set[str]]:
    """Subpackage (or top-level module) -> the others it imports, lazy imports inside functions included."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        here = rel[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against this file's package
                base = ["saliency_trust", *rel[:-1]][: len(rel) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "saliency_trust":
                names = [f"saliency_trust.{a.name}" for a in node.names]  # from saliency_trust import faults
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saliency_trust."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("saliency_trust.")]
            for name in names:
                if name.count(".") < 1:
                    continue
                there = name.split(".")[1]
                if there != here:
                    edges.setdefault(here, set()).add(there)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_subpackages():
    edges = _edges()
    assert "networks" in edges and "saliency" in edges  # the walk sees the package
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))
    # The cycle checker itself finds one when there is one.
    assert _cycle({**edges, "networks": edges["networks"] | {"saliency"}, "saliency": {"networks"}})


#: Run first in a child: any import of these (or of anything under them) raises ImportError.
_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Blocker())
"""


def _child(code: str, blocked: tuple[str, ...]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _BLOCKER.format(blocked=blocked) + code], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")


def _model_folders(root) -> None:
    good = root / "m"
    good.mkdir()
    (good / "seed0.pt").write_bytes(b"")
    (good / "model.json").write_text('{"schema_version": 1, "network": "densenet121", "replicates": {"0": "seed0.pt"}, '
                                     '"input": {"size": 64}, "classes": ["a", "b"]}')
    bad = root / "bad"
    bad.mkdir()
    (bad / "w.pt").write_bytes(b"")
    (bad / "model.json").write_text('{"schema_version": 1, "network": "densenet121", "weights": "w.pt", '
                                    '"input": {"size": 8}, "classes": ["a", "b"]}')


def test_the_manifest_part_reads_model_folders_with_torch_and_numpy_blocked(tmp_path):
    """What the Slicer module does: load networks/manifest.py by file path, torch, numpy, jsonschema and the
    package itself unimportable; it lists, opens and validates model folders (the schema from its JSON file)."""
    _model_folders(tmp_path)
    lines = _child(f"""
import importlib.util
spec = importlib.util.spec_from_file_location("manifest", {str(PACKAGE / "networks" / "manifest.py")!r})
mf = importlib.util.module_from_spec(spec)
sys.modules["manifest"] = mf
spec.loader.exec_module(mf)
found = mf.find_models({str(tmp_path)!r})
f = found["m"]
print(type(f).__name__, f.network_label, sorted(f.replicates), f.image_size, f.kind, f.assessment_file.name)
print(found["bad"])
print(sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED))
""", ("torch", "torchvision", "monai", "numpy", "jsonschema", "saliency_trust"))
    assert lines[0].split() == ["ModelManifest", "densenet121", "[0]", "64", "classifier", "results.json"]
    assert "model.json: field 'input.size': 8 is less than the minimum of 16" in lines[1], lines[1]
    assert lines[2] == "[]"


def test_the_slicer_lib_loads_without_torch(tmp_path):
    """Every room of SaliencyTrustLib imports without the engine's packages, and reads the bundle's method
    table and model folders through the files it loads by path."""
    _model_folders(tmp_path)
    lib = REPO / "SaliencyTrust" / "SaliencyTrustLib"
    rooms = sorted(p.stem for p in lib.glob("*.py") if p.stem != "__init__")
    lines = _child(f"""
import importlib
sys.path.insert(0, {str(lib.parent)!r})
for room in {rooms!r}:
    importlib.import_module("SaliencyTrustLib." + room)
from SaliencyTrustLib import bundle, texts
print(",".join(texts.method_names({str(REPO / "monai_bundle")!r})))
print(sorted(bundle.find_models({str(tmp_path)!r}, {str(REPO / "monai_bundle")!r})))
print(sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED))
""", ("torch", "torchvision", "monai", "saliency_trust", "jsonschema"))
    from saliency_trust.methods import METHODS

    assert lines[0].split(",") == list(METHODS)
    assert lines[1] == "['bad', 'm']" and lines[2] == "[]"
