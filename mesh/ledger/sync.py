"""Ledger anti-entropy without I/O (DESIGN.md "Usage ledger and quotas"; wire in
ledger.proto: SyncRequest, SyncBatch).

A member asks a peer for what follows its own view of each node's chain (per-node
sequence heads), with the receipts of those records, and for the receipts of records it
holds without one, named by the records' hashes (never by the peer's row numbers, which
start again when a box rebuilds its ledger). Each answer ends with the signed heads the
peer holds (each node's statement of how far its chain reaches, with the members'
countersignatures), which the asker checks against the records it holds and
countersigns in turn. Nothing a peer sends is kept before it is verified: `check_batch`
verifies every record's, receipt's, refusal's and head's signature (in worker processes
when there are many: `Checker`), and `plan_chain` decides, against what this node
already holds for that node, which records extend or fill its chain, and which are
proof of a fork: a second, different record signed for a position, or a record naming
a predecessor other than the one held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError

from mesh.errors import BadSignature
from mesh.ledger.records import (
    GENESIS,
    head_hash,
    head_receipt_is_signed,
    open_head,
    open_record,
    receipt_is_signed,
    refusal_is_signed,
)
from mesh.wire.v1 import ledger_pb2 as lpb

FRAME_RECORDS = 1000  # records (and receipts) per answer frame: about 0.5 MB
MAX_RECORDS_PER_CALL = 20_000  # per sync call; `more` says to ask again
MAX_HEADS = 100_000  # nodes named in one SyncRequest
MAX_FORK_PROOFS = 64  # fork proof records sent per answer
MAX_WANTED = 1024  # record hashes one request asks receipts for (the newest first)
MAX_SIGNED_HEADS = 128  # signed heads per answer (the rest next time: the asker says what it has)
MAX_HEAD_RECEIPTS = 16  # countersignatures kept (and sent) per signed head, besides one's own
INLINE_ITEMS = 256  # fewer signatures than this are checked on the event loop
CHUNK_ITEMS = 500


@dataclass(frozen=True, slots=True)
class Checked:
    """A record whose signature verified, with what the chain logic needs."""

    node_id: str
    seq: int
    prev_hash: bytes
    digest: bytes
    request_id: str
    kind: int
    record: bytes
    signature: bytes
    entry_node_id: str = ""
    ended_at_ms: int = 0  # when its signer says the answer ended


@dataclass(frozen=True, slots=True)
class CheckedReceipt:
    """A receipt or a refusal (`receipt` holds its exact bytes) whose signature verified."""

    record_hash: bytes
    entry_node_id: str
    receipt: bytes


@dataclass(frozen=True, slots=True)
class CheckedHead:
    """A signed head whose signature verified, with the countersignatures that did."""

    node_id: str
    seq: int
    hash: bytes  # of the record it names
    head_hash: bytes  # of the statement itself
    head: bytes
    signature: bytes
    receipts: tuple[tuple[str, bytes], ...]  # (countersigner, exact HeadReceipt bytes)


@dataclass(kw_only=True)
class Received:
    """A peer's batch after the signature checks."""

    records: list[Checked] = field(default_factory=list)
    receipts: list[CheckedReceipt] = field(default_factory=list)
    refusals: list[CheckedReceipt] = field(default_factory=list)
    heads: list[CheckedHead] = field(default_factory=list)
    fork_proofs: list[Checked] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    def extend(self, other: Received) -> None:
        self.records += other.records
        self.receipts += other.receipts
        self.refusals += other.refusals
        self.heads += other.heads
        self.fork_proofs += other.fork_proofs
        self.rejected += other.rejected


def check_record(record: bytes, signature: bytes) -> Checked:
    """BadSignature unless the record is signed by the node it names."""
    signed = lpb.SignedRecord(record=record, signature=signature)
    parsed = open_record(signed)
    return Checked(
        node_id=parsed.node_id,
        seq=parsed.seq,
        prev_hash=parsed.prev_hash,
        digest=hashlib.sha256(record).digest(),
        request_id=parsed.request_id,
        kind=parsed.kind,
        record=record,
        signature=signature,
        entry_node_id=parsed.entry_node_id,
        ended_at_ms=parsed.ended_at_unix_ms,
    )


def check_head(signed: lpb.SignedHead) -> CheckedHead:
    """BadSignature unless the head is signed by the node it names; countersignatures
    that do not verify are dropped (at most MAX_HEAD_RECEIPTS looked at)."""
    head = open_head(signed)
    digest = head_hash(signed)
    receipts = tuple(
        (r.node_id, r.SerializeToString())
        for r in signed.receipts[: MAX_HEAD_RECEIPTS * 2]
        if r.node_id != head.node_id and head_receipt_is_signed(r, digest)
    )
    return CheckedHead(
        node_id=head.node_id,
        seq=head.seq,
        hash=head.hash,
        head_hash=digest,
        head=signed.head,
        signature=signed.signature,
        receipts=receipts[:MAX_HEAD_RECEIPTS],
    )


