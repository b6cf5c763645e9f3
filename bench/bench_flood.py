"""One client against one node: 20,000 idle connections to the gRPC port and 500 slowloris
connections to the HTTP API, all from one other address (127.0.0.2), while the box's owner
chats from 127.0.0.1 and a member of the mesh sends requests over gRPC.

Prints, against a baseline measured in the same run without the flood: the owner's chat
latency, members' request latency (on an open connection, and on a new one), the node's
descriptors and resident memory (psutil, sampled every 0.2 s), and how much its log grew.
The node runs with its default caps (no test knobs).

The attacker (bench/flood_worker.py): one process holds at most its RLIMIT_NOFILE sockets
(20,000 here, soft and hard), and 20,500 sockets exceed that, so the flood is spread over
`--workers` processes for the idle connections (default 5: 4,000 sockets each) and one for
the slowloris ones, each with its soft limit raised to the hard one. Every socket is bound
to 127.0.0.2 (IP_BIND_ADDRESS_NO_PORT: the source port is picked per destination). A
connection the node closes is dialled again, at most `--redial-per-s` a second in all
(default 500), so the attacker keeps trying to hold its 20,500 for `--hold-s` seconds;
slowloris connections send one more header line every 5 s. The workers run at nice 10
(`--attacker-nice`): on a network the attacker is another machine, here it shares the
node's 2 cores. Workers are stopped on exit, also on failure (SIGTERM, then SIGKILL).

    python bench/bench_flood.py [--idle 20000] [--slowloris 500] [--workers 5]
                                [--hold-s 30] [--redial-per-s 500] [--chats 10]
                                [--attacker-nice 10]

Not part of the test suite (tests/test_conn_limits.py is the fast version).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.inference import InferenceRequest, Sampling  # noqa: E402
from node.store.trust_store import TrustStore  # noqa: E402
from node.transport.peer_client import PeerClient  # noqa: E402
from tests.members import join_as_member  # noqa: E402
from tests.nodeproc import NodeProcess  # noqa: E402

WORKER = ROOT / "bench" / "flood_worker.py"
ATTACKER = "127.0.0.2"
MiB = 1024 * 1024
START_TIMEOUT_S = 60.0
CHAT = {
    "model": "default",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
}


class Attack:
    """The worker processes; `latest` holds each one's last report."""

    def __init__(self, niceness: int) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.latest: dict[int, dict[str, Any]] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._reported = asyncio.Event()
        self._niceness = niceness

    async def start(self, kind: str, port: int, count: int, redial_per_s: float) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            kind,
            str(port),
            str(count),
            str(redial_per_s),
            str(self._niceness),
            stdout=asyncio.subprocess.PIPE,
        )
        index = len(self.procs)
        self.procs.append(proc)
        self._readers.append(asyncio.create_task(self._read(index, proc)))

    async def _read(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                self.latest[index] = json.loads(line)
                self._reported.set()

    async def all_started(self) -> None:
        """Every worker has reported once (it is up and dialling)."""
        while len(self.latest) < len(self.procs):
            if any(proc.returncode is not None for proc in self.procs):
                raise RuntimeError("an attacking worker exited")
            self._reported.clear()
            await self._reported.wait()

    def waves_done(self) -> bool:
        return all(report.get("wave_done") for report in self.latest.values())

    def totals(self, kind: str) -> dict[str, int]:
        reports = [r for r in self.latest.values() if r["kind"] == kind]
        keys = ("open", "dialed", "reset", "closed_by_node")
        return {key: sum(int(r[key]) for r in reports) for key in keys}

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def attack(niceness: int) -> AsyncIterator[Attack]:
    flood = Attack(niceness)
    try:
        yield flood
    finally:  # whatever happened: no attacker outlives the bench
        await flood.stop()


async def owner_chat(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.perf_counter() - started


def member_request() -> InferenceRequest:
    return InferenceRequest(
        model="default", prompt="The capital of France is", sampling=Sampling(max_tokens=8)
    )


async def member_infer(client: PeerClient) -> float:
    """A member's request on its open connection."""
    started = time.perf_counter()
    card = await client.public_card()
    async for _ in client.infer(card, member_request()):
        pass
    return time.perf_counter() - started


async def member_new_connection(address: str, trust: TrustStore) -> float:
    """A member's request on a new connection (it must be admitted during the flood)."""
    started = time.perf_counter()
    async with PeerClient(address, trust=trust) as client:
        card = await client.public_card()
        async for _ in client.infer(card, member_request()):
            pass
    return time.perf_counter() - started


class Sampler:
    """The node's descriptors and RSS every 0.2 s, while in use."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.fds: list[int] = []
        self.rss: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            self.fds.append(self._process.num_fds())
            self.rss.append(self._process.memory_info().rss)
            await asyncio.sleep(0.2)


Figures = dict[str, list[float]]


def figures() -> Figures:
    return {"chat": [], "member": [], "member_new": []}


async def one_round(
    session: aiohttp.ClientSession, node: NodeProcess, member: PeerClient, trust: TrustStore
) -> Figures:
    return {
        "chat": [await owner_chat(session, node.url)],
        "member": [await member_infer(member)],
        "member_new": [await member_new_connection(str(node.info["grpc_address"]), trust)],
    }


def add(into: Figures, more: Figures) -> None:
    for key, values in more.items():
        into[key] += values


def ms(values: list[float], how: str) -> str:
    if not values:
        return "-"
    value = statistics.median(values) if how == "median" else max(values)
    return f"{value * 1000:.0f}"


async def main(args: argparse.Namespace) -> None:
    baseline, wave, held = figures(), figures(), figures()
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp) / "node").start()
        log = node.home / "node.log"
        try:
            trust = await join_as_member(node, Path(tmp) / "member")
            grpc_port = int(str(node.info["grpc_address"]).rpartition(":")[2])
            http_port = int(node.url.rpartition(":")[2])
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
                PeerClient(str(node.info["grpc_address"]), trust=trust) as member,
            ):
                for _ in range(2):  # warm up
                    await one_round(session, node, member, trust)
                async with Sampler(int(node.info["pid"])) as quiet:
                    for _ in range(args.chats):
                        add(baseline, await one_round(session, node, member, trust))
                log_before = log.stat().st_size
                async with (
                    Sampler(int(node.info["pid"])) as flooded,
                    attack(args.attacker_nice) as flood,
                ):
                    per_worker = -(-args.idle // args.workers)
                    for i in range(args.workers):
                        count = min(per_worker, args.idle - i * per_worker)
                        redial = args.redial_per_s / 2 / args.workers
                        await flood.start("idle", grpc_port, count, redial)
                    await flood.start("slowloris", http_port, args.slowloris, args.redial_per_s / 2)
                    await asyncio.wait_for(flood.all_started(), START_TIMEOUT_S)
                    started = time.monotonic()
                    while time.monotonic() - started < args.hold_s:
                        during_wave = not flood.waves_done()
                        add(
                            wave if during_wave else held,
                            await one_round(session, node, member, trust),
                        )
                    wave_s = time.monotonic() - started
                    async with session.get(
                        node.url + "/allerac/status", headers=node.owner
                    ) as response:
                        connections = (await response.json())["connections"]
                    idle, slow = flood.totals("idle"), flood.totals("slowloris")
                log_growth = log.stat().st_size - log_before
                after = [await owner_chat(session, node.url) for _ in range(3)]
        finally:
            node.kill()

    under = figures()
    add(under, wave)
    add(under, held)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(
        f"flood from {ATTACKER} for {wave_s:.0f} s: {args.idle} idle connections to gRPC from "
        f"{args.workers} processes and {args.slowloris} slowloris to HTTP from one (each with "
        f"its soft NOFILE raised to the hard {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}, "
        f"nice {args.attacker_nice}), closed ones redialled at up to {args.redial_per_s:.0f}/s"
    )
    print(
        "owner: chat of 8 tokens from 127.0.0.1; member: sealed infer of 8 tokens over gRPC, "
        "on its open connection and on a new one; wave = while the attackers dial their "
        "first 20,500, held = after it, while they hold and redial"
    )
    print(f"{'':34} {'baseline':>9} {'flood':>9} {'wave':>9} {'held':>9}")

    def row(label: str, key: str, how: str) -> None:
        cells = [ms(part[key], how) for part in (baseline, under, wave, held)]
        print(f"{label:34} " + " ".join(f"{cell:>9}" for cell in cells))

    row("owner chat (ms, median)", "chat", "median")
    row("owner chat (ms, max)", "chat", "max")
    row("member infer (ms, median)", "member", "median")
    row("member infer (ms, max)", "member", "max")
    row("member new connection (ms, median)", "member_new", "median")
    row("member new connection (ms, max)", "member_new", "max")
    counts = [str(len(part["chat"]) * 3) for part in (baseline, under, wave, held)]
    print(f"{'requests measured':34} " + " ".join(f"{c:>9}" for c in counts))
    print(f"{'node descriptors (max)':34} {max(quiet.fds):>9} {max(flooded.fds):>9}")
    rss = [f"{max(sampler.rss) / MiB:.0f}" for sampler in (quiet, flooded)]
    print(f"{'node RSS (MiB, max)':34} {rss[0]:>9} {rss[1]:>9}")
    print(f"node log growth during the flood: {log_growth} bytes")
    print(f"owner chat once the flood stopped (ms, median of 3): {ms(after, 'median')}")
    print(
        f"attacker's view at the end: idle {idle['open']} open of {idle['dialed']} dialled "
        f"({idle['reset']} refused while connecting, {idle['closed_by_node']} closed after); "
        f"slowloris {slow['open']} open of {slow['dialed']} dialled ({slow['reset']} refused "
        f"while connecting, {slow['closed_by_node']} closed after)"
    )
    print(f"node's view: {json.dumps(connections)}")
    ok = max(under["chat"], default=float("inf")) < 1.0 and log_growth < MiB
    ok = ok and len(under["member"]) > 0 and len(under["member_new"]) > 0
    print(
        "targets (every owner chat < 1 s under flood, members served, log grows < 1 MB): "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=20_000)
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--workers", type=int, default=5, help="processes for the idle ones")
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--redial-per-s", type=float, default=500.0)
    parser.add_argument("--chats", type=int, default=10, help="baseline rounds")
    parser.add_argument("--attacker-nice", type=int, default=10, help="0: compete equally")
    asyncio.run(main(parser.parse_args()))
