"""The ledger on disk: one aiosqlite database per node, append-only, durable.

Every record is stored as the exact bytes that were signed, with its signature and hash;
`UNIQUE(node_id, seq)` keeps one record per position of a node's chain (a second,
different one arriving by sync is kept apart, as fork proof, by the sync code) and
`UNIQUE(request_id, kind)` makes appending idempotent: the same request served twice is
recorded once.

Durability: WAL with `synchronous=FULL`, and `append` returns only after the COMMIT that
holds its record. Appends that arrive together share one transaction (group commit), so
thousands of durable appends a second cost one fsync per batch, not per record; after a
crash (kill -9) every acknowledged record is there and the chain continues from the
last one committed. A record made for a request this node let in itself is countersigned
in that same commit.

A peer's record for a request this node let in (`accept`) is checked and judged at once,
and kept with this node's receipt just after: the answer does not wait for that commit
(its record is durable at the node that signed it). Such keeps share a transaction too,
`flush` waits for them and `close` makes them durable before the store closes; a crash
in between loses the receipt, never the record, which its signer still holds and sync
brings back. A refusal is kept before `accept` returns.

A chain's head is also kept outside the chain, so that deleting its newest records
shows (`mesh.ledger.records.verify` reads them as `Mark`s): each receipt notes where the record
it countersigns sits, `marks` holds the highest record held of every node, and `heads`
each node's latest signed head with the members' countersignatures. This node's own
chain continues after the highest of these, never under it: a box whose newest records
were lost leaves a gap its peers fill, not a second history.

Receipts (and refusals) are kept only with their record, travel with it, and are asked
for by the record's hash (`unreceipted`: records held without either), never by row
numbers, which start again when a box rebuilds its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aiosqlite
from google.protobuf.message import DecodeError

from mesh.clock import SYSTEM
from mesh.errors import BadSignature, ConfigError, InvalidRequest, LedgerError
from mesh.ledger.records import (
    GENESIS,
    ChainWriter,
    Mark,
    Usage,
    countersign,
    countersign_head,
    head_hash,
    open_record,
    record_hash,
    refuse,
    sign_head,
)
from mesh.ledger.sync import (
    FRAME_RECORDS,
    MAX_FORK_PROOFS,
    MAX_HEAD_RECEIPTS,
    MAX_HEADS,
    MAX_RECORDS_PER_CALL,
    MAX_SIGNED_HEADS,
    MAX_WANTED,
    BatchChecker,
    Checked,
    CheckedHead,
    CheckedReceipt,
    Held,
    Received,
    contiguous_head,
    plan_chain,
)
from mesh.trust.identity import Identity
from mesh.wire.v1 import ledger_pb2 as lpb
from node.tasks import Tasks

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    node_id    TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    request_id TEXT    NOT NULL,
    kind       INTEGER NOT NULL,
    record     BLOB    NOT NULL,   -- the exact signed bytes
    signature  BLOB    NOT NULL,
    hash       BLOB    NOT NULL,
    UNIQUE (node_id, seq),
    UNIQUE (node_id, request_id, kind)
);
CREATE INDEX IF NOT EXISTS records_by_hash ON records (hash);
-- The entry nodes' countersignatures, each kept with its record: node_id and seq note
-- where that record sits (not signed: evidence of the chain's head once it is gone).
CREATE TABLE IF NOT EXISTS receipts (
    hash          BLOB    NOT NULL,
    entry_node_id TEXT    NOT NULL,
    receipt       BLOB    NOT NULL,
    node_id       TEXT    NOT NULL DEFAULT '',
    seq           INTEGER NOT NULL DEFAULT 0,
    UNIQUE (hash, entry_node_id)
);
-- Entry nodes' signed refusals to countersign a record (implausible counts).
CREATE TABLE IF NOT EXISTS refusals (
    hash          BLOB NOT NULL,
    entry_node_id TEXT NOT NULL,
    refusal       BLOB NOT NULL,
    UNIQUE (hash, entry_node_id)
);
-- Records held (their rowid) with neither a receipt nor a refusal: what sync asks its
-- peers for, the newest first.
CREATE TABLE IF NOT EXISTS unreceipted (
    record INTEGER PRIMARY KEY
);
-- Proof that a node's history split: records signed by it that conflict with the
-- records held (a second record for a position, or one naming another predecessor).
CREATE TABLE IF NOT EXISTS forks (
    node_id   TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    record    BLOB    NOT NULL,
    signature BLOB    NOT NULL,
    hash      BLOB    NOT NULL UNIQUE
);
-- The membership certificate of every node whose records are held (sent with them).
CREATE TABLE IF NOT EXISTS members (
    node_id TEXT PRIMARY KEY,
    cert    BLOB NOT NULL
);
-- Per node, the highest record this box has held (never lowered).
CREATE TABLE IF NOT EXISTS marks (
    node_id TEXT    PRIMARY KEY,
    seq     INTEGER NOT NULL,
    hash    BLOB    NOT NULL
);
-- Per node, its latest signed head held here (this node's own too: signed when asked
-- for after its chain moved on), and the members' countersignatures of each.
CREATE TABLE IF NOT EXISTS heads (
    node_id   TEXT    PRIMARY KEY,
    seq       INTEGER NOT NULL,
    hash      BLOB    NOT NULL,
    head_hash BLOB    NOT NULL,
    head      BLOB    NOT NULL,   -- the exact signed bytes
    signature BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS head_receipts (
    head_hash BLOB NOT NULL,
    node_id   TEXT NOT NULL,
    receipt   BLOB NOT NULL,
    UNIQUE (head_hash, node_id)
);
-- Kept by SQLite itself, whatever wrote the record: the mark never falls behind the
-- records, and a record awaits its receipt until one (or a refusal) is kept.
CREATE TRIGGER IF NOT EXISTS record_kept AFTER INSERT ON records BEGIN
    INSERT INTO marks (node_id, seq, hash) VALUES (new.node_id, new.seq, new.hash)
        ON CONFLICT (node_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash
        WHERE excluded.seq > marks.seq;
    INSERT OR IGNORE INTO unreceipted (record) VALUES (new.rowid);
END;
CREATE TRIGGER IF NOT EXISTS receipt_kept AFTER INSERT ON receipts BEGIN
    DELETE FROM unreceipted WHERE record IN (SELECT rowid FROM records WHERE hash = new.hash);
END;
CREATE TRIGGER IF NOT EXISTS refusal_kept AFTER INSERT ON refusals BEGIN
    DELETE FROM unreceipted WHERE record IN (SELECT rowid FROM records WHERE hash = new.hash);
END;
"""
INSERT_RECORD = (
    "INSERT INTO records (node_id, seq, request_id, kind, record, signature, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# A receipt of a record held, noting where that record sits.
INSERT_RECEIPT = (
    "INSERT OR IGNORE INTO receipts (hash, entry_node_id, receipt, node_id, seq) "
    "SELECT ?, ?, ?, node_id, seq FROM records WHERE hash = ? LIMIT 1"
)
MAX_BATCH = 4096
KEEP_RETRY_S = 1.0  # an accepted record whose keep failed is tried again after this
CLOSE_FLUSH_S = 10.0  # the most `close` waits for queued records to commit
SQL_PARAMETERS = 500  # values bound per IN (...) query, under SQLite's bound


class LedgerStore:
    def __init__(
        self,
        db: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        identity: Identity,
        writer: ChainWriter,
        *,
        clock: Callable[[], int] = SYSTEM.now_ms,
    ):
        self._db = db
        # Answers to peers read here: WAL lets it read while the writer writes, and it
        # sees committed records only (a record another transaction may still roll back
        # must never leave this node).
        self._reader = reader
        self._identity = identity
        self._writer = writer
        self._empty_at_open = writer.last_seq == 0
        self._own_ready = asyncio.Event()
        self._own_ready.set()
        self._closed = False
        self._clock = clock
        self._pending: list[tuple[Usage, asyncio.Future[lpb.SignedRecord]]] = []
        # Peers' records accepted (checked and judged) whose keep has not committed yet,
        # and `flush` callers waiting for what was queued before them.
        self._accepted: list[Checked] = []
        self._flushes: list[asyncio.Future[None]] = []
        self._committing = False  # a pass of the commit loop holds queued work
        # Hashes of accepted records quotas were told of before their keep committed: not
        # told again when they are kept (by their keep, or first by a sync).
        self._told_early: set[bytes] = set()
        self._wake = asyncio.Event()
        # One connection: one transaction at a time, so a rollback only undoes its own.
        self._transaction = asyncio.Lock()
        self._tasks = Tasks("ledger")
        self._tasks.start(self._commit_loop(), "commits")
        self.commits = 0
        # Told of every record newly kept here (made, accepted or synced), once each,
        # after its commit: what quotas count. Records refused by their entry node are
        # not told.
        self.on_records: Callable[[list[lpb.UsageRecord]], None] = lambda records: None

    @classmethod
    async def open(
        cls, path: Path, identity: Identity, *, clock: Callable[[], int] = SYSTEM.now_ms
    ) -> LedgerStore:
        _private_files(path)
        db: aiosqlite.Connection | None = None
        reader: aiosqlite.Connection | None = None
        try:
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await _migrate(db)
            last_seq, last_hash = await _own_head(db, identity.node_id)
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        except BaseException as exc:
            # Each connection is a thread: one left open on an error path keeps the
            # process alive after the error was told, serving nothing.
            for connection in (reader, db):
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot open the ledger {path}: {exc}") from exc
            raise
        writer = ChainWriter(identity, last_seq=last_seq, last_hash=last_hash)
        return cls(db, reader, identity, writer, clock=clock)

    async def __aenter__(self) -> LedgerStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def empty_at_open(self) -> bool:
        """True when this file held nothing of this node's own chain when it was opened."""
        return self._empty_at_open

    def hold_own_records(self) -> None:
        """Make `append` wait (for `release_own_records`): a node whose ledger was lost
        must first learn from a member how far its own chain went, or it would start a
        second history (a fork) at #1."""
        self._own_ready.clear()

    def release_own_records(self) -> None:
        self._own_ready.set()

    async def close(self) -> None:
        self._closed = True
        self._own_ready.set()  # an append waiting for its chain gets the closed error
        # What was queued before the close is made durable first (accepted records'
        # receipts, appends under way), unless the database itself keeps failing.
        if len(self._tasks):  # the committer still runs
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_S):
                    await self.flush()
        if self._accepted:
            logger.error(
                "the ledger closed with %d accepted usage records not kept (their signers "
                "hold them; their receipts are lost)",
                len(self._accepted),
            )
        await self._tasks.aclose()
        for _, future in self._pending:
            if not future.done():
                future.set_exception(LedgerError("the ledger was closed"))
        for waiter in self._flushes:
            if not waiter.done():
                waiter.set_result(None)
        await self._reader.close()
        await self._db.close()

    # --- this node's records ------------------------------------------------------------------

    async def append(self, usage: Usage) -> lpb.SignedRecord:
        """Record what a served request used; returns once it is durably committed. The
        same request (and kind) appended again returns the record already made."""
        if not self._own_ready.is_set():
            await self._own_ready.wait()
        if self._closed:
            raise LedgerError("the ledger was closed")
        future: asyncio.Future[lpb.SignedRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((usage, future))
        self._wake.set()
        return await future

    async def flush(self) -> None:
        """Return once everything queued before this call is committed (accepted records
        with their receipts, appends), or could not be (then it stays queued)."""
        if not self._pending and not self._accepted and not self._committing:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append(waiter)
        self._wake.set()
        await waiter

    async def _commit_loop(self) -> None:
        failed = False
        while True:
            if failed:  # a keep that failed is tried again a little later, or when woken
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KEEP_RETRY_S):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake.clear()
            # One pass: everything queued now; then those who flushed before it are told.
            flushes, self._flushes = self._flushes, []
            self._committing = True
            try:
                while self._pending:  # appends first: their answers wait for them
                    batch = self._pending[:MAX_BATCH]
                    self._pending = self._pending[MAX_BATCH:]
                    async with self._transaction:
                        await self._commit(batch)
                accepted, self._accepted = self._accepted, []
                failed = False
                for start in range(0, len(accepted), MAX_BATCH):
                    if not await self._keep_accepted(accepted[start : start + MAX_BATCH]):
                        self._accepted[:0] = accepted[start:]
                        failed = True
                        break
            finally:
                self._committing = False
            for waiter in flushes:
                if not waiter.done():
                    waiter.set_result(None)

    async def _commit(self, batch: list[tuple[Usage, asyncio.Future[lpb.SignedRecord]]]) -> None:
        writer_state = (self._writer.last_seq, self._writer.last_hash)
        try:
            results, new = await self._commit_on_db_thread(
                functools.partial(self._append_batch, batch=[usage for usage, _ in batch])
            )
        except Exception as exc:
            self._writer.last_seq, self._writer.last_hash = writer_state
            for _, future in batch:
                if not future.done():
                    future.set_exception(LedgerError(f"the ledger could not commit: {exc}"))
            return
        self.commits += 1
        self._tell(new)
        for (_, future), signed in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(signed)

    def _append_batch(
        self, db: sqlite3.Connection, batch: list[Usage]
    ) -> tuple[list[lpb.SignedRecord], list[bytes]]:
        """On the database's thread, one transaction: this node's records for `batch` (the
        ones it made already for a request, and kind, are returned as they are), with its
        receipts of those it let in itself. Returns them, and the new records' bytes."""
        me = self._identity.node_id
        made = _db_existing_records(db, me, sorted({usage.request_id for usage in batch}))
        results: list[lpb.SignedRecord] = []
        rows = []
        receipts: dict[bytes, tuple[bytes, str, bytes, bytes]] = {}
        for usage in batch:
            kind = lpb.RECORD_KIND_PARTIAL if usage.partial else lpb.RECORD_KIND_COMPLETE
            key = (usage.request_id, kind)
            existing = made.get(key)
            if existing is None:
                existing = self._writer.append(usage)
                made[key] = existing
                rows.append(
                    (
                        me,
                        self._writer.last_seq,  # the writer's state is the new record's
                        usage.request_id,
                        kind,
                        existing.record,
                        existing.signature,
                        self._writer.last_hash,
                    )
                )
            if usage.entry_node_id == me:  # let in here: this node is its entry node too
                receipt = countersign(self._identity, existing)
                digest = receipt.record_hash
                receipts[digest] = (digest, me, receipt.SerializeToString(), digest)
            results.append(existing)
        db.executemany(INSERT_RECORD, rows)
        db.executemany(INSERT_RECEIPT, list(receipts.values()))
        return results, [row[4] for row in rows]

    async def _on_db_thread(self, work: Callable[[sqlite3.Connection], _R]) -> _R:
        """`work(connection)` on the writer connection's own thread (aiosqlite's), in one
        thread hop however many statements it runs: under load each hop costs a context
        switch and an event-loop turn (~0.1-0.3 ms on a busy 2-core box). Inside a
        `_write` transaction, or see `_commit_on_db_thread`."""
        db: sqlite3.Connection = self._db._conn
        # aiosqlite runs every call through this one method (its public calls are
        # one-statement wrappers around it); the ledger tests exercise it throughout.
        return await self._db._execute(work, db)  # type: ignore[no-untyped-call, no-any-return]

    async def _commit_on_db_thread(self, work: Callable[[sqlite3.Connection], _R]) -> _R:
        """`work(connection)` as one transaction in one thread hop: committed, or rolled
        back if it raises."""

        def transaction(db: sqlite3.Connection) -> _R:
            try:
                result = work(db)
                db.commit()
            except BaseException:
                db.rollback()
                raise
            return result

        return await self._on_db_thread(transaction)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One transaction at a time on the connection: committed at the end, rolled back
        (its own writes only) if anything in it fails."""
        async with self._transaction:
            try:
                yield
                await self._db.commit()
            except Exception:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.rollback()
                raise

    def _tell(self, new: list[bytes]) -> None:
        if self._told_early and new:
            fresh = []
            for data in new:
                digest = record_hash_of(data)
                if digest in self._told_early:
                    self._told_early.discard(digest)  # told when it was accepted
                else:
                    fresh.append(data)
            new = fresh
        if new:
            self.on_records([lpb.UsageRecord.FromString(data) for data in new])

    async def usage_records(self) -> list[lpb.UsageRecord]:
        """Every record held (committed), parsed: they verified when they were kept.
        Records their entry node refused are left out (they do not count)."""
        async with self._reader.execute(
            "SELECT record FROM records WHERE hash NOT IN (SELECT hash FROM refusals)"
        ) as cursor:
            rows = await cursor.fetchall()
        return [lpb.UsageRecord.FromString(bytes(r[0])) for r in rows]

    # --- reading --------------------------------------------------------------------------------

    async def records(
        self, node_id: str | None = None, *, after_seq: int = 0, limit: int = 1_000_000
    ) -> list[lpb.SignedRecord]:
        query = "SELECT record, signature FROM records"
        args: tuple[object, ...] = ()
        if node_id is not None:
            query += " WHERE node_id = ? AND seq > ?"
            args = (node_id, after_seq)
        query += " ORDER BY node_id, seq LIMIT ?"
        async with self._db.execute(query, (*args, limit)) as cursor:
            rows = await cursor.fetchall()
        return [lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1])) for r in rows]

    async def countersign(self, signed: lpb.SignedRecord) -> lpb.Receipt:
        """This node, as the entry node, countersigns a record it holds and keeps the
        receipt (`append` already did for the records it makes for requests let in here)."""
        receipt = countersign(self._identity, signed)
        await self.add_receipt(receipt)
        return receipt

    async def accept(
        self,
        raw: bytes,
        *,
        served_by: str,
        request_id: str,
        judge: Callable[[lpb.UsageRecord], str] = lambda record: "",
    ) -> str:
        """A peer's record for a request this node let in: keep it if it is that peer's,
        for that request, naming this node as entry node; then countersign it, unless
        `judge` says what is wrong with its counts: then the record is kept with this
        node's signed refusal instead, as proof (passed on like a receipt; it does not
        count). Returns what is wrong with it, or "" when it is countersigned.

        A countersigned record counts (`on_records`) at once; it is kept with its receipt
        just after, without holding up the answer (see the module docstring: `flush`).
        What its chain says of it then (a fork) is logged and kept as proof."""
        if not raw:
            return "the answer came without a usage record"
        try:
            signed = lpb.SignedRecord.FromString(raw)
            record = open_record(signed)
        except (DecodeError, BadSignature) as exc:
            return f"the usage record does not verify ({exc})"
        if record.node_id != served_by or record.request_id != request_id:
            return "the usage record is for another node or request"
        if record.entry_node_id != self._identity.node_id:
            return "the usage record names another entry node"
        if self._closed:
            raise LedgerError("the ledger was closed")
        wrong = judge(record)
        item = Checked(
            node_id=record.node_id,
            seq=record.seq,
            prev_hash=record.prev_hash,
            digest=record_hash(signed),
            request_id=record.request_id,
            kind=record.kind,
            record=signed.record,
            signature=signed.signature,
            entry_node_id=record.entry_node_id,
        )
        if not wrong:
            self._told_early.add(item.digest)
            self.on_records([record])
            self._accepted.append(item)
            self._wake.set()
            return ""
        # A refusal is rare (a box claiming more than it can have served): kept now.
        result = Ingested()
        refusal = refuse(self._identity, signed, wrong)
        async with self._write():
            await self._keep_chain(record.node_id, [item], result)
            proof = CheckedReceipt(item.digest, self._identity.node_id, refusal.SerializeToString())
            await self._insert_refusals([proof])
        return "; ".join([f"implausible: {wrong}", *result.problems])

    async def _keep_accepted(self, items: list[Checked]) -> bool:
        """Keep accepted records with this node's receipts, in one transaction; False
        (and nothing kept) when it failed."""
        result = Ingested()
        by_node: dict[str, list[Checked]] = {}
        for item in items:
            by_node.setdefault(item.node_id, []).append(item)
        receipts = _receipt_rows(
            [countersign(self._identity, lpb.SignedRecord(record=item.record)) for item in items]
        )

        def keep(db: sqlite3.Connection) -> None:
            for node_id, its in by_node.items():
                _db_keep_chain(db, node_id, its, result)
            _db_changed(db, INSERT_RECEIPT, receipts)

        try:
            async with self._transaction:
                await self._commit_on_db_thread(keep)
        except Exception as exc:  # the database failed: tried again later, and at close
            logger.error("could not keep %d accepted usage records: %s", len(items), exc)
            return False
        self._told_early.difference_update(item.digest for item in items)
        for problem in result.problems:
            logger.warning("a usage record this node accepted: %s", problem)
        return True

    async def add_receipt(self, receipt: lpb.Receipt) -> None:
        async with self._write():
            await self._insert_receipts([receipt])

    async def _insert_receipts(self, receipts: Sequence[lpb.Receipt | CheckedReceipt]) -> int:
        """Inside a transaction: keep receipts of records held here (each once), noting
        where each record sits; returns how many were new."""
        return await self._changed(INSERT_RECEIPT, _receipt_rows(receipts))

    async def _insert_refusals(self, refusals: Sequence[CheckedReceipt]) -> int:
        """Inside a transaction: keep refusals of records held here (each once)."""
        return await self._changed(
            "INSERT OR IGNORE INTO refusals (hash, entry_node_id, refusal) "
            "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM records WHERE hash = ?)",
            [(r.record_hash, r.entry_node_id, r.receipt, r.record_hash) for r in refusals],
        )

    async def _changed(self, sql: str, rows: Sequence[tuple[object, ...]]) -> int:
        """Inside a transaction: `sql` over each of `rows`; the rows it changed itself
        (not those its triggers changed)."""
        if not rows:
            return 0
        cursor = await self._db.executemany(sql, rows)  # not closed: one thread hop, not two
        return max(cursor.rowcount, 0)

    async def receipts(self) -> list[lpb.Receipt]:
        async with self._db.execute("SELECT receipt FROM receipts") as cursor:
            rows = await cursor.fetchall()
        return [lpb.Receipt.FromString(bytes(r[0])) for r in rows]

    async def refusals(self) -> list[lpb.Refusal]:
        async with self._db.execute("SELECT refusal FROM refusals") as cursor:
            rows = await cursor.fetchall()
        return [lpb.Refusal.FromString(bytes(r[0])) for r in rows]

    # --- sync (mesh.ledger.sync decides; this reads and writes) -------------------------------

    async def heads(self, answerer: str = "") -> list[lpb.ChainHead]:
        """Per node, the highest sequence held with none missing before it, and its hash;
        with the signed head held of it (its seq, how many countersignatures, and whether
        `answerer`'s is one)."""
        async with self._reader.execute(
            # SQLite: the bare column `hash` comes from the row holding MAX(seq).
            "SELECT node_id, MAX(seq), COUNT(*), hash FROM records GROUP BY node_id"
        ) as cursor:
            rows = await cursor.fetchall()
        heads: dict[str, lpb.ChainHead] = {}
        for node_id, top, count, digest in rows:
            head, head_hash = int(top), bytes(digest)
            if head != count:  # a gap: find where it starts (rare)
                async with self._reader.execute(
                    "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq", (node_id,)
                ) as cursor:
                    held = {int(r[0]): bytes(r[1]) for r in await cursor.fetchall()}
                head = contiguous_head(held)
                head_hash = held.get(head, b"")
            heads[str(node_id)] = lpb.ChainHead(node_id=str(node_id), seq=head, hash=head_hash)
        async with self._reader.execute(
            "SELECT h.node_id, h.seq, COUNT(r.node_id), SUM(r.node_id = ?) FROM heads h "
            "LEFT JOIN head_receipts r ON r.head_hash = h.head_hash GROUP BY h.node_id",
            (answerer,),
        ) as cursor:
            for node_id, seq, count, theirs in await cursor.fetchall():
                chain = heads.setdefault(str(node_id), lpb.ChainHead(node_id=str(node_id)))
                chain.signed_seq = int(seq)
                chain.signed_receipts = int(count)
                chain.signed_by_answerer = bool(theirs)
        return list(heads.values())

    async def wanted(self) -> list[bytes]:
        """Hashes of the newest records held without a receipt or refusal."""
        async with self._reader.execute(
            "SELECT r.hash FROM unreceipted u JOIN records r ON r.rowid = u.record "
            "ORDER BY u.record DESC LIMIT ?",
            (MAX_WANTED,),
        ) as cursor:
            return [bytes(r[0]) for r in await cursor.fetchall()]

    async def answer(
        self, request: lpb.SyncRequest, *, asker: str = "", limit: int = MAX_RECORDS_PER_CALL
    ) -> list[lpb.SyncBatch]:
        """What the asker lacks, in frames: the records after its heads with their
        receipts and refusals, then the receipts it asked for by record, the signed heads
        it lacks (this node's own signed afresh when its chain moved on) and fork proof.
        `asker` is the asking node (its own countersignatures are not sent back)."""
        if len(request.heads) > MAX_HEADS:
            raise InvalidRequest(f"a sync request names at most {MAX_HEADS} nodes")
        await self._sign_own_head()
        heads = {head.node_id: head.seq for head in request.heads}
        budget = min(request.max_records or limit, limit)
        more = False
        sent: list[tuple[str, lpb.SignedRecord, bytes]] = []  # (node, record, its hash)
        proofs: dict[bytes, tuple[list[lpb.Receipt], list[lpb.Refusal]]] = {}
        async with self._reader.execute(
            "SELECT node_id, MAX(seq) FROM records GROUP BY node_id ORDER BY node_id"
        ) as cursor:
            tops = await cursor.fetchall()
        for node_id, top in tops:
            after = heads.get(str(node_id), 0)
            if int(top) <= after:
                continue
            if budget == 0:
                more = True
                break
            async with self._reader.execute(
                "SELECT record, signature, hash, seq FROM records WHERE node_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (node_id, after, budget + 1),
            ) as cursor:
                rows = list(await cursor.fetchall())
            if len(rows) > budget:
                rows, more = rows[:budget], True
            budget -= len(rows)
            sent += [
                (
                    str(node_id),
                    lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1])),
                    bytes(r[2]),
                )
                for r in rows
            ]
            if rows:
                proofs.update(await self._proofs_between(str(node_id), after, int(rows[-1][3])))
        frames = []
        for start in range(0, len(sent), FRAME_RECORDS):
            part = sent[start : start + FRAME_RECORDS]
            frame = lpb.SyncBatch(records=[record for _, record, _ in part])
            for _, _, digest in part:
                receipts, refusals = proofs.get(digest, ([], []))
                frame.receipts.extend(receipts)
                frame.refusals.extend(refusals)
            certs = await self._certs(sorted({node_id for node_id, _, _ in part}))
            frame.member_certs.extend(certs.values())
            frames.append(frame)
        last = lpb.SyncBatch(more=more)
        wanted = [h for h in request.want_receipts[:MAX_WANTED] if len(h) == 32]
        for receipts, refusals in (await self._proofs_of(wanted)).values():
            last.receipts.extend(receipts)
            last.refusals.extend(refusals)
        last.signed_heads.extend(await self._heads_for(request, asker))
        last.fork_proofs.extend(await self._differing_heads(request.heads))
        async with self._reader.execute(
            "SELECT record, signature FROM forks ORDER BY rowid LIMIT ?", (MAX_FORK_PROOFS,)
        ) as cursor:
            last.fork_proofs.extend(
                lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1]))
                for r in await cursor.fetchall()
            )
        return [*frames, last]

    async def _proofs_between(
        self, node_id: str, after: int, up_to: int
    ) -> dict[bytes, tuple[list[lpb.Receipt], list[lpb.Refusal]]]:
        """Receipts and refusals of `node_id`'s records after..up_to, by record hash."""
        found: dict[bytes, tuple[list[lpb.Receipt], list[lpb.Refusal]]] = {}
        async with self._reader.execute(
            "SELECT hash, receipt FROM receipts WHERE node_id = ? AND seq > ? AND seq <= ?",
            (node_id, after, up_to),
        ) as cursor:
            for digest, raw in await cursor.fetchall():
                found.setdefault(bytes(digest), ([], []))[0].append(
                    lpb.Receipt.FromString(bytes(raw))
                )
        async with self._reader.execute(
            "SELECT f.hash, f.refusal FROM records r JOIN refusals f ON f.hash = r.hash "
            "WHERE r.node_id = ? AND r.seq > ? AND r.seq <= ?",
            (node_id, after, up_to),
        ) as cursor:
            for digest, raw in await cursor.fetchall():
                found.setdefault(bytes(digest), ([], []))[1].append(
                    lpb.Refusal.FromString(bytes(raw))
                )
        return found

    async def _proofs_of(
        self, hashes: list[bytes]
    ) -> dict[bytes, tuple[list[lpb.Receipt], list[lpb.Refusal]]]:
        """Receipts and refusals held of these records, by record hash."""
        found: dict[bytes, tuple[list[lpb.Receipt], list[lpb.Refusal]]] = {}
        for start in range(0, len(hashes), SQL_PARAMETERS):
            chunk = hashes[start : start + SQL_PARAMETERS]
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            query = f"SELECT hash, receipt FROM receipts WHERE hash IN ({marks})"  # noqa: S608
            async with self._reader.execute(query, chunk) as cursor:
                for digest, raw in await cursor.fetchall():
                    found.setdefault(bytes(digest), ([], []))[0].append(
                        lpb.Receipt.FromString(bytes(raw))
                    )
            query = f"SELECT hash, refusal FROM refusals WHERE hash IN ({marks})"  # noqa: S608
            async with self._reader.execute(query, chunk) as cursor:
                for digest, raw in await cursor.fetchall():
                    found.setdefault(bytes(digest), ([], []))[1].append(
                        lpb.Refusal.FromString(bytes(raw))
                    )
        return found

    async def _sign_own_head(self) -> None:
        """Sign this node's head afresh when its own chain moved on since the last one."""
        me = self._identity.node_id
        async with self._transaction:
            async with self._db.execute(
                "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
                (me,),
            ) as cursor:
                top = await cursor.fetchone()
            async with self._db.execute("SELECT seq FROM heads WHERE node_id = ?", (me,)) as cursor:
                signed = await cursor.fetchone()
            if top is None or (signed is not None and int(signed[0]) >= int(top[0])):
                return
            head = sign_head(
                self._identity, seq=int(top[0]), digest=bytes(top[1]), now_ms=self._clock()
            )
            try:
                await self._store_head(me, int(top[0]), bytes(top[1]), head)
                await self._db.commit()
            except Exception:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.rollback()
                raise

    async def _store_head(
        self, node_id: str, seq: int, digest: bytes, head: lpb.SignedHead
    ) -> None:
        """Inside a transaction: `head` becomes the node's latest signed head held here."""
        async with self._db.execute(
            "SELECT head_hash FROM heads WHERE node_id = ?", (node_id,)
        ) as cursor:
            old = await cursor.fetchone()
        if old is not None:
            await self._db.execute(
                "DELETE FROM head_receipts WHERE head_hash = ?", (bytes(old[0]),)
            )
        await self._db.execute(
            "INSERT OR REPLACE INTO heads (node_id, seq, hash, head_hash, head, signature) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (node_id, seq, digest, head_hash(head), head.head, head.signature),
        )

    async def _heads_for(self, request: lpb.SyncRequest, asker: str) -> list[lpb.SignedHead]:
        """The signed heads held that the asker lacks (a later one, more countersignatures,
        or this node's own countersignature), with their countersignatures (the asker's
        own left out)."""
        me = self._identity.node_id
        held: dict[str, _HeldHead] = {}
        async with self._reader.execute(
            "SELECT h.node_id, h.seq, h.head, h.signature, r.node_id, r.receipt FROM heads h "
            "LEFT JOIN head_receipts r ON r.head_hash = h.head_hash ORDER BY h.node_id"
        ) as cursor:
            for node_id, seq, head, signature, signer, receipt in await cursor.fetchall():
                entry = held.get(str(node_id))
                if entry is None:
                    signed = lpb.SignedHead(head=bytes(head), signature=bytes(signature))
                    entry = held[str(node_id)] = _HeldHead(int(seq), signed)
                if receipt is None:
                    continue
                entry.countersigned += 1
                entry.mine = entry.mine or str(signer) == me
                if str(signer) != asker and len(entry.signed.receipts) <= MAX_HEAD_RECEIPTS:
                    entry.signed.receipts.append(lpb.HeadReceipt.FromString(bytes(receipt)))
        theirs = {h.node_id: h for h in request.heads}
        out = []
        for node_id, entry in held.items():
            asked = theirs.get(node_id)
            if (
                asked is None
                or asked.signed_seq < entry.seq
                or (
                    asked.signed_seq == entry.seq
                    and (
                        asked.signed_receipts < entry.countersigned
                        or (entry.mine and not asked.signed_by_answerer)
                    )
                )
            ):
                out.append(entry.signed)
            if len(out) >= MAX_SIGNED_HEADS:
                break
        return out

    async def _differing_heads(self, heads: Iterable[lpb.ChainHead]) -> list[lpb.SignedRecord]:
        """Where the asker's head record is not the one held here: ours, as fork proof."""
        proofs: list[lpb.SignedRecord] = []
        for head in heads:
            if not head.hash or len(proofs) >= MAX_FORK_PROOFS:
                continue
            async with self._reader.execute(
                "SELECT record, signature, hash FROM records WHERE node_id = ? AND seq = ?",
                (head.node_id, head.seq),
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None and bytes(row[2]) != head.hash:
                proofs.append(lpb.SignedRecord(record=bytes(row[0]), signature=bytes(row[1])))
        return proofs

    async def _certs(self, nodes: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(nodes), SQL_PARAMETERS):
            chunk = nodes[start : start + SQL_PARAMETERS]
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            query = f"SELECT node_id, cert FROM members WHERE node_id IN ({marks})"  # noqa: S608
            async with self._reader.execute(query, chunk) as cursor:
                found.update({str(r[0]): bytes(r[1]) for r in await cursor.fetchall()})
        return found

    async def remember_members(self, certs: dict[str, bytes]) -> None:
        """Keep the membership certificates of nodes (proven members) to pass them on."""
        if not certs:
            return
        async with self._write():
            await self._db.executemany(
                "INSERT OR REPLACE INTO members (node_id, cert) VALUES (?, ?)",
                list(certs.items()),
            )

    async def member_ids(self) -> set[str]:
        async with self._db.execute("SELECT node_id FROM members") as cursor:
            return {str(r[0]) for r in await cursor.fetchall()}

    async def ingest(self, received: Received) -> Ingested:
        """Keep what a peer sent (already signature-checked): records that extend or fill
        a chain, fork proof apart, the receipts and refusals of records held (signed by
        their own entry node), and signed heads that match the records held (each
        countersigned here)."""
        result = Ingested(problems=list(received.rejected))
        by_node: dict[str, list[Checked]] = {}
        for item in received.records:
            by_node.setdefault(item.node_id, []).append(item)
        refused: set[bytes] = set()
        async with self._write():
            for node_id, items in by_node.items():
                await self._keep_chain(node_id, items, result)
            for proof in received.fork_proofs:
                have = (await self._held(proof.node_id, proof.seq, proof.seq)).get(proof.seq)
                if have is not None and have.digest != proof.digest:
                    if await self._insert_forks([proof]):
                        result.forks += 1
                        result.problems.append(
                            f"fork: node {proof.node_id[:7]} signed two different records "
                            f"#{proof.seq}"
                        )
            entries = await self._entry_nodes(
                {r.record_hash for r in (*received.receipts, *received.refusals)},
                received.records,
            )
            result.receipts = await self._insert_receipts(
                [r for r in received.receipts if entries.get(r.record_hash) == r.entry_node_id]
            )
            refusals = [
                r for r in received.refusals if entries.get(r.record_hash) == r.entry_node_id
            ]
            result.refusals = await self._insert_refusals(refusals)
            refused = {r.record_hash for r in refusals}
            result.heads = await self._keep_heads(received.heads, result)
        if self._identity.node_id in by_node:
            await self._follow_own_chain()
        self._tell([raw for raw in result.new if not refused or record_hash_of(raw) not in refused])
        return result

    async def _entry_nodes(self, hashes: set[bytes], batch: list[Checked]) -> dict[bytes, str]:
        """The entry node each of these records names (records of the batch, or held)."""
        found = {item.digest: item.entry_node_id for item in batch if item.digest in hashes}
        rest = sorted(hashes - found.keys())
        for start in range(0, len(rest), SQL_PARAMETERS):
            chunk = rest[start : start + SQL_PARAMETERS]
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            query = f"SELECT hash, record FROM records WHERE hash IN ({marks})"  # noqa: S608
            async with self._db.execute(query, chunk) as cursor:
                for digest, record in await cursor.fetchall():
                    found[bytes(digest)] = lpb.UsageRecord.FromString(bytes(record)).entry_node_id
        return found

    async def _keep_heads(self, heads: list[CheckedHead], result: Ingested) -> int:
        """Inside a transaction: signed heads naming a record held here are kept (the
        latest per node) with their countersignatures and this node's own; one naming
        another record than the one held is proof of a fork. Returns rows changed."""
        me = self._identity.node_id
        changed = 0
        for head in heads[:MAX_SIGNED_HEADS]:
            async with self._db.execute(
                "SELECT hash FROM records WHERE node_id = ? AND seq = ?", (head.node_id, head.seq)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                continue  # not held (yet): it comes again
            if bytes(row[0]) != head.hash:
                result.problems.append(
                    f"fork: node {head.node_id[:7]} signed a head naming another record "
                    f"#{head.seq} than the one held"
                )
                continue
            async with self._db.execute(
                "SELECT seq, head_hash FROM heads WHERE node_id = ?", (head.node_id,)
            ) as cursor:
                stored = await cursor.fetchone()
            signed = lpb.SignedHead(head=head.head, signature=head.signature)
            if stored is None or head.seq > int(stored[0]):
                await self._store_head(head.node_id, head.seq, head.hash, signed)
                changed += 1
            elif bytes(stored[1]) != head.head_hash:
                continue  # an older head, or another statement of the one held: ours stays
            async with self._db.execute(
                "SELECT COUNT(*) FROM head_receipts WHERE head_hash = ? AND node_id != ?",
                (head.head_hash, me),
            ) as cursor:
                count_row = await cursor.fetchone()
            room = MAX_HEAD_RECEIPTS - (int(count_row[0]) if count_row else 0)
            receipts = [(signer, raw) for signer, raw in head.receipts if signer != me][
                : max(room, 0)
            ]
            if head.node_id != me:
                receipts.append((me, countersign_head(self._identity, signed).SerializeToString()))
            changed += await self._changed(
                "INSERT OR IGNORE INTO head_receipts (head_hash, node_id, receipt) "
                "VALUES (?, ?, ?)",
                [(head.head_hash, signer, raw) for signer, raw in receipts],
            )
        return changed

    async def _keep_chain(self, node_id: str, items: list[Checked], result: Ingested) -> None:
        """Inside a transaction: one node's verified records, kept where they fit its chain;
        the ones that conflict with it kept apart as fork proof (`_db_keep_chain`)."""
        await self._on_db_thread(
            functools.partial(_db_keep_chain, node_id=node_id, items=items, result=result)
        )

    async def _held(self, node_id: str, low: int, high: int) -> dict[int, Held]:
        """The records held of `node_id` from low-1 to high+1 (inclusive)."""
        return await self._on_db_thread(
            functools.partial(_db_held, node_id=node_id, low=low, high=high)
        )

    async def _insert_forks(self, items: list[Checked]) -> int:
        """Inside a transaction: keep these records apart, as fork proof."""
        return await self._on_db_thread(functools.partial(_db_insert_forks, items=items))

    async def _follow_own_chain(self) -> None:
        """Records of this node's own that a peer gave back (a node restored without its
        ledger) move the writer on, so the chain continues instead of forking."""
        async with self._transaction:  # the writer's state belongs to the commit loop too
            async with self._db.execute(
                "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
                (self._identity.node_id,),
            ) as cursor:
                last = await cursor.fetchone()
            if last is not None and int(last[0]) > self._writer.last_seq:
                self._writer.last_seq, self._writer.last_hash = int(last[0]), bytes(last[1])

    async def forks(self) -> list[lpb.SignedRecord]:
        async with self._reader.execute(
            "SELECT record, signature FROM forks ORDER BY node_id, seq"
        ) as cursor:
            rows = await cursor.fetchall()
        return [lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1])) for r in rows]


