"""Checking the signatures of what ledger sync brings, without holding up the node:
small answer frames on the event loop, large ones split over worker processes that end
with their node (`node.store.workers`). The rules are `mesh.ledger.sync.check_batch`'s."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor

from mesh.ledger.sync import CHUNK_ITEMS, INLINE_ITEMS, Received, batch_parts, check_batch
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.workers import process_pool


class Checker:
    """`check_batch` for a node: small batches on the event loop, large ones split over
    worker processes (made once, on first need: `node.store.workers.process_pool`)."""

    def __init__(self, workers: int = 2) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None

    async def check(self, batch: lpb.SyncBatch) -> Received:
        records, receipts, forks, refusals, heads = batch_parts(batch)
        if len(records) + len(receipts) < INLINE_ITEMS or self._workers < 2:
            return check_batch(records, receipts, forks, refusals, heads)
        if self._pool is None:
            # Its workers end with this process, even one killed with SIGKILL.
            self._pool = process_pool(self._workers)
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, check_batch, [], [], forks, refusals, heads)]
        for start in range(0, max(len(records), len(receipts)), CHUNK_ITEMS):
            jobs.append(
                loop.run_in_executor(
                    self._pool,
                    check_batch,
                    records[start : start + CHUNK_ITEMS],
                    receipts[start : start + CHUNK_ITEMS],
                )
            )
        out = Received()
        for part in await asyncio.gather(*jobs):
            out.extend(part)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
