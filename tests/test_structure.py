"""The shape of the code base: modules a newcomer can read, names that mean one thing.

No module over 800 lines, no function over 100, no class name defined in two modules of
the core or the pass library, and every package of the distribution listed in
pyproject.toml (the list is explicit: a package left out would be missing from wheels).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["onnxopt", "passes", "models", "benchmarks"]
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100


def _modules(folders=SOURCES):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", list(_modules()), ids=_rel)
def test_module_and_its_functions_stay_readable(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{_rel(path)} has {text.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{_rel(path)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_no_class_name_is_defined_in_two_modules():
    where = defaultdict(list)
    for path in _modules(["onnxopt", "passes"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(_rel(path))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not clashes


def test_every_package_is_in_the_distribution():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((name, *parts)))
    assert found == listed


def test_the_readme_layout_names_every_core_module_and_pass_package():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Benchmarks")]
    named = set()
    for line in layout.splitlines():
        if line.startswith("- `"):
            named.add(line[3:line.index("`", 3)])
    wanted = {_rel(p) for p in _modules(["onnxopt"]) if p.parent == ROOT / "onnxopt" or p.name != "__init__.py"}
    wanted |= {_rel(p.parent) + "/" for p in _modules(["onnxopt", "passes"])
               if p.name == "__init__.py" and p.parent not in (ROOT / "onnxopt", ROOT / "passes")}
    wanted |= {_rel(p) for p in _modules(["passes"]) if p.parent != ROOT / "passes" and p.name != "__init__.py"}
    assert not wanted - named, f"not in the README's layout: {sorted(wanted - named)}"
    assert not named - wanted, f"in the README's layout but not in the tree: {sorted(named - wanted)}"
