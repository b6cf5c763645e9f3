"""The tests' own process launcher (tests/launch.py): what it starts never outlives the test
worker that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import launch

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for a test worker: starts a node through the launcher, says its pid once the
# node runs, then dies the way an interrupted run's workers do (no teardown, no cleanup).
WORKER = """
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests import launch
home = Path({home!r})
home.mkdir()
argv = ["up", "--home", str(home), "--http-port", "0", "--grpc-host", "127.0.0.1",
        "--grpc-port", "0", "--no-mdns"]
node = launch.start(argv, out=home / "node.log")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if json.loads((home / "run" / "node.json").read_text())["pid"] == node.pid:
            break
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(0.05)
print(node.pid, flush=True)
os.kill(os.getpid(), signal.{signal})
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not launch.forking(), reason="processes are not forked (ALLERAC_TEST_FORK=0)")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_node_ends_when_the_worker_that_started_it_dies(tmp_path: Path, sig: str) -> None:
    home = tmp_path / "home"
    said = tmp_path / "worker.out"
    with said.open("wb") as out:  # a file, not a pipe: what the node inherits never blocks us
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER.format(root=str(ROOT), home=str(home), signal=sig)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            assert worker.wait(120) == -getattr(signal, sig), said.read_text()
        finally:
            worker.kill()
    pid = int(said.read_text().split()[0])
    assert json.loads((home / "run" / "node.json").read_text())["pid"] == pid
    deadline = time.monotonic() + 10
    try:
        while _running(pid):
            assert time.monotonic() < deadline, "the node outlived its test worker"
            time.sleep(0.05)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
