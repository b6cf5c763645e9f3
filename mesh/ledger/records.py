"""The signed usage ledger, without I/O (DESIGN.md "Usage ledger and quotas"; wire in
ledger.proto).

A node's log is a hash chain of records it signed: record n names record n-1 by the
SHA-256 of its exact bytes. `ChainWriter` makes the next record from the last one it
knows; `countersign` is the entry node's receipt over a record's hash; `verify` reads
any set of records (and receipts) and reports, by node and sequence number, every bad
signature, broken link, gap, missing receipt and fork (two different records signed for
the same node and sequence: proof that the node rewrote its history).

A chain's newest records could be deleted without breaking any link, so its head is
also evident outside it (`Mark`): the receipts of its records (the store notes where
each countersigned record sits), the heads a box has held, and heads the node signed
itself (`sign_head`) that members countersign as they sync (`countersign_head`). Any
of these beyond the records held is a truncation, named by node and sequence.

An entry node that finds a record implausible (ledger_bounds.py) signs a `Refusal`
instead of a receipt: the record is kept with it, named by `verify`, not counted.

Nothing here re-encodes what was signed: records are checked and hashed as the bytes
they arrived as, and parsed only after their signature verifies.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from mesh.errors import BadSignature, InvalidRequest
from mesh.trust.identity import Identity, node_id_from_public_key, verify_signature
from mesh.wire.v1 import ledger_pb2 as lpb

RECORD_CONTEXT = b"allerac-mesh/v1/usage-record\x00"
RECEIPT_CONTEXT = b"allerac-mesh/v1/usage-receipt\x00"
HEAD_CONTEXT = b"allerac-mesh/v1/chain-head\x00"
HEAD_RECEIPT_CONTEXT = b"allerac-mesh/v1/head-receipt\x00"
REFUSAL_CONTEXT = b"allerac-mesh/v1/usage-refusal\x00"
GENESIS = bytes(32)
MAX_RECORD_BYTES = 4096
MAX_HEAD_BYTES = 512
MAX_REASON_CHARS = 512


def record_hash(signed: lpb.SignedRecord) -> bytes:
    return hashlib.sha256(signed.record).digest()


_Signed = TypeVar("_Signed", lpb.UsageRecord, lpb.HeadStatement)


def _open_signed(
    data: bytes, signature: bytes, kind: type[_Signed], *, context: bytes, max_bytes: int, what: str
) -> _Signed:
    """`data` parsed as `kind`, signed (after `context`) by the key it names, which must be
    its node's; BadSignature naming `what` otherwise. Size is checked before parsing."""
    if len(data) > max_bytes or len(signature) != 64:
        raise BadSignature(f"{what} is malformed")
    message = kind()
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise BadSignature(f"{what} does not parse") from exc
    key = message.identity_public_key
    if len(key) != 32 or node_id_from_public_key(key) != message.node_id:
        raise BadSignature(f"{what} names a key that is not its node's")
    if not verify_signature(key, signature, context + data):
        raise BadSignature(f"{what} {message.node_id[:7]}#{message.seq} is not signed by it")
    return message


def open_record(signed: lpb.SignedRecord) -> lpb.UsageRecord:
    """A record whose signature verifies against the key it names; BadSignature otherwise."""
    record = _open_signed(
        signed.record,
        signed.signature,
        lpb.UsageRecord,
        context=RECORD_CONTEXT,
        max_bytes=MAX_RECORD_BYTES,
        what="usage record",
    )
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


# --- refusals ---------------------------------------------------------------------------------


def refuse(identity: Identity, signed: lpb.SignedRecord, reason: str) -> lpb.Refusal:
    """The entry node's signed refusal to countersign this record, and why."""
    digest = record_hash(signed)
    reason = reason[:MAX_REASON_CHARS]
    return lpb.Refusal(
        record_hash=digest,
        entry_node_id=identity.node_id,
        entry_public_key=identity.public_key_raw,
        reason=reason,
        signature=identity.sign(REFUSAL_CONTEXT + digest + reason.encode("utf-8")),
    )


def refusal_is_signed(refusal: lpb.Refusal) -> bool:
    """Signed by the node it names, over the hash and reason it names."""
    key = refusal.entry_public_key
    return (
        len(key) == 32
        and len(refusal.record_hash) == 32
        and len(refusal.reason) <= MAX_REASON_CHARS
        and node_id_from_public_key(key) == refusal.entry_node_id
        and verify_signature(
            key,
            refusal.signature,
            REFUSAL_CONTEXT + refusal.record_hash + refusal.reason.encode("utf-8"),
        )
    )


