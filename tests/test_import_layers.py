"""The import graph flows one way: each part of moeslim imports only parts on lower layers (or itself).

models <- data <- calibrate <- methods <- runtime <- appliers <- io/evaluate/export <- workflows <- cli <- the facade.
Every import counts, including the ones inside functions, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moeslim

PACKAGE = Path(moeslim.__file__).parent

# Lower number = lower layer. Parts on one layer must not import each other unless listed in SAME_LAYER_OK.
LAYERS: dict[str, int] = {
    "_package": 0,
    "config": 0,
    "hub": 0,
    "progress": 0,
    "outputs": 1,
    "devices": 1,
    "plans": 2,
    "models": 3,
    "data": 4,
    "calibrate": 5,
    "methods": 6,
    "runtime": 7,
    "appliers": 8,
    "io": 9,
    "evaluate": 10,
    "export": 10,
    "workflows": 11,
    "cli": 12,
    "__init__": 13,
}


def _part(module: str) -> str | None:
    """``moeslim.models.layer`` -> ``models``; ``moeslim`` -> ``__init__``; not ours -> None."""
    parts = module.split(".")
    if parts[0] != "moeslim":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, str]]:
    """(file, importing part, imported part) for every import of a moeslim module in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        src = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                dst = _part(name)
                if dst is not None and dst != src:
                    found.append((str(rel), src, dst))
    return found


def test_every_part_has_a_layer() -> None:
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    missing = sorted(parts - set(LAYERS))
    assert not missing, f"add these parts of moeslim to LAYERS in {__file__}: {missing}"


def test_imports_point_down_only() -> None:
    wrong = [
        f"{file}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
        for file, src, dst in _imports()
        if LAYERS[dst] >= LAYERS[src]
    ]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_check_sees_imports() -> None:
    """The walk must find the imports we know exist, or the test above would pass on nothing."""
    pairs = {(src, dst) for _, src, dst in _imports()}
    assert ("cli", "workflows") in pairs
    assert ("appliers", "runtime") in pairs
    assert ("calibrate", "models") in pairs


@pytest.mark.parametrize("name", ["inspect", "pipeline", "recipe", "runs", "variants", "demo"])
def test_no_flat_orchestration_modules(name: str) -> None:
    """Orchestration lives in ``workflows/``; a top-level ``inspect`` would also shadow the stdlib module."""
    assert not (PACKAGE / f"{name}.py").exists()
