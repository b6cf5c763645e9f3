"""The usage ledger's chain, receipts and verifier, without I/O (mesh/ledger.py): any change
to any stored record is found and named, a deleted record is a gap, a rewritten history is
a fork, and an uncountersigned record is reported."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidRequest
from mesh.identity import Identity
from mesh.ledger import (
    GENESIS,
    ChainWriter,
    Usage,
    countersign,
    open_record,
    period_bounds,
    record_hash,
    summarize,
    verify,
)
from mesh.wire.v1 import ledger_pb2 as lpb

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
    two = verify(records, receipts[:-1], workers=2)
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
