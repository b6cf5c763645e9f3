"""The usage ledger's chain, receipts and verifier, without I/O (mesh/ledger.py): any change
to any stored record is found and named, a deleted record is a gap, a rewritten history is
a fork, and an uncountersigned record is reported."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import BadSignature, InvalidRequest
from mesh.ledger.records import (
    GENESIS,
    ChainWriter,
    Mark,
    Usage,
    countersign,
    countersign_head,
    head_hash,
    head_receipt_is_signed,
    open_head,
    open_record,
    period_bounds,
    record_hash,
    refusal_is_signed,
    refuse,
    refused_records,
    sign_head,
    summarize,
    verify,
)
from mesh.trust.identity import Identity
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.workers import chunk_map

SERVER, ENTRY = Identity.generate(), Identity.generate()


def _usage(i: int, **changes: object) -> Usage:
    values: dict[str, object] = {
        "request_id": f"{i:032x}",
        "entry_node_id": ENTRY.node_id,
        "user": "alice",
        "model": "smollm2-135m-instruct",
        "prompt_tokens": 10 + i,
        "completion_tokens": 20 + i,
        "route": "lan",
        "started_at_ms": 1_800_000_000_000 + i,
        "ended_at_ms": 1_800_000_000_500 + i,
    }
    values.update(changes)
    return Usage(**values)  # type: ignore[arg-type]


def _log(n: int, server: Identity = SERVER) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    writer = ChainWriter(server)
    records = [writer.append(_usage(i)) for i in range(n)]
    return records, [countersign(ENTRY, r) for r in records]


def test_an_honest_log_verifies() -> None:
    records, receipts = _log(20)
    report = verify(records, receipts)
    assert report.ok, report.problems
    assert (report.records, report.nodes) == (20, 1)
    first = open_record(records[0])
    assert (first.seq, first.prev_hash) == (1, GENESIS)
    assert open_record(records[-1]).completion_tokens == 39


def test_a_writer_continues_a_chain_after_a_restart() -> None:
    records, receipts = _log(3)
    last = open_record(records[-1])
    resumed = ChainWriter(SERVER, last_seq=last.seq, last_hash=record_hash(records[-1]))
    more = [resumed.append(_usage(i)) for i in range(3, 6)]
    report = verify(records + more, receipts + [countersign(ENTRY, r) for r in more])
    assert report.ok, report.problems


FIELDS = [
    ("user", "mallory"),
    ("model", "other-model"),
    ("prompt_tokens", 1),
    ("completion_tokens", 999_999),
    ("route", "cloud"),
    ("request_id", "f" * 32),
    ("entry_node_id", "X" * 63),
    ("ended_at_unix_ms", 1),
]


@pytest.mark.parametrize(("name", "value"), FIELDS)
def test_changing_any_field_of_a_stored_record_is_caught_and_named(
    name: str, value: object
) -> None:
    records, receipts = _log(5)
    tampered = lpb.UsageRecord()
    tampered.ParseFromString(records[2].record)
    setattr(tampered, name, value)
    records[2] = lpb.SignedRecord(
        record=tampered.SerializeToString(), signature=records[2].signature
    )
    report = verify(records, receipts)
    assert not report.ok
    assert [(p.kind, p.seq) for p in report.problems] == [("bad_signature", 3), ("gap", 3)]


def test_a_deleted_record_is_a_gap_with_its_position() -> None:
    records, receipts = _log(6)
    del records[3]
    problems = verify(records, receipts).problems
    assert [(p.kind, p.node_id, p.seq) for p in problems] == [("gap", SERVER.node_id, 4)]


def test_a_rewritten_history_is_a_fork_proof() -> None:
    records, receipts = _log(4)
    forked = ChainWriter(SERVER, last_seq=2, last_hash=record_hash(records[1]))
    other = forked.append(_usage(2, completion_tokens=1))  # a second, smaller record #3
    problems = verify([*records, other], [*receipts, countersign(ENTRY, other)]).problems
    assert ("fork", 3) in [(p.kind, p.seq) for p in problems]


def test_a_record_the_entry_node_did_not_countersign_is_reported() -> None:
    records, receipts = _log(3)
    problems = verify(records, receipts[:2]).problems
    assert [(p.kind, p.seq) for p in problems] == [("no_receipt", 3)]
    forged = countersign(Identity.generate(), records[2])  # someone else's receipt
    problems = verify(records, [*receipts[:2], forged]).problems
    assert [(p.kind, p.seq) for p in problems] == [("bad_receipt", 3)]


def test_a_record_signed_by_another_key_is_refused() -> None:
    records, receipts = _log(2)
    impostor = ChainWriter(Identity.generate())
    fake = impostor.append(_usage(9))
    claimed = lpb.UsageRecord()
    claimed.ParseFromString(fake.record)
    claimed.node_id = SERVER.node_id  # claims to be the server's record
    forged = lpb.SignedRecord(record=claimed.SerializeToString(), signature=fake.signature)
    problems = verify([*records, forged], receipts).problems
    assert problems[0].kind == "bad_signature"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=80))
def test_any_bytes_as_a_record_are_reported_never_crash(record: bytes, signature: bytes) -> None:
    report = verify([lpb.SignedRecord(record=record, signature=signature)])
    assert [p.kind for p in report.problems] == ["bad_signature"]


def test_checking_in_several_processes_reports_the_same() -> None:
    records, receipts = _log(1500)
    del records[700]
    records[100] = lpb.SignedRecord(record=records[100].record, signature=bytes(64))
    one = verify(records, receipts[:-1])
    two = verify(records, receipts[:-1], map_chunks=chunk_map(2))
    assert one.problems == two.problems
    assert {p.kind for p in one.problems} == {"bad_signature", "gap", "no_receipt"}


def test_usage_is_summed_once_per_record_by_any_key() -> None:
    writer = ChainWriter(SERVER)
    records = [
        writer.append(_usage(1, user="alice", route="lan")),
        writer.append(_usage(2, user="bob", route="cloud")),
        writer.append(_usage(3, user="alice", route="cloud")),
    ]
    twice = [*records, records[0]]  # the same record held twice (e.g. synced) counts once
    by_user = {r.key: (r.requests, r.completion_tokens) for r in summarize(twice, by="user")}
    assert by_user == {"alice": (2, 21 + 23), "bob": (1, 22)}
    by_tier = {r.key: r.prompt_tokens for r in summarize(records, by="tier", user="alice")}
    assert by_tier == {"lan": 11, "cloud": 13}
    forged = lpb.SignedRecord(record=records[1].record, signature=bytes(64))
    assert [r.key for r in summarize([forged], by="user")] == []  # only proven usage counts
    with pytest.raises(InvalidRequest):
        summarize(records, by="color")


def test_periods_are_utc_days_and_months() -> None:
    now = 1_795_600_000_000  # 2026-11-25 (UTC)
    assert period_bounds("day", now_ms=now) == period_bounds("2026-11-25", now_ms=now)
    month = period_bounds("month", now_ms=now)
    assert month == period_bounds("2026-11", now_ms=now)
    assert month[1] == period_bounds("2026-12", now_ms=now)[0]
    assert period_bounds("2026-12", now_ms=now)[1] == period_bounds("2027-01", now_ms=now)[0]
    assert period_bounds("all", now_ms=now)[0] == 0
    for bad in ("yesterday", "2026-13", "2026-11-31", ""):
        with pytest.raises(InvalidRequest, match="not a period"):
            period_bounds(bad, now_ms=now)


@settings(max_examples=300)
@given(st.integers(min_value=-(10**12), max_value=253_370_764_799_999))  # 1938 to 9998
def test_todays_and_this_months_bounds_are_the_utc_calendars(now: int) -> None:
    """The day and month of `now_ms` (worked out once per day) are the ones its UTC date
    names, and hold it."""
    date = datetime.fromtimestamp(now / 1000, tz=UTC)
    day = period_bounds("day", now_ms=now)
    assert day == period_bounds(date.strftime("%Y-%m-%d"), now_ms=now)
    month = period_bounds("month", now_ms=now)
    assert month == period_bounds(date.strftime("%Y-%m"), now_ms=now)
    assert day[0] <= now < day[1]
    assert month[0] <= day[0] < day[1] <= month[1]


# --- a chain's head, evident outside the chain (issue 12, finding 4) ------------------------


def _held_positions(records: list[lpb.SignedRecord]) -> dict[bytes, tuple[str, int]]:
    """Where each record sits: what the store notes beside each receipt."""
    return {record_hash(r): (open_record(r).node_id, open_record(r).seq) for r in records}


def test_deleted_newest_records_are_a_truncation_named_by_each_kind_of_evidence() -> None:
    records, receipts = _log(6)
    positions = _held_positions(records)
    head = sign_head(SERVER, seq=6, digest=record_hash(records[5]), now_ms=1)
    head.receipts.append(countersign_head(ENTRY, head))
    mark = Mark(SERVER.node_id, 6, record_hash(records[5]), "held here before")
    kept = records[:4]  # #5 and #6 deleted
    assert verify(kept, receipts[:4], positions=positions).ok  # nothing says they existed
    for report in (
        verify(kept, receipts, positions=positions),  # their receipts were left behind
        verify(kept, receipts[:4], marks=[mark]),  # the store's mark of the chain's head
        verify(kept, receipts[:4], heads=[head]),  # the head the node signed
    ):
        assert [(p.kind, p.node_id, p.seq, p.last_seq) for p in report.problems] == [
            ("truncated", SERVER.node_id, 5, 6)
        ]
    detail = verify(kept, receipts[:4], heads=[head]).problems[0].detail
    assert "countersigned by " + ENTRY.node_id[:7] in detail
    # The whole chain gone: still named, from its first record.
    problems = verify([], receipts, positions=positions, marks=[mark]).problems
    assert [(p.kind, p.seq, p.last_seq) for p in problems] == [("truncated", 1, 6)]


def test_a_rewritten_record_is_named_by_the_evidence_of_the_one_before() -> None:
    records, receipts = _log(4)
    mark = Mark(SERVER.node_id, 4, record_hash(records[3]), "held here before")
    # The owner, who has the key, re-signs a cheaper #4 after deleting the real one.
    writer = ChainWriter(SERVER, last_seq=3, last_hash=record_hash(records[2]))
    cheaper = writer.append(_usage(3, completion_tokens=1))
    problems = verify([*records[:3], cheaper], receipts, marks=[mark]).problems
    assert ("replaced", 4) in {(p.kind, p.seq) for p in problems}


def test_a_signed_head_and_its_countersignatures_verify_and_tampering_is_caught() -> None:
    records, _ = _log(3)
    head = sign_head(SERVER, seq=3, digest=record_hash(records[2]), now_ms=5)
    statement = open_head(head)
    assert (statement.node_id, statement.seq) == (SERVER.node_id, 3)
    receipt = countersign_head(ENTRY, head)
    assert head_receipt_is_signed(receipt, head_hash(head))
    forged = lpb.SignedHead(head=head.head.replace(b"\x03", b"\x09", 1), signature=head.signature)
    with pytest.raises(BadSignature):
        open_head(forged)
    # In a ledger: a head that does not verify is a problem, not evidence.
    report = verify(records, heads=[forged], require_receipts=False)
    assert [p.kind for p in report.problems] == ["bad_signature"]
    report = verify(records, heads=[head], require_receipts=False)
    assert report.ok
    assert report.heads[SERVER.node_id].seq == 3


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=80))
def test_any_bytes_as_a_signed_head_are_refused_never_crash(head: bytes, signature: bytes) -> None:
    with pytest.raises(BadSignature):
        open_head(lpb.SignedHead(head=head, signature=signature))


# --- refusals (issue 12, finding 6) ----------------------------------------------------------


def test_a_refused_record_is_named_and_not_counted() -> None:
    records, receipts = _log(3)
    refusal = refuse(ENTRY, records[1], "it claims 50000 prompt tokens")
    assert refusal_is_signed(refusal)
    problems = verify(records, [receipts[0], receipts[2]], refusals=[refusal]).problems
    assert [(p.kind, p.seq) for p in problems] == [("refused", 2)]
    assert "50000 prompt tokens" in problems[0].detail
    refused = refused_records(records, [refusal])
    assert list(refused) == [record_hash(records[1])]
    counted = summarize(records, excluded=refused)
    assert sum(r.requests for r in counted) == 2
    # Only the record's own entry node can refuse it; a tampered reason does not verify.
    stranger = refuse(Identity.generate(), records[1], "no")
    assert refused_records(records, [stranger]) == {}
    edited = lpb.Refusal()
    edited.CopyFrom(refusal)
    edited.reason = "something else"
    assert not refusal_is_signed(edited)
    assert [p.kind for p in verify(records, receipts[:1], refusals=[edited]).problems] == [
        "no_receipt",
        "no_receipt",
    ]
