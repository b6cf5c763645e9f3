"""The ledger on disk (mesh/ledger_store.py): durable, idempotent, tamper-evident, and a
node killed with -9 in the middle of heavy writing loses no record it acknowledged and
continues its chain."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import ConfigError, LedgerError
from mesh.ledger.records import Usage, countersign, open_record, record_hash, verify
from mesh.ledger.sync import check_batch
from mesh.trust.identity import Identity
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.identity_key import load_or_create_identity
from node.store.ledger_store import LedgerStore, read_ledger

ENTRY = Identity.generate()


def _usage(i: int, *, partial: bool = False, entry: Identity = ENTRY) -> Usage:
    return Usage(
        request_id=f"{i:032x}",
        entry_node_id=entry.node_id,
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
from node.store.identity_key import load_or_create_identity
from mesh.ledger.records import Usage, open_record
from node.store.ledger_store import LedgerStore

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


async def test_a_damaged_file_is_a_clear_error_that_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """Each connection is a thread: one left open on the error path would keep a node's
    process alive, serving nothing, after it told the error (issue 12, finding 5)."""
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database" * 1000)
    threads = threading.active_count()
    with pytest.raises(ConfigError, match="file is not a database"):
        await LedgerStore.open(path, Identity.generate())
    deadline = time.monotonic() + 5  # a closed connection's thread ends as it sees the stop
    while threading.active_count() > threads:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "left",
    ["their receipts", "the store's mark"],
)
async def test_a_chain_whose_newest_records_were_deleted_goes_on_after_them(
    tmp_path: Path, left: str
) -> None:
    """The writer continues after the highest evidence of its own chain (a receipt's
    note of where its record sat, the store's mark), never under it: the deleted records
    leave a gap a peer fills, not a second history (issue 12, finding 4)."""
    path = tmp_path / "ledger.db"
    me = Identity.generate()
    async with await LedgerStore.open(path, me) as store:
        # Served and let in here: each is countersigned in its own commit.
        made = [await store.append(_usage(i, entry=me)) for i in range(5)]
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM records WHERE seq > 3")
        db.execute("DELETE FROM receipts" if left == "the store's mark" else "DELETE FROM marks")
    db.close()
    async with await LedgerStore.open(path, me) as store:
        after = await store.append(_usage(99, entry=me))
        assert open_record(after).seq == 6
        assert open_record(after).prev_hash == record_hash(made[4])
        problems = verify(*read_ledger(path), require_receipts=False).problems
        assert [(p.kind, p.seq) for p in problems] == [("gap", 4)]
        # A peer gives the deleted records back: they fit, and the chain is whole.
        await store.ingest(check_batch([(r.record, r.signature) for r in made[3:]], []))
        records, receipts = read_ledger(path)
        assert verify(records, receipts, require_receipts=False).ok


async def test_a_failure_at_run_time_is_a_ledger_error_not_a_config_error(tmp_path: Path) -> None:
    """Issue 13 item 6: runtime ledger failures were reported as `config_error`."""
    from mesh.errors import LedgerError

    me = Identity.generate()
    store = await LedgerStore.open(tmp_path / "ledger.db", me)
    await store.close()
    with pytest.raises(LedgerError) as info:
        await store.append(_usage(1))
    assert info.value.code == "ledger_error"


async def test_a_record_for_a_request_let_in_here_is_countersigned_in_its_own_commit(
    tmp_path: Path,
) -> None:
    """The entry node's receipt of a record it made itself commits with the record: no
    second transaction on the answer's path, and no moment where one is held without the
    other."""
    me = Identity.generate()
    async with await LedgerStore.open(tmp_path / "ledger.db", me) as store:
        here = await store.append(_usage(1, entry=me))
        await store.append(_usage(2))  # let in by another node: the receipt is that node's
        assert await store.append(_usage(1, entry=me)) == here  # recorded once
        assert store.commits == 3
    records, receipts = read_ledger(tmp_path / "ledger.db")
    assert [r.record_hash for r in receipts] == [record_hash(here)]
    assert verify(records[:1], receipts).ok


async def _served_elsewhere(path: Path, entry: Identity, count: int) -> list[tuple[str, bytes]]:
    """`count` records another node signed for requests `entry` let in."""
    async with await LedgerStore.open(path, Identity.generate()) as server:
        made = [await server.append(_usage(i, entry=entry)) for i in range(count)]
    return [(open_record(r).node_id, r.SerializeToString()) for r in made]


async def test_an_accepted_record_counts_at_once_and_close_keeps_it_with_its_receipt(
    tmp_path: Path,
) -> None:
    """The entry node's commit of a peer's record and its receipt is off the answer's
    path: the record counts as soon as `accept` returns, and `close` makes whatever is
    still queued durable."""
    me = Identity.generate()
    made = await _served_elsewhere(tmp_path / "server.db", me, 3)
    store = await LedgerStore.open(tmp_path / "entry.db", me)
    counted: list[int] = []
    store.on_records = lambda records: counted.extend(r.seq for r in records)
    for i, (server, raw) in enumerate(made):
        assert await store.accept(raw, served_by=server, request_id=_usage(i).request_id) == ""
    assert counted == [1, 2, 3]
    await store.close()  # no flush before: the close keeps them
    records, receipts = read_ledger(tmp_path / "entry.db")
    assert [open_record(r).seq for r in records] == [1, 2, 3]
    assert verify(records, receipts).ok


@pytest.mark.parametrize("first", ["its keep", "a sync"])
async def test_an_accepted_record_that_also_arrives_by_sync_counts_once(
    tmp_path: Path, first: str
) -> None:
    me = Identity.generate()
    [(server, raw)] = await _served_elsewhere(tmp_path / "server.db", me, 1)
    signed = lpb.SignedRecord.FromString(raw)
    async with await LedgerStore.open(tmp_path / "entry.db", me) as store:
        counted: list[int] = []
        store.on_records = lambda records: counted.extend(r.seq for r in records)
        assert await store.accept(raw, served_by=server, request_id=_usage(0).request_id) == ""
        if first == "its keep":
            await store.flush()
        await store.ingest(check_batch([(signed.record, signed.signature)], []))
        await store.flush()
        assert counted == [1]
        assert len(await store.records()) == 1
        assert len(await store.receipts()) == 1


async def test_a_batch_that_cannot_commit_fails_its_appends_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    """A failed transaction is rolled back whole, and the next record continues the
    chain after the last one committed."""
    path = tmp_path / "ledger.db"
    me = Identity.generate()
    async with await LedgerStore.open(path, me) as store:
        first = await store.append(_usage(1, entry=me))
    bad = _usage(2).request_id  # hex digits: nothing to quote
    with sqlite3.connect(path) as db:  # the disk refuses one record (a fault injected)
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON records "
            f"WHEN new.request_id = '{bad}' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
    db.close()
    async with await LedgerStore.open(path, me) as store:
        failed = await asyncio.gather(
            store.append(_usage(2, entry=me)),
            store.append(_usage(3, entry=me)),  # in the same batch: it fails with it
            return_exceptions=True,
        )
        assert all(isinstance(f, LedgerError) for f in failed), failed
        after = await store.append(_usage(4, entry=me))
        assert (open_record(after).seq, open_record(after).prev_hash) == (2, record_hash(first))
    records, receipts = read_ledger(path)
    assert [open_record(r).seq for r in records] == [1, 2]
    assert verify(records, receipts).ok


async def test_flush_waits_for_a_keep_already_under_way(tmp_path: Path) -> None:
    """`flush` (and so `close`) returns only once what is being committed right now is
    committed, not merely once nothing is left queued."""
    me = Identity.generate()
    [(server, raw)] = await _served_elsewhere(tmp_path / "server.db", me, 1)
    async with await LedgerStore.open(tmp_path / "entry.db", me) as store:
        entered, go_on = asyncio.Event(), asyncio.Event()
        commit = store._commit_on_db_thread

        async def slow_disk(work: Any) -> Any:  # the database is slow to take this keep
            entered.set()
            await go_on.wait()
            return await commit(work)

        store._commit_on_db_thread = slow_disk  # type: ignore[method-assign]
        assert await store.accept(raw, served_by=server, request_id=_usage(0).request_id) == ""
        async with asyncio.timeout(5):
            await entered.wait()  # the commit loop took it: nothing is queued any more
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.flush(), 0.2)
        go_on.set()
        await store.flush()
        assert len(await store.receipts()) == 1
