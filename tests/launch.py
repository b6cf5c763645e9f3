"""Start the project's own processes (nodes, relays, CLI runs) for tests, quickly.

A new interpreter importing the node (grpc, aiohttp, llama_cpp, cryptography, ~300
modules) costs ~0.8 s of CPU, and the suite starts a few hundred of them. Here each one
is forked instead from a server that imported the project once (the standard library's
`multiprocessing` forkserver, one per test worker): still a process of its own, with its
own pid, sockets, signals, files and exit code, running the same `allerac` command line
(`node.cli`), only without paying for the imports again. The server imports but never
runs anything: it holds no threads, event loops or gRPC channels to be forked. It holds
one thing more than imports: the embedded model, loaded once, which the first load of
it in each forked node takes instead of reading the file again (tests/model_preload.py).

A forked process ends with the test worker that started it: one thread in it waits on the
worker's pidfd and kills the process when the worker is gone, so a worker that dies in
the middle of a test (killed, or an interrupted run) leaves no box running; nothing else
would stop it, since its parent is the server, which lives on while any of its processes
do.

A process for a box of a network-namespace lab (tests/netns.py) enters the box's
namespace first (`setns`, what `ip netns exec` does before it execs), and
`in_namespace` runs a function on a thread of this process that entered one (a network
namespace belongs to a thread), for the lab's HTTP requests.

`ALLERAC_TEST_FORK=0` turns it off: every process is then `python -m node ...` (the
coverage run uses it, so that coverage starts in every process the usual way).
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_context: ForkServerContext | None = None
# What the server imports: the command line and the node, what the node imports only when
# it loads a model (llama.cpp's bindings, the chat template's jinja2: ~60 ms of CPU in every
# node forked otherwise), and the embedded model itself (~0.1 s of CPU in every node).
PRELOAD = [
    "node.cli",
    "node.daemon",
    "tests.launch",
    "llama_cpp",
    "llama_cpp._internals",
    "llama_cpp.llama_chat_format",
    "tests.model_preload",
]


def forking() -> bool:
    """Whether processes are forked here: not when turned off, and not from a script run
    as a file (multiprocessing would run that script again in every process it starts;
    the benchmarks exec)."""
    if os.environ.get("ALLERAC_TEST_FORK", "1") == "0":
        return False
    main = sys.modules.get("__main__")
    return getattr(main, "__spec__", None) is not None or not hasattr(main, "__file__")


def _forkserver() -> ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


CLONE_NEWNET = 0x40000000


def enter_namespace(name: str) -> None:
    """Move the calling thread into network namespace NAME (made by `ip netns add`)."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_namespace(name: str, work: Callable[[], T]) -> T:
    """`work()` run on a new thread inside network namespace NAME; its result or error."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def inside() -> None:
        try:
            enter_namespace(name)
            outcome.append(work())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    thread = threading.Thread(target=inside, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _end_with(worker: int) -> None:
    """End this process (SIGKILL) when process `worker` ends."""
    try:
        pidfd = os.pidfd_open(worker)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGKILL)

    def wait() -> None:
        select.select([pidfd], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="ends-with-its-test-worker", daemon=True).start()


def _run(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    out: str,
    err: str,
    netns: str | None,
    worker: int,
) -> None:
    """In the forked process: become `allerac ARGV` with this environment and output, for
    as long as process `worker` (the test worker that started it) lives."""
    _end_with(worker)
    if netns is not None:
        enter_namespace(netns)
    os.chdir(cwd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.argv = ["allerac", *argv]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    from node.cli import cli

    cli.main(args=argv, prog_name="allerac")


class Forked:
    """What `subprocess.Popen` offers the tests, for a process forked by the server."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid: int = process.pid or 0

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(["allerac"], timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    argv: list[str],
    *,
    out: Path,
    err: Path | None = None,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
) -> Forked:
    """`allerac ARGV` as a forked process (inside network namespace `netns` if given);
    stdout (and stderr unless `err`) appended to `out`."""
    process = _forkserver().Process(
        target=_run,
        args=(
            list(argv),
            dict(os.environ if env is None else env),
            os.getcwd(),
            str(out),
            str(err or out),
            netns,
            os.getpid(),
        ),
    )
    process.start()
    return Forked(process)


def run(
    argv: list[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`allerac ARGV` to its end, as `subprocess.run(..., capture_output=True, text=True)`."""
    with tempfile.TemporaryDirectory(prefix="allerac-run-") as folder:
        out, err = Path(folder) / "out", Path(folder) / "err"
        process = start(argv, out=out, err=err, env=env, netns=netns)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise
        return subprocess.CompletedProcess(
            ["allerac", *argv],
            code,
            out.read_text(encoding="utf-8", errors="replace"),
            err.read_text(encoding="utf-8", errors="replace"),
        )