# --- on the writer connection's thread (LedgerStore._on_db_thread), inside a transaction ---


def _db_changed(db: sqlite3.Connection, sql: str, rows: Sequence[tuple[object, ...]]) -> int:
    """`sql` over each of `rows`; the rows it changed itself (not its triggers')."""
    if not rows:
        return 0
    return max(db.executemany(sql, rows).rowcount, 0)


def _receipt_rows(receipts: Sequence[lpb.Receipt | CheckedReceipt]) -> list[tuple[object, ...]]:
    """INSERT_RECEIPT's parameters for these receipts."""
    return [
        (
            r.record_hash,
            r.entry_node_id,
            r.receipt if isinstance(r, CheckedReceipt) else r.SerializeToString(),
            r.record_hash,
        )
        for r in receipts
    ]


def _db_keep_chain(
    db: sqlite3.Connection, node_id: str, items: list[Checked], result: Ingested
) -> None:
    """One node's verified records, kept where they fit its chain; the ones that conflict
    with it kept apart as fork proof (what `plan_chain` decides)."""
    seqs = [item.seq for item in items]
    plan = plan_chain(_db_held(db, node_id, min(seqs), max(seqs)), items)
    result.problems += plan.problems
    result.records += _db_insert_records(db, plan.accept, result)
    result.forks += _db_insert_forks(db, plan.conflicts)


