"""Columns of per-peer numbers for one model, so choosing among thousands of peers
is a few vector operations instead of a Python loop (DESIGN.md target: a
scheduling decision with 10,000 known peers in at most 1 ms).

`PeerTable` keeps one `ModelColumns` per model name and alias and updates a
row in O(1) when a heartbeat, a state change or a finished request changes a
peer's numbers; `best()` returns the few peers worth a full look. A table of a
few peers (a home's boxes) is read by a plain loop: numpy's fixed cost per call
(~40 µs for the dozen operations) is more than the loop's for dozens of rows.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from mesh.routing.scheduler import DEFAULT_SERVICE_MS, DEFAULT_TOKENS_PER_SECOND, wait_ms

_FIELDS = ("rtt", "busy", "slots", "service", "tps", "ctx", "parallel")
SMALL_TABLE = 32  # rows up to which a Python loop beats the vector operations


class ModelColumns:
    def __init__(self, capacity: int = 16) -> None:
        self.node_ids: list[str] = []
        self.rows: dict[str, int] = {}
        self._columns: dict[str, npt.NDArray[np.float64]] = {
            name: np.zeros(capacity) for name in _FIELDS
        }
        self._available = np.zeros(capacity, dtype=bool)

    def __len__(self) -> int:
        return len(self.node_ids)

    def _grow(self) -> None:
        capacity = len(self._available) * 2
        for name, column in self._columns.items():
            grown = np.zeros(capacity)
            grown[: len(column)] = column
            self._columns[name] = grown
        available = np.zeros(capacity, dtype=bool)
        available[: len(self._available)] = self._available
        self._available = available

    def upsert(self, node_id: str, **values: float | bool) -> None:
        row = self.rows.get(node_id)
        if row is None:
            if len(self.node_ids) == len(self._available):
                self._grow()
            row = len(self.node_ids)
            self.node_ids.append(node_id)
            self.rows[node_id] = row
        for name, value in values.items():
            if name == "available":
                self._available[row] = bool(value)
            else:
                self._columns[name][row] = float(value)

    def remove(self, node_id: str) -> None:
        row = self.rows.pop(node_id, None)
        if row is None:
            return
        last = len(self.node_ids) - 1
        if row != last:  # move the last row into the hole
            moved = self.node_ids[last]
            self.node_ids[row] = moved
            self.rows[moved] = row
            for column in self._columns.values():
                column[row] = column[last]
            self._available[row] = self._available[last]
        self.node_ids.pop()
        self._available[last] = False

    def best(self, *, k: int, new_tokens: int, needed_context: int) -> list[str]:
        """The k peers with the smallest estimated time to finish that can take it now."""
        n = len(self.node_ids)
        if n == 0:
            return []
        if n <= SMALL_TABLE:
            return self._best_of_few(n, k=k, new_tokens=new_tokens, needed_context=needed_context)
        c = {name: column[:n] for name, column in self._columns.items()}
        service = np.where(c["service"] > 0, c["service"], DEFAULT_SERVICE_MS)
        tps = np.where(c["tps"] > 0, c["tps"], DEFAULT_TOKENS_PER_SECOND)
        generation = new_tokens / tps * 1000.0
        parallel = np.maximum(c["parallel"], 1.0)
        busy = c["busy"]
        # scheduler.wait_ms, a column at a time
        wait = np.where(
            busy < parallel,
            busy * generation,
            (busy - parallel + 1) * service / parallel + (parallel - 1) * generation,
        )
        eta = c["rtt"] + wait + generation
        usable = (
            self._available[:n]
            & (c["busy"] < c["slots"])
            & ((c["ctx"] == 0) | (c["ctx"] >= needed_context))
        )
        eta = np.where(usable, eta, np.inf)
        if k < n:
            picked = np.argpartition(eta, k)[:k]
            picked = picked[np.argsort(eta[picked])]
        else:
            picked = np.argsort(eta)
        return [self.node_ids[int(i)] for i in picked if np.isfinite(eta[int(i)])]

    def _best_of_few(self, n: int, *, k: int, new_tokens: int, needed_context: int) -> list[str]:
        """`best` for a few rows, the same arithmetic in a loop."""
        rtt, busy, slots, service, tps, ctx, parallel = (
            self._columns[name][:n].tolist() for name in _FIELDS
        )
        available = self._available[:n].tolist()
        scored: list[tuple[float, int]] = []
        for row in range(n):
            if not available[row] or busy[row] >= slots[row]:
                continue
            if ctx[row] != 0 and ctx[row] < needed_context:
                continue
            row_service = service[row] if service[row] > 0 else DEFAULT_SERVICE_MS
            row_tps = tps[row] if tps[row] > 0 else DEFAULT_TOKENS_PER_SECOND
            generation = new_tokens / row_tps * 1000.0
            wait = wait_ms(
                busy=busy[row],
                parallel=parallel[row],
                service_ms=row_service,
                generation_ms=generation,
            )
            eta = rtt[row] + wait + generation
            if eta != float("inf"):
                scored.append((eta, row))
        scored.sort()
        return [self.node_ids[row] for _, row in scored[:k]]
