"""Every import inside the package points down the layers: server -> backends -> engine -> adapters ->
models / metrics / rank_rules -> errors / types (the applications on top — cli, training, loadtest,
vllm_plugin — may import any layer, and nothing below imports them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "matryoshka_lora"
LAYERS = {  # a module may import its own layer and the ones below it
    "cli": 9,
    "loadtest": 8,
    "training": 7,
    "vllm_plugin": 6,
    "server": 5,
    "backends": 4,
    "engine": 3,
    "adapters": 2,
    "models": 1,
    "metrics": 1,
    "rank_rules": 1,
    "errors": 0,
    "types": 0,
    "__init__": 0,
}


def layer_of(module: str) -> str:
    """matryoshka_lora.engine.engine -> engine; matryoshka_lora.types -> types."""
    return module.split(".")[1]


def package_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("matryoshka_lora."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("matryoshka_lora.")]
    return found


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    assert names - {"__pycache__"} <= set(LAYERS), f"give these a layer: {sorted(names - set(LAYERS))}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    upward = [m for m in package_imports(path) if LAYERS[layer_of(m)] > LAYERS[own]]
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}) imports a layer above it: {upward}"
