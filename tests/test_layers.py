"""Imports point down only (DESIGN.md): cli > driver > storage > engine > models > data > config.
The engine never imports ray, so it runs the same in one process, under torchrun and in a Ray worker."""

import ast
from pathlib import Path

import pytest

ORDER = ["config", "data", "models", "engine", "storage", "driver", "cli"]
PKG = Path(__file__).resolve().parents[1] / "deim_ray"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ORDER)
def test_layer_imports_point_down(layer):
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    bad = []
    for path in (PKG / layer).rglob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "deim_ray" and len(parts) > 1 and parts[1] in ORDER and parts[1] not in allowed:
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, bad


@pytest.mark.parametrize("layer", ["config", "data", "models", "engine", "storage"])
def test_lower_layers_never_import_ray(layer):
    hits = [f"{p.relative_to(PKG)}: {n}" for p in (PKG / layer).rglob("*.py") for n in _imports(p)
            if n == "ray" or n.startswith("ray.")]
    assert not hits, hits


def test_the_check_sees_real_imports():
    # the driver does import ray; if the parser missed imports, the tests above would pass vacuously
    assert any(n.startswith("ray") for n in _imports(PKG / "driver" / "ray_stage.py"))
