"""The peer table: which verified members this node knows, how they are doing, and
what they serve. Sans I/O: heartbeat outcomes and `now_ms` in, state changes
(past-tense events) out.

A peer enters the table only after its public card, membership certificate and
encryption keys verified, and its sealed full card arrived (so we know its
models). Heartbeats (pings, every HEARTBEAT_INTERVAL_MS) carry its load and
measure RTT. States:

    up       answered recently; eligible for requests
    suspect  no answer for SUSPECT_AFTER_MS: skipped while others can serve
    down     no answer for DOWN_AFTER_MS (or said goodbye): out of rotation

The numbers give the DESIGN.md targets: a killed node is out of rotation within
DOWN_AFTER_MS + one heartbeat (< 6 s); a node back is up at its first answer.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from mesh.inference import MAX_HELD_PREFIXES, Load, ModelInfo, Route
from mesh.routing.peer_index import ModelColumns
from mesh.routing.prefix import Boundary

HEARTBEAT_INTERVAL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 1000
SUSPECT_AFTER_MS = 2000
DOWN_AFTER_MS = 4000
RTT_SMOOTHING = 0.3
SERVICE_SMOOTHING = 0.3


class PeerState(enum.StrEnum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    node_id: str


@dataclass(frozen=True, slots=True)
class PeerStateChanged:
    node_id: str
    old: PeerState
    new: PeerState
    reason: str


@dataclass(frozen=True, slots=True)
class PeerLost:
    node_id: str
    reason: str


PeerEvent = PeerDiscovered | PeerStateChanged | PeerLost


@dataclass(kw_only=True)
class Peer:
    node_id: str
    address: str
    route: Route
    display_name: str = ""
    models: tuple[ModelInfo, ...] = ()
    load: Load = field(default_factory=lambda: Load(active_streams=0, queued=0, slots=1))
    state: PeerState = PeerState.UP
    rtt_ms: float = 0.0
    last_ok_ms: int = 0
    service_ms: float = 0.0  # smoothed time one request occupied it, as we saw it
    in_flight: int = 0  # requests we sent it that are still running
    others_busy: int = 0  # its load from others, as of its last heartbeat

    @property
    def busy(self) -> int:
        """Requests ahead of a new one there: ours (known now) plus others' (as of the last
        heartbeat). Heartbeats lag by up to a second; our own count does not."""
        return self.in_flight + self.others_busy

    def serves(self, model: str) -> ModelInfo | None:
        for info in self.models:
            if model == info.name or model in info.aliases:
                return info
        return None


class PeerTable:
    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        self._index: dict[str, ModelColumns] = {}  # model name or alias -> columns
        # Conversation prefix key -> the peers whose card says they hold it (any model).
        self._holders: dict[bytes, set[str]] = {}

    # --- the per-model index (kept in step with every change to a peer) -----------------

    def _sync(self, peer: Peer) -> None:
        available = peer.state is PeerState.UP and not peer.load.draining
        busy = peer.busy
        for info in peer.models:
            for name in (info.name, *info.aliases):
                columns = self._index.get(name)
                if columns is None:  # built only when missing: it allocates its columns
                    columns = self._index[name] = ModelColumns()
                columns.upsert(
                    peer.node_id,
                    rtt=peer.rtt_ms,
                    busy=busy,
                    slots=max(peer.load.slots, 1),
                    parallel=max(peer.load.parallel, 1),
                    service=peer.service_ms,
                    tps=info.tokens_per_second,
                    ctx=info.context_length,
                    available=available,
                )

    def _unindex(self, peer: Peer) -> None:
        for info in peer.models:
            for name in (info.name, *info.aliases):
                columns = self._index.get(name)
                if columns is not None:
                    columns.remove(peer.node_id)
            for key in info.prefixes:
                holders = self._holders.get(key)
                if holders is not None:
                    holders.discard(peer.node_id)
                    if not holders:
                        del self._holders[key]

    def _index_prefixes(self, peer: Peer) -> None:
        for info in peer.models:
            for key in info.prefixes:
                self._holders.setdefault(key, set()).add(peer.node_id)

    def note_held(self, node_id: str, model: str, key: bytes) -> None:
        """A peer answered a chat with `model` (its canonical name): its prompt cache holds
        that chat now, until its next card says otherwise."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        for i, info in enumerate(peer.models):
            if info.name == model and key not in info.prefixes:
                if len(info.prefixes) >= MAX_HELD_PREFIXES:
                    return  # its card says what it holds; a note never grows it past that
                models = list(peer.models)
                models[i] = replace(info, prefixes=info.prefixes | {key})
                peer.models = tuple(models)
                self._holders.setdefault(key, set()).add(node_id)
                return

    def holding(self, found: Sequence[Boundary]) -> dict[str, Peer]:
        """The peers holding one of a request's conversation prefixes (one lookup each)."""
        out: dict[str, Peer] = {}
        for boundary in found:
            for node_id in self._holders.get(boundary.key, ()):
                peer = self._peers.get(node_id)
                if peer is not None:
                    out[node_id] = peer
        return out

    def best(self, model: str, *, k: int, new_tokens: int, needed_context: int) -> list[Peer]:
        """The k most promising peers for `model` (vectorized; see mesh.routing.peer_index)."""
        columns = self._index.get(model)
        if columns is None:
            return []
        ids = columns.best(k=k, new_tokens=new_tokens, needed_context=needed_context)
        return [self._peers[node_id] for node_id in ids if node_id in self._peers]

    def started(self, node_id: str) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.in_flight += 1
            self._sync(peer)

    def finished(self, node_id: str) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.in_flight = max(0, peer.in_flight - 1)
            self._sync(peer)

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._peers.values()))

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def verified(
        self,
        *,
        node_id: str,
        address: str,
        route: Route,
        models: tuple[ModelInfo, ...],
        display_name: str,
        now_ms: int,
    ) -> list[PeerEvent]:
        """A peer's cards verified (first contact, or again after a restart or an address
        change): it is up, at this address, serving these models."""
        peer = self._peers.get(node_id)
        if peer is None:
            peer = Peer(
                node_id=node_id,
                address=address,
                route=route,
                models=models,
                display_name=display_name,
                last_ok_ms=now_ms,
            )
            self._peers[node_id] = peer
            self._sync(peer)
            self._index_prefixes(peer)
            return [PeerDiscovered(node_id)]
        self._unindex(peer)
        peer.address, peer.route, peer.models = address, route, models
        peer.display_name = display_name
        events = self._mark_ok(peer, now_ms, "card verified")
        self._sync(peer)
        self._index_prefixes(peer)
        return events

    def _mark_ok(self, peer: Peer, now_ms: int, reason: str) -> list[PeerEvent]:
        peer.last_ok_ms = now_ms
        return self._set(peer, PeerState.UP, reason)

    def heartbeat_ok(
        self, node_id: str, *, now_ms: int, rtt_ms: float, load: Load
    ) -> list[PeerEvent]:
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        peer.rtt_ms = (
            rtt_ms
            if peer.rtt_ms == 0
            else ((1 - RTT_SMOOTHING) * peer.rtt_ms + RTT_SMOOTHING * rtt_ms)
        )
        peer.load = load
        peer.others_busy = max(0, load.active_streams + load.queued - peer.in_flight)
        if load.draining:
            events = self._set(peer, PeerState.DOWN, "draining (shutting down)")
        else:
            events = self._mark_ok(peer, now_ms, "answered a heartbeat")
        self._sync(peer)
        return events

    def tick(self, now_ms: int) -> list[PeerEvent]:
        """Apply silence: call after heartbeats (failed ones simply do not report ok)."""
        events: list[PeerEvent] = []
        for peer in self._peers.values():
            silent = now_ms - peer.last_ok_ms
            if silent >= DOWN_AFTER_MS:
                events += self._set(peer, PeerState.DOWN, f"silent for {silent / 1000:.1f} s")
            elif silent >= SUSPECT_AFTER_MS and peer.state is PeerState.UP:
                events += self._set(peer, PeerState.SUSPECT, f"silent for {silent / 1000:.1f} s")
        return events

    def failed(self, node_id: str, reason: str) -> list[PeerEvent]:
        """A request to it failed at the transport: stop using it until it answers again."""
        peer = self._peers.get(node_id)
        if peer is None or peer.state is PeerState.DOWN:
            return []
        return self._set(peer, PeerState.SUSPECT, reason)

    def goodbye(self, node_id: str) -> list[PeerEvent]:
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        return self._set(peer, PeerState.DOWN, "said goodbye")

    def forget(self, node_id: str, reason: str) -> list[PeerEvent]:
        peer = self._peers.pop(node_id, None)
        if peer is None:
            return []
        self._unindex(peer)
        return [PeerLost(node_id, reason)]

    def _set(self, peer: Peer, state: PeerState, reason: str) -> list[PeerEvent]:
        if peer.state is state:
            return []
        old, peer.state = peer.state, state
        self._sync(peer)
        return [PeerStateChanged(peer.node_id, old, state, reason)]

    def served(self, node_id: str, *, elapsed_ms: float) -> None:
        """A request it served ended: learn how long its requests take."""
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.service_ms = (
                elapsed_ms
                if peer.service_ms == 0
                else ((1 - SERVICE_SMOOTHING) * peer.service_ms + SERVICE_SMOOTHING * elapsed_ms)
            )
            self._sync(peer)
