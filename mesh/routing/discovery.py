"""LAN discovery hints (mDNS, `_allerac._tcp.local.`), sans I/O.

What a node announces is only a hint: its node ID, mesh ID, protocol version
and gRPC port in TXT. Nothing is trusted because it answered mDNS: a hint only
tells the peering layer where to try, and a peer is used after its signed card
and membership verify. Bad hints (junk, oversized, other versions, other
meshes, ourselves) are dropped here with a reason, never an exception.

What discovery keeps is bounded whoever floods the LAN: see `NameBook` and
`ForwardGate` below.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from mesh import PROTOCOL_VERSION
from mesh.errors import MeshError
from mesh.routing.relay import TokenBucket
from mesh.trust.identity import parse_node_id

SERVICE_TYPE = "_allerac._tcp.local."
MAX_TXT_VALUE_BYTES = 128
MAX_TXT_KEYS = 16


@dataclass(frozen=True, slots=True)
class Hint:
    node_id: str
    mesh_id: str
    port: int


def hint_properties(*, node_id: str, mesh_id: str, port: int) -> dict[str, str]:
    return {"id": node_id, "mesh": mesh_id, "v": str(PROTOCOL_VERSION), "port": str(port)}


def parse_hint(properties: dict[bytes, bytes | None]) -> tuple[Hint | None, str]:
    """TXT properties -> (hint, "") or (None, why it was dropped)."""
    if not isinstance(properties, dict) or len(properties) > MAX_TXT_KEYS:
        return None, "too many TXT entries"
    values: dict[str, str] = {}
    for key, value in properties.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes | None):
            return None, "malformed TXT entry"
        if value is not None and len(value) > MAX_TXT_VALUE_BYTES:
            return None, "oversized TXT entry"
        try:
            values[key.decode("ascii")] = (value or b"").decode("ascii")
        except UnicodeDecodeError:
            return None, "non-ASCII TXT entry"
    if values.get("v") != str(PROTOCOL_VERSION):
        return None, f"protocol version {values.get('v')!r} is not spoken here"
    try:
        node_id = parse_node_id(values.get("id", ""))
        mesh_id = parse_node_id(values.get("mesh", ""))
    except MeshError:
        return None, "malformed node or mesh ID"
    port_text = values.get("port", "")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None, "malformed port"
    return Hint(node_id=node_id, mesh_id=mesh_id, port=int(port_text)), ""


# --- what discovery keeps: bounded, whoever floods the LAN -----------------------------------
#
# Every sighting costs memory (python-zeroconf's records and refresh schedule, our own
# bookkeeping) and, once handed to peering, a connection attempt. So discovery keeps a book of
# the instance names of our service it is willing to hold, charged to the address the
# announcement came from (its *source*): at most `max_names_per_source` names per source (a
# box announces one; a few boxes may share an address) and `max_names` in all. A source over
# its share is refused; when the book is full, a name of the source holding the most names
# makes room (junk first, then unresolved names; see `NameBook._victim`). A name that has not
# resolved into a hint within `unresolved_ttl_ms`, or that nobody re-announced within
# `max_record_ttl_s`, leaves the book, and with it every record of it that zeroconf held.
# Records are kept `max_record_ttl_s` at most, whatever TTL they claim (RFC 6762 §10 lets a
# cache keep records for less). Addresses handed on to peering are rate-limited per source and
# in all (`ForwardGate`).


@dataclass(frozen=True, kw_only=True, slots=True)
class DiscoveryLimits:
    max_names_per_source: int = 16
    max_names: int = 512
    max_record_ttl_s: int = 120  # RFC 6762 §10's TTL for host records
    unresolved_ttl_ms: int = 10_000
    max_records_per_name: int = 8
    forward_burst_per_source: float = 8.0  # new addresses handed to peering at once
    forward_per_source_per_s: float = 0.1  # and then one per 10 s
    forward_burst: float = 256.0
    forward_per_s: float = 2.0
    max_sources: int = 1024  # sources whose forwarding rate is remembered
    max_forwarded: int = 1024  # addresses remembered as handed on (re-handing one is free)


DEFAULT_LIMITS = DiscoveryLimits()


def capped_ttl(ttl_s: int, limits: DiscoveryLimits = DEFAULT_LIMITS) -> int:
    """The TTL we keep a record for: what it claims, never beyond the cap (0 stays a goodbye)."""
    return max(0, min(ttl_s, limits.max_record_ttl_s))


class NameState(Enum):
    PENDING = "pending"  # announced, not (yet) resolved into a well-formed hint
    REJECTED = "rejected"  # resolved into junk: held (so its source's share stays taken)
    RESOLVED = "resolved"  # resolved into a hint; peering decides whether it is a peer


class Refusal(Enum):
    SOURCE_FULL = "the source already holds its share of names"
    BOOK_FULL = "the book is full of names nobody may evict"


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    new: bool = False  # not in the book before
    evicted: tuple[str, ...] = ()  # names that left the book to make room
    refusal: Refusal | None = None


@dataclass(slots=True)
class _Entry:
    name: str  # as first announced (the browser schedules refreshes by that spelling)
    source: str
    seen_ms: int
    state: NameState = NameState.PENDING
    server: str | None = None
    hint: Hint | None = None
    addresses: tuple[str, ...] = ()
    protected: bool = False
    order: int = 0  # admissions before this one


_EVICTION_RANK = {NameState.REJECTED: 0, NameState.PENDING: 1, NameState.RESOLVED: 2}


class NameBook:
    """The instance names discovery holds, per source, within `DiscoveryLimits`.

    Names are case-insensitive (DNS): the book keys them lowercased and hands them back as
    first announced. `admit` is called for every announcement of a name (a new one or a refresh);
    everything it returns in `evicted` and everything `expire` returns must be forgotten by
    the caller too (zeroconf's records, pending resolves)."""

    def __init__(self, limits: DiscoveryLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._names: dict[str, _Entry] = {}
        self._by_source: dict[str, dict[str, None]] = {}  # insertion order = age
        self._servers: dict[str, int] = {}  # server host name -> names pointing at it
        self.refused: dict[str, int] = {}  # source -> refusals since `take_refused`
        self._admitted = 0

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._names

    def source_of(self, name: str) -> str | None:
        entry = self._names.get(name.lower())
        return entry.source if entry is not None else None

    def state_of(self, name: str) -> NameState | None:
        entry = self._names.get(name.lower())
        return entry.state if entry is not None else None

    def server_of(self, name: str) -> str | None:
        entry = self._names.get(name.lower())
        return entry.server if entry is not None else None

    def name_as_admitted(self, name: str) -> str | None:
        entry = self._names.get(name.lower())
        return entry.name if entry is not None else None

    def pending(self) -> list[str]:
        """Names not resolved yet, oldest first."""
        return [e.name for e in self._names.values() if e.state is NameState.PENDING]

    def names_of(self, source: str) -> list[str]:
        return list(self._by_source.get(source, ()))

    def knows_server(self, server: str) -> bool:
        return server.lower() in self._servers

    def admit(self, name: str, *, source: str, now_ms: int) -> Admission:
        key = name.lower()
        entry = self._names.get(key)
        if entry is not None:
            entry.seen_ms = now_ms  # a refresh keeps the source that announced it first
            return Admission(admitted=True)
        evicted: tuple[str, ...] = ()
        if len(self._by_source.get(source, ())) >= self.limits.max_names_per_source:
            return self._refuse(source, Refusal.SOURCE_FULL)
        if len(self._names) >= self.limits.max_names:
            victim = self._victim()
            if victim is None:
                return self._refuse(source, Refusal.BOOK_FULL)
            evicted = (self._names[victim].name,)
            self.remove(victim)
        self._admitted += 1
        self._names[key] = _Entry(name=name, source=source, seen_ms=now_ms, order=self._admitted)
        self._by_source.setdefault(source, {})[key] = None
        return Admission(admitted=True, new=True, evicted=evicted)

    def protect(self, name: str) -> None:
        """Never evict this name for another (our own announcement)."""
        entry = self._names.get(name.lower())
        if entry is not None:
            entry.protected = True

    def note_server(self, name: str, server: str) -> None:
        """The host name the name's SRV record points at (whose address records we keep)."""
        entry = self._names.get(name.lower())
        if entry is None or entry.server == server.lower():
            return
        self._forget_server(entry)
        entry.server = server.lower()
        self._servers[entry.server] = self._servers.get(entry.server, 0) + 1

    def resolved(self, name: str, hint: Hint, addresses: list[str], *, now_ms: int) -> None:
        entry = self._names.get(name.lower())
        if entry is None:
            return
        entry.state = NameState.RESOLVED
        entry.hint = hint
        entry.addresses = tuple(addresses[:4])
        entry.seen_ms = now_ms

    def rejected(self, name: str) -> None:
        """The name resolved into junk: keep it (and its source's share) until it expires,
        so that junk is looked at once per name, not once per packet."""
        entry = self._names.get(name.lower())
        if entry is not None and not entry.protected:
            entry.state = NameState.REJECTED
            entry.hint = None
            entry.addresses = ()

    def hints(self) -> list[tuple[Hint, tuple[str, ...], str]]:
        """(hint, addresses, source) of every resolved name."""
        return [
            (entry.hint, entry.addresses, entry.source)
            for entry in self._names.values()
            if entry.hint is not None
        ]

    def remove(self, name: str) -> bool:
        key = name.lower()
        entry = self._names.pop(key, None)
        if entry is None:
            return False
        names = self._by_source[entry.source]
        del names[key]
        if not names:
            del self._by_source[entry.source]
        self._forget_server(entry)
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Forget names that did not resolve into a hint in time, and names nobody
        re-announced within the TTL cap; returns them (as first announced)."""
        gone = []
        for entry in self._names.values():
            if entry.protected:
                continue
            age = now_ms - entry.seen_ms
            if entry.state is NameState.RESOLVED:
                if age >= self.limits.max_record_ttl_s * 1000:
                    gone.append(entry.name)
            elif age >= self.limits.unresolved_ttl_ms:
                gone.append(entry.name)
        for name in gone:
            self.remove(name)
        return gone

    def take_refused(self) -> dict[str, int]:
        """Refusals per source since the last call (for one log line, not one per packet)."""
        refused, self.refused = self.refused, {}
        return refused

    def _refuse(self, source: str, why: Refusal) -> Admission:
        if source in self.refused or len(self.refused) < self.limits.max_sources:
            self.refused[source] = self.refused.get(source, 0) + 1
        return Admission(admitted=False, refusal=why)

    def _victim(self) -> str | None:
        """The name (its key) to give up for a newcomer; never a protected one. It comes from
        the source holding the most names: a flooder pays for its own flood. Within a source
        junk goes first, then unresolved names, then the oldest. Between sources holding as
        many, the same order, then the newest name: one a flood just brought, rather than a
        box that has been announcing itself all along."""
        best: tuple[int, int, int] | None = None
        victim = None
        for names in self._by_source.values():
            pick: tuple[int, int, str] | None = None  # (rank, order, key)
            for key in names:  # oldest first
                entry = self._names[key]
                rank = _EVICTION_RANK[entry.state]
                if not entry.protected and (pick is None or rank < pick[0]):
                    pick = (rank, entry.order, key)
            if pick is None:
                continue
            score = (-len(names), pick[0], -pick[1])
            if best is None or score < best:
                best, victim = score, pick[2]
        return victim

    def _forget_server(self, entry: _Entry) -> None:
        if entry.server is None:
            return
        left = self._servers.get(entry.server, 0) - 1
        if left > 0:
            self._servers[entry.server] = left
        else:
            self._servers.pop(entry.server, None)
        entry.server = None


class ForwardGate:
    """Which sighted addresses to hand to peering: each new address costs a token from its
    source's bucket and from a global one; an address handed on lately passes for free
    (peering already has it), so re-announcements cost nothing."""

    def __init__(self, limits: DiscoveryLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._per_source: OrderedDict[str, TokenBucket] = OrderedDict()
        self._global: TokenBucket | None = None
        self._forwarded: OrderedDict[str, None] = OrderedDict()
        self.refused = 0

    def allow(self, source: str, address: str, *, now_ms: int) -> bool:
        now_s = now_ms / 1000
        if address in self._forwarded:
            self._forwarded.move_to_end(address)
            return True
        bucket = self._per_source.get(source)
        if bucket is None:
            bucket = TokenBucket(
                rate=self.limits.forward_per_source_per_s,
                burst=self.limits.forward_burst_per_source,
                now_s=now_s,
            )
            self._per_source[source] = bucket
            if len(self._per_source) > self.limits.max_sources:
                self._per_source.popitem(last=False)
        else:
            self._per_source.move_to_end(source)
        if self._global is None:
            self._global = TokenBucket(
                rate=self.limits.forward_per_s, burst=self.limits.forward_burst, now_s=now_s
            )
        # The source's bucket first, so a source over its rate cannot drain the global one.
        if not bucket.take(1.0, now_s):
            self.refused += 1
            return False
        if not self._global.take(1.0, now_s):
            bucket.take(-1.0, now_s)  # give the source its token back
            self.refused += 1
            return False
        self._forwarded[address] = None
        if len(self._forwarded) > self.limits.max_forwarded:
            self._forwarded.popitem(last=False)
        return True