def check_refusal(refusal: lpb.Refusal, record: lpb.UsageRecord, digest: bytes) -> bool:
    """Signed by the entry node the record names, over this very record."""
    return (
        refusal.record_hash == digest
        and refusal.entry_node_id == record.entry_node_id
        and refusal_is_signed(refusal)
    )


# --- signed heads -----------------------------------------------------------------------------


def sign_head(identity: Identity, *, seq: int, digest: bytes, now_ms: int) -> lpb.SignedHead:
    """This node's statement that its own chain reaches record `seq` (of hash `digest`)."""
    head = lpb.HeadStatement(
        node_id=identity.node_id,
        identity_public_key=identity.public_key_raw,
        seq=seq,
        hash=digest,
        signed_at_unix_ms=now_ms,
    ).SerializeToString(deterministic=True)
    return lpb.SignedHead(head=head, signature=identity.sign(HEAD_CONTEXT + head))


def head_hash(signed: lpb.SignedHead) -> bytes:
    return hashlib.sha256(signed.head).digest()


def open_head(signed: lpb.SignedHead) -> lpb.HeadStatement:
    """A head whose signature verifies against the key it names; BadSignature otherwise."""
    head = _open_signed(
        signed.head,
        signed.signature,
        lpb.HeadStatement,
        context=HEAD_CONTEXT,
        max_bytes=MAX_HEAD_BYTES,
        what="signed head",
    )
    if head.seq < 1 or len(head.hash) != 32:
        raise BadSignature(f"head {head.node_id[:7]}#{head.seq} is malformed")
    return head


def countersign_head(identity: Identity, signed: lpb.SignedHead) -> lpb.HeadReceipt:
    """A member's word that it held this node's chain up to this head."""
    digest = head_hash(signed)
    return lpb.HeadReceipt(
        head_hash=digest,
        node_id=identity.node_id,
        public_key=identity.public_key_raw,
        signature=identity.sign(HEAD_RECEIPT_CONTEXT + digest),
    )


def head_receipt_is_signed(receipt: lpb.HeadReceipt, digest: bytes) -> bool:
    key = receipt.public_key
    return (
        receipt.head_hash == digest
        and len(key) == 32
        and node_id_from_public_key(key) == receipt.node_id
        and verify_signature(key, receipt.signature, HEAD_RECEIPT_CONTEXT + digest)
    )


@dataclass(frozen=True, slots=True)
class Problem:
    # bad_signature | broken_chain | gap | fork | no_receipt | bad_receipt | refused |
    # truncated | replaced
    kind: str
    node_id: str
    seq: int
    detail: str
    last_seq: int = 0  # gap and truncated: the last record missing (seq is the first)


@dataclass(frozen=True, slots=True)
class Mark:
    """Evidence, kept outside a chain, that it reached record `seq` (of hash `digest`),
    and what says so."""

    node_id: str
    seq: int
    digest: bytes
    source: str


@dataclass(frozen=True, slots=True)
class HeadView:
    """A node's latest signed head that verifies, and the members that countersigned it."""

    seq: int
    countersigned_by: tuple[str, ...]


@dataclass(kw_only=True)
class Report:
    records: int = 0
    nodes: int = 0
    problems: list[Problem] = field(default_factory=list)
    tops: dict[str, int] = field(default_factory=dict)  # per node, the highest seq held
    heads: dict[str, HeadView] = field(default_factory=dict)

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
    refused: str = ""  # its entry node's reason, when that node refused to countersign it


def _check(
    record_bytes: bytes, signature: bytes, receipts: list[bytes], refusals: list[bytes]
) -> _Checked:
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
    refused = ""
    for raw in refusals:
        try:
            refusal = lpb.Refusal.FromString(raw)
        except (DecodeError, ValueError):
            continue
        if check_refusal(refusal, record, digest):
            refused = refusal.reason or "no reason given"
            break
    return _Checked(record.node_id, record.seq, record.prev_hash, digest, status, "", refused)


def check_chunk(items: list[tuple[bytes, bytes, list[bytes], list[bytes]]]) -> list[_Checked]:
    return [_check(*item) for item in items]


PARALLEL_ITEMS = 1000  # fewer records than this are checked in the calling process
# Runs a function over chunks of a list (in worker processes) and yields each result.
ChunkMap = Callable[[Callable[[list[Any]], list[Any]], list[Any]], Iterable[list[Any]]]


