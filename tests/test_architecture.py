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
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saliency_trust."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("saliency_trust.")]
            for name in names:
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


def test_the_manifest_part_reads_model_folders_with_torch_blocked(tmp_path):
    """What the Slicer module does: load modelfolder.py by file path in a Python without torch."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "seed0.pt").write_bytes(b"")
    (folder / "model.json").write_text('{"schema_version": 1, "network": "densenet121", '
                                       '"replicates": {"0": "seed0.pt"}, "input": {"size": 64}, "classes": ["a", "b"]}')
    code = f"""
import importlib.util, sys
for blocked in ("torch", "torchvision", "monai", "numpy", "saliency_trust"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
spec = importlib.util.spec_from_file_location("modelfolder", {str(PACKAGE / "networks" / "modelfolder.py")!r})
mf = importlib.util.module_from_spec(spec)
sys.modules["modelfolder"] = mf
spec.loader.exec_module(mf)
f = mf.ModelFolder.open({str(folder)!r})
print(f.network_label, sorted(f.replicates), f.image_size, f.kind)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["densenet121", "[0]", "64", "classifier"]
