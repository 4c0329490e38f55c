"""House rules read from the source: no engine function takes more than six positional parameters, and no public one
more than four (options go after ``*``, scikit-image's style)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "monai_bundle" / "saliency_trust"
MAX_POSITIONAL = 6
MAX_PUBLIC_POSITIONAL = 4


def _positional(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args.posonlyargs + node.args.args
    return [a.arg for a in args if a.arg not in ("self", "cls")]


def test_no_engine_function_takes_more_than_six_positional_parameters():
    """Options after ``*`` (scikit-image's style): interchangeable ints passed by position go unnoticed
    when reordered, keywords do not."""
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and len(_positional(node)) > MAX_POSITIONAL:
                offenders.append(f"{path.relative_to(ENGINE)}:{node.lineno} {node.name} "
                                 f"({len(_positional(node))} positional)")
    assert not offenders, "make the options keyword-only (after *):\n" + "\n".join(offenders)


def test_no_public_engine_function_takes_more_than_four_positional_parameters():
    """A public signature's options are keywords: ``random_pair_ssim(maps, 50, seed=3)``, never a row of ints whose
    order a reader must remember."""
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_")
                    and len(_positional(node)) > MAX_PUBLIC_POSITIONAL):
                offenders.append(f"{path.relative_to(ENGINE)}:{node.lineno} {node.name} "
                                 f"({len(_positional(node))} positional)")
    assert not offenders, "make the options keyword-only (after *):\n" + "\n".join(offenders)


def test_the_rule_sees_a_long_signature(tmp_path):
    """The check can fail: seven positional parameters are counted, a keyword-only tail is not."""
    tree = ast.parse("def f(a, b, c, d, e, f, g): pass\ndef g(a, b, c, *, d, e, f, g): pass\n")
    long, short = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert len(_positional(long)) == 7 > MAX_POSITIONAL and len(_positional(short)) == 3
