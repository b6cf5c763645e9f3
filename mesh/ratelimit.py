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

from mesh.relay import TokenBucket

MAX_SOURCES = 4096


def source_address(peer: str) -> str:
    """The address part of a gRPC peer string: 'ipv4:1.2.3.4:5678' -> '1.2.3.4',
    'ipv6:[::1]:5678' -> '::1'; anything else is its own source."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer[:256]
    if rest.startswith("["):
        end = rest.find("]")
        return rest[1:end] if end > 0 else rest[:256]
    host, _, _ = rest.rpartition(":")
    return host or rest[:256]


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
