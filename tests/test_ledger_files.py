"""Damaged files and dead nodes (issue 12, finding 5), with real node processes: a ledger
that is not a database stops `allerac up` with the error and a non-zero exit (a
supervisor must not see a running service that serves nothing), and a node killed with
SIGKILL takes its ledger-verification worker processes with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.ledger.records import Usage
from mesh.trust.identity import Identity
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from node.store.ledger_store import LedgerStore
from tests.members import models_config, read_ledger
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import peer_states, wait_until

UP_TIMEOUT_S = 30.0


def _up(home: Path) -> subprocess.CompletedProcess[str]:
    """`allerac up` in `home`, expected to give up by itself (killed if it hangs)."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "node", "up", "--home", str(home), "--http-port", "0"),
            *("--grpc-host", "127.0.0.1", "--grpc-port", "0", "--no-mdns"),
        ],
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("damage", ["random bytes", "cut short"])
def test_a_damaged_ledger_stops_the_node_with_the_error(tmp_path: Path, damage: str) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    ledger = home / "ledger.db"
    if damage == "random bytes":
        ledger.write_bytes(os.urandom(16384))
    else:  # a real ledger whose file lost its end (a full disk, a bad copy)
        identity, _ = load_or_create_identity(home / "identity.key")
        asyncio.run(_fill(ledger, identity, 400))
        data = ledger.read_bytes()
        ledger.write_bytes(data[: len(data) // 3])
    ledger.chmod(0o600)
    started = time.monotonic()
    result = _up(home)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "ledger" in result.stderr, result.stderr
    assert time.monotonic() - started < UP_TIMEOUT_S
    assert not (home / "run" / "node.json").exists()  # it never claimed to be serving


async def _fill(path: Path, identity: Identity, n: int) -> None:
    """n records of this node, served and countersigned by itself."""
    async with await LedgerStore.open(path, identity) as store:
        for start in range(0, n, 100):
            made = await asyncio.gather(
                *(
                    store.append(
                        Usage(
                            request_id=f"{i:032x}",
                            entry_node_id=identity.node_id,
                            user="",
                            model="m",
                            prompt_tokens=3,
                            completion_tokens=4,
                            route="local",
                            started_at_ms=1_800_000_000_000 + i,
                            ended_at_ms=1_800_000_000_100 + i,
                        )
                    )
                    for i in range(start, min(n, start + 100))
                )
            )
            for record in made:
                await store.countersign(record)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def leftovers() -> Iterator[set[int]]:
    """Processes the test's node left behind: killed at the end whatever happened."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if _running(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing" in cmdline:  # still ours, not a reused pid
                os.kill(pid, signal.SIGKILL)


def test_verification_workers_end_when_their_node_is_killed(
    tmp_path: Path, leftovers: set[int]
) -> None:
    # b's ledger holds enough records that a checks them in worker processes when it
    # pulls them (a sync batch of 256 signatures or more).
    b_home = Home.resolve(tmp_path / "b")
    b_home.ensure()
    b_identity, _ = load_or_create_identity(b_home.identity_key)
    asyncio.run(_fill(b_home.ledger_file, b_identity, 600))
    nodes: list[NodeProcess] = []
    try:
        # `a` runs as a command of its own (not forked from the tests' preloaded server,
        # whose resource tracker its process pool would share): its whole tree is its own.
        a = NodeProcess(tmp_path / "a", config=models_config("m-a"), forked=False).start()
        nodes.append(a)
        b = NodeProcess(
            tmp_path / "b", "--peer", a.info["grpc_address"], config=models_config("m-b")
        ).start()
        nodes.append(b)
        code = run_cli(a.home, "mesh", "invite").stdout.strip()
        assert run_cli(b.home, "mesh", "join", code).returncode == 0
        wait_until(lambda: peer_states(a).get(b.node_id) == "up", 15, "b is up at a")
        wait_until(lambda: len(read_ledger(a.home)[0]) >= 600, 60, "a holds b's records")
        assert a.proc is not None
        workers = _children(a.proc.pid)
        leftovers.update(workers)
        # Two workers and the resource tracker.
        assert len(workers) >= 3, workers
        a.proc.send_signal(signal.SIGKILL)  # a crash, or the out-of-memory killer
        a.proc.wait(10)
        wait_until(
            lambda: not any(_running(pid) for pid in workers),
            10,
            "the killed node's worker processes exit",
        )
    finally:
        for node in nodes:
            node.kill()
