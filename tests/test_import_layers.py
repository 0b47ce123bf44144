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
    "__main__": 13,  # python -m moeslim: the CLI
}


def _part(module: str) -> str | None:
    """``moeslim.models.layer`` -> ``models``; ``moeslim`` -> ``__init__``; not ours -> None."""
    parts = module.split(".")
    if parts[0] != "moeslim":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, str]]:
    """(module, importing part, imported part) for every import of a moeslim module from another part
    (relative imports resolved: the module graph below)."""
    found = []
    for src, dsts in _module_graph().items():
        for dst in sorted(dsts):
            src_part, dst_part = _part(src), _part(dst)
            if src_part is not None and dst_part is not None and dst_part != src_part:
                found.append((src, src_part, dst_part))
    return found


def test_every_part_has_a_layer() -> None:
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    missing = sorted(parts - set(LAYERS))
    assert not missing, f"add these parts of moeslim to LAYERS in {__file__}: {missing}"


def test_imports_point_down_only() -> None:
    wrong = [
        f"{module}: {src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
        for module, src, dst in _imports()
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


# -- inside a part: modules, not only parts --------------------------------------------------------------------

def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_graph() -> dict[str, set[str]]:
    """moeslim module -> the moeslim modules it imports (lazy imports too; ``from pkg import submodule`` counts
    as importing the submodule)."""
    files = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def _facade(src: str, dst: str) -> bool:
    """``dst`` is a package that contains ``src``: importing one's own package's re-exports is not a circle."""
    return src.startswith(dst + ".")


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of ``graph`` that import each other, directly or around a circle (Tarjan's strongly connected
    components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles_between_modules() -> None:
    graph = {src: {d for d in dsts if not _facade(src, d)} for src, dsts in _module_graph().items()}
    circles = _circles(graph)
    assert not circles, "modules that import each other (directly or around a circle):\n" + "\n".join(
        " <-> ".join(c) for c in circles)


# Subpackages that are compositions of their siblings, declared: the joint planner chooses among pruning and
# quantization options, so it measures them with those methods' own code (one way: they never import it back,
# which the circle checks enforce).
COMPOSITIONS: dict[str, set[str]] = {"moeslim.methods.joint": {"moeslim.methods.prune", "moeslim.methods.quant",
                                                               "moeslim.methods.skip"}}


def _sibling_imports(graph: dict[str, set[str]], packages: set[str]) -> list[str]:
    """Lines "src imports dst", one per import of ``graph`` between sibling subpackages of one part (``packages``: the
    modules that are packages), except the declared ``COMPOSITIONS``."""
    wrong = []
    for src, dsts in graph.items():
        parts = src.split(".")
        if len(parts) < 3:
            continue
        part = ".".join(parts[:2])
        own = ".".join(parts[:3]) if ".".join(parts[:3]) in packages else None
        for dst in sorted(dsts):
            dparts = dst.split(".")
            if len(dparts) < 3 or ".".join(dparts[:2]) != part:
                continue
            sub = ".".join(dparts[:3])
            if sub in packages and sub != own and src != part and sub not in COMPOSITIONS.get(own or "", set()):
                wrong.append(f"{src} imports {dst}")
    return wrong


def test_sibling_subpackages_do_not_import_each_other() -> None:
    """Inside a part (``methods``), a subpackage (``methods.merge``) imports its own modules and the part's shared
    modules (``methods.router_fit``), never another subpackage (except the declared ``COMPOSITIONS``); shared
    modules import no subpackage."""
    packages = {_module_of(p.parent) for p in PACKAGE.rglob("__init__.py")}
    wrong = _sibling_imports(_module_graph(), packages)
    assert not wrong, "imports between sibling subpackages (move the shared code below both):\n" + "\n".join(wrong)


def test_the_module_check_sees_circles() -> None:
    graph = _module_graph()
    assert "moeslim.runtime.skipping" in graph["moeslim.runtime.odp"]  # a real edge the walk must see
    assert "moeslim.models.expert_edit" in graph["moeslim.methods.merge.driver"]


def test_the_checks_find_what_they_forbid() -> None:
    """On small made-up graphs: the circle and sibling checks report the import knots they exist to catch."""
    runtime = {"moeslim.runtime.odp": {"moeslim.runtime.skipping"},
               "moeslim.runtime.skipping": {"moeslim.runtime.odp", "moeslim.runtime.routed_experts"},
               "moeslim.runtime.routed_experts": set()}
    assert _circles(runtime) == [["moeslim.runtime.odp", "moeslim.runtime.skipping"]]
    around = {"moeslim.a": {"moeslim.b"}, "moeslim.b": {"moeslim.c"}, "moeslim.c": {"moeslim.a"}}
    assert _circles(around) == [["moeslim.a", "moeslim.b", "moeslim.c"]]
    assert _circles({"moeslim.a": {"moeslim.b"}, "moeslim.b": set()}) == []

    packages = {"moeslim.methods", "moeslim.methods.lowrank", "moeslim.methods.merge", "moeslim.methods.joint",
                "moeslim.methods.prune"}
    methods = {"moeslim.methods.lowrank.driver": {"moeslim.methods.merge.driver", "moeslim.methods.lowrank.svd",
                                                  "moeslim.methods.router_fit"},
               "moeslim.methods.router_fit": {"moeslim.methods.prune"},
               "moeslim.methods.joint.solve": {"moeslim.methods.prune.driver"}}  # a declared composition
    assert _sibling_imports(methods, packages) == [
        "moeslim.methods.lowrank.driver imports moeslim.methods.merge.driver",
        "moeslim.methods.router_fit imports moeslim.methods.prune"]
