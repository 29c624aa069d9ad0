"""The layout rules of docs/architecture.md, checked on the source: no module over ~400 lines, and no
module reaching into another module's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spark_gmm"
#: Most lines of a module before it should be split (the project's "~400").
MOST_LINES = 400
#: Protected names of the frameworks spark_gmm builds on, meant for subclasses and helpers:
#: pyspark.ml's Params and models, Py4J gateways, argparse; and the hooks of `persistence.Persistable`
#: (`_save`, `_load`), which every persistable class implements and the persistence code calls.
FRAMEWORK_NAMES = {
    "_set", "_setDefault", "_copyValues", "_resetUid", "_dummy", "_paramMap", "_defaultParamMap",
    "_jvm", "_jsc", "_jdf", "_gateway", "_ensure_initialized", "_actions", "_save", "_load",
}


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def own_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, methods, module variables, and attributes
    it assigns on `self` or `cls` (assigning `other._x` does not make `_x` this module's)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and (
            isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {name for name in names if private(name)}


def reach_ins(path: Path) -> list[str]:
    """Uses of another module's private names in `path`: `from m import _x`, or `obj._x` where the
    module itself defines no `_x`."""
    tree = ast.parse(path.read_text())
    own = own_private_names(tree) | FRAMEWORK_NAMES
    found = []
    for node in sorted(ast.walk(tree), key=lambda node: getattr(node, "lineno", 0)):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found += [f"line {node.lineno}: from {module} import {a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_privates():
    found = {str(path.relative_to(PACKAGE)): reach_ins(path) for path in modules()}
    assert {name: uses for name, uses in found.items() if uses} == {}


def test_the_check_finds_a_reach_in(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from .model import _hidden\n"
        "class A:\n    def __init__(self):\n        self._mine = 1\n"
        "def f(model, a):\n    model._summary = None\n    return model._feature_names, a._mine, model._set\n"
    )
    assert reach_ins(sample) == [
        "line 1: from .model import _hidden", "line 6: model._summary", "line 7: model._feature_names",
    ]


def test_no_module_is_over_the_line_budget():
    sizes = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in modules()}
    assert {name: lines for name, lines in sizes.items() if lines > MOST_LINES} == {}


def test_the_modules_executors_run_do_not_import_pyspark_ml():
    """A new Python worker on an executor imports what its tasks unpickle (the packing, the passes,
    the resident tasks, scoring); pyspark.ml would add about half a second to each such start."""
    import subprocess
    import sys

    executor_side = ["blocks", "barrier", "scoring", "em", "mixed_input", "latent_estep", "marginal"]
    code = ("import importlib, sys\n"
            f"for name in {executor_side!r}: importlib.import_module('spark_gmm.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('pyspark.ml')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
