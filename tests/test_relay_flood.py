"""Strangers flood a real relay process (issue 11, finding 4): anyone can make a mesh of their
own, so the relay shares itself out per source address and per mesh, and charges packets to
their sender only once it knows the recipient.

The flood comes from self-made meshes on four loopback addresses (127.0.0.1 directly, 127.0.0.2
to .4 through small forwarders that connect from those addresses); a real mesh's members then
connect from 127.0.0.9 and call each other while every stranger sends packets to nobody at
full speed. Their calls all arrive, and the relay's sessions and memory stay bounded. The
relay runs with small limits so the flood is quick: the rules are the same at any size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import psutil
import pytest

from cloud_relay import relay_pb2_grpc as rpb_grpc
from cloud_relay.client import fetch_stats
from cloud_relay.operator_token import read_operator_token
from mesh.routing.relay import sign_hello
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role
from mesh.wire.v1 import relay_pb2 as rpb
from tests.nodeproc import wait_for_run_info

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30.0
WAIT_S = 10.0
POLL_S = 0.02
YEAR_MS = 365 * 86_400_000
LIMITS = {
    "max_sessions": 32,
    "max_sessions_per_address": 8,
    "max_sessions_per_mesh": 12,
    "global_packets_per_s": 300.0,
    "node_refusals_per_s": 20.0,
}

# A relay process with the given limits and allowlist (`allerac relay up` has the defaults).
LAUNCH = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from cloud_relay.server import Relay
    from mesh.routing.relay import RelayLimits

    async def serve(home, limits, allowed):
        run_file = Path(home) / "run" / "relay.json"
        async with Relay(
            host="127.0.0.1", port=0, limits=limits, run_file=run_file, allowed_meshes=allowed
        ):
            await asyncio.Event().wait()  # until the test kills it

    allowed = json.loads(sys.argv[3])
    limits = RelayLimits(**json.loads(sys.argv[2]))
    asyncio.run(serve(sys.argv[1], limits, None if allowed is None else frozenset(allowed)))
    """
)


@dataclass
class RelayUnderTest:
    address: str
    port: int
    pid: int
    run_dir: Path

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)


@contextlib.contextmanager
def _relay_process(
    home: Path, limits: dict[str, float], allowed_meshes: list[str] | None = None
) -> Iterator[RelayUnderTest]:
    (home / "run").mkdir(mode=0o700, parents=True)
    log = (home / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(home), json.dumps(limits), json.dumps(allowed_meshes)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )

    def output() -> str:
        return (home / "relay.log").read_text(encoding="utf-8", errors="replace")

    try:
        info = wait_for_run_info(proc, home, output, "relay", "relay.json")
        yield RelayUnderTest(
            address=f"127.0.0.1:{info['port']}",
            port=int(info["port"]),
            pid=proc.pid,
            run_dir=home / "run",
        )
        assert proc.poll() is None, "the relay died: " + output()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayUnderTest]:
    with _relay_process(tmp_path, LIMITS) as process:
        yield process


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()