def check_batch(
    records: Pairs,
    receipts: list[bytes],
    fork_proofs: Pairs | None = None,
    refusals: list[bytes] | None = None,
    heads: list[bytes] | None = None,
) -> Received:
    """Verify every signature in a batch (picklable in and out: runs in workers)."""
    out = Received()
    for record, signature in records:
        try:
            out.records.append(check_record(record, signature))
        except BadSignature as exc:
            out.rejected.append(exc.message)
    for record, signature in fork_proofs or ():
        try:
            out.fork_proofs.append(check_record(record, signature))
        except BadSignature as exc:
            out.rejected.append(f"fork proof: {exc.message}")
    for raw in receipts:
        try:
            receipt = lpb.Receipt.FromString(raw)
        except (DecodeError, ValueError):
            out.rejected.append("a receipt does not parse")
            continue
        if not receipt_is_signed(receipt):
            out.rejected.append("a receipt is not signed by the entry node it names")
            continue
        out.receipts.append(
            CheckedReceipt(receipt.record_hash, receipt.entry_node_id, receipt.SerializeToString())
        )
    for raw in refusals or ():
        try:
            refusal = lpb.Refusal.FromString(raw)
        except (DecodeError, ValueError):
            out.rejected.append("a refusal does not parse")
            continue
        if not refusal_is_signed(refusal):
            out.rejected.append("a refusal is not signed by the entry node it names")
            continue
        out.refusals.append(
            CheckedReceipt(refusal.record_hash, refusal.entry_node_id, refusal.SerializeToString())
        )
    for raw in heads or ():
        try:
            out.heads.append(check_head(lpb.SignedHead.FromString(raw)))
        except (DecodeError, ValueError):
            out.rejected.append("a signed head does not parse")
        except BadSignature as exc:
            out.rejected.append(exc.message)
    return out


Pairs = list[tuple[bytes, bytes]]  # (record, signature)


def batch_parts(batch: lpb.SyncBatch) -> tuple[Pairs, list[bytes], Pairs, list[bytes], list[bytes]]:
    return (
        [(r.record, r.signature) for r in batch.records],
        [r.SerializeToString() for r in batch.receipts],
        [(r.record, r.signature) for r in batch.fork_proofs],
        [r.SerializeToString() for r in batch.refusals],
        [h.SerializeToString() for h in batch.signed_heads],
    )


class BatchChecker(Protocol):
    """What checks an answer frame's signatures (`check_batch`), wherever it runs: the node
    spreads large frames over worker processes (`node.store.ledger_checker.Checker`)."""

    async def check(self, batch: lpb.SyncBatch) -> Received: ...


@dataclass(frozen=True, slots=True)
class Held:
    """A record this node holds: its hash and the hash it names as its predecessor."""

    digest: bytes
    prev_hash: bytes


@dataclass(kw_only=True)
class ChainPlan:
    accept: list[Checked] = field(default_factory=list)
    conflicts: list[Checked] = field(default_factory=list)  # kept apart as fork proof
    problems: list[str] = field(default_factory=list)


def plan_chain(held: dict[int, Held], incoming: Iterable[Checked]) -> ChainPlan:
    """For one node's records: `held` is what this node has around the incoming range
    (seq -> Held). A record that repeats one held is skipped; one that differs from one
    held, or does not link to its held neighbour, is fork proof and ends the batch for
    that node (its history split: which branch is right is not ours to pick)."""
    plan = ChainPlan()
    view = dict(held)
    for item in sorted(incoming, key=lambda c: c.seq):
        have = view.get(item.seq)
        if have is not None:
            if have.digest == item.digest:
                continue
            plan.conflicts.append(item)
            plan.problems.append(
                f"fork: node {item.node_id[:7]} signed two different records #{item.seq}"
            )
            break
        before = view.get(item.seq - 1)
        after = view.get(item.seq + 1)
        if (
            (item.seq == 1 and item.prev_hash != GENESIS)
            or (before is not None and before.digest != item.prev_hash)
            or (after is not None and after.prev_hash != item.digest)
        ):
            plan.conflicts.append(item)
            plan.problems.append(
                f"fork: node {item.node_id[:7]}'s record #{item.seq} does not link to the "
                "records held around it"
            )
            break
        view[item.seq] = Held(item.digest, item.prev_hash)
        plan.accept.append(item)
    return plan


def contiguous_head(seqs: Iterable[int]) -> int:
    """The highest n such that 1..n are all present."""
    head = 0
    for seq in sorted(seqs):
        if seq != head + 1:
            break
        head = seq
    return head
