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
last one committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from types import TracebackType

import aiosqlite
from google.protobuf.message import DecodeError

from mesh.errors import BadSignature, ConfigError
from mesh.identity import Identity
from mesh.ledger import GENESIS, ChainWriter, Usage, countersign, open_record, record_hash
from mesh.wire.v1 import ledger_pb2 as lpb

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
CREATE TABLE IF NOT EXISTS receipts (
    hash          BLOB NOT NULL,
    entry_node_id TEXT NOT NULL,
    receipt       BLOB NOT NULL,
    UNIQUE (hash, entry_node_id)
);
"""
INSERT_RECORD = (
    "INSERT INTO records (node_id, seq, request_id, kind, record, signature, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
MAX_BATCH = 4096


class LedgerStore:
    def __init__(self, db: aiosqlite.Connection, identity: Identity, writer: ChainWriter):
        self._db = db
        self._identity = identity
        self._writer = writer
        self._pending: list[tuple[Usage, asyncio.Future[lpb.SignedRecord]]] = []
        self._wake = asyncio.Event()
        # One connection: one transaction at a time, so a rollback only undoes its own.
        self._transaction = asyncio.Lock()
        self._committer = asyncio.create_task(self._commit_loop(), name="ledger-commits")
        self.commits = 0

    @classmethod
    async def open(cls, path: Path, identity: Identity) -> LedgerStore:
        try:
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(SCHEMA)
            await db.commit()
            async with db.execute(
                "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
                (identity.node_id,),
            ) as cursor:
                last = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the ledger {path}: {exc}") from exc
        writer = ChainWriter(
            identity,
            last_seq=int(last[0]) if last else 0,
            last_hash=bytes(last[1]) if last else GENESIS,
        )
        return cls(db, identity, writer)

    async def __aenter__(self) -> LedgerStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._committer
        for _, future in self._pending:
            if not future.done():
                future.set_exception(ConfigError("the ledger was closed"))
        await self._db.close()

    # --- this node's records ------------------------------------------------------------------

    async def append(self, usage: Usage) -> lpb.SignedRecord:
        """Record what a served request used; returns once it is durably committed. The
        same request (and kind) appended again returns the record already made."""
        future: asyncio.Future[lpb.SignedRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((usage, future))
        self._wake.set()
        return await future

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                async with self._transaction:
                    await self._commit(batch)

    async def _commit(self, batch: list[tuple[Usage, asyncio.Future[lpb.SignedRecord]]]) -> None:
        writer_state = (self._writer.last_seq, self._writer.last_hash)
        made: dict[tuple[str, int], lpb.SignedRecord] = {}
        results: list[lpb.SignedRecord] = []
        rows = []
        try:
            made.update(await self._existing([usage.request_id for usage, _ in batch]))
            for usage, _ in batch:
                kind = lpb.RECORD_KIND_PARTIAL if usage.partial else lpb.RECORD_KIND_COMPLETE
                key = (usage.request_id, kind)
                existing = made.get(key)
                if existing is None:
                    existing = self._writer.append(usage)
                    made[key] = existing
                    rows.append(
                        (
                            self._identity.node_id,
                            self._writer.last_seq,  # the writer's state is the new record's
                            usage.request_id,
                            kind,
                            existing.record,
                            existing.signature,
                            self._writer.last_hash,
                        )
                    )
                results.append(existing)
            await self._db.executemany(
                INSERT_RECORD,
                rows,
            )
            await self._db.commit()
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._db.rollback()
            self._writer.last_seq, self._writer.last_hash = writer_state
            for _, future in batch:
                if not future.done():
                    future.set_exception(ConfigError(f"the ledger could not commit: {exc}"))
            return
        self.commits += 1
        for (_, future), signed in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(signed)

    async def _existing(self, request_ids: list[str]) -> dict[tuple[str, int], lpb.SignedRecord]:
        """Records this node already made for these requests (one query per batch)."""
        found: dict[tuple[str, int], lpb.SignedRecord] = {}
        unique = sorted(set(request_ids))
        for start in range(0, len(unique), 500):  # SQLite's bound on parameters
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))  # placeholders only: the values are bound
            query = f"SELECT request_id, kind, record, signature FROM records WHERE node_id = ? AND request_id IN ({marks})"  # noqa: E501, S608
            async with self._db.execute(query, (self._identity.node_id, *chunk)) as cursor:
                for row in await cursor.fetchall():
                    found[(str(row[0]), int(row[1]))] = lpb.SignedRecord(
                        record=bytes(row[2]), signature=bytes(row[3])
                    )
        return found

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
        """This node, as the entry node, countersigns a record and keeps the receipt."""
        receipt = countersign(self._identity, signed)
        await self.add_receipt(receipt)
        return receipt

    async def accept(
        self, raw: bytes, *, served_by: str, request_id: str, completion_tokens: int
    ) -> str:
        """A peer's record for a request this node let in: keep and countersign it if it
        is that peer's, for that request, and counts what was delivered. Returns what is
        wrong with it, or "" when it was accepted."""
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
        if record.completion_tokens != completion_tokens:
            return (
                f"the usage record counts {record.completion_tokens} tokens; "
                f"{completion_tokens} were delivered"
            )
        receipt = countersign(self._identity, signed)
        async with self._transaction:  # never inside another transaction's commit or rollback
            await self._db.execute(
                # A second record for a position is fork proof: sync keeps it, not this.
                INSERT_RECORD.replace("INSERT", "INSERT OR IGNORE", 1),
                (
                    record.node_id,
                    record.seq,
                    record.request_id,
                    record.kind,
                    signed.record,
                    signed.signature,
                    record_hash(signed),
                ),
            )
            await self._insert_receipt(receipt)
            await self._db.commit()
        return ""

    async def add_receipt(self, receipt: lpb.Receipt) -> None:
        async with self._transaction:
            await self._insert_receipt(receipt)
            await self._db.commit()

    async def _insert_receipt(self, receipt: lpb.Receipt) -> None:
        await self._db.execute(
            "INSERT OR IGNORE INTO receipts (hash, entry_node_id, receipt) VALUES (?, ?, ?)",
            (receipt.record_hash, receipt.entry_node_id, receipt.SerializeToString()),
        )

    async def receipts(self) -> list[lpb.Receipt]:
        async with self._db.execute("SELECT receipt FROM receipts") as cursor:
            rows = await cursor.fetchall()
        return [lpb.Receipt.FromString(bytes(r[0])) for r in rows]


def read_ledger(path: Path) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    """Everything in a ledger file, read-only (safe while the node writes: WAL)."""
    if not path.exists():
        return [], []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT record, signature FROM records ORDER BY node_id, seq")
            records = [lpb.SignedRecord(record=bytes(r), signature=bytes(s)) for r, s in rows]
            raw = [bytes(r) for (r,) in db.execute("SELECT receipt FROM receipts")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read the ledger {path}: {exc}") from exc
    receipts = []
    for item in raw:
        try:
            receipts.append(lpb.Receipt.FromString(item))
        except DecodeError:
            continue  # an unreadable receipt is as good as none: verify reports the record
    return records, receipts
