"""Ledger sync between two nodes: how long a new member takes to hold, verified, the whole
history another member has.

Node A's ledger is filled with N signed records of its own chain, each with its entry
node's receipt. Node B (an empty ledger) joins A's mesh; from the end of `mesh join`,
the time until B holds all N records and N receipts, every one verified before it was
kept (the sealed gRPC calls of the running nodes, anti-entropy alone, nothing special
for the benchmark). Both nodes run the benchmark-only instant backend so no model loads.

Baselines from the same run, same data: copying A's ledger file with SQLite's backup API
(moving the bytes with no checks), and `mesh.ledger.records.verify` of the same records and
receipts on 2 processes (checking them with no transfer).

Target (issue "ledger"): syncing 100,000 records between two nodes in at most 15 s.

    python bench/bench_sync.py [--records 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_ledger import ENTRY, record_row, usage  # noqa: E402
from bench_routing import LAUNCHER, instant_config  # noqa: E402

from mesh.ledger.records import ChainWriter, countersign, verify  # noqa: E402
from node.store.home import Home  # noqa: E402
from node.store.identity_key import load_or_create_identity  # noqa: E402
from node.store.ledger_store import INSERT_RECORD, SCHEMA, read_ledger  # noqa: E402
from node.store.workers import chunk_map  # noqa: E402
from tests.nodeproc import NodeProcess, run_cli  # noqa: E402

TARGET_S = 15.0


def fill(home: Home, n: int) -> None:
    """N records of this home's node, each countersigned by the entry node."""
    identity, _ = load_or_create_identity(home.identity_key)
    writer = ChainWriter(identity)
    db = sqlite3.connect(home.ledger_file)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    rows, receipts = [], []
    for i in range(n):
        signed = writer.append(usage(i))
        rows.append(record_row(writer, signed, f"{i:032x}"))
        receipt = countersign(ENTRY, signed)
        receipts.append((receipt.record_hash, ENTRY.node_id, receipt.SerializeToString()))
    with db:
        db.executemany(INSERT_RECORD, rows)
        db.executemany(
            "INSERT INTO receipts (hash, entry_node_id, receipt) VALUES (?, ?, ?)", receipts
        )
    db.close()


def counts(path: Path) -> tuple[int, int]:
    if not path.exists():
        return 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0]),
            int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]),
        )
    except sqlite3.OperationalError:
        return 0, 0  # the node has not made its tables yet
    finally:
        db.close()


def main(n: int) -> None:
    print(f"# ledger sync bench — {platform.processor() or platform.machine()}, ", end="")
    print(f"{os.cpu_count()} cores, {n:,} records")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home_a = Home(root / "a")
        home_a.ensure()
        started = time.perf_counter()
        fill(home_a, n)
        print(f"(made A's ledger in {time.perf_counter() - started:.1f} s)")

        # Baselines, same data.
        started = time.perf_counter()
        source = sqlite3.connect(home_a.ledger_file)
        target = sqlite3.connect(root / "copy.db")
        with target:
            source.backup(target)
        source.close()
        target.close()
        copy_s = time.perf_counter() - started
        started = time.perf_counter()
        records, receipts = read_ledger(home_a.ledger_file)
        report = verify(records, receipts, map_chunks=chunk_map(2))
        verify_s = time.perf_counter() - started
        assert report.ok, report.problems[:3]

        a = NodeProcess(root / "a", config=instant_config("a-model"), command=LAUNCHER).start()
        b = NodeProcess(
            root / "b",
            "--peer",
            a.info["grpc_address"],
            config=instant_config("b-model"),
            command=LAUNCHER,
        ).start()
        try:
            code = run_cli(a.home, "mesh", "invite").stdout.strip()
            joined = run_cli(b.home, "mesh", "join", code)
            assert joined.returncode == 0, joined.stderr
            started = time.perf_counter()
            while counts(b.home / "ledger.db") < (n, n):
                if time.perf_counter() - started > 300:
                    raise SystemExit(f"B holds {counts(b.home / 'ledger.db')} after 300 s")
                time.sleep(0.05)
            sync_s = time.perf_counter() - started
        finally:
            a.stop()
            b.stop()
        records, receipts = read_ledger(root / "b" / "ledger.db")
        synced = verify(records, receipts, map_chunks=chunk_map(2))
        assert synced.ok, synced.problems[:3]

    print()
    print("| What | Seconds | Records/s |")
    print("|---|---|---|")
    print(f"| Baseline: copy the ledger file (no checks) | {copy_s:.2f} | {n / copy_s:,.0f} |")
    print(
        f"| Baseline: verify the records and receipts (2 processes, no transfer) | "
        f"{verify_s:.2f} | {n / verify_s:,.0f} |"
    )
    print(f"| Sync A -> B: joined to all held and verified | {sync_s:.2f} | {n / sync_s:,.0f} |")
    print()
    if n < 100_000:
        print(
            f"(a smaller run: the target is 100,000 records in <= {TARGET_S:.0f} s, "
            "the default --records)"
        )
    else:
        print(f"target: {n:,} records synced in <= {TARGET_S:.0f} s: ", end="")
        print("met" if sync_s <= TARGET_S else "NOT met")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    main(parser.parse_args().records)
