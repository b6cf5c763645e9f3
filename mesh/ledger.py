"""The signed usage ledger, without I/O (DESIGN.md "Usage ledger and quotas"; wire in
ledger.proto).

A node's log is a hash chain of records it signed: record n names record n-1 by the
SHA-256 of its exact bytes. `ChainWriter` makes the next record from the last one it
knows; `countersign` is the entry node's receipt over a record's hash; `verify` reads
any set of records (and receipts) and reports, by node and sequence number, every bad
signature, broken link, gap, missing receipt and fork (two different records signed for
the same node and sequence: proof that the node rewrote its history).

Nothing here re-encodes what was signed: records are checked and hashed as the bytes
they arrived as, and parsed only after their signature verifies.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.message import DecodeError

from mesh.errors import BadSignature, InvalidRequest
from mesh.identity import Identity, node_id_from_public_key, verify_signature
from mesh.wire.v1 import ledger_pb2 as lpb

RECORD_CONTEXT = b"allerac-mesh/v1/usage-record\x00"
RECEIPT_CONTEXT = b"allerac-mesh/v1/usage-receipt\x00"
GENESIS = bytes(32)
MAX_RECORD_BYTES = 4096


def record_hash(signed: lpb.SignedRecord) -> bytes:
    return hashlib.sha256(signed.record).digest()


def open_record(signed: lpb.SignedRecord) -> lpb.UsageRecord:
    """A record whose signature verifies against the key it names; BadSignature otherwise."""
    if len(signed.record) > MAX_RECORD_BYTES or len(signed.signature) != 64:
        raise BadSignature("usage record is malformed")
    record = lpb.UsageRecord()
    try:
        record.ParseFromString(signed.record)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("usage record does not parse") from exc
    key = record.identity_public_key
    if len(key) != 32 or node_id_from_public_key(key) != record.node_id:
        raise BadSignature("usage record names a key that is not its node's")
    if not verify_signature(key, signed.signature, RECORD_CONTEXT + signed.record):
        raise BadSignature(f"usage record {record.node_id[:7]}#{record.seq} is not signed by it")
    if record.seq < 1 or len(record.prev_hash) != 32:
        raise BadSignature(f"usage record {record.node_id[:7]}#{record.seq} is malformed")
    return record


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """What one served request (or the served part of one) used."""

    request_id: str
    entry_node_id: str
    user: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    route: str
    started_at_ms: int
    ended_at_ms: int
    partial: bool = False
    served_by: str = ""  # who generated the tokens, when not the signing node


class ChainWriter:
    """The next record of this node's log, from the last one written (seq, hash)."""

    def __init__(self, identity: Identity, *, last_seq: int = 0, last_hash: bytes = GENESIS):
        self._identity = identity
        self.last_seq = last_seq
        self.last_hash = last_hash

    def append(self, usage: Usage) -> lpb.SignedRecord:
        if not 0 <= usage.prompt_tokens < 2**32 or not 0 <= usage.completion_tokens < 2**32:
            raise InvalidRequest("token counts out of range")
        record = lpb.UsageRecord(
            node_id=self._identity.node_id,
            identity_public_key=self._identity.public_key_raw,
            seq=self.last_seq + 1,
            prev_hash=self.last_hash,
            request_id=usage.request_id,
            entry_node_id=usage.entry_node_id,
            user=usage.user,
            model=usage.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            route=usage.route,
            started_at_unix_ms=usage.started_at_ms,
            ended_at_unix_ms=usage.ended_at_ms,
            kind=lpb.RECORD_KIND_PARTIAL if usage.partial else lpb.RECORD_KIND_COMPLETE,
            served_by=usage.served_by,
        )
        data = record.SerializeToString(deterministic=True)
        signed = lpb.SignedRecord(record=data, signature=self._identity.sign(RECORD_CONTEXT + data))
        self.last_seq = record.seq
        self.last_hash = hashlib.sha256(data).digest()
        return signed


