"""Peering (node/transport/peering.py) in process: the real peering of one harness node
(tests/harness.py), dialling the others through the in-memory transport. It learns a
static peer (public card verified against our mesh, sealed full card, ping), hands the
entry side a usable peer, refuses a box of another mesh at a known address, takes a peer
out when its link is cut (heartbeats, under the harness's fake clock) and back when the
link returns, and drops a revoked one at once. The network-namespace tests keep the
end-to-end proof over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from mesh.inference import Route
from mesh.routing.peers import DOWN_AFTER_MS, PeerState, PeerTable
from node.transport.peering import Peering
from tests.harness import MODEL, MemoryTransport, Mesh, Node, NodeSpec, ScriptedBackend, mesh


def box(model: str = MODEL) -> NodeSpec:
    return NodeSpec(backends=[ScriptedBackend(model=model)])


@asynccontextmanager
async def peering_of(m: Mesh, node: Node, *addresses: str) -> AsyncIterator[Peering]:
    """`node`'s own Peering, knowing `addresses`, dialling through the harness."""
    peering = Peering(
        trust=node.trust,
        table=PeerTable(),
        static_peers=addresses,
        clock=node.clock,
        dial=lambda address: MemoryTransport(m.net, node, address),
    )
    await peering.start()
    try:
        yield peering
    finally:
        await peering.aclose()


async def until(
    check: Callable[[], bool], what: str, *, ticking: Mesh | None = None, timeout_s: float = 15.0
) -> None:
    """Until `check()` holds; with `ticking`, its fake clock moves a second each time
    (peering's rounds wait on real time, and look at the clock when they wake)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not check():
                if ticking is not None:
                    ticking.clock.advance(1.0)
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


def state(peering: Peering, node_id: str) -> PeerState | None:
    peer = peering.table.get(node_id)
    return None if peer is None else peer.state


async def test_a_static_peer_is_verified_learnt_and_usable(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box("b-only")}, connect=False) as m:
        a, b = m["a"], m["b"]
        async with peering_of(m, a, b.address) as peering:
            await until(lambda: peering.client(b.node_id) is not None, "b learnt")
            await until(lambda: state(peering, b.node_id) is PeerState.UP, "b up")
            peer = peering.table.get(b.node_id)
            assert peer is not None
            assert peer.route is Route.LAN
            assert peer.address == b.address
            assert "b-only" in {info.name for info in peer.models}  # from its sealed card
            handle = peering.client(b.node_id)
            assert handle is not None
            assert handle.card.node_id == b.node_id
            reply = await handle.client.ping()  # the handle the entry side gets works
            assert reply.load.slots >= 1
            assert peering.direct_addresses() == [b.address]


async def test_a_box_of_another_mesh_at_a_known_address_never_enters_the_table(
    tmp_path: Path,
) -> None:
    async with mesh(tmp_path, {"a": box()}, connect=False) as m:
        a = m["a"]
        stranger = await m.add("d", box("d-only"), join=False)
        async with peering_of(m, a, stranger.address) as peering:
            await asyncio.sleep(0.3)  # a few connection attempts' time
            assert peering.table.get(stranger.node_id) is None
            assert peering.client(stranger.node_id) is None
            assert len(peering.table) == 0


async def test_a_cut_link_takes_the_peer_out_and_back_in(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box()}, connect=False) as m:
        a, b = m["a"], m["b"]
        async with peering_of(m, a, b.address) as peering:
            await until(lambda: state(peering, b.node_id) is PeerState.UP, "b up")
            m.net.cut(a, b)
            cut_at = m.clock.now_ms()
            await until(lambda: state(peering, b.node_id) is PeerState.DOWN, "b down", ticking=m)
            assert m.clock.now_ms() - cut_at >= DOWN_AFTER_MS  # not before it was silent that long
            assert peering.direct_addresses() == []
            m.net.restore(a, b)
            await until(lambda: state(peering, b.node_id) is PeerState.UP, "b back", ticking=m)


async def test_a_revoked_peer_is_dropped_at_once(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box()}, connect=False) as m:
        a, b = m["a"], m["b"]
        async with peering_of(m, a, b.address) as peering:
            await until(lambda: state(peering, b.node_id) is PeerState.UP, "b up")
            a.trust.revoke(b.node_id, now=m.clock.now_ms())  # a is the mesh's admin
            peering.drop_revoked()
            assert peering.table.get(b.node_id) is None
            assert peering.client(b.node_id) is None
            await asyncio.sleep(0.3)  # and it is not learnt again from its address
            assert peering.table.get(b.node_id) is None