def verify(
    records: Iterable[lpb.SignedRecord],
    receipts: Iterable[lpb.Receipt] = (),
    *,
    refusals: Iterable[lpb.Refusal] = (),
    heads: Iterable[lpb.SignedHead] = (),
    marks: Iterable[Mark] = (),
    positions: Mapping[bytes, tuple[str, int]] | None = None,
    require_receipts: bool = True,
    map_chunks: ChunkMap | None = None,
) -> Report:
    """Check signatures, chains, receipts; report gaps and forks by node and sequence,
    records their entry node refused, and truncation: a node's chain shorter than what
    `heads` (signed by it), `marks` (kept by the store), or receipts whose records are
    missing (`positions`: where the store says each countersigned record sat) show.
    `map_chunks` (the node's worker processes: `node.store.workers.chunk_map`) runs
    the signature checks, nearly all the time, over chunks of records in parallel."""
    receipts_by_hash: dict[bytes, list[bytes]] = defaultdict(list)
    receipt_list = list(receipts)
    for receipt in receipt_list:
        receipts_by_hash[receipt.record_hash].append(receipt.SerializeToString())
    refusals_by_hash: dict[bytes, list[bytes]] = defaultdict(list)
    for refusal in refusals:
        refusals_by_hash[refusal.record_hash].append(refusal.SerializeToString())
    items = []
    for r in records:
        digest = hashlib.sha256(r.record).digest()
        items.append(
            (
                r.record,
                r.signature,
                receipts_by_hash.get(digest, []),
                refusals_by_hash.get(digest, []),
            )
        )
    if map_chunks is not None and len(items) > PARALLEL_ITEMS:
        checked = [c for part in map_chunks(check_chunk, items) for c in part]
    else:
        checked = check_chunk(items)
    report = _report(checked, require_receipts=require_receipts)
    held: dict[str, dict[int, set[bytes]]] = defaultdict(lambda: defaultdict(set))
    for item in checked:
        if not item.error:
            held[item.node_id][item.seq].add(item.digest)
    report.tops = {node_id: max(chain) for node_id, chain in held.items()}
    evidence = list(marks)
    evidence += _orphan_receipts(receipt_list, positions or {}, held)
    evidence += _head_marks(heads, report)
    report.problems += evidence_problems(held, evidence)
    return report


def _orphan_receipts(
    receipts: list[lpb.Receipt],
    positions: Mapping[bytes, tuple[str, int]],
    held: Mapping[str, Mapping[int, set[bytes]]],
) -> list[Mark]:
    """Receipts whose records are not held, where the store noted those records sat."""
    digests = {d for chain in held.values() for versions in chain.values() for d in versions}
    marks = []
    for receipt in receipts:
        where = positions.get(receipt.record_hash)
        if where is None or receipt.record_hash in digests or not receipt_is_signed(receipt):
            continue
        node_id, seq = where
        marks.append(
            Mark(node_id, seq, receipt.record_hash, f"countersigned by {receipt.entry_node_id[:7]}")
        )
    return marks


def _head_marks(heads: Iterable[lpb.SignedHead], report: Report) -> list[Mark]:
    """Marks of the signed heads that verify (noting the latest in `report.heads`); a
    signed head that does not verify is a problem of its own."""
    marks = []
    for signed in heads:
        try:
            head = open_head(signed)
        except BadSignature as exc:
            report.problems.append(Problem("bad_signature", "?", 0, f"a signed head: {exc}"))
            continue
        digest = head_hash(signed)
        countersigners = tuple(
            sorted(
                {
                    r.node_id
                    for r in signed.receipts
                    if r.node_id != head.node_id and head_receipt_is_signed(r, digest)
                }
            )
        )
        source = f"signed by {head.node_id[:7]}"
        if countersigners:
            source += " and countersigned by " + ", ".join(n[:7] for n in countersigners)
        marks.append(Mark(head.node_id, head.seq, head.hash, source))
        known = report.heads.get(head.node_id)
        if known is None or head.seq > known.seq:
            report.heads[head.node_id] = HeadView(head.seq, countersigners)
    return marks