class LoopbackSource:
    """Connections to the relay from another loopback address: gRPC cannot pick a client's
    source address, so this listens on 127.0.0.1 and connects onward from `source`."""

    def __init__(self, relay: RelayUnderTest, source: str) -> None:
        self._relay = relay
        self.source = source
        self.address = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self._relay.port, local_addr=(self.source, 0)
            )
            writers.append(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for each in writers:
                each.close()
            for each in writers:
                with contextlib.suppress(ConnectionError, OSError):
                    await each.wait_closed()
            self._handlers.discard(task)

    async def __aenter__(self) -> LoopbackSource:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@dataclass
class Opened:
    node: Identity
    channel: grpc.aio.Channel
    call: Any


class Sessions:
    """Relay sessions opened by the test; every channel is closed on the way out."""

    def __init__(self) -> None:
        self.opened: list[Opened] = []

    async def try_open(self, target: str, mesh: MeshAuthority) -> Opened | grpc.StatusCode:
        node = Identity.generate()
        cert = mesh.issue(
            node.public_key_raw, role=Role.MEMBER, now_ms=int(time.time() * 1000), ttl_ms=YEAR_MS
        )
        # Its own connection, as a node has (the relay allows few streams per connection).
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        call = rpb_grpc.RelayServiceStub(channel).Session(timeout=DEADLINE_S)  # type: ignore[no-untyped-call]
        try:
            challenge = await call.read()
            hello = sign_hello(challenge.challenge, identity=node, cert=cert)
            await call.write(rpb.RelayFrame(hello=hello))
            welcome = await call.read()
        except grpc.aio.AioRpcError as error:
            await channel.close()
            return error.code()
        assert welcome.welcome.node_id == node.node_id
        opened = Opened(node, channel, call)
        self.opened.append(opened)
        return opened

    async def aclose(self) -> None:
        await asyncio.gather(*(o.channel.close() for o in self.opened), return_exceptions=True)


@pytest.fixture
async def sessions() -> AsyncIterator[Sessions]:
    held = Sessions()
    try:
        yield held
    finally:
        await held.aclose()


async def _to_nobody(opened: Opened, stop: asyncio.Event) -> int:
    """Packets to node IDs nobody has, as fast as the relay takes them, until `stop`."""
    sent = 0
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while not stop.is_set() and sent < 20_000:
            packet = rpb.RelayPacket(
                peer=f"nobody-{sent}", stream_id=sent, kind=rpb.PACKET_KIND_CALL, method="Ping"
            )
            await opened.call.write(rpb.RelayFrame(packet=packet))
            sent += 1
    return sent


async def _packets(opened: Opened, count: int) -> list[rpb.RelayPacket]:
    packets: list[rpb.RelayPacket] = []
    while len(packets) < count:
        frame = await opened.call.read()
        if frame.WhichOneof("frame") == "packet":
            packets.append(frame.packet)
    return packets


async def _stats(relay: RelayUnderTest) -> dict[str, Any]:
    return await fetch_stats(relay.address, token=read_operator_token(relay.run_dir))


async def test_strangers_flooding_from_self_made_meshes_leave_members_served_and_memory_bounded(
    relay: RelayUnderTest, sessions: Sessions
) -> None:
    rss_before = relay.rss_bytes()
    async with (
        LoopbackSource(relay, "127.0.0.2") as from_2,
        LoopbackSource(relay, "127.0.0.3") as from_3,
        LoopbackSource(relay, "127.0.0.4") as from_4,
        LoopbackSource(relay, "127.0.0.9") as from_9,
    ):
        # One self-made mesh from two addresses; a fresh self-made mesh per session from two
        # more. 96 attempts at a relay of 32 sessions.
        big = MeshAuthority.generate()
        attempts = [(from_2.address, big)] * 12 + [(from_3.address, big)] * 12
        attempts += [(relay.address, MeshAuthority.generate()) for _ in range(36)]
        attempts += [(from_4.address, MeshAuthority.generate()) for _ in range(36)]
        results = await asyncio.gather(*(sessions.try_open(t, m) for t, m in attempts))
        strangers = [r for r in results if isinstance(r, Opened)]
        refused = [r for r in results if not isinstance(r, Opened)]
        assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        by_source = [isinstance(r, Opened) for r in results]
        assert sum(by_source[:24]) == LIMITS["max_sessions_per_mesh"]  # the big mesh's share
        assert sum(by_source[24:60]) == LIMITS["max_sessions_per_address"]  # 127.0.0.1's
        assert sum(by_source[60:]) == LIMITS["max_sessions_per_address"]  # 127.0.0.4's
        assert len(strangers) == 12 + 8 + 8

        # A real mesh's two members come in from their own address while the strangers
        # send packets to nobody as fast as they can.
        ours = MeshAuthority.generate()
        alice = await sessions.try_open(from_9.address, ours)
        bob = await sessions.try_open(from_9.address, ours)
        assert isinstance(alice, Opened), f"a member was refused: {alice}"
        assert isinstance(bob, Opened), f"a member was refused: {bob}"
        stop = asyncio.Event()
        flood = [asyncio.create_task(_to_nobody(s, stop)) for s in strangers]
        try:
            # Wait until the flood has sent the relay's global budget to nobody four times.
            burst = int(LIMITS["global_packets_per_s"])
            deadline = time.monotonic() + WAIT_S
            while int((await _stats(relay))["packets_refused"].get("UNKNOWN_PEER", 0)) < 4 * burst:
                assert time.monotonic() < deadline, "the flood did not reach the relay"
                await asyncio.sleep(POLL_S)  # a poll interval, not a guess at timing
            for stream_id in range(20):
                call = rpb.RelayPacket(
                    peer=bob.node.node_id,
                    stream_id=stream_id,
                    kind=rpb.PACKET_KIND_CALL,
                    method="Infer",
                    payload=b"sealed",
                )
                await alice.call.write(rpb.RelayFrame(packet=call))
            delivered = await asyncio.wait_for(_packets(bob, 20), WAIT_S)
            stats = await _stats(relay)
        finally:
            stop.set()
            sent = await asyncio.gather(*flood)

    assert [p.stream_id for p in delivered] == list(range(20))
    assert {p.peer for p in delivered} == {alice.node.node_id}
    assert sum(sent) > 4 * burst
    assert "RELAY_FULL" not in stats["packets_refused"]
    assert int(stats["sessions"]) == 30
    assert int(stats["hellos_refused"]) == len(refused)
    # 98 connections, 30 sessions and thousands of refusals cost the relay a few MiB.
    growth_mib = (relay.rss_bytes() - rss_before) / 2**20
    assert growth_mib < 32, f"the relay grew {growth_mib:.0f} MiB"


async def test_a_relay_with_an_allowlist_refuses_every_other_mesh(
    tmp_path: Path, sessions: Sessions
) -> None:
    ours, stranger = MeshAuthority.generate(), MeshAuthority.generate()
    with _relay_process(tmp_path, {}, [ours.mesh_id]) as relay:
        member = await sessions.try_open(relay.address, ours)
        assert isinstance(member, Opened)
        channel = grpc.aio.insecure_channel(relay.address)
        try:
            call = rpb_grpc.RelayServiceStub(channel).Session(timeout=DEADLINE_S)  # type: ignore[no-untyped-call]
            node = Identity.generate()
            cert = stranger.issue(
                node.public_key_raw,
                role=Role.MEMBER,
                now_ms=int(time.time() * 1000),
                ttl_ms=YEAR_MS,
            )
            challenge = await call.read()
            await call.write(
                rpb.RelayFrame(hello=sign_hello(challenge.challenge, identity=node, cert=cert))
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(call.read(), WAIT_S)
        finally:
            await channel.close()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not on this relay's list" in (refused.value.details() or "")
        stats = await _stats(relay)
        assert int(stats["sessions"]) == 1
        assert int(stats["hellos_refused"]) == 1
