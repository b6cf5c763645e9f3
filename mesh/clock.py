"""The one place that reads the time (as python-zeroconf's `current_time_millis`).

Components take what they need of a `Clock` (wall time in milliseconds for what other
nodes see: certificates, envelopes, records; a monotonic clock for durations), so that
tests can pass a fake one; `SYSTEM` is the real one, handed out by the edges (the daemon,
the CLI, the relay) to every component. Nothing else reads the time
(tests/test_import_contract.py checks it).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock time, Unix milliseconds (what other nodes compare with theirs)."""

    def monotonic(self) -> float:
        """Seconds that never go back (timeouts, intervals); not comparable across nodes."""


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM = SystemClock()
