"""The layout's import rules (DESIGN.md "Layout"), checked on the source:

- `mesh` imports neither `node` nor `cloud_relay`, and `cloud_relay` does not import `node`;
- `mesh` does no I/O of any kind (it takes bytes, values and `now_ms` and returns values):
  it imports no module that does I/O, runs processes or threads, reads the clock or probes
  the machine (`MESH_MAY_NOT_IMPORT`), and calls nothing that touches files, the
  environment or the hardware (`_io_calls`);
- `node` has no import cycle (module-level imports, TYPE_CHECKING ones included), and its
  subpackages are layered.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MESH_MAY_NOT_IMPORT = frozenset(
    {
        # sockets, event loops, databases, the network
        "asyncio",
        "aiosqlite",
        "sqlite3",
        "socket",
        "ssl",
        "select",
        "selectors",
        "grpc",
        "aiohttp",
        "http.client",
        "urllib.request",
        "zeroconf",
        # threads and processes
        "threading",
        "multiprocessing",
        "concurrent",
        "subprocess",
        "signal",
        # files
        "io",
        "tempfile",
        "shutil",
        "glob",
        "fcntl",
        "mmap",
        "os.path",
        "importlib",  # finding a package searches the file system
        # the clock and the machine
        "time",
        "platform",
        "psutil",
        "resource",
    }
)
# (module, import): why it is allowed.
MESH_IMPORT_EXCEPTIONS = {
    ("mesh.clock", "time"): "the one place that reads the clock; everything else is given it",
}
# `os` in mesh is for the kernel's random bytes only (what `secrets` uses too).
MESH_OS_ALLOWED = frozenset({"urandom"})
# Methods that touch the file system (pathlib.Path's, and file objects'), judged by name.
FILE_METHODS = frozenset(
    {
        "open",
        "read_text",
        "read_bytes",
        "write_text",
        "write_bytes",
        "mkdir",
        "rmdir",
        "unlink",
        "rename",
        "chmod",
        "lchmod",
        "touch",
        "exists",
        "is_file",
        "is_dir",
        "is_symlink",
        "iterdir",
        "glob",
        "rglob",
        "stat",
        "lstat",
        "readlink",
        "symlink_to",
        "hardlink_to",
        "samefile",
        "expanduser",  # reads $HOME
        "home",
        "cwd",
        "absolute",  # reads the working directory
        "resolve",
        "fsync",
        "fileno",
    }
)
# `replace` is also str's, bytes' and datetime's: Path.replace(target) is the call with
# exactly one positional argument and no keyword.
ONE_ARGUMENT_FILE_METHODS = frozenset({"replace"})
MACHINE_PROBES = frozenset({"cpu_count", "sysconf", "sched_getaffinity", "getloadavg"})
CLOCK_READS = {("datetime", "now"), ("datetime", "utcnow"), ("date", "today")}


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


def _forbidden(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in MESH_MAY_NOT_IMPORT)


def test_mesh_does_no_io() -> None:
    impure = {}
    excepted = set()
    for path in _package("mesh"):
        module = _module(path)
        used = set()
        for name in _imports(path, top_level_only=False):
            if (module, name) in MESH_IMPORT_EXCEPTIONS:
                excepted.add((module, name))
            elif _forbidden(name):
                used.add(name)
        if used:
            impure[module] = sorted(used)
    assert impure == {}, "mesh is the pure library: move I/O to node/ (or cloud_relay/)"
    assert excepted == set(MESH_IMPORT_EXCEPTIONS), "an exception no longer needed: remove it"


def _io_calls(tree: ast.AST) -> list[str]:
    """Where `tree` touches files, the environment, the machine or the clock."""
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = node.value.id
            if owner == "os" and node.attr not in MESH_OS_ALLOWED:
                found.append(f"{where}: os.{node.attr}")
            elif owner == "platform" or (owner, node.attr) in CLOCK_READS:
                found.append(f"{where}: {owner}.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            found.append(f"{where}: open()")
        elif isinstance(func, ast.Attribute):
            one_argument = len(node.args) == 1 and not node.keywords
            if (
                func.attr in FILE_METHODS
                or func.attr in MACHINE_PROBES
                or (func.attr in ONE_ARGUMENT_FILE_METHODS and one_argument)
            ):
                found.append(f"{where}: .{func.attr}()")
    return found


def test_mesh_touches_no_file_environment_or_hardware() -> None:
    impure = {}
    for path in _package("mesh"):
        calls = _io_calls(ast.parse(path.read_text(encoding="utf-8")))
        if calls:
            impure[_module(path)] = calls
    assert impure == {}, "mesh takes bytes and values: do the I/O in node/ (or cloud_relay/)"


@pytest.mark.parametrize(
    "source",
    [
        "open('f')",
        "path.open('rb')",
        "path.write_bytes(b'')",
        "path.replace(other)",
        "os.replace(a, b)",
        "os.fsync(fd)",
        "os.environ.get('HOME')",
        "x = os.environ",
        "os.getenv('HOME')",
        "os.path.exists(p)",
        "os.cpu_count()",
        "multiprocessing.cpu_count()",
        "platform.machine()",
        "datetime.now(tz=UTC)",
        "from os import fsync",
        "Path('~').expanduser()",
        "p.iterdir()",
    ],
)
def test_the_io_finder_finds_io(source: str) -> None:
    assert _io_calls(ast.parse(source)) != []


@pytest.mark.parametrize(
    "source",
    [
        "os.urandom(16)",
        "text.replace('-', '')",
        "moment.replace(hour=0)",
        "dataclasses.replace(record, name='x')",
        "Path('a') / 'b'",
        "datetime.fromtimestamp(1, tz=UTC)",
        "opener.seal(b'')",
    ],
)
def test_the_io_finder_lets_pure_code_be(source: str) -> None:
    assert _io_calls(ast.parse(source)) == []


def test_cloud_relay_does_not_import_node() -> None:
    wrong = {
        _module(path): sorted(
            i for i in _imports(path, top_level_only=False) if i.split(".")[0] == "node"
        )
        for path in _package("cloud_relay")
    }
    assert {m: i for m, i in wrong.items() if i} == {}


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


# The one clock (issue 13 item 4): mesh/clock.py reads the time; everything else is handed a
# `Clock` (or `now_ms`). `loop.time()` is allowed: it is the clock the event loop's own
# timers (`call_at`) run on, and only code scheduling such timers reads it.
TIME_READERS = {
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "monotonic"),
    ("time", "monotonic_ns"),
    ("time", "perf_counter"),
    ("time", "perf_counter_ns"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}
READS_THE_TIME = {"mesh.clock"}


def _time_reads(path: Path) -> list[str]:
    """`time.time`, `datetime.now`, ... used (called or handed on) in this file, and names
    imported from `time` that read it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name | ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if (owner, node.attr) in TIME_READERS:
                found.append(f"{owner}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [
                f"from time import {alias.name} (line {node.lineno})"
                for alias in node.names
                if ("time", alias.name) in TIME_READERS
            ]
    return found


def test_one_clock_reads_the_time() -> None:
    readers = {
        _module(path): reads
        for name in ("mesh", "node", "cloud_relay")
        for path in _package(name)
        if (reads := _time_reads(path)) and _module(path) not in READS_THE_TIME
    }
    assert readers == {}, "take a mesh.clock.Clock (SYSTEM at the edge) instead"


def test_the_time_check_sees_reads() -> None:
    assert _time_reads(ROOT / "mesh" / "clock.py")  # the one reader: the check sees it
