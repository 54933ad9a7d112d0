"""The shape of the code base, checked: each module keeps its private names to itself, the modules
of ``xrpc`` import one another without cycles, and the protocol core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "xrpc"
MODULES = sorted(p for p in ROOT.rglob("*.py"))
# the I/O a sans-IO core must never import
IO_MODULES = {"socket", "ssl", "select", "selectors", "asyncio", "anyio", "trio", "os", "subprocess", "threading", "mmap", "fcntl"}


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, attributes set on anything, slots, module names."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            own.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            own.add(node.value)  # __slots__ entries, setattr/getattr names
        elif isinstance(node, ast.alias):
            own.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            own.add(node.arg)
    return own


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the statements under ``if TYPE_CHECKING:``."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    inside.add(id(sub))
    return inside


def _imports(path: Path, tree: ast.AST) -> list[tuple[str, list[str], ast.AST]]:
    """(module imported, names taken, node) for every relative import outside TYPE_CHECKING."""
    skip = _type_checking_nodes(tree)
    package = _name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in skip:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            out.append((target, [a.name for a in node.names], node))
    return out


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in MODULES}


def test_no_module_reads_another_modules_private_names() -> None:
    problems = []
    modules = _modules()
    for path in MODULES:
        tree = ast.parse(path.read_text(), str(path))
        own = _own_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own:
                problems.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: .{node.attr}")
        for target, names, node in _imports(path, tree):
            for n in names:
                # a private module may be imported; a private name out of a sibling module may not
                if _is_private(n) and f"{target}.{n}" not in modules:
                    problems.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: from {target} import {n}")
    assert not problems, "private names read across modules:\n" + "\n".join(problems)


def test_the_check_sees_a_private_read() -> None:
    tree = ast.parse("def f(conn):\n    return conn._core\n")
    assert "_core" not in _own_names(tree)
    assert any(isinstance(n, ast.Attribute) and n.attr == "_core" for n in ast.walk(tree))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, names, _ in _imports(path, tree):
            for n in names:
                sub = f"{target}.{n}"
                dep = sub if sub in modules else target
                if dep in modules and dep != mod and dep != "xrpc":
                    graph[mod].add(dep)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_modules_import_each_other_without_cycles() -> None:
    # the package itself re-exports everything and is left out; imports for type checking only are not imports
    graph = {m: deps for m, deps in _graph().items() if m != "xrpc"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted((ROOT / "_protocol").glob("*.py")), ids=lambda p: p.name)
def test_the_protocol_core_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [(node.module or "").split(".")[0]]
        elif isinstance(node, ast.ImportFrom):
            # inside xrpc: only the core's own modules and the error classes
            target = "." * node.level + (node.module or "")
            assert target.startswith(".") and (node.level == 1 or target == ".._errors"), f"{path.name} imports {target}"
            continue
        else:
            continue
        assert not set(names) & IO_MODULES, f"{path.name} imports {names}"
