"""Worker processes for CPU-bound checks (ledger signatures) that never outlive the
process that made them.

`ProcessPoolExecutor` workers wait on a pipe whose other end they hold themselves, so
when their parent is killed with SIGKILL (a crash, the out-of-memory killer) nothing
tells them: they, and the resource tracker that waits for them, would run for ever,
and a supervisor's restarts would pile them up. Each worker therefore watches its
parent from a thread: on Linux through a pidfd (pidfd_open(2), Linux 5.3), readable
the moment the parent process exits, whichever of its threads made the worker; where
there is no pidfd, by polling its parent pid. When the parent is gone the worker
exits at once, and the resource tracker, whose last writer was that worker, follows.

PR_SET_PDEATHSIG (prctl(2)) is not used: it fires when the *thread* that spawned the
worker ends, not the process, so a pool first used from a short-lived thread would
lose its workers while its process still runs.

Spawn, not fork: the node has gRPC and sqlite threads, and forking those deadlocks.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

POLL_S = 0.5  # where there is no pidfd


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that exit when this process dies."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=watch_parent,
        initargs=(os.getpid(),),
    )


def watch_parent(parent_pid: int) -> None:
    """In a worker: exit as soon as the process `parent_pid` (our parent) is gone."""
    pidfd: int | None
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or the parent is gone
        pidfd = None
    # Checked after opening: while the parent is our parent its pid cannot be reused, so
    # the pidfd (if any) is that process's; if it died first, we were re-parented.
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(
        target=_exit_with_parent, args=(parent_pid, pidfd), name="parent-watch", daemon=True
    ).start()


def _exit_with_parent(parent_pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the parent process has exited
    else:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
    os._exit(1)


def chunk_map(workers: int) -> Callable[..., Any]:
    """A `mesh.ledger.records.ChunkMap` over `workers` processes (that end with this one): the
    items split in about four chunks per worker."""

    def run(function: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[list[Any]]:
        size = -(-len(items) // (workers * 4))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        with process_pool(workers) as pool:
            return list(pool.map(function, chunks))

    return run
