"""The import graph of framebus/ and services/ has no cycle, counting the imports made inside
functions too (an import moved into a function to dodge a cycle is still a cycle), and the
layers hold: framebus imports nothing of services, services/runtime, services/control and
services/calls (what call transports share) name no service."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("framebus", "services")
SERVICE_PACKAGES = ("hub", "capture", "decode", "vision", "recorder", "supervisor", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
        for path in sorted((REPO / root).rglob("*.c")):  # a compiled extension (framebus._atomic): a leaf module
            found[".".join(path.relative_to(REPO).with_suffix("").parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module named by an import statement anywhere in `tree` (annotation-only imports excluded)."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            out.extend(f"{base}.{alias.name}" for alias in node.names)  # a module, else its package (graph())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.suffix == ".c":
            edges[name] = set()
            continue
        targets = set()
        for imported in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            while imported and imported not in modules:  # `from pkg import name`: the module, or the package
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles_between_modules():
    edges = graph()
    assert len(edges) > 80  # the walk found the code
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_cycle_dodged_inside_a_function(tmp_path):
    a = ast.parse("def f():\n    from services.x import b\n")
    b = ast.parse("from services.x import a\n")
    edges = {"services.x.a": {m for m in _imports(a, "services.x.a", False) if m.startswith("services.x.")},
             "services.x.b": {m for m in _imports(b, "services.x.b", False) if m.startswith("services.x.")}}
    assert cycles(edges) == [["services.x.a", "services.x.b"]]
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services.x import a\n")
    assert not [m for m in _imports(typed, "services.x.b", False) if m.startswith("services.x.")]


def test_the_layers_hold():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("framebus"):
            assert not [t for t in targets if t.startswith("services")], f"{name} imports services: {targets}"
        if name.startswith(("services.runtime", "services.control", "services.calls")):
            named = [t for t in targets if t.split(".")[1:2] and t.split(".")[1] in SERVICE_PACKAGES]
            assert not named, f"{name} names a service: {named}"
