"""Rate limits per source, for what answers strangers before they prove anything
(pings, invite redemptions), sans I/O: the clock is passed in.

Each source (an IP address, or a node ID for what arrives through the relay) has a
token bucket; the table keeps at most `max_sources` of them, dropping the least
recently seen, so a flood from many addresses costs bounded memory (a dropped source
starts again with a full bucket, which only ever errs towards the sender, and only
for sources the table had to forget).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mesh.routing.relay import TokenBucket
from mesh.routing.relay import source_address as ip_source

MAX_SOURCES = 4096


def source_address(peer: str) -> str:
    """Whose rate a call counts against: for a gRPC peer its address (IPv6 by /64, as the
    relay counts it: `mesh.routing.relay.source_address`); for anything else (a node ID behind
    the relay, "relay:NODE") the string itself."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return ip_source(peer)
    return peer[:256]


@dataclass(frozen=True, kw_only=True, slots=True)
class Rate:
    per_s: float
    burst: float


class SourceLimiter:
    """`allow(source, now_s)`: True while that source stays within its rate."""

    def __init__(self, rate: Rate, *, max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self._max_sources = max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now_s: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = TokenBucket(rate=self.rate.per_s, burst=self.rate.burst, now_s=now_s)
            self._buckets[source] = bucket
            if len(self._buckets) > self._max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
        if bucket.take(1.0, now_s):
            return True
        self.refused += 1
        return False
