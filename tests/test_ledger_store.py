"""The ledger on disk (mesh/ledger_store.py): durable, idempotent, tamper-evident, and a
node killed with -9 in the middle of heavy writing loses no record it acknowledged and
continues its chain."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from mesh.identity import Identity, load_or_create_identity
from mesh.ledger import Usage, countersign, open_record, verify
from mesh.ledger_store import LedgerStore

ENTRY = Identity.generate()


def _usage(i: int, *, partial: bool = False) -> Usage:
    return Usage(
        request_id=f"{i:032x}",
        entry_node_id=ENTRY.node_id,
        user="bob",
        model="m",
        prompt_tokens=5,
        completion_tokens=i,
        route="local",
        started_at_ms=1_800_000_000_000,
        ended_at_ms=1_800_000_000_100,
        partial=partial,
    )


async def test_concurrent_appends_form_one_verified_chain_that_survives_a_reopen(
    tmp_path: Path,
) -> None:
    me = Identity.generate()
    async with await LedgerStore.open(tmp_path / "ledger.db", me) as store:
        made = await asyncio.gather(*(store.append(_usage(i)) for i in range(500)))
        assert sorted(open_record(r).seq for r in made) == list(range(1, 501))
        assert store.commits < 100  # appends that come together share a commit
    async with await LedgerStore.open(tmp_path / "ledger.db", me) as store:
        more = await store.append(_usage(500))
        assert open_record(more).seq == 501
        records = await store.records()
    report = verify(records, [countersign(ENTRY, r) for r in records])
    assert report.ok, report.problems
    assert report.records == 501


async def test_the_same_request_is_recorded_once(tmp_path: Path) -> None:
    async with await LedgerStore.open(tmp_path / "ledger.db", Identity.generate()) as store:
        first, again = await asyncio.gather(store.append(_usage(7)), store.append(_usage(7)))
        later = await store.append(_usage(7))
        partial = await store.append(_usage(7, partial=True))  # a failed-over part is apart
        assert first == again == later
        assert partial != first
        assert len(await store.records()) == 2


async def test_an_edited_or_deleted_row_is_found_and_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    me = Identity.generate()
    async with await LedgerStore.open(path, me) as store:
        for i in range(6):
            record = await store.append(_usage(i))
            await store.add_receipt(countersign(ENTRY, record))
    with sqlite3.connect(path) as db:  # someone with the file edits it
        row = db.execute("SELECT record FROM records WHERE seq = 3").fetchone()[0]
        db.execute("UPDATE records SET record = ? WHERE seq = 3", (row.replace(b"bob", b"eve"),))
        db.execute("DELETE FROM records WHERE seq = 5")
    async with await LedgerStore.open(path, me) as store:
        report = verify(await store.records(), await store.receipts())
    found = [(p.kind, p.seq) for p in report.problems]
    assert ("bad_signature", 3) in found
    assert ("gap", 5) in found


WRITER = r"""
import asyncio, sys
from pathlib import Path
from mesh.identity import load_or_create_identity
from mesh.ledger import Usage, open_record
from mesh.ledger_store import LedgerStore

async def main(home):
    identity, _ = load_or_create_identity(Path(home) / "identity.key")
    store = await LedgerStore.open(Path(home) / "ledger.db", identity)
    n = 0
    async def one(i):
        record = await store.append(Usage(request_id=f"{i:032x}", entry_node_id="e", user="u",
            model="m", prompt_tokens=1, completion_tokens=1, route="local",
            started_at_ms=0, ended_at_ms=0))
        print(open_record(record).seq, flush=True)
    while True:
        await asyncio.gather(*(one(n + k) for k in range(50)))
        n += 50

asyncio.run(main(sys.argv[1]))
"""


def test_kill_9_during_heavy_writing_loses_no_acknowledged_record(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path / "identity.key")
    out = (tmp_path / "acked.txt").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=out)
    try:
        deadline = time.monotonic() + 60
        while (tmp_path / "acked.txt").stat().st_size < 20_000:  # thousands acknowledged
            assert proc.poll() is None, "the writer died"
            assert time.monotonic() < deadline, "the writer is too slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    acked = {int(line) for line in (tmp_path / "acked.txt").read_text().split()}

    async def check() -> None:
        async with await LedgerStore.open(tmp_path / "ledger.db", identity) as store:
            records = await store.records()
            seqs = {open_record(r).seq for r in records}
            assert acked <= seqs, f"{len(acked - seqs)} acknowledged records lost"
            report = verify(records, require_receipts=False)
            assert report.ok, report.problems[:3]
            nxt = await store.append(_usage(10**9))
            assert open_record(nxt).seq == max(seqs) + 1  # the chain goes on

    asyncio.run(check())
