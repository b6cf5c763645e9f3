"""Keeping in touch with the other boxes of the mesh (the I/O around `mesh.routing.peers`).

For every address it is given (static `--peer`s, mDNS sightings) it fetches the
public card, verifies it against our mesh, fetches the sealed full card and
enters the peer in the table. Every second it pings each known peer (load and
RTT), applies silence to the table, and retries addresses whose peer is down,
so a restarted box is back at its first answer. On shutdown it tells each peer
it is leaving, so they stop sending at once.

Members the relay lists (other offices, cloud overflow nodes) are reached
through the relay session the same way: same cards, same sealed calls, same
heartbeats, entered in the table as tier `relay` (or `cloud` for overflow
nodes). A direct path wins: a peer reached through the relay keeps being tried
directly where an address is known, and the relay never replaces a working
direct path. An overflow node never connects to anyone: it serves what it is
sent and never routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from mesh.clock import SYSTEM, Clock
from mesh.errors import MeshError
from mesh.inference import Route
from mesh.routing.peers import (
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_TIMEOUT_MS,
    PeerDiscovered,
    PeerEvent,
    PeerLost,
    PeerState,
    PeerStateChanged,
    PeerTable,
)
from mesh.trust.cards import PeerCard
from mesh.trust.goodbye import Goodbye, goodbye_holds, sign_goodbye
from mesh.trust.membership import Role
from mesh.wire import codec
from mesh.wire.v1 import node_pb2 as pb
from node.store.trust_store import TrustStore
from node.tasks import Tasks
from node.transport.directory import PeerHandle
from node.transport.peer_client import GrpcTransport, PeerClient, Transport
from node.transport.relay_client import RelayLink, RelayMember, RelayTransport

logger = logging.getLogger(__name__)
MAX_ADDRESSES = 4096  # addresses to try; hints beyond it are dropped
MAX_HINT_FAILURES = 3  # tries before an address that never was a peer is forgotten
DIRECT_RETRY_S = 5.0  # how often a peer reached through the relay is tried directly
RETRY_S = HEARTBEAT_INTERVAL_MS / 1000  # how often an address that failed is tried again


class Peering:
    def __init__(
        self,
        *,
        trust: TrustStore,
        table: PeerTable,
        static_peers: tuple[str, ...] = (),
        on_change: Callable[[], None] = lambda: None,
        card_issued_at: Callable[[], int] = lambda: 0,
        clock: Clock = SYSTEM,
        dial: Callable[[str], Transport] = GrpcTransport,
    ) -> None:
        self._clock = clock
        self._dial = dial  # a direct path to an address (gRPC; in-memory in tests)
        self._trust = trust
        self._card_issued_at = card_issued_at  # our own card's, bound into our goodbyes
        self.table = table
        self._addresses: dict[str, str | None] = dict.fromkeys(static_peers)  # -> node ID
        self._clients: dict[str, PeerClient] = {}  # node ID -> client
        self._cards: dict[str, PeerCard] = {}
        self._on_change = on_change
        self._tasks = Tasks("peering")
        self._connecting: set[str] = set()
        self._card_versions: dict[str, int] = {}  # node ID -> issued-at of the card we hold
        # node ID -> the card version it announced in its last heartbeat answer: what its
        # goodbye must name (a restart announces a new one, so older goodbyes stop holding)
        self._announced: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._connects = Tasks("peering connects")
        self._relay: RelayLink | None = None
        self._relay_members: dict[str, Role] = {}
        self._tried: dict[str, float] = {}  # address -> when we last tried it
        # Hints (mDNS, gossip) that never proved to be a peer are forgotten after a few
        # tries, so junk cannot fill the address book; static peers are kept for good.
        self._static = frozenset(static_peers)
        self._failures: dict[str, int] = {}
        self._closing: set[asyncio.Future[None]] = set()  # clients of dropped peers

    # --- what the entry side needs -------------------------------------------------------

    def direct_addresses(self) -> list[str]:
        """Where the peers up on a direct path listen (gossiped in our full card)."""
        return [
            peer.address
            for peer in self.table
            if peer.state is PeerState.UP
            and (client := self._clients.get(peer.node_id)) is not None
            and not client.via_relay
        ]

    def client(self, node_id: str) -> PeerHandle | None:
        client, card = self._clients.get(node_id), self._cards.get(node_id)
        if client is None or card is None:
            return None
        return PeerHandle(client, card)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.start(self._run(), "rounds")

    async def aclose(self) -> None:
        await self._tasks.aclose()
        await self._connects.aclose()
        await self._say_goodbye()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _failed_hint(self, address: str) -> None:
        """An address that did not answer with a card of our mesh: forget it after
        MAX_HINT_FAILURES tries unless it is a static peer or was a peer once."""
        if address in self._static or self._addresses.get(address) is not None:
            return
        failures = self._failures.get(address, 0) + 1
        if failures < MAX_HINT_FAILURES:
            self._failures[address] = failures
            return
        self._failures.pop(address, None)
        self._addresses.pop(address, None)
        self._tried.pop(address, None)

    def consider(self, address: str) -> None:
        """An address where a peer may listen (mDNS, static, a join): try it now, unless
        a peer is already up there."""
        if len(self._addresses) >= MAX_ADDRESSES and address not in self._addresses:
            return
        node_id = self._addresses.setdefault(address, None)
        peer = self.table.get(node_id) if node_id else None
        due = self._clock.monotonic() - self._tried.get(address, -RETRY_S) >= RETRY_S
        # Only when an attempt is due: the loop calls this for every member it knows, and
        # waking it for an address it just tried would spin it.
        if (
            due
            and address not in self._connecting
            and (peer is None or peer.state is not PeerState.UP)
        ):
            self._wake.set()

    def attach_relay(self, link: RelayLink | None) -> None:
        self._relay = link

    def set_static_peers(self, peers: tuple[str, ...]) -> None:
        """A reloaded configuration's static peers: new ones are tried now; removed ones
        become ordinary hints (a member there stays in the mesh until it goes away)."""
        self._static = frozenset(peers)
        for address in peers:
            self._addresses.setdefault(address, None)
            self.consider(address)

    def relay_directory(self, members: list[RelayMember]) -> None:
        """The relay's list of our mesh's nodes connected to it (empty when it is lost)."""
        gone = set(self._relay_members) - {m.node_id for m in members}
        self._relay_members = {m.node_id: m.role for m in members[:MAX_ADDRESSES]}
        for node_id in gone:
            client = self._clients.get(node_id)
            if client is not None and client.via_relay:
                self.apply(self.table.failed(node_id, "left the relay"))
        self._wake.set()

    def drop_revoked(self) -> None:
        """Stop using every peer the mesh revoked, at once: its client, card and place in
        the table go, so nothing routes to it and no answer comes from it (it is not
        tried again: `_connect` refuses a revoked card)."""
        revoked = self._trust.revoked
        for node_id in [n for n in self._clients if n in revoked]:
            client = self._clients.pop(node_id)
            self._cards.pop(node_id, None)
            self._card_versions.pop(node_id, None)
            self._announced.pop(node_id, None)
            self._closing.add(asyncio.ensure_future(client.aclose()))
        for gone in [p.node_id for p in self.table if p.node_id in revoked]:
            logger.info("peer %s is revoked from the mesh: dropped", gone[:7])
            self.apply(self.table.forget(gone, "revoked"))
        for address, known in list(self._addresses.items()):
            if known in revoked:
                self._addresses.pop(address)

    def leaving(self, goodbye: Goodbye) -> None:
        """A peer says it is shutting down: out of rotation at once, if it signed that
        itself (for us, lately, about the card we hold); anything else is ignored."""
        node_id = goodbye.leaving_node_id
        card = self._cards.get(node_id)
        if card is None or not goodbye_holds(
            goodbye,
            identity_public_key=card.card.identity_public_key,
            me=self._trust.identity.node_id,
            card_issued_at_ms=self._announced.get(node_id),
            now_ms=self._clock.now_ms(),
        ):
            logger.debug("ignored a goodbye for %s that does not hold", node_id[:7])
            return
        self.apply(self.table.goodbye(node_id))

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._rounds()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # we are being stopped
                logger.exception("a peering round was cancelled from below; going on")
                await asyncio.sleep(HEARTBEAT_INTERVAL_MS / 1000)
            except Exception:  # the loop that keeps the table honest must never die
                logger.exception("peering round failed; going on")
                await asyncio.sleep(HEARTBEAT_INTERVAL_MS / 1000)

    async def _rounds(self) -> None:
        interval = HEARTBEAT_INTERVAL_MS / 1000
        last_beat = 0.0
        while True:
            self._wake.clear()
            self._closing = {f for f in self._closing if not f.done()}
            self.drop_revoked()  # however the list arrived (a push, a join, the relay)
            # An admin knows where the members it invited listen.
            for member in list(self._trust.members.values()):
                if member.get("node_id") in self._trust.revoked:
                    continue
                for address in member.get("addresses", [])[:2]:
                    self.consider(address)
            # Connection attempts run on their own: an unreachable address (a stale hint,
            # a dead box) must not delay the heartbeats that keep the table honest.
            self._connect_pending()
            if self._clock.monotonic() - last_beat >= interval:
                last_beat = self._clock.monotonic()
                await self._heartbeat()
                self.apply(self.table.tick(self._clock.now_ms()))
            pause = max(0.0, interval - (self._clock.monotonic() - last_beat))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    def apply(self, events: list[PeerEvent]) -> None:
        for event in events:
            if isinstance(event, PeerDiscovered):
                logger.info("peer %s joined the rotation", event.node_id[:7])
            elif isinstance(event, PeerStateChanged):
                logger.info(
                    "peer %s %s -> %s (%s)", event.node_id[:7], event.old, event.new, event.reason
                )
            elif isinstance(event, PeerLost):
                logger.info("peer %s forgotten (%s)", event.node_id[:7], event.reason)
        if events:
            self._on_change()

    def _connect_pending(self) -> None:
        if self._trust.role is Role.OVERFLOW:
            return  # overflow nodes serve; they never route, so they need no peers
        now = self._clock.monotonic()
        for address, node_id in list(self._addresses.items()):
            if address in self._connecting:
                continue
            peer = self.table.get(node_id) if node_id else None
            client = self._clients.get(node_id) if node_id else None
            since = now - self._tried.get(address, -RETRY_S)
            if client is not None and client.via_relay:
                due = since >= DIRECT_RETRY_S  # a direct path would beat the relay
            else:
                # A new address at once; a failing one at most once a heartbeat interval.
                due = (peer is None or peer.state is PeerState.DOWN) and since >= RETRY_S
            if due:
                self._tried[address] = now
                self._spawn(
                    address, PeerClient(address, trust=self._trust, transport=self._dial(address))
                )
        relay = self._relay
        if relay is None or not relay.connected.is_set():
            return
        for node_id in list(self._relay_members):
            peer = self.table.get(node_id)
            key = f"relay:{node_id}"
            current = self._clients.get(node_id)
            # Down, or silent on its direct path: the relay may still reach it.
            lost = (
                peer is None
                or peer.state is PeerState.DOWN
                or (
                    peer.state is PeerState.SUSPECT
                    and current is not None
                    and not current.via_relay
                )
            )
            if lost and key not in self._connecting:
                transport = RelayTransport(relay, node_id)
                self._spawn(
                    key, PeerClient(transport.label, trust=self._trust, transport=transport)
                )

    def _spawn(self, key: str, client: PeerClient) -> None:
        self._connecting.add(key)
        self._connects.start(self._connect(key, client), key)

    async def _connect(self, key: str, client: PeerClient) -> None:
        timeout_s = HEARTBEAT_TIMEOUT_MS / 1000 * 2
        try:
            card = await client.public_card(timeout_s=timeout_s)
            if card.node_id == self._trust.identity.node_id:
                self._addresses.pop(key, None)  # that is us
                await client.aclose()
                return
            full = await client.full_card(card, timeout_s=timeout_s)
        except MeshError as exc:
            logger.debug("peer at %s not usable: %s", key, exc.message)
            await client.aclose()
            self._failed_hint(key)
            return
        finally:
            self._connecting.discard(key)
        old = self._clients.get(card.node_id)
        peer = self.table.get(card.node_id)
        if (
            client.via_relay
            and old is not None
            and not old.via_relay
            and peer is not None
            and peer.state is PeerState.UP
        ):
            return  # the direct path works (again): it wins
        self._clients.pop(card.node_id, None)
        if old is not None and old is not client:
            await old.aclose()
        self._clients[card.node_id] = client
        self._cards[card.node_id] = card
        if not client.via_relay:
            self._addresses[key] = card.node_id
        self._learn(card.node_id, client.address, full, self._route(card, client))
        # Its load and RTT now, not at the next heartbeat: until then it would look full.
        await self._ping(card.node_id, client)

    @staticmethod
    def _route(card: PeerCard, client: PeerClient) -> Route:
        if card.membership.role is Role.OVERFLOW:
            return Route.CLOUD
        return Route.RELAY if client.via_relay else Route.LAN

    def _learn(self, node_id: str, address: str, full: pb.NodeCard, route: Route) -> None:
        self._card_versions[node_id] = full.issued_at_unix_ms
        self.apply(
            self.table.verified(
                node_id=node_id,
                address=address,
                route=route,
                models=tuple(codec.model_from_pb(m) for m in full.models),
                display_name=full.display_name,
                now_ms=self._clock.now_ms(),
            )
        )
        for other in full.peer_addresses[:64]:
            self.consider(other)

    async def _refresh_card(self, node_id: str, client: PeerClient) -> None:
        card = self._cards.get(node_id)
        peer = self.table.get(node_id)
        if card is None or peer is None:
            return
        try:
            full = await client.full_card(card, timeout_s=HEARTBEAT_TIMEOUT_MS / 1000 * 2)
        except MeshError as exc:
            logger.debug("could not refresh the card of %s: %s", node_id[:7], exc.message)
            return
        self._learn(node_id, peer.address, full, peer.route)

    async def _ping(self, node_id: str, client: PeerClient) -> None:
        started = self._clock.monotonic()
        try:
            reply = await client.ping(timeout_s=HEARTBEAT_TIMEOUT_MS / 1000)
        except MeshError as exc:
            logger.debug("no heartbeat from %s: %s", node_id[:7], exc.message)
            return  # silence: tick() decides when it becomes suspect or down
        rtt_ms = (self._clock.monotonic() - started) * 1000
        self._announced[node_id] = reply.card_issued_at_unix_ms
        if reply.card_issued_at_unix_ms != self._card_versions.get(node_id):
            await self._refresh_card(node_id, client)
        self.apply(
            self.table.heartbeat_ok(
                node_id,
                now_ms=self._clock.now_ms(),
                rtt_ms=rtt_ms,
                load=codec.load_from_pb(reply.load),
            )
        )

    async def _heartbeat(self) -> None:
        peers = [
            (node_id, client)
            for node_id, client in self._clients.items()
            if (peer := self.table.get(node_id)) is not None and peer.state is not PeerState.DOWN
        ]
        await asyncio.gather(*(self._ping(n, c) for n, c in peers))

    async def _say_goodbye(self) -> None:
        async def bye(node_id: str, client: PeerClient) -> None:
            goodbye = sign_goodbye(
                self._trust.identity,
                recipient_node_id=node_id,
                now_ms=self._clock.now_ms(),
                card_issued_at_ms=self._card_issued_at(),
            )
            with contextlib.suppress(MeshError, grpc.aio.AioRpcError):
                await client.ping(timeout_s=0.5, goodbye=goodbye)

        await asyncio.gather(*(bye(n, c) for n, c in self._clients.items()))