def _db_held(db: sqlite3.Connection, node_id: str, low: int, high: int) -> dict[int, Held]:
    """The records held of `node_id` from low-1 to high+1 (inclusive)."""
    rows = db.execute(
        "SELECT seq, hash, record FROM records WHERE node_id = ? AND seq BETWEEN ? AND ?",
        (node_id, min(low, high) - 1, max(low, high) + 1),
    )
    return {
        int(seq): Held(bytes(digest), lpb.UsageRecord.FromString(bytes(record)).prev_hash)
        for seq, digest, record in rows
    }


def _db_insert_records(db: sqlite3.Connection, items: list[Checked], result: Ingested) -> int:
    if not items:
        return 0
    added = _db_changed(
        db,
        INSERT_RECORD.replace("INSERT", "INSERT OR IGNORE", 1),
        [(i.node_id, i.seq, i.request_id, i.kind, i.record, i.signature, i.digest) for i in items],
    )
    kept = items
    if added != len(items):
        # A record for a request (and kind) this node already holds under another
        # sequence number: its node signed the same request twice. Proof, kept apart.
        kept = []
        for item in items:
            row = db.execute(
                "SELECT hash FROM records WHERE node_id = ? AND seq = ?", (item.node_id, item.seq)
            ).fetchone()
            if row is not None and bytes(row[0]) == item.digest:
                kept.append(item)
            else:
                result.forks += _db_insert_forks(db, [item])
                result.problems.append(
                    f"node {item.node_id[:7]} signed request {item.request_id[:12]} twice"
                )
    result.new += [item.record for item in kept]
    return added


