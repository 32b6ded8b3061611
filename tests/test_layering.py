"""The layout shows the architecture: components import only the layers below them and never a stage."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dg_pipeline"

# Each component package and the packages it may import (core and settings are the foundation).
BELOW = {
    "core": set(),
    "settings": {"core"},
    "data": {"core", "settings"},
    "model": {"core", "settings", "data"},
    "objective": {"core", "settings", "data", "model"},
    "training": {"core", "settings", "data", "model", "objective"},
    "sampling": {"core", "settings", "data", "model"},
    "verify": {"core", "settings", "data", "model", "sampling"},
    "quant": {"core", "settings", "data", "model", "sampling", "verify"},
    "export": {"core", "settings", "data", "model", "sampling", "verify", "quant"},
}


def imported_packages(package: str) -> set[str]:
    out = set()
    for path in (PACKAGE / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "dg_pipeline" and len(parts) > 1 and parts[1] != package:
                    out.add(parts[1])
    return out


def test_every_component_imports_only_the_layers_below_it():
    assert set(BELOW) | {"stages"} == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    for package, allowed in BELOW.items():
        assert imported_packages(package) <= allowed, package


def test_model_does_not_import_export_and_nothing_below_stages_imports_stages():
    assert "export" not in imported_packages("model")
    assert all("stages" not in imported_packages(package) for package in BELOW)


def test_no_stage_imports_another_stage():
    """Stages only wire components; what two stages share lives in a module that is not a stage."""
    from dg_pipeline.core.registry import STAGES

    stage_modules = set(STAGES)  # stage=<name> lives in dg_pipeline/stages/<name>.py
    for name in stage_modules:
        tree = ast.parse((PACKAGE / "stages" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {f"dg_pipeline.stages.{other}" for other in stage_modules} & imported, name