def evidence_problems(
    held: Mapping[str, Mapping[int, Collection[bytes]]], marks: Iterable[Mark]
) -> list[Problem]:
    """Truncation (evidence of records beyond a chain's last one held, or of a chain none
    of whose records is held) and replaced records (evidence naming another record than
    the one held at its position), by node and sequence."""
    beyond: dict[str, list[Mark]] = defaultdict(list)
    problems = []
    for mark in marks:
        chain = held.get(mark.node_id, {})
        top = max(chain, default=0)
        if mark.seq > top:
            beyond[mark.node_id].append(mark)
        elif mark.seq in chain and mark.digest not in chain[mark.seq]:
            problems.append(
                Problem(
                    "replaced",
                    mark.node_id,
                    mark.seq,
                    f"the record held is not the one {mark.source} ({mark.digest.hex()[:12]})",
                )
            )
    for node_id, found in sorted(beyond.items()):
        first = max(held.get(node_id, {}), default=0) + 1
        last = max(mark.seq for mark in found)
        sources = sorted({mark.source for mark in found})
        more = f"; and {len(sources) - 3} more" if len(sources) > 3 else ""
        shown = "; ".join(sources[:3]) + more
        problems.append(
            Problem(
                "truncated",
                node_id,
                first,
                f"records {first} to {last} missing: the chain reached #{last} ({shown})",
                last,
            )
        )
    return sorted(set(problems), key=lambda p: (p.node_id, p.seq, p.kind, p.detail))


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
                    Problem(
                        "gap",
                        node_id,
                        expected,
                        f"records {expected} to {seq - 1} missing",
                        seq - 1,
                    )
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
                if item.refused:
                    report.problems.append(
                        Problem(
                            "refused",
                            node_id,
                            seq,
                            f"its entry node refused to countersign it: {item.refused}",
                        )
                    )
                elif require_receipts and item.receipt == "none":
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


USAGE_KEYS = ("node", "model", "tier", "user", "day")


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
    excluded: Collection[bytes] = (),
) -> list[UsageRow]:
    """Usage by node, model, tier, user or UTC day, from the records that verify, each counted once
    (by node and sequence), ended inside [since_ms, until_ms). `excluded`: hashes of
    records not to count (those their entry node refused: `refused_records`)."""
    if by not in USAGE_KEYS:
        raise InvalidRequest(f"--by must be one of {', '.join(USAGE_KEYS)}", param="by")
    seen: set[tuple[str, int]] = set()
    rows: dict[str, UsageRow] = {}
    for signed in records:
        if excluded and record_hash(signed) in excluded:
            continue
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
        key = _usage_key(record, by)
        row = rows.setdefault(key, UsageRow(key=key))
        row.requests += 1
        row.prompt_tokens += record.prompt_tokens
        row.completion_tokens += record.completion_tokens
    return sorted(rows.values(), key=lambda r: (-r.completion_tokens - r.prompt_tokens, r.key))


def _usage_key(record: lpb.UsageRecord, by: str) -> str:
    if by == "node":
        return record.served_by or record.node_id
    if by == "model":
        return record.model
    if by == "tier":
        return record.route
    if by == "user":
        return record.user or "(owner)"
    return datetime.fromtimestamp(record.ended_at_unix_ms / 1000, tz=UTC).strftime("%Y-%m-%d")


def refused_records(
    records: Iterable[lpb.SignedRecord], refusals: Iterable[lpb.Refusal]
) -> dict[bytes, lpb.UsageRecord]:
    """The records (by hash) whose own entry node signed a refusal to countersign them."""
    by_hash: dict[bytes, list[lpb.Refusal]] = defaultdict(list)
    for refusal in refusals:
        by_hash[refusal.record_hash].append(refusal)
    found: dict[bytes, lpb.UsageRecord] = {}
    for signed in records:
        digest = record_hash(signed)
        if digest not in by_hash or digest in found:
            continue
        try:
            record = open_record(signed)
        except BadSignature:
            continue
        if any(check_refusal(r, record, digest) for r in by_hash[digest]):
            found[digest] = record
    return found


def period_bounds(text: str, *, now_ms: int) -> tuple[int, int]:
    """'all', 'day' (today, UTC), 'month' (this month, UTC), 'YYYY-MM' or 'YYYY-MM-DD'
    -> [since_ms, until_ms)."""
    if text == "day":  # what quotas ask for every record counted: worked out once a day
        return _calendar(now_ms // DAY_MS)[0]
    if text == "month":
        return _calendar(now_ms // DAY_MS)[1]
    try:
        if text == "all":
            return 0, 2**63 - 1
        if len(text) == 7:
            return _month_of(datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC))
        start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return _ms(start), _ms(start + timedelta(days=1))
    except ValueError as exc:
        raise InvalidRequest(
            f"not a period: {text!r} (use all, day, month, 2026-11 or 2026-11-25)",
            param="period",
        ) from exc


DAY_MS = 86_400_000  # Unix time has no leap seconds: every UTC day is this long


@functools.lru_cache(maxsize=16)
def _calendar(day: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The bounds of the UTC day number `day` (days since 1970-01-01) and of its month."""
    start = datetime.fromtimestamp(day * DAY_MS / 1000, tz=UTC)
    return (_ms(start), _ms(start + timedelta(days=1))), _month_of(start.replace(day=1))


def _month_of(start: datetime) -> tuple[int, int]:
    """[start of the month starting at `start`, start of the next)."""
    following = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return _ms(start), _ms(following)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
