"""The layout's import rules (DESIGN.md "Layout"), checked on the source:

- `mesh` imports neither `node` nor `cloud_relay`;
- `mesh` does no I/O: it imports none of asyncio, aiosqlite, sqlite3, socket, grpc,
  aiohttp, threading, multiprocessing, concurrent.futures (so the gRPC service stubs are
  generated into node/transport and cloud_relay, and only the message code into mesh/wire);
- `node` has no import cycle (module-level imports, TYPE_CHECKING ones included).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = frozenset(
    {
        "asyncio",
        "aiosqlite",
        "sqlite3",
        "socket",
        "grpc",
        "aiohttp",
        "threading",
        "multiprocessing",
        "concurrent",
    }
)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # and the bodies of `if TYPE_CHECKING:` blocks
        nodes = [
            n
            for block in nodes
            for n in ([block, *block.body] if isinstance(block, ast.If) else [block])
        ]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _package(name: str) -> list[Path]:
    return sorted((ROOT / name).rglob("*.py"))


def test_mesh_imports_neither_node_nor_cloud_relay() -> None:
    wrong = {
        _module(path): sorted(
            i
            for i in _imports(path, top_level_only=False)
            if i.split(".")[0] in ("node", "cloud_relay")
        )
        for path in _package("mesh")
    }
    assert {m: i for m, i in wrong.items() if i} == {}


def test_mesh_does_no_io() -> None:
    impure = {}
    for path in _package("mesh"):
        used = sorted(
            i for i in _imports(path, top_level_only=False) if i.split(".")[0] in IO_LIBRARIES
        )
        if used:
            impure[_module(path)] = used
    assert impure == {}, "mesh is the pure library: move I/O to node/ (or cloud_relay/)"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                found.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_node_has_no_import_cycle() -> None:
    modules = {_module(path): path for path in _package("node")}
    graph = {
        module: {i for i in _imports(path, top_level_only=True) if i in modules}
        for module, path in modules.items()
    }
    assert [" -> ".join(cycle) for cycle in _cycles(graph)] == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# node's subpackages in layers: each may import those before it, never one after it.
NODE_LAYERS = ("store", "transport", "serving", "api")


def test_node_subpackages_are_layered() -> None:
    upward = {}
    for path in _package("node"):
        parts = _module(path).split(".")
        if len(parts) < 3 or parts[1] not in NODE_LAYERS:
            continue
        rank = NODE_LAYERS.index(parts[1])
        wrong = sorted(
            i
            for i in _imports(path, top_level_only=False)
            if i.startswith("node.")
            and i.split(".")[1] in NODE_LAYERS
            and NODE_LAYERS.index(i.split(".")[1]) > rank
        )
        if wrong:
            upward[_module(path)] = wrong
    assert upward == {}, f"layers, lowest first: {' <- '.join(NODE_LAYERS)}"
