"""The house keeps its shape: every import inside osteolib points down the layer order, and no modules import each
other in a loop (imports inside functions count too: a lazy import hides a loop, it does not remove it).

Layers, bottom to top: leaves (study, runs, paths, utils, plotting) -> data -> models -> engine -> evaluation ->
explain -> stages -> report -> cli. A module may import its own layer and the layers below; nothing imports cli.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "osteolib"
LAYERS = ["", "data", "models", "engine", "evaluation", "explain", "stages", "report", "cli"]  # "" = the leaves


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""
    return LAYERS.index(top)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The osteolib modules ``path`` imports, anywhere in it, resolved to module names."""
    here = module_name(path, package)
    is_package = path.name == "__init__.py"
    modules = {module_name(p, package) for p in package.rglob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import submodule" imports the submodule
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != package.name:
                continue
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != here:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    graph = {module_name(p, package): imports_of(p, package) for p in sorted(package.rglob("*.py"))}
    # a package's __init__ runs before any of its modules: importing a.b imports a too
    for module in list(graph):
        parent = module.rsplit(".", 1)[0]
        if "." in module and parent in graph and parent != module:
            graph[module] = graph[module] | ({parent} if parent != package.name else set())
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                out.append(f"{module} (layer {LAYERS[layer_of(module)] or 'leaves'}) imports {target} "
                           f"(layer {LAYERS[layer_of(target)] or 'leaves'}), above it")
    return sorted(out)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as a list of modules (first == last), or None. A package importing its own modules from
    its __init__ is not a loop: the edge module -> its parent package is left out when the parent imports it."""
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and m in graph.get(t, set()))} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        assert layer_of(module) >= 0, module
        if path.parent == PACKAGE:
            assert path.stem in ("__init__", "study", "runs", "paths", "utils", "plotting"), (
                f"{path.name} sits at the top of the package: put it in the folder of its layer")


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_loops():
    assert find_cycle(import_graph()) is None


def test_checker_catches_a_back_import_and_a_loop(tmp_path):
    """The checks above can fail: a copy of the package with one back-import (data -> stages) fails both."""
    import shutil

    copy = tmp_path / "osteolib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    graph = import_graph(copy)
    assert layer_violations(graph) == [] and find_cycle(graph) is None
    io = copy / "data" / "io.py"
    io.write_text(io.read_text() + "\n\ndef _late():\n    from osteolib.stages import finetune  # noqa: F401\n")
    graph = import_graph(copy)
    assert any(v.startswith("osteolib.data.io (layer data) imports osteolib.stages.finetune") for v in
               layer_violations(graph))
    assert find_cycle(graph) is not None


@pytest.mark.parametrize("layer", [name for name in LAYERS if name])
def test_each_layer_names_its_public_api(layer):
    init = PACKAGE / layer / "__init__.py"
    assert init.is_file(), f"osteolib/{layer}/ has no __init__.py"
    tree = ast.parse(init.read_text())
    assert ast.get_docstring(tree), f"osteolib/{layer}/__init__.py: say in a docstring what the layer holds"
