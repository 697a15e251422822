"""The architecture as drawn: imports go cli -> pipeline -> recipes -> formats, the stages sit on top
of pipeline's concept packages, typer/rich stay in cli/, and no module reaches into another's privates."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"cli": "lpc.cli", "pipeline": "lpc.pipeline", "recipes": "lpc.recipes", "formats": "lpc.formats"}
ORDER = ["cli", "pipeline", "recipes", "formats"]  # each may import only those after it


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, pkg in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([pkg, *parts]), path))
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _layer(module: str) -> str | None:
    for folder, pkg in PACKAGES.items():
        if module == pkg or module.startswith(pkg + "."):
            return folder
    return None


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_one_way(module, path):
    own = _layer(module)
    allowed = set(ORDER[ORDER.index(own):])
    for target, _, line in _imports(path):
        layer = _layer(target)
        assert layer is None or layer in allowed, f"{path}:{line}: {own}/ imports {target} (upward)"
        assert target.split(".")[0] not in PACKAGES, f"{path}:{line}: bare import {target}; use lpc.{target}"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_only_cli_draws(module, path):
    if _layer(module) == "cli":
        return
    for target, _, line in _imports(path):
        assert target.split(".")[0] not in ("typer", "rich"), f"{path}:{line}: {target} outside cli/"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_private_imports_across_modules(module, path):
    for target, names, line in _imports(path):
        if not target.startswith("lpc.") or target == module:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path}:{line}: imports private {private} from {target}"


@pytest.mark.parametrize("module,path", [(m, p) for m, p in MODULES if m.startswith("lpc.pipeline.")
                                         and not m.startswith("lpc.pipeline.stages")],
                         ids=[m for m, _ in MODULES if m.startswith("lpc.pipeline.")
                              and not m.startswith("lpc.pipeline.stages")])
def test_stages_are_the_top_of_the_pipeline(module, path):
    """Algorithms know nothing of how the stages drive them."""
    for target, _, line in _imports(path):
        assert not target.startswith("lpc.pipeline.stages"), f"{path}:{line}: {module} imports {target}"


def test_every_module_is_seen():
    assert len(MODULES) > 60 and any(m == "lpc.pipeline.stages.quantize" for m, _ in MODULES)


def test_a_violation_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lpc.cli.app import app\nfrom lpc.pipeline.io.models import _matches\n")
    found = _imports(bad)
    assert ("lpc.cli.app", ["app"], 1) in found and _layer(found[0][0]) == "cli"
    assert found[1][1] == ["_matches"]


def test_every_package_folder_is_packaged():
    """A sub-package missing from pyproject imports in an editable checkout but not from a wheel."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(project["packages"]), project["package-dir"]
    for folder, pkg in PACKAGES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            name = ".".join([pkg, *rel])
            assert name in listed, f"{name} ({init.parent}) is not in pyproject's packages"
            assert dirs.get(name) == "/".join([folder, *rel]), f"{name} has no package-dir entry"
