"""The package layout of docs/architecture.md, checked on the code: what each package may import,
the loose modules at the top of ``nowcast/``, no re-export shims or module aliases, and the lean
imports of ``nowcast predict``."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nowcast

PACKAGE = Path(nowcast.__file__).parent

#: What each unit of ``nowcast`` (a package or a loose module) may import from the others, as
#: docs/architecture.md lists it. Data flows one way: sources -> patches -> training (model) ->
#: nowcasts (forecasts) -> evaluate (scores), visualization (maps), export (NetCDF), predict.
ALLOWED = {
    "config": set(),
    "storage": {"config"},
    "parallel": {"config"},
    "sources": {"config", "storage", "parallel"},
    "windows": {"config", "sources"},
    "advection": set(),
    "verification": set(),
    "models": set(),
    "patches": {"config", "storage", "parallel", "sources", "windows", "advection"},
    "training": {
        "config",
        "storage",
        "parallel",
        "sources",
        "windows",
        "advection",
        "verification",
        "models",
        "patches",
    },
    "nowcasts": {"config", "storage", "sources", "windows", "advection", "training"},
    "visualization": {"nowcasts"},
    "export": {"config", "storage", "sources", "windows", "patches", "nowcasts"},
    "evaluate": {
        "config",
        "storage",
        "parallel",
        "sources",
        "windows",
        "advection",
        "verification",
        "patches",
        "training",
        "nowcasts",
        "visualization",
    },
    "predict": {"config", "storage", "sources", "windows", "nowcasts", "visualization", "export"},
    "train": {"training"},
    "cli": {
        "config",
        "storage",
        "sources",
        "patches",
        "training",
        "evaluate",
        "export",
        "predict",
    },
}

#: Names the package root itself offers every unit (its version, the quiet pysteps import).
ROOT_NAMES = {"__version__", "import_pysteps"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports_by_unit() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for path, module in _modules():
        unit = _unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import (use nowcast.<package>)")
            if isinstance(node, ast.ImportFrom) and node.module == "nowcast":
                targets = {a.name for a in node.names} - ROOT_NAMES
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nowcast."):
                targets = {_unit(node.module)}
            elif isinstance(node, ast.Import):
                targets = {_unit(a.name) for a in node.names if a.name.startswith("nowcast.")}
            else:
                continue
            graph[unit] |= targets - {unit}
    return graph


def _imported_names(tree: ast.Module) -> set[str]:
    return {
        alias.asname or alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }


def _all_names(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return [elt.value for elt in node.value.elts]
    return []


def test_every_package_imports_only_what_the_architecture_allows():
    graph = _imports_by_unit()
    assert set(graph) - {""} <= set(ALLOWED), set(graph) - set(ALLOWED)
    extra = {unit: sorted(targets - ALLOWED[unit]) for unit, targets in graph.items() if unit}
    assert not {unit: names for unit, names in extra.items() if names}


def test_the_top_of_the_package_keeps_at_most_eight_loose_modules():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(loose) <= 8, loose
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert set(ALLOWED) == set(loose) | packages


def test_no_reexport_shims_or_module_aliases_outside_init():
    for path, _ in _modules():
        text = path.read_text()
        if path.name != "__init__.py":
            assert "noqa: F401" not in text, f"{path}: a re-export shim"
            imported = _imported_names(ast.parse(text))
            reexported = sorted(set(_all_names(ast.parse(text))) & imported)
            assert not reexported, f"{path}: names re-exported through __all__: {reexported}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nowcast"):
                for alias in node.names:
                    submodule = PACKAGE.parent / Path(*f"{node.module}.{alias.name}".split("."))
                    is_module = submodule.with_suffix(".py").is_file() or submodule.is_dir()
                    assert not (is_module and alias.asname), (
                        f"{path}: module alias {alias.name} as {alias.asname}"
                    )


def test_predict_does_not_import_the_training_loop():
    code = (
        "import sys, nowcast.predict, nowcast.cli; "
        "print(sorted(m for m in sys.modules if m in "
        "('nowcast.training.loop', 'nowcast.training.step', 'nowcast.patches.loader', "
        "'nowcast.evaluate.stage')))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "[]"
