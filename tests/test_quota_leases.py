"""The entry node's lease state machine (mesh/quota/leases.py) without I/O: each
transition by example."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mesh.quota.leases import (
    CALL_MARGIN_MS,
    LEASE_IDLE_MS,
    LEASE_TOKENS,
    LEASE_VALID_MS,
    RETRY_MS,
    AskHome,
    EndReason,
    EntryLeases,
    Leased,
    LeaseEnded,
    LeaseLapsed,
    Report,
    UserVersion,
    grow_at_home,
    lease_id,
    take_back_at_home,
)
from mesh.quota.rules import (
    DEFAULT_MAX_TOKENS,
    HOLD_TTL_MS,
    QuotaBook,
    TierClass,
    parse_quota,
)
from mesh.wire.v1 import ledger_pb2 as lpb

MESH, CLOUD = TierClass.MESH, TierClass.CLOUD
HOME = "H"
V1: UserVersion = (1, "k", False)
V2: UserVersion = (2, "k", False)
NOW = int(datetime(2026, 11, 25, 23, 0, tzinfo=UTC).timestamp() * 1000)


def signed(tokens: int, *, seq: int = 0, user: str = "u", route: str = "lan") -> lpb.SignedRecord:
    record = lpb.UsageRecord(
        node_id="S",
        seq=seq,
        user=user,
        route=route,
        kind=lpb.RECORD_KIND_COMPLETE,
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        ended_at_unix_ms=NOW,
    )
    return lpb.SignedRecord(record=record.SerializeToString())


def admit(
    leases: EntryLeases,
    *,
    prompt: int = 10,
    max_tokens: int | None = 100,
    classes: frozenset[TierClass] = frozenset({MESH}),
    version: UserVersion = V1,
    home: str = HOME,
    now_ms: int = NOW,
) -> Leased | AskHome:
    return leases.admit(
        user="u",
        version=version,
        home=home,
        classes=classes,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        now_ms=now_ms,
    )


def grant(
    leases: EntryLeases,
    tokens: int,
    *,
    classes: frozenset[TierClass] = frozenset({MESH}),
    version: UserVersion = V1,
    home: str = HOME,
    now_ms: int = NOW,
) -> list[LeaseEnded | LeaseLapsed]:
    return leases.granted(
        user="u",
        version=version,
        home=home,
        classes=classes,
        tokens=tokens,
        asked_at_ms=now_ms,
        now_ms=now_ms,
    )


def leased(decision: Leased | AskHome) -> Leased:
    assert isinstance(decision, Leased), decision
    return decision


def free(leases: EntryLeases) -> int:
    return sum(view.free for view in leases.view() if view.ended is None)


# --- each transition ----------------------------------------------------------------------


def test_without_a_lease_the_home_is_asked_for_one() -> None:
    assert admit(EntryLeases()) == AskHome(LEASE_TOKENS, 0, None)


def test_a_granted_lease_admits_without_asking() -> None:
    leases = EntryLeases()
    assert grant(leases, 1000) == []
    got = leased(admit(leases, prompt=10, max_tokens=100))
    assert (got.tokens, got.max_tokens) == (110, 100)
    assert free(leases) == 890
    # Without max_tokens: what the lease has left, at most the default (as the home would).
    open_ended = leased(admit(leases, prompt=10, max_tokens=None))
    assert (open_ended.tokens, open_ended.max_tokens) == (890, 880)
    big = EntryLeases()
    grant(big, 10 * DEFAULT_MAX_TOKENS)
    assert leased(admit(big, prompt=10, max_tokens=None)).max_tokens == DEFAULT_MAX_TOKENS


def test_a_lease_too_small_is_given_back_with_the_asking() -> None:
    leases = EntryLeases()
    grant(leases, 100)
    assert admit(leases, prompt=10, max_tokens=100) == AskHome(LEASE_TOKENS, 100, None)
    assert free(leases) == 0
    assert [v.ended for v in leases.view()] == [None]  # still the lease the home grows


def test_a_lease_is_for_the_classes_it_was_granted_for() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    both = frozenset({MESH, CLOUD})
    assert admit(leases, classes=both) == AskHome(LEASE_TOKENS, 1000, None)
    [ended] = grant(leases, 500, classes=both)
    assert ended == LeaseEnded("u", HOME, EndReason.REPLACED, 0)
    assert leased(admit(leases, classes=both)).tokens == 110


def test_a_lease_is_valid_for_a_while_after_the_home_last_confirmed_it() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    later = NOW + LEASE_VALID_MS
    assert admit(leases, now_ms=later - 1) != admit(leases, now_ms=later)
    assert free(leases) == 0  # given back with the asking


def test_a_lease_ends_when_its_user_changes_and_what_it_had_goes_back() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    running = leased(admit(leases))
    decision = admit(leases, version=V2)
    assert decision == AskHome(LEASE_TOKENS, 0, LeaseEnded("u", HOME, EndReason.USER_CHANGED, 890))
    [report] = leases.reports_to_send(NOW)
    assert (report.returned, report.consumed, report.final) == (890, 0, True)
    leases.reported(report)
    # The answer still running settles against its own lease: the unused part goes back too.
    leases.settle(lease_no=running.lease_no, taken=110, records=[signed(30)], now_ms=NOW)
    [report] = leases.reports_to_send(NOW)
    assert (report.returned, report.consumed, len(report.records)) == (80, 30, 1)
    leases.reported(report)
    assert leases.view() == []
    assert not leases.outstanding()


def test_a_settled_answer_puts_back_what_it_did_not_use_and_reports_the_rest() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    got = leased(admit(leases))
    leases.settle(lease_no=got.lease_no, taken=got.tokens, records=[signed(40)], now_ms=NOW)
    assert free(leases) == 1000 - 40
    [report] = leases.reports_to_send(NOW)
    assert (report.consumed, report.returned, report.final) == (40, 0, False)
    assert leases.reports_to_send(NOW) == []  # one at a time per lease
    leases.reported(report)
    assert leases.reports_to_send(NOW) == []
    assert not leases.outstanding()


def test_a_failover_overrun_shrinks_the_lease_only_by_what_the_answer_took() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    got = leased(admit(leases))
    leases.settle(lease_no=got.lease_no, taken=110, records=[signed(150)], now_ms=NOW)
    [report] = leases.reports_to_send(NOW)
    assert report.consumed == 110  # the 40 over count from the records, at the home
    assert free(leases) == 890


def test_a_failed_report_is_sent_again_later() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    got = leased(admit(leases))
    leases.settle(lease_no=got.lease_no, taken=110, records=[signed(40)], now_ms=NOW)
    [report] = leases.reports_to_send(NOW)
    leases.report_failed(report, NOW)
    assert leases.reports_to_send(NOW + RETRY_MS - 1) == []
    [again] = leases.reports_to_send(NOW + RETRY_MS)
    assert (again.consumed, again.records) == (report.consumed, report.records)
    leases.reported(report)  # a stale outcome changes nothing
    assert leases.outstanding()


def test_many_records_go_in_several_reports_the_consumed_tokens_with_the_last() -> None:
    leases = EntryLeases(max_report_records=2)
    grant(leases, 1000)
    got = leased(admit(leases))
    records = [signed(10, seq=i) for i in range(5)]
    leases.settle(lease_no=got.lease_no, taken=110, records=records, now_ms=NOW)
    sent: list[Report] = []
    while reports := leases.reports_to_send(NOW):
        [report] = reports
        sent.append(report)
        leases.reported(report)
    assert [len(r.records) for r in sent] == [2, 2, 1]
    assert [r.consumed for r in sent] == [0, 0, 50]


def test_an_idle_lease_ends_but_not_while_an_answer_runs() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    got = leased(admit(leases))
    assert leases.tick(NOW + 10 * LEASE_IDLE_MS) == []
    later = NOW + 10 * LEASE_IDLE_MS
    leases.settle(lease_no=got.lease_no, taken=110, records=[], now_ms=later)
    assert leases.tick(later + LEASE_IDLE_MS) == []
    [ended] = leases.tick(later + LEASE_IDLE_MS + 1)
    assert ended == LeaseEnded("u", HOME, EndReason.IDLE, 1000)
    [report] = leases.reports_to_send(later)
    assert (report.returned, report.final) == (1000, True)


def test_a_lease_the_home_may_no_longer_hold_is_forgotten_not_reported() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    got = leased(admit(leases))
    leases.settle(lease_no=got.lease_no, taken=110, records=[signed(40)], now_ms=NOW)
    [report] = leases.reports_to_send(NOW)
    leases.report_failed(report, NOW)
    lapse_at = NOW + HOLD_TTL_MS - CALL_MARGIN_MS
    [again] = leases.reports_to_send(lapse_at - 1)
    leases.report_failed(again, lapse_at - 1)
    assert leases.reports_to_send(lapse_at) == []
    assert leases.tick(lapse_at) == [LeaseLapsed("u", HOME, 1000, 1)]  # all it held
    assert leases.view() == []
    assert admit(leases, now_ms=lapse_at) == AskHome(LEASE_TOKENS, 0, None)


def test_a_confirmation_keeps_every_lease_of_the_same_hold() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    running = leased(admit(leases))
    admit(leases, version=V2)  # ends the first lease; its answer still runs
    later = NOW + 20 * 60 * 1000
    grant(leases, 500, version=V2, now_ms=later)  # the same hold at the home
    assert {v.held_until_ms for v in leases.view()} == {later + HOLD_TTL_MS}
    leases.settle(lease_no=running.lease_no, taken=110, records=[], now_ms=later + 1)
    events = leases.tick(NOW + HOLD_TTL_MS)  # not lapsed: the home holds it still
    assert not [e for e in events if isinstance(e, LeaseLapsed)]
    reports = leases.reports_to_send(NOW + HOLD_TTL_MS)
    assert sorted(r.returned for r in reports) == [500, 890 + 110]


def test_closing_ends_every_lease_and_waits_for_the_home_to_be_told() -> None:
    leases = EntryLeases()
    grant(leases, 1000)
    [ended] = leases.close()
    assert ended.reason is EndReason.CLOSED
    assert leases.outstanding()
    [report] = leases.reports_to_send(NOW)
    leases.reported(report)
    assert not leases.outstanding()


def test_the_home_grows_a_lease_by_a_quarter_at_most_and_takes_back_what_it_is_told() -> None:
    book = QuotaBook()
    quota = parse_quota("mesh=100k/day")
    grown = grow_at_home(
        book,
        entry_node_id="E",
        user="u",
        quota=quota,
        classes=frozenset({MESH}),
        asked=10**6,
        now_ms=NOW,
    )
    assert grown == LEASE_TOKENS
    assert [h["id"] for h in book.holds()] == [lease_id("E", "u")]
    take_back_at_home(book, entry_node_id="E", user="u", tokens=96, now_ms=NOW)
    assert book.held("u", MESH) == LEASE_TOKENS - 96


@pytest.mark.parametrize("tokens", [0, 1, 999])
def test_settling_nothing_of_an_unknown_lease_changes_nothing(tokens: int) -> None:
    leases = EntryLeases()
    leases.settle(lease_no=42, taken=tokens, records=[], now_ms=NOW)
    assert leases.view() == []
