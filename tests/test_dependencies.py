"""Every third-party package the library imports is declared in pyproject.toml: one that only
arrives through another package is one upgrade away from an ImportError."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from helpers.paths import REPO


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(root) -> set[str]:
    """Top-level names of every absolute import under ``root``, less the standard library and covidct."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"covidct", "__future__"}


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_norm(re.split(r"[<>=!~\[; ]", spec)[0]) for spec in project["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    undeclared = {
        module: owners.get(module, ["(not installed)"])
        for module in sorted(imported_modules(REPO / "src"))
        if not {_norm(d) for d in owners.get(module, [])} & declared
    }
    assert not undeclared, f"imported by src/ but not in pyproject.toml's dependencies: {undeclared}"


def test_the_check_sees_an_undeclared_import(tmp_path) -> None:
    (tmp_path / "m.py").write_text("import numpy\nfrom ruamel.yaml import YAML\nimport json\nfrom . import x\n")
    assert imported_modules(tmp_path) == {"numpy", "ruamel"}