def countersign(identity: Identity, signed: lpb.SignedRecord) -> lpb.Receipt:
    """The entry node's receipt: it saw this record for a request it let in."""
    digest = record_hash(signed)
    return lpb.Receipt(
        record_hash=digest,
        entry_node_id=identity.node_id,
        entry_public_key=identity.public_key_raw,
        signature=identity.sign(RECEIPT_CONTEXT + digest),
    )


def receipt_is_signed(receipt: lpb.Receipt) -> bool:
    """Signed by the node it names, over the hash it names (whatever record that is)."""
    key = receipt.entry_public_key
    return (
        len(key) == 32
        and len(receipt.record_hash) == 32
        and node_id_from_public_key(key) == receipt.entry_node_id
        and verify_signature(key, receipt.signature, RECEIPT_CONTEXT + receipt.record_hash)
    )


def check_receipt(receipt: lpb.Receipt, record: lpb.UsageRecord, digest: bytes) -> bool:
    """Signed by the entry node the record names, over this very record."""
    return (
        receipt.record_hash == digest
        and receipt.entry_node_id == record.entry_node_id
        and receipt_is_signed(receipt)
    )


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # bad_signature | broken_chain | gap | fork | no_receipt | bad_receipt
    node_id: str
    seq: int
    detail: str


@dataclass(kw_only=True)
class Report:
    records: int = 0
    nodes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class _Checked:
    """One record after its signatures were checked (what the chain logic needs)."""

    node_id: str
    seq: int
    prev_hash: bytes
    digest: bytes
    receipt: str  # "ok" | "none" | "bad"
    error: str = ""


def _check(record_bytes: bytes, signature: bytes, receipts: list[bytes]) -> _Checked:
    signed = lpb.SignedRecord(record=record_bytes, signature=signature)
    try:
        record = open_record(signed)
    except BadSignature as exc:
        node, seq = _best_effort_position(signed)
        return _Checked(node, seq, b"", b"", "none", exc.message)
    digest = record_hash(signed)
    status = "none"
    for raw in receipts:
        status = "bad"
        try:
            receipt = lpb.Receipt.FromString(raw)
        except (DecodeError, ValueError):
            continue
        if check_receipt(receipt, record, digest):
            status = "ok"
            break
    return _Checked(record.node_id, record.seq, record.prev_hash, digest, status)


def _check_chunk(items: list[tuple[bytes, bytes, list[bytes]]]) -> list[_Checked]:
    return [_check(*item) for item in items]


