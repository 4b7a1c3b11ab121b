"""The DVC graph is checked, not hand-kept: every file of ``covidct`` a stage imports (its whole
import closure, read from the source) is one of its ``deps``, and every ``params.yaml`` section
a stage reads is in its ``params``. Otherwise editing, say, the AUC code would re-run
``evaluate`` but not the training whose checkpoint the same code chose."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from covidct.config import SECTIONS
from helpers.paths import REPO

SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The file of module ``covidct.x.y`` (None for a name that is no module, e.g. a class)."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Modules of covidct that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("covidct")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covidct"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def import_closure(entry: Path) -> set[Path]:
    """Every covidct source file ``entry`` runs, less the package ``__init__`` files that hold
    a docstring and nothing else."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for name in _imports(path) if (f := _module_file(name)) is not None]
    return {p for p in seen if SRC in p.parents and not (p.name == "__init__.py" and _docstring_only(p))}


def _stages() -> dict[str, dict]:
    """Stage name -> definition, ``foreach`` stages expanded to their first item (deps are the same but for data paths)."""
    out = {}
    for name, stage in STAGES.items():
        out[name] = stage["do"] if "foreach" in stage else stage
    return out


def _entry(stage: dict) -> Path:
    script = stage["cmd"].split()[1]
    return REPO / script


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", list(_stages()))
def test_every_imported_file_is_a_dependency(name: str) -> None:
    stage = _stages()[name]
    missing = sorted(
        p.relative_to(REPO).as_posix() for p in import_closure(_entry(stage)) if not _covered(p, stage["deps"])
    )
    assert not missing, (
        f"dvc.yaml stage {name} imports these files but does not list them (or a folder holding them) in deps: {missing}"
    )


def _sections_read(files: set[Path]) -> set[str]:
    """``params.yaml`` sections read through ``CropConfig.of(params)`` (and the like) in these files."""
    keys = {kind.__name__: name for name, kind in SECTIONS.items()}
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "of":
                found |= {keys[node.func.value.id]} if getattr(node.func.value, "id", None) in keys else set()
    return found


@pytest.mark.parametrize("name", list(_stages()))
def test_every_section_read_is_a_param(name: str) -> None:
    stage = _stages()[name]
    listed = {p.split(".")[0] for p in stage.get("params", [])}
    files = import_closure(_entry(stage)) | {_entry(stage)}
    read = _sections_read({f for f in files if "stages" in f.parts or f == _entry(stage)})
    assert read <= listed, (
        f"dvc.yaml stage {name} reads params.yaml sections {sorted(read - listed)} but does not list them in params"
    )


def test_the_section_check_sees_what_a_stage_reads() -> None:
    """The check itself can fail: it finds the sections a stage module reads."""
    assert _sections_read({REPO / "src/covidct/stages/crop_images.py"}) >= {"crop"}


def test_the_closure_sees_imports_inside_functions() -> None:
    """The check itself can fail: a stage's closure holds what its functions import late."""
    closure = {p.relative_to(SRC).as_posix() for p in import_closure(REPO / "pipelines/train_classifier.py")}
    assert {
        "covidct/metrics.py",
        "covidct/config.py",
        "covidct/classification/train.py",
        "covidct/tracking.py",
    } <= closure
