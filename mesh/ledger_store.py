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
import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiosqlite
from google.protobuf.message import DecodeError

from mesh.errors import BadSignature, ConfigError, InvalidRequest
from mesh.identity import Identity
from mesh.ledger import GENESIS, ChainWriter, Usage, countersign, open_record, record_hash
from mesh.ledger_sync import (
    FRAME_RECORDS,
    MAX_FORK_PROOFS,
    MAX_HEADS,
    MAX_RECORDS_PER_CALL,
    Checked,
    CheckedReceipt,
    Checker,
    Held,
    Received,
    contiguous_head,
    plan_chain,
)
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
    from_peer     TEXT NOT NULL DEFAULT '',  -- who sent it: never sent back to them
    UNIQUE (hash, entry_node_id)
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
-- Per peer: how far this node has read that peer's receipts (the peer's own order).
CREATE TABLE IF NOT EXISTS sync_cursors (
    peer_id        TEXT    PRIMARY KEY,
    receipts_after INTEGER NOT NULL
);
"""
INSERT_RECORD = (
    "INSERT INTO records (node_id, seq, request_id, kind, record, signature, hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
MAX_BATCH = 4096


class LedgerStore:
    def __init__(
        self,
        db: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        identity: Identity,
        writer: ChainWriter,
    ):
        self._db = db
        # Answers to peers read here: WAL lets it read while the writer writes, and it
        # sees committed records only (a record another transaction may still roll back
        # must never leave this node).
        self._reader = reader
        self._identity = identity
        self._writer = writer
        self._pending: list[tuple[Usage, asyncio.Future[lpb.SignedRecord]]] = []
        self._wake = asyncio.Event()
        # One connection: one transaction at a time, so a rollback only undoes its own.
        self._transaction = asyncio.Lock()
        self._committer = asyncio.create_task(self._commit_loop(), name="ledger-commits")
        self.commits = 0
        # Told of every record newly kept here (made, accepted or synced), once each,
        # after its commit: what quotas count.
        self.on_records: Callable[[list[lpb.UsageRecord]], None] = lambda records: None

    @classmethod
    async def open(cls, path: Path, identity: Identity) -> LedgerStore:
        _private_files(path)
        try:
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(SCHEMA)
            async with db.execute("PRAGMA table_info(receipts)") as cursor:
                columns = {str(row[1]) for row in await cursor.fetchall()}
            if "from_peer" not in columns:  # a ledger made before sync
                await db.execute(
                    "ALTER TABLE receipts ADD COLUMN from_peer TEXT NOT NULL DEFAULT ''"
                )
            await db.commit()
            async with db.execute(
                "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
                (identity.node_id,),
            ) as cursor:
                last = await cursor.fetchone()
            reader = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the ledger {path}: {exc}") from exc
        writer = ChainWriter(
            identity,
            last_seq=int(last[0]) if last else 0,
            last_hash=bytes(last[1]) if last else GENESIS,
        )
        return cls(db, reader, identity, writer)

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
        await self._reader.close()
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
        self._tell([row[4] for row in rows])
        for (_, future), signed in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(signed)

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
        if new:
            self.on_records([lpb.UsageRecord.FromString(data) for data in new])

    async def usage_records(self) -> list[lpb.UsageRecord]:
        """Every record held (committed), parsed: they verified when they were kept."""
        async with self._reader.execute("SELECT record FROM records") as cursor:
            rows = await cursor.fetchall()
        return [lpb.UsageRecord.FromString(bytes(r[0])) for r in rows]

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
        item = Checked(
            node_id=record.node_id,
            seq=record.seq,
            prev_hash=record.prev_hash,
            digest=record_hash(signed),
            request_id=record.request_id,
            kind=record.kind,
            record=signed.record,
            signature=signed.signature,
        )
        result = Ingested()
        async with self._write():
            await self._keep_chain(record.node_id, [item], result)
            await self._insert_receipts([receipt])
        self._tell(result.new)
        return "; ".join(result.problems)

    async def add_receipt(self, receipt: lpb.Receipt) -> None:
        async with self._write():
            await self._insert_receipts([receipt])

    async def _insert_receipts(
        self, receipts: list[lpb.Receipt] | list[CheckedReceipt], from_peer: str = ""
    ) -> int:
        """Inside a transaction: keep receipts (each once); returns how many were new."""
        before = self._db.total_changes
        await self._db.executemany(
            "INSERT OR IGNORE INTO receipts (hash, entry_node_id, receipt, from_peer) "
            "VALUES (?, ?, ?, ?)",
            [
                (
                    r.record_hash,
                    r.entry_node_id,
                    r.receipt if isinstance(r, CheckedReceipt) else r.SerializeToString(),
                    from_peer,
                )
                for r in receipts
            ],
        )
        return self._db.total_changes - before

    async def receipts(self) -> list[lpb.Receipt]:
        async with self._db.execute("SELECT receipt FROM receipts") as cursor:
            rows = await cursor.fetchall()
        return [lpb.Receipt.FromString(bytes(r[0])) for r in rows]

    # --- sync (mesh.ledger_sync decides; this reads and writes) -------------------------------

    async def heads(self) -> list[lpb.ChainHead]:
        """Per node, the highest sequence held with none missing before it, and its hash."""
        async with self._reader.execute(
            # SQLite: the bare column `hash` comes from the row holding MAX(seq).
            "SELECT node_id, MAX(seq), COUNT(*), hash FROM records GROUP BY node_id"
        ) as cursor:
            rows = await cursor.fetchall()
        heads = []
        for node_id, top, count, digest in rows:
            head, head_hash = int(top), bytes(digest)
            if head != count:  # a gap: find where it starts (rare)
                async with self._reader.execute(
                    "SELECT seq, hash FROM records WHERE node_id = ? ORDER BY seq", (node_id,)
                ) as cursor:
                    held = {int(r[0]): bytes(r[1]) for r in await cursor.fetchall()}
                head = contiguous_head(held)
                head_hash = held.get(head, b"")
            heads.append(lpb.ChainHead(node_id=str(node_id), seq=head, hash=head_hash))
        return heads

    async def answer(
        self, request: lpb.SyncRequest, *, asker: str = "", limit: int = MAX_RECORDS_PER_CALL
    ) -> list[lpb.SyncBatch]:
        """What the asker lacks, after its heads and its receipt cursor, in frames
        (receipts it sent here are not sent back)."""
        if len(request.heads) > MAX_HEADS:
            raise InvalidRequest(f"a sync request names at most {MAX_HEADS} nodes")
        heads = {head.node_id: head.seq for head in request.heads}
        budget = min(request.max_records or limit, limit)
        more = False
        records: list[lpb.SignedRecord] = []
        owners: list[str] = []  # each record's node
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
                "SELECT record, signature FROM records WHERE node_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (node_id, after, budget + 1),
            ) as cursor:
                rows = list(await cursor.fetchall())
            if len(rows) > budget:
                rows, more = rows[:budget], True
            budget -= len(rows)
            records += [lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1])) for r in rows]
            owners += [str(node_id)] * len(rows)
        async with self._reader.execute(
            "SELECT rowid, receipt, from_peer FROM receipts WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (request.receipts_after, limit + 1),
        ) as cursor:
            receipt_rows = list(await cursor.fetchall())
        if len(receipt_rows) > limit:
            receipt_rows, more = receipt_rows[:limit], True
        cursor_after = int(receipt_rows[-1][0]) if receipt_rows else request.receipts_after
        receipts = [
            lpb.Receipt.FromString(bytes(r[1])) for r in receipt_rows if not asker or r[2] != asker
        ]
        forks = await self._differing_heads(request.heads)
        async with self._reader.execute(
            "SELECT record, signature FROM forks ORDER BY rowid LIMIT ?", (MAX_FORK_PROOFS,)
        ) as cursor:
            forks += [
                lpb.SignedRecord(record=bytes(r[0]), signature=bytes(r[1]))
                for r in await cursor.fetchall()
            ]
        frames = []
        for start in range(0, max(len(records), len(receipts), 1), FRAME_RECORDS):
            frames.append(
                lpb.SyncBatch(
                    records=records[start : start + FRAME_RECORDS],
                    receipts=receipts[start : start + FRAME_RECORDS],
                )
            )
        certs = await self._certs(sorted(set(owners)))
        for index, frame in enumerate(frames):
            start = index * FRAME_RECORDS
            frame_nodes = sorted(set(owners[start : start + FRAME_RECORDS]))
            frame.member_certs.extend(certs[n] for n in frame_nodes if n in certs)
        last = frames[-1]
        last.receipts_cursor = cursor_after
        last.more = more
        last.fork_proofs.extend(forks)
        return frames

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
        for start in range(0, len(nodes), 500):
            chunk = nodes[start : start + 500]
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

    async def receipts_cursor(self, peer_id: str) -> int:
        async with self._reader.execute(
            "SELECT receipts_after FROM sync_cursors WHERE peer_id = ?", (peer_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def ingest(
        self, received: Received, *, peer_id: str = "", receipts_cursor: int = 0
    ) -> Ingested:
        """Keep what a peer sent (already signature-checked): records that extend or fill
        a chain, receipts, and fork proof apart; then move the peer's receipt cursor."""
        result = Ingested(problems=list(received.rejected))
        by_node: dict[str, list[Checked]] = {}
        for item in received.records:
            by_node.setdefault(item.node_id, []).append(item)
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
            result.receipts = await self._insert_receipts(received.receipts, peer_id)
            if peer_id:
                await self._db.execute(
                    "INSERT INTO sync_cursors (peer_id, receipts_after) VALUES (?, ?) "
                    "ON CONFLICT (peer_id) DO UPDATE SET "
                    "receipts_after = MAX(receipts_after, excluded.receipts_after)",
                    (peer_id, receipts_cursor),
                )
        if self._identity.node_id in by_node:
            await self._follow_own_chain()
        self._tell(result.new)
        return result

    async def _keep_chain(self, node_id: str, items: list[Checked], result: Ingested) -> None:
        """Inside a transaction: one node's verified records, kept where they fit its
        chain; the ones that conflict with it kept apart as fork proof."""
        seqs = [item.seq for item in items]
        plan = plan_chain(await self._held(node_id, min(seqs), max(seqs)), items)
        result.problems += plan.problems
        result.records += await self._insert_records(plan.accept, result)
        result.forks += await self._insert_forks(plan.conflicts)

    async def _held(self, node_id: str, low: int, high: int) -> dict[int, Held]:
        """This node's records of `node_id` from low-1 to high+1 (inclusive)."""
        async with self._db.execute(
            "SELECT seq, hash, record FROM records WHERE node_id = ? AND seq BETWEEN ? AND ?",
            (node_id, min(low, high) - 1, max(low, high) + 1),
        ) as cursor:
            rows = await cursor.fetchall()
        return {
            int(seq): Held(bytes(digest), lpb.UsageRecord.FromString(bytes(record)).prev_hash)
            for seq, digest, record in rows
        }

    async def _insert_records(self, items: list[Checked], result: Ingested) -> int:
        if not items:
            return 0
        before = self._db.total_changes
        await self._db.executemany(
            INSERT_RECORD.replace("INSERT", "INSERT OR IGNORE", 1),
            [
                (i.node_id, i.seq, i.request_id, i.kind, i.record, i.signature, i.digest)
                for i in items
            ],
        )
        added = self._db.total_changes - before
        if added == len(items):
            result.new += [item.record for item in items]
            return added
        # A record for a request (and kind) this node already holds under another
        # sequence number: its node signed the same request twice. Proof, kept apart.
        for item in items:
            async with self._db.execute(
                "SELECT hash FROM records WHERE node_id = ? AND seq = ?",
                (item.node_id, item.seq),
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None and bytes(row[0]) == item.digest:
                result.new.append(item.record)
            else:
                result.forks += await self._insert_forks([item])
                result.problems.append(
                    f"node {item.node_id[:7]} signed request {item.request_id[:12]} twice"
                )
        return added

    async def _insert_forks(self, items: list[Checked]) -> int:
        before = self._db.total_changes
        await self._db.executemany(
            "INSERT OR IGNORE INTO forks (node_id, seq, record, signature, hash) "
            "VALUES (?, ?, ?, ?, ?)",
            [(i.node_id, i.seq, i.record, i.signature, i.digest) for i in items],
        )
        return self._db.total_changes - before

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


@dataclass(kw_only=True)
class Ingested:
    records: int = 0
    receipts: int = 0
    forks: int = 0
    problems: list[str] = field(default_factory=list)
    new: list[bytes] = field(default_factory=list)  # the records just kept (exact bytes)


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


def read_ledger(path: Path) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    """Everything in a ledger file, read-only (safe while the node writes: WAL)."""
    if not path.exists():
        return [], []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT record, signature FROM records ORDER BY node_id, seq")
            records = [lpb.SignedRecord(record=bytes(r), signature=bytes(s)) for r, s in rows]
            with contextlib.suppress(sqlite3.OperationalError):  # a ledger from before forks
                rows = db.execute("SELECT record, signature FROM forks ORDER BY node_id, seq")
                # After the records: usage counts what was held first, verify sees the fork.
                records += [lpb.SignedRecord(record=bytes(r), signature=bytes(s)) for r, s in rows]
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


Ask = Callable[[lpb.SyncRequest], AsyncIterator[lpb.SyncBatch]]
Vouch = Callable[[bytes], str | None]
MAX_CERTS = 1024
PIPELINE = 3  # answer frames being checked while the next ones arrive


async def pull(
    store: LedgerStore,
    peer_id: str,
    ask: Ask,
    checker: Checker,
    *,
    max_records: int = 0,
    own_only: bool = False,
    vouch: Vouch | None = None,
) -> Ingested:
    """Everything `peer_id` holds that this store lacks, by asking until nothing is left
    (`ask` carries one SyncRequest to the peer and yields its answer frames). Frames are
    checked in parallel and kept in order, so a chain is always extended from its end.
    `own_only`: keep only the peer's own records (a cloud node speaks for itself only).
    `vouch`: the node ID a membership certificate proves a member of this mesh (None if
    it does not); with it, only records of proven members are kept."""
    total = Ingested()
    in_flight: deque[tuple[lpb.SyncBatch, asyncio.Task[Received]]] = deque()
    try:
        while True:
            cursor = await store.receipts_cursor(peer_id)
            request = lpb.SyncRequest(
                heads=await store.heads(), receipts_after=cursor, max_records=max_records
            )
            kept = total.records
            more = False
            async for batch in ask(request):
                in_flight.append((batch, asyncio.create_task(checker.check(batch))))
                more = more or batch.more
                if len(in_flight) >= PIPELINE:
                    await _keep_oldest(store, peer_id, in_flight, total, own_only, vouch)
            while in_flight:
                await _keep_oldest(store, peer_id, in_flight, total, own_only, vouch)
            stuck = total.records == kept and await store.receipts_cursor(peer_id) == cursor
            if not more or stuck:  # stuck: what is left does not fit (fork proof was kept)
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
) -> None:
    batch, task = in_flight.popleft()
    received = await task
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
    if own_only:
        others = [r for r in received.records if r.node_id != peer_id]
        if others:
            total.problems.append(f"{len(others)} records of other nodes ignored")
        received.records = [r for r in received.records if r.node_id == peer_id]
        received.fork_proofs = [r for r in received.fork_proofs if r.node_id == peer_id]
    done = await store.ingest(received, peer_id=peer_id, receipts_cursor=batch.receipts_cursor)
    total.records += done.records
    total.receipts += done.receipts
    total.forks += done.forks
    total.problems += done.problems