def _db_insert_forks(db: sqlite3.Connection, items: list[Checked]) -> int:
    return _db_changed(
        db,
        "INSERT OR IGNORE INTO forks (node_id, seq, record, signature, hash) "
        "VALUES (?, ?, ?, ?, ?)",
        [(i.node_id, i.seq, i.record, i.signature, i.digest) for i in items],
    )


def _db_existing_records(
    db: sqlite3.Connection, node_id: str, request_ids: list[str]
) -> dict[tuple[str, int], lpb.SignedRecord]:
    """The records `node_id` made already for these requests, by (request, kind)."""
    found: dict[tuple[str, int], lpb.SignedRecord] = {}
    for start in range(0, len(request_ids), SQL_PARAMETERS):
        chunk = request_ids[start : start + SQL_PARAMETERS]
        marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
        query = f"SELECT request_id, kind, record, signature FROM records WHERE node_id = ? AND request_id IN ({marks})"  # noqa: E501, S608
        for row in db.execute(query, (node_id, *chunk)):
            found[(str(row[0]), int(row[1]))] = lpb.SignedRecord(
                record=bytes(row[2]), signature=bytes(row[3])
            )
    return found


@dataclass
class _HeldHead:
    seq: int
    signed: lpb.SignedHead
    countersigned: int = 0
    mine: bool = False  # this node's countersignature is one


