"""The ledger's speed: signed, durably committed appends a second, and verifying a large
history.

Appends: N appends from C concurrent requests through `LedgerStore` (group commit: one
COMMIT, fsync'd, per batch), against the same signed records committed one by one (the
baseline, measured in the same run, same file system, WAL + synchronous=FULL). Verify:
`mesh.ledger.records.verify` over R records of one chain with their receipts.

Targets (issue "ledger"): at least 5,000 appends a second; verifying 100,000 records in at
most 10 s.

    python bench/bench_ledger.py [--appends 20000] [--concurrency 64] [--verify 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.ledger.records import (  # noqa: E402
    ChainWriter,
    Usage,
    countersign,
    open_record,
    record_hash,
    verify,
)
from mesh.trust.identity import Identity  # noqa: E402
from mesh.wire.v1.ledger_pb2 import SignedRecord  # noqa: E402
from node.store.ledger_store import INSERT_RECORD, SCHEMA, LedgerStore  # noqa: E402
from node.store.workers import chunk_map  # noqa: E402

ENTRY = Identity.generate()  # the entry node that countersigns


def usage(i: int) -> Usage:
    return Usage(
        request_id=f"{i:032x}",
        entry_node_id=ENTRY.node_id,
        user="alice",
        model="smollm2-135m-instruct",
        prompt_tokens=40,
        completion_tokens=128,
        route="lan",
        started_at_ms=1_800_000_000_000 + i,
        ended_at_ms=1_800_000_001_000 + i,
    )


def record_row(writer: ChainWriter, signed: SignedRecord, request_id: str) -> tuple[object, ...]:
    """The `records` row of the record `writer` just made (INSERT_RECORD's order)."""
    node_id = open_record(signed).node_id
    return (
        node_id,
        writer.last_seq,
        request_id,
        1,
        signed.record,
        signed.signature,
        writer.last_hash,
    )


def one_by_one(path: Path, identity: Identity, n: int) -> float:
    """Baseline: each signed record in its own durable transaction."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    writer = ChainWriter(identity)
    started = time.perf_counter()
    for i in range(n):
        signed = writer.append(usage(i))
        db.execute(INSERT_RECORD, record_row(writer, signed, f"{i:032x}"))
        db.commit()
    elapsed = time.perf_counter() - started
    db.close()
    return n / elapsed


async def grouped(path: Path, identity: Identity, n: int, concurrency: int) -> float:
    store = await LedgerStore.open(path, identity)
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await store.append(usage(i))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await store.close()
    return n / elapsed


def main(appends: int, concurrency: int, to_verify: int) -> None:
    identity = Identity.generate()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # the project's file system, not tmpfs
        baseline_n = max(200, appends // 20)
        baseline = one_by_one(Path(tmp) / "baseline.db", identity, baseline_n)
        rate = asyncio.run(grouped(Path(tmp) / "ledger.db", identity, appends, concurrency))
    writer = ChainWriter(identity)
    records = [writer.append(usage(i)) for i in range(to_verify)]
    receipts = [countersign(ENTRY, r) for r in records]
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    report = verify(records, receipts, map_chunks=chunk_map(workers) if workers > 1 else None)
    verify_s = time.perf_counter() - started
    assert report.ok
    assert report.records == to_verify
    assert record_hash(records[-1]) == writer.last_hash
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(f"durable appends/s, one commit per record (baseline, {baseline_n}): {baseline:9,.0f}")
    print(
        f"durable appends/s, LedgerStore group commit ({appends}, {concurrency} at once): "
        f"{rate:9,.0f}  ({rate / baseline:.1f}x)"
    )
    print(
        f"verify {to_verify:,} records with receipts (signatures, chain, countersignatures; "
        f"{workers} processes): {verify_s:.1f} s"
    )
    ok = rate >= 5000 and verify_s * 100_000 / to_verify <= 10  # scaled to 100,000
    print(f"targets (>= 5,000 appends/s, verify 100,000 in <= 10 s): {'met' if ok else 'NOT met'}")
    print("sync: bench/bench_sync.py; quota check per request: bench/bench_quota.py")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--verify", type=int, default=100000)
    args = parser.parse_args()
    main(args.appends, args.concurrency, args.verify)
