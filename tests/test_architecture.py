"""The package's import graph: no cycles (top-level and function-level imports alike), layers point down."""

from __future__ import annotations

import ast
from pathlib import Path

import matt

PACKAGE_DIR = Path(matt.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["matt", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (`matt.x.y` -> `matt.x` if y is a name)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the `matt` modules it imports anywhere in its source (also inside functions).

    `from matt.pkg import name` counts as importing `matt.pkg.name` when that is a module, else `matt.pkg`.
    Importing a submodule is not counted as importing its parent package (Python runs the parent's
    `__init__`, but `matt/__init__.py` only imports lazily, and no subpackage imports back into its users)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules) if target.startswith("matt") else None
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_walker_sees_function_level_imports_and_finds_cycles():
    graph = import_graph()
    assert "matt.api" in graph["matt"]  # the lazy import inside matt.__getattr__
    assert "matt.modeling.registry" in graph["matt.modeling"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_matt_has_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_tracking_does_not_import_the_recipes():
    assert not {m for m in import_graph()["matt.tracking"] if m.startswith("matt.pipeline")}


def design_map() -> dict[str, int]:
    """docs/DESIGN.md's module map: module -> its line's rank (0 = top). A package listed without its
    modules (`evaluation/`) stands for all of them."""
    text = (PACKAGE_DIR.parent / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    block = text.split("```\nmatt/", 1)[1].split("```", 1)[0]
    ranks: dict[str, int] = {"matt": 0}
    parents: list[str] = ["matt"]
    for rank, line in enumerate(block.splitlines()[1:], start=1):
        depth = (len(line) - len(line.lstrip(" "))) // 2
        names = []
        for token in line.split():
            if not (token.endswith(".py") or token.endswith("/")):
                break
            names.append(token)
        if not names:
            continue  # a continuation line
        parents = parents[:depth]
        for name in names:
            module = ".".join([*parents, name.rstrip("/").removesuffix(".py")])
            ranks[module] = rank
            if name.endswith("/"):
                parents = [*parents, name.rstrip("/")]
    return ranks


def _design_rank(module: str, ranks: dict[str, int]) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):  # a module not listed on its own goes with its package's line
        if ".".join(parts[:end]) in ranks:
            return ranks[".".join(parts[:end])]
    return None


def test_the_design_module_map_lists_every_module_and_imports_point_down():
    ranks = design_map()
    graph = import_graph()
    assert "matt.pipeline.run_context" in ranks and "matt.modeling.base" in ranks
    unlisted = [m for m in graph if m != "matt" and _design_rank(m, ranks) in (None, 0)]
    assert not unlisted, f"modules missing from docs/DESIGN.md's module map: {unlisted}"
    upward = [(a, b) for a, edges in graph.items() for b in edges
              if _design_rank(b, ranks) < _design_rank(a, ranks)]
    assert not upward, f"imports of a module listed above the importer in docs/DESIGN.md: {upward}"
