"""Who may hold a connection on a public port: caps per source and in total, sans I/O.

How it works: a listener calls `admit(address)` for every connection it accepts and
closes the connection at once when the answer is False; it calls `release(address)`
exactly once when an admitted connection ends. A connection is admitted while

- its source holds fewer than `per_source` connections, and
- the listener holds fewer than `total`; a source that is not loopback must also leave
  `loopback_reserve` of them free, so a flood from the network (or a LAN full of
  clients) never locks the box's own owner out of their node.

A source is an IPv4 address, or an IPv6 /64: one subscriber usually holds a whole /64
(RFC 6177), so counting single IPv6 addresses would count nothing. An IPv4-mapped IPv6
address (a dual-stack socket's IPv4 client) is its IPv4 address. Anything that is not
an IP address (a Unix socket's empty peer name) is one shared source, not loopback.

`budget()` sizes the totals from the descriptor limit: it keeps a quarter of the
descriptors (at least `KEEP_MIN_FDS`) for the node's own files, model, database and
outgoing peer connections, and splits the rest between the two ports, a spliced gRPC
connection costing `FDS_PER_GRPC_CONNECTION` descriptors.

Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

IPV6_SOURCE_PREFIX = 64
MAX_SOURCE_CHARS = 64

KEEP_FRACTION = 0.25  # of the descriptor limit, never given to listeners
KEEP_MIN_FDS = 256
HTTP_SHARE = 0.5  # of what is left; the gRPC front gets the rest
# The public socket, the front's socket to the gRPC server, and the server's end of it.
FDS_PER_GRPC_CONNECTION = 3
LOOPBACK_RESERVE_FRACTION = 0.1  # of a listener's total, kept for this box


class Refusal(Enum):
    """Why a connection was not admitted."""

    PER_SOURCE = "per_source"  # its source holds its share already
    TOTAL = "total"  # the listener is full (for non-loopback: down to the reserve)


@dataclass(frozen=True, slots=True)
class Source:
    """Whose share a connection counts against."""

    key: str
    loopback: bool


def source_of(address: str) -> Source:
    """'203.0.113.7' -> itself; '2001:db8:1:2::9' -> '2001:db8:1:2::/64';
    '::ffff:127.0.0.1' -> '127.0.0.1' (loopback); anything else -> one shared source."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return Source(key="unknown", loopback=False)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif not ip.is_loopback:
            network = ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False)
            return Source(key=str(network)[:MAX_SOURCE_CHARS], loopback=False)
    return Source(key=str(ip), loopback=ip.is_loopback)


@dataclass(frozen=True, kw_only=True, slots=True)
class Caps:
    per_source: int
    total: int
    loopback_reserve: int = 0

    def __post_init__(self) -> None:
        if self.per_source < 1 or self.total < 1:
            raise ValueError("connection caps must be at least 1")
        if not 0 <= self.loopback_reserve < self.total:
            raise ValueError("the loopback reserve must be below the total")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnStats:
    open: int
    peak: int
    sources: int
    admitted: int
    refused_per_source: int
    refused_total: int

    @property
    def refused(self) -> int:
        return self.refused_per_source + self.refused_total


class ConnLimits:
    """Open connections per source and in total, against `Caps`."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._per_source: dict[str, int] = {}
        self._open = 0
        self._peak = 0
        self._admitted = 0
        self._refused = dict.fromkeys(Refusal, 0)

    def refusal(self, address: str) -> Refusal | None:
        """Why `address` would be refused now (None: it would be admitted)."""
        source = source_of(address)
        if self._per_source.get(source.key, 0) >= self.caps.per_source:
            return Refusal.PER_SOURCE
        room = self.caps.total if source.loopback else self.caps.total - self.caps.loopback_reserve
        if self._open >= room:
            return Refusal.TOTAL
        return None

    def admit(self, address: str) -> bool:
        """Count a new connection from `address` if the caps allow it."""
        refusal = self.refusal(address)
        if refusal is not None:
            self._refused[refusal] += 1
            return False
        key = source_of(address).key
        self._per_source[key] = self._per_source.get(key, 0) + 1
        self._open += 1
        self._peak = max(self._peak, self._open)
        self._admitted += 1
        return True

    def release(self, address: str) -> None:
        """An admitted connection from `address` ended."""
        key = source_of(address).key
        held = self._per_source.get(key, 0)
        if held <= 0:
            raise ValueError(f"release without admit for {key}")
        if held == 1:
            del self._per_source[key]
        else:
            self._per_source[key] = held - 1
        self._open -= 1

    def open_from(self, address: str) -> int:
        return self._per_source.get(source_of(address).key, 0)

    def stats(self) -> ConnStats:
        return ConnStats(
            open=self._open,
            peak=self._peak,
            sources=len(self._per_source),
            admitted=self._admitted,
            refused_per_source=self._refused[Refusal.PER_SOURCE],
            refused_total=self._refused[Refusal.TOTAL],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """Connections each public port may hold, from the descriptor limit."""

    nofile: int
    kept_fds: int  # for the node's own files, model, database and outgoing connections
    http_total: int
    grpc_total: int


def budget(nofile: int) -> Budget:
    kept = max(KEEP_MIN_FDS, int(nofile * KEEP_FRACTION))
    usable = max(0, nofile - kept)
    http_fds = int(usable * HTTP_SHARE)
    grpc_fds = usable - http_fds
    return Budget(
        nofile=nofile,
        kept_fds=kept,
        http_total=max(1, http_fds),
        grpc_total=max(1, grpc_fds // FDS_PER_GRPC_CONNECTION),
    )


def caps_for(*, total: int, per_source: int) -> Caps:
    """Caps for one listener: `per_source` (at most the total) and a loopback reserve of
    a tenth of the total, at least one source's share where the total allows it."""
    per_source = max(1, min(per_source, total))
    reserve = max(per_source, int(total * LOOPBACK_RESERVE_FRACTION))
    if reserve >= total:
        reserve = total // 2 if total > 1 else 0
    return Caps(per_source=per_source, total=total, loopback_reserve=reserve)
