"""Worker processes that never outlive their parent (node/workers.py): a process killed
with SIGKILL takes its pool's workers, and their resource tracker, with it; through a
pidfd, and by polling where there is none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_lan_mesh import wait_until
from tests.test_ledger_files import _children, _running

ROOT = Path(__file__).resolve().parent.parent

PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from node.store.workers import process_pool, watch_parent

def without_pidfd(parent_pid):
    del os.pidfd_open  # as on a system without pidfds
    watch_parent(parent_pid)

def work():
    time.sleep(0.2)
    return os.getpid()

if __name__ == "__main__":
    if sys.argv[1] == "pidfd":
        pool = process_pool(2)
    else:
        pool = ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=without_pidfd,
            initargs=(os.getpid(),),
        )
    pids = set()
    while len(pids) < 2:
        pids |= {job.result() for job in [pool.submit(work) for _ in range(4)]}
    print(*sorted(pids), flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids of processes the test started, killed at the end if still running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("watch", ["pidfd", "polling"])
def test_workers_exit_when_their_parent_is_killed(
    tmp_path: Path, watch: str, started: list[int]
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT, encoding="utf-8")
    parent = subprocess.Popen(
        [sys.executable, str(script), watch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    started.append(parent.pid)
    try:
        assert parent.stdout is not None
        workers = {int(pid) for pid in parent.stdout.readline().split()}
        assert len(workers) == 2
        helpers = _children(parent.pid)  # the workers and the resource tracker
        started.extend(helpers)
        assert workers < helpers
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(
            lambda: not any(_running(pid) for pid in helpers),
            10,
            "the workers and the resource tracker exit",
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for stream in (parent.stdin, parent.stdout):
            if stream is not None:
                stream.close()