def record_hash_of(raw: bytes) -> bytes:
    return record_hash(lpb.SignedRecord(record=raw))


@dataclass(kw_only=True)
class Ingested:
    records: int = 0
    receipts: int = 0
    refusals: int = 0
    heads: int = 0  # signed heads and countersignatures newly kept
    forks: int = 0
    problems: list[str] = field(default_factory=list)
    new: list[bytes] = field(default_factory=list)  # the records just kept (exact bytes)

    @property
    def progress(self) -> tuple[int, int, int, int, int]:
        return (self.records, self.receipts, self.refusals, self.heads, self.forks)


async def _migrate(db: aiosqlite.Connection) -> None:
    """Make or bring up to date the tables of a ledger (those of older versions too)."""
    async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cursor:
        tables = {str(row[0]) for row in await cursor.fetchall()}
    await db.executescript(SCHEMA)
    async with db.execute("PRAGMA table_info(receipts)") as cursor:
        columns = {str(row[1]) for row in await cursor.fetchall()}
    if "node_id" not in columns:  # a ledger from before receipts noted their records
        await db.execute("ALTER TABLE receipts ADD COLUMN node_id TEXT NOT NULL DEFAULT ''")
        await db.execute("ALTER TABLE receipts ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
    await db.execute("CREATE INDEX IF NOT EXISTS receipts_by_position ON receipts (node_id, seq)")
    # Receipts written without their record's position (older versions, bulk loads).
    await db.execute(
        "UPDATE receipts SET node_id = r.node_id, seq = r.seq FROM records AS r "
        "WHERE receipts.node_id = '' AND r.hash = receipts.hash"
    )
    # Marks at least as high as the records held (records written before the trigger).
    await db.execute(
        "INSERT INTO marks (node_id, seq, hash) "
        "SELECT node_id, MAX(seq), hash FROM records WHERE true GROUP BY node_id "
        "ON CONFLICT (node_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash "
        "WHERE excluded.seq > marks.seq"
    )
    if "unreceipted" not in tables:
        await db.execute(
            "INSERT OR IGNORE INTO unreceipted (record) SELECT rowid FROM records r "
            "WHERE NOT EXISTS (SELECT 1 FROM receipts c WHERE c.hash = r.hash) "
            "AND NOT EXISTS (SELECT 1 FROM refusals f WHERE f.hash = r.hash)"
        )
    await db.commit()


async def _own_head(db: aiosqlite.Connection, node_id: str) -> tuple[int, bytes]:
    """Where this node's chain goes on from: its last record held, or the highest
    evidence that its chain went further (a mark, its signed head, a receipt's note),
    so that a box whose newest records were lost never signs a second history."""
    found: list[tuple[int, bytes, str]] = []
    for query, what in (
        ("SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1", "record"),
        ("SELECT seq, hash FROM marks WHERE node_id = ?", "mark"),
        ("SELECT seq, hash FROM heads WHERE node_id = ?", "signed head"),
        ("SELECT seq, hash FROM receipts WHERE node_id = ? ORDER BY seq DESC LIMIT 1", "receipt"),
    ):
        async with db.execute(query, (node_id,)) as cursor:
            row = await cursor.fetchone()
        if row is not None:
            found.append((int(row[0]), bytes(row[1]), what))
    if not found:
        return 0, GENESIS
    held = found[0][0] if found[0][2] == "record" else 0
    seq, digest, what = max(found, key=lambda f: f[0])
    if seq > held:
        logger.warning(
            "this node's records #%d to #%d are missing from its ledger (its %s shows "
            "them); its chain goes on from #%d, and its peers give the missing ones back",
            held + 1,
            seq,
            what,
            seq + 1,
        )
    return seq, digest


LEDGER_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _private_files(path: Path) -> None:
    """The ledger and its WAL files readable by the node's user only. SQLite gives the
    WAL and shared-memory files the database file's mode, so creating it 0600 is enough;
    files from before that are tightened."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for suffix in LEDGER_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the ledger {path}: {exc.strerror}") from exc


@dataclass(kw_only=True)
class LedgerFile:
    """Everything in a ledger file, as stored (what `ledger verify` and `usage` read)."""

    records: list[lpb.SignedRecord] = field(default_factory=list)  # fork proofs last
    receipts: list[lpb.Receipt] = field(default_factory=list)
    refusals: list[lpb.Refusal] = field(default_factory=list)
    heads: list[lpb.SignedHead] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    positions: dict[bytes, tuple[str, int]] = field(default_factory=dict)  # receipts' notes


def read_ledger(path: Path) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    """The records (fork proofs after them) and receipts in a ledger file, read-only."""
    held = read_ledger_file(path)
    return held.records, held.receipts


def read_ledger_file(path: Path) -> LedgerFile:
    """Everything in a ledger file, read-only (safe while the node writes: WAL). Tables a
    ledger of an older version lacks read as empty."""
    held = LedgerFile()
    if not path.exists():
        return held
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT record, signature FROM records ORDER BY node_id, seq")
            held.records = [lpb.SignedRecord(record=bytes(r), signature=bytes(s)) for r, s in rows]
            with contextlib.suppress(sqlite3.OperationalError):  # a ledger from before forks
                rows = db.execute("SELECT record, signature FROM forks ORDER BY node_id, seq")
                # After the records: usage counts what was held first, verify sees the fork.
                held.records += [
                    lpb.SignedRecord(record=bytes(r), signature=bytes(s)) for r, s in rows
                ]
            receipts = [bytes(r) for (r,) in db.execute("SELECT receipt FROM receipts")]
            with contextlib.suppress(sqlite3.OperationalError):  # before positions
                for digest, node_id, seq in db.execute(
                    "SELECT hash, node_id, seq FROM receipts WHERE node_id != ''"
                ):
                    held.positions[bytes(digest)] = (str(node_id), int(seq))
            refusals: list[bytes] = []
            heads: list[tuple[bytes, bytes, bytes]] = []
            head_receipts: dict[bytes, list[bytes]] = {}
            with contextlib.suppress(sqlite3.OperationalError):  # before refusals and heads
                refusals = [bytes(r) for (r,) in db.execute("SELECT refusal FROM refusals")]
                held.marks = [
                    Mark(str(n), int(s), bytes(h), "held here before")
                    for n, s, h in db.execute("SELECT node_id, seq, hash FROM marks")
                ]
                heads = [
                    (bytes(h), bytes(s), bytes(d))
                    for h, s, d in db.execute("SELECT head, signature, head_hash FROM heads")
                ]
                for digest, raw in db.execute("SELECT head_hash, receipt FROM head_receipts"):
                    head_receipts.setdefault(bytes(digest), []).append(bytes(raw))
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read the ledger {path}: {exc}") from exc
    # An unreadable receipt or refusal is as good as none: verify reports the record.
    for raw in receipts:
        with contextlib.suppress(DecodeError):
            held.receipts.append(lpb.Receipt.FromString(raw))
    for raw in refusals:
        with contextlib.suppress(DecodeError):
            held.refusals.append(lpb.Refusal.FromString(raw))
    for head, signature, digest in heads:
        signed = lpb.SignedHead(head=head, signature=signature)
        for raw in head_receipts.get(digest, []):
            with contextlib.suppress(DecodeError):
                signed.receipts.append(lpb.HeadReceipt.FromString(raw))
        held.heads.append(signed)
    return held


Ask = Callable[[lpb.SyncRequest], AsyncIterator[lpb.SyncBatch]]
Vouch = Callable[[bytes], str | None]
RevokedAt = Callable[[str], int | None]
MAX_CERTS = 1024
PIPELINE = 3  # answer frames being checked while the next ones arrive


async def pull(
    store: LedgerStore,
    peer_id: str,
    ask: Ask,
    checker: BatchChecker,
    *,
    max_records: int = 0,
    own_only: bool = False,
    vouch: Vouch | None = None,
    revoked_at: RevokedAt | None = None,
) -> Ingested:
    """Everything `peer_id` holds that this store lacks, by asking until nothing is left
    (`ask` carries one SyncRequest to the peer and yields its answer frames). Frames are
    checked in parallel and kept in order, so a chain is always extended from its end.
    `own_only`: keep only the peer's own records (a cloud node speaks for itself only).
    `vouch`: the node ID a membership certificate proves a member of this mesh (None if
    it does not); with it, only records of proven members are kept. `revoked_at`: when a
    node was revoked (None: it was not); what it signed after that is not kept."""
    total = Ingested()
    in_flight: deque[tuple[lpb.SyncBatch, asyncio.Task[Received]]] = deque()
    try:
        while True:
            request = lpb.SyncRequest(
                heads=await store.heads(peer_id),
                max_records=max_records,
                want_receipts=await store.wanted(),
            )
            before = total.progress
            more = False
            async for batch in ask(request):
                in_flight.append((batch, asyncio.create_task(checker.check(batch))))
                more = more or batch.more
                if len(in_flight) >= PIPELINE:
                    await _keep_oldest(
                        store, peer_id, in_flight, total, own_only, vouch, revoked_at
                    )
            while in_flight:
                await _keep_oldest(store, peer_id, in_flight, total, own_only, vouch, revoked_at)
            # Stuck: what is left does not fit (fork proof was kept); ask again next round.
            if not more or total.progress == before:
                return total
    finally:
        for _, task in in_flight:
            task.cancel()


async def _keep_oldest(
    store: LedgerStore,
    peer_id: str,
    in_flight: deque[tuple[lpb.SyncBatch, asyncio.Task[Received]]],
    total: Ingested,
    own_only: bool,
    vouch: Vouch | None,
    revoked_at: RevokedAt | None = None,
) -> None:
    batch, task = in_flight.popleft()
    received = await task
    if revoked_at is not None:
        late = [
            r
            for r in received.records
            if (when := revoked_at(r.node_id)) is not None and r.ended_at_ms >= when
        ]
        if late:
            total.problems.append(
                f"{len(late)} record(s) signed by revoked nodes after their revocation ignored"
            )
            received.records = [r for r in received.records if r not in late]
    if vouch is not None:
        proven = {}
        for raw in batch.member_certs[:MAX_CERTS]:
            node_id = vouch(raw)
            if node_id is not None:
                proven[node_id] = raw
        await store.remember_members(proven)
        members = await store.member_ids()
        strangers = {r.node_id for r in received.records if r.node_id not in members}
        if strangers:
            total.problems.append(
                f"records of {len(strangers)} node(s) not proven members of this mesh ignored"
            )
        received.records = [r for r in received.records if r.node_id in members]
        received.fork_proofs = [r for r in received.fork_proofs if r.node_id in members]
        received.heads = [h for h in received.heads if h.node_id in members]
    if own_only:
        others = [r for r in received.records if r.node_id != peer_id]
        if others:
            total.problems.append(f"{len(others)} records of other nodes ignored")
        received.records = [r for r in received.records if r.node_id == peer_id]
        received.fork_proofs = [r for r in received.fork_proofs if r.node_id == peer_id]
        received.heads = [h for h in received.heads if h.node_id == peer_id]
    done = await store.ingest(received)
    total.records += done.records
    total.receipts += done.receipts
    total.refusals += done.refusals
    total.heads += done.heads
    total.forks += done.forks
    total.problems += done.problems