def verify(
    records: Iterable[lpb.SignedRecord],
    receipts: Iterable[lpb.Receipt] = (),
    *,
    require_receipts: bool = True,
    workers: int = 1,
) -> Report:
    """Check signatures, chains, receipts; report gaps and forks by node and sequence.
    With `workers` > 1 the signature checks (nearly all the time) run in that many
    processes."""
    receipts_by_hash: dict[bytes, list[bytes]] = defaultdict(list)
    for receipt in receipts:
        receipts_by_hash[receipt.record_hash].append(receipt.SerializeToString())
    items = [
        (r.record, r.signature, receipts_by_hash.get(hashlib.sha256(r.record).digest(), []))
        for r in records
    ]
    if workers > 1 and len(items) > 1000:
        size = -(-len(items) // (workers * 4))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        # spawn, not fork: the node has gRPC and sqlite threads, and forking those deadlocks.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            checked = [c for part in pool.map(_check_chunk, chunks) for c in part]
    else:
        checked = _check_chunk(items)
    return _report(checked, require_receipts=require_receipts)


def _report(checked: list[_Checked], *, require_receipts: bool) -> Report:
    report = Report(records=len(checked))
    by_node: dict[str, dict[int, list[_Checked]]] = defaultdict(lambda: defaultdict(list))
    for item in checked:
        if item.error:
            report.problems.append(Problem("bad_signature", item.node_id, item.seq, item.error))
            continue
        versions = by_node[item.node_id][item.seq]
        if all(existing.digest != item.digest for existing in versions):
            versions.append(item)
    report.nodes = len(by_node)
    for node_id, chain in sorted(by_node.items()):
        expected = 1
        for seq in sorted(chain):
            versions = chain[seq]
            if seq > expected:
                report.problems.append(
                    Problem("gap", node_id, expected, f"records {expected} to {seq - 1} missing")
                )
            expected = seq + 1
            if len(versions) > 1:
                report.problems.append(
                    Problem("fork", node_id, seq, f"{len(versions)} different signed records")
                )
            for item in versions:
                previous = chain.get(seq - 1)
                if seq == 1:
                    linked = item.prev_hash == GENESIS
                elif previous:
                    linked = any(item.prev_hash == prior.digest for prior in previous)
                else:
                    linked = True  # the gap is reported; the link cannot be checked
                if not linked:
                    report.problems.append(
                        Problem("broken_chain", node_id, seq, "does not follow the record before")
                    )
                if require_receipts and item.receipt == "none":
                    report.problems.append(Problem("no_receipt", node_id, seq, "not countersigned"))
                elif require_receipts and item.receipt == "bad":
                    report.problems.append(
                        Problem("bad_receipt", node_id, seq, "countersignature invalid")
                    )
    return report


def _best_effort_position(signed: lpb.SignedRecord) -> tuple[str, int]:
    """Where a record that failed verification claims to sit, for the report."""
    record = lpb.UsageRecord()
    try:
        record.ParseFromString(signed.record[:MAX_RECORD_BYTES])
    except (DecodeError, ValueError):
        return "?", 0
    return record.node_id[:64] or "?", int(record.seq)


USAGE_KEYS = ("node", "model", "tier", "user")


@dataclass(kw_only=True)
class UsageRow:
    key: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def summarize(
    records: Iterable[lpb.SignedRecord],
    *,
    by: str = "user",
    user: str | None = None,
    since_ms: int = 0,
    until_ms: int = 2**63 - 1,
) -> list[UsageRow]:
    """Usage by node, model, tier or user, from the records that verify, each counted once
    (by node and sequence), ended inside [since_ms, until_ms)."""
    if by not in USAGE_KEYS:
        raise InvalidRequest(f"--by must be one of {', '.join(USAGE_KEYS)}", param="by")
    seen: set[tuple[str, int]] = set()
    rows: dict[str, UsageRow] = {}
    for signed in records:
        try:
            record = open_record(signed)
        except BadSignature:
            continue  # `verify` reports it; usage counts only what is proven
        if (record.node_id, record.seq) in seen:
            continue
        seen.add((record.node_id, record.seq))
        if user is not None and record.user != user:
            continue
        if not since_ms <= record.ended_at_unix_ms < until_ms:
            continue
        key = {
            "node": record.served_by or record.node_id,
            "model": record.model,
            "tier": record.route,
            "user": record.user or "(owner)",
        }[by]
        row = rows.setdefault(key, UsageRow(key=key))
        row.requests += 1
        row.prompt_tokens += record.prompt_tokens
        row.completion_tokens += record.completion_tokens
    return sorted(rows.values(), key=lambda r: (-r.completion_tokens - r.prompt_tokens, r.key))


def period_bounds(text: str, *, now_ms: int) -> tuple[int, int]:
    """'all', 'day' (today, UTC), 'month' (this month, UTC), 'YYYY-MM' or 'YYYY-MM-DD'
    -> [since_ms, until_ms)."""
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    try:
        if text == "all":
            return 0, 2**63 - 1
        if text == "day":
            start = now.replace(hour=0, minute=0, second=0, microsecond=0)
            return _ms(start), _ms(start + timedelta(days=1))
        if text == "month" or len(text) == 7:
            start = (
                now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
                if text == "month"
                else datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
            )
            following = start.replace(
                year=start.year + start.month // 12, month=start.month % 12 + 1
            )
            return _ms(start), _ms(following)
        start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return _ms(start), _ms(start + timedelta(days=1))
    except ValueError as exc:
        raise InvalidRequest(
            f"not a period: {text!r} (use all, day, month, 2026-11 or 2026-11-25)",
            param="period",
        ) from exc


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
