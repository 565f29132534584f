"""The shape of the package (docs/architecture.rst): small modules, no import cycle
(type-only imports included), the pure core free of I/O, no tooling in the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import dim

PACKAGE = Path(dim.__file__).parent
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))

#: The pure core: no Redis, no threads, no clock of its own (docs/architecture.rst).
PURE = {
    "balance",
    "flow",
    "shares",
    "plan",
    "slots",
    "era",
    "protocol",
    "renewal",
    "configs",
    "change",
    "keys",
    "roster",
    "share",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module this one imports, at any level (``if TYPE_CHECKING:`` included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    names = {module_name(p) for p in MODULES}
    edges = {}
    for path in MODULES:
        name = module_name(path)
        # "from dim import x" names module dim.x; the package itself is not a dependency
        edges[name] = {m for m in imports_of(path) if m in names and m not in (name, "dim")}
    return edges


def test_no_module_is_over_600_lines() -> None:
    sizes = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    assert {m: n for m, n in sizes.items() if n > 600} == {}


def test_no_import_cycle_type_only_included() -> None:
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_core_does_no_io() -> None:
    """The pure modules import neither Redis, sockets nor time, nor the shells, and start
    no thread (a slot carries a ``threading.Event`` as its cancel flag, nothing more)."""
    shells = {"dim.node", "dim.leader", "dim.reconciler", "dim.store", "dim.manager", "dim.loop"}
    for path in MODULES:
        name = module_name(path)
        if name.split(".")[-1] not in PURE:
            continue
        imported = imports_of(path)
        assert not {m.split(".")[0] for m in imported} & {"redis", "time", "socket"}, name
        assert not imported & shells, name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not called & {"Thread", "Timer", "sleep", "monotonic", "time"}, name


def test_the_package_does_not_import_the_tooling() -> None:
    for path in MODULES:
        assert not {m for m in imports_of(path) if m.split(".")[0] == "tools"}, path
