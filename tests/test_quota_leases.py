"""The entry node's lease state machine (mesh/quota/leases.py) without I/O: each
transition by example, then every interleaving of reserves, settles, lease grants,
reports, hand-backs, lost calls, user changes, crashes and the clock against the home's
QuotaBook (Hypothesis, stateful)."""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mesh.errors import QuotaExceeded
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
    UNLIMITED,
    Period,
    Quota,
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


def test_a_report_sent_again_after_its_answer_was_lost_shrinks_the_home_once() -> None:
    book, quota = QuotaBook(), parse_quota("mesh=100000/day")
    leases = EntryLeases(incarnation=7)
    tokens = grow_at_home(
        book,
        entry_node_id="E",
        user="u",
        quota=quota,
        classes=frozenset({MESH}),
        asked=LEASE_TOKENS,
        now_ms=NOW,
    )
    grant(leases, tokens)
    got = leased(admit(leases))
    leases.settle(lease_no=got.lease_no, taken=got.tokens, records=[signed(40)], now_ms=NOW)

    def at_home(report: Report) -> None:
        book.count([lpb.UsageRecord.FromString(r.record) for r in report.records])
        take_back_at_home(
            book,
            entry_node_id="E",
            user="u",
            tokens=report.consumed + report.returned,
            now_ms=NOW,
            report=report.key,
            total=report.total,
        )

    [report] = leases.reports_to_send(NOW)
    assert (report.key, report.total) == ("7/1", 40)
    at_home(report)  # applied; its answer is lost:
    leases.report_failed(report, NOW)
    [again] = leases.reports_to_send(NOW + RETRY_MS)
    assert (again.key, again.total, again.consumed) == ("7/1", 40, 40)
    at_home(again)
    leases.reported(again)
    assert book.held("u", MESH) == free(leases)  # what this node may still spend, held once
    # The next report counts from there: only what it adds shrinks the hold.
    more = leased(admit(leases))
    leases.settle(lease_no=more.lease_no, taken=more.tokens, records=[signed(30)], now_ms=NOW)
    [third] = leases.reports_to_send(NOW + RETRY_MS)
    assert third.total == 70
    at_home(third)
    leases.reported(third)
    assert book.held("u", MESH) == free(leases)


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


# --- every interleaving -------------------------------------------------------------------

ENTRIES = ("E1", "E2")
USERS = ("u", "v")
MAX_AGE_MS = 4 * 60 * 1000  # see LeaseWorld: how long anything stays under way


@dataclass
class Answer:
    entry: str  # an entry node, or HOME (reserved in process)
    user: str
    classes: frozenset[TierClass]
    bound: int  # the most it may use: what its reservation holds for it
    started_ms: int
    request_id: str = ""  # reserved at the home
    lease_no: int = 0  # admitted from a lease


@dataclass
class Call:
    """A call from an entry node to the home, not processed there yet."""

    entry: str
    sent_ms: int
    origin_ms: int = 0  # a release: when its answer ended (the release is sent until told)
    reserve: lpb.Reserve | None = None
    version: UserVersion = V1
    release: lpb.Release | None = None
    report: Report | None = None


@dataclass
class Reply:
    """The home processed `call`; the entry node has not heard back yet."""

    call: Call
    processed_ms: int
    granted: Answer | None = None  # for a reserve: the answer it lets in
    grant_classes: frozenset[TierClass] = frozenset()
    lease_tokens: int = 0


@dataclass
class Record:
    user: str
    tier_class: TierClass
    tokens: int
    ended_ms: int
    signed: lpb.SignedRecord = field(repr=False, default_factory=lpb.SignedRecord)


class LeaseWorld(RuleBasedStateMachine):
    """One home node (a QuotaBook, answering as QuotaService.serve_call does), two entry
    nodes (an EntryLeases each, calling as QuotaService does) and the home admitting its
    own requests, for two users with limited quotas, over one clock. Steps: requests
    (reserved at the home or admitted from a lease), answers ending having used any part
    of their reservation (never more: a failover's overrun is tested by example), calls
    and replies delivered in any order, lost or failed, ledger sync, ticks, time, user
    entries changing, entry nodes crashing.

    The model's delays: a call reaches the home within CALL_MARGIN_MS of being sent, or
    fails without reaching it (a reserve may also reach it and its answer be lost); an
    answer, a reply on its way back, a record the home has not counted and whatever an
    entry node has not told the home yet, are each settled within MAX_AGE_MS. (The clock
    jumps freely when nothing is under way: leases lapse, holds expire, days end.)

    Invariant, after every step, for each user, each limit `CLASS=N/PERIOD` of theirs, at
    the current time:

        spent + outstanding <= N

    spent: the tokens of every record the user's answers made (whether the home counted
    it yet or not) in CLASS and ended in the current PERIOD; outstanding: what can still
    be spent in CLASS without asking the home: the reservation of every answer under way
    that may run in CLASS, of every grant on its way back, the lease tokens on their way
    back, and the free tokens of every entry node's live, valid lease for CLASS. So no
    interleaving lets a user's records pass their quota.

    And, per entry node and user: the home's hold for their leases is at least what the
    leases have free, took for answers in flight and have yet to tell (give or take the
    calls under way), until the entry node lets them lapse; and every token an entry node
    gives back is in that hold, unexpired, when the call arrives.

    At the end, everything under way completes, the idle leases go back, and then the
    home holds nothing beyond what lost calls and crashes left it (each named), every
    record is counted once, and after HOLD_TTL_MS it holds nothing at all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.book = QuotaBook()
        self.quotas: dict[str, Quota] = {}
        self.versions = {u: V1 for u in USERS}
        self.answers: list[Answer] = []
        self.calls: list[Call] = []
        self.replies: list[Reply] = []
        self.records: dict[tuple[str, int], Record] = {}
        self.counted: set[tuple[str, int]] = set()
        self.leaked: dict[str, int] = {}  # by lease id: what the home may hold for nobody
        self.orphans: set[str] = set()  # reservations whose grant was lost on the way
        self.applied: dict[tuple[str, str], int] = {}  # lease reports' totals the home has
        self.busy_since: dict[str, int] = {}  # entry nodes with something untold
        self.numbers = itertools.count(1)
        self.entries = {
            e: EntryLeases(incarnation=next(self.numbers), max_report_records=2) for e in ENTRIES
        }
        self.ending = False

    # --- set-up ----------------------------------------------------------------------------

    @initialize(
        mesh_limits=st.lists(
            st.one_of(st.integers(200, 3000), st.integers(10_000, 100_000)), min_size=2, max_size=2
        ),
        cloud=st.lists(
            st.one_of(st.none(), st.tuples(st.integers(200, 30_000), st.sampled_from(Period))),
            min_size=2,
            max_size=2,
        ),
        monthly=st.lists(st.one_of(st.none(), st.integers(300, 60_000)), min_size=2, max_size=2),
    )
    def quotas_of(
        self,
        mesh_limits: list[int],
        cloud: list[tuple[int, Period] | None],
        monthly: list[int | None],
    ) -> None:
        for user, mesh, cloud_limit, month in zip(USERS, mesh_limits, cloud, monthly, strict=True):
            spec = f"mesh={mesh}/day"
            if month is not None:
                spec += f",mesh={month}/month"
            if cloud_limit is not None:
                spec += f",cloud={cloud_limit[0]}/{cloud_limit[1]}"
            self.quotas[user] = parse_quota(spec)

    # --- requests --------------------------------------------------------------------------

    @rule(
        entry=st.sampled_from((*ENTRIES, HOME)),
        user=st.sampled_from(USERS),
        anywhere=st.booleans(),
        prompt=st.integers(0, 400),
        max_tokens=st.one_of(st.none(), st.integers(0, 300), st.integers(0, 5000)),
    )
    def request(
        self, entry: str, user: str, anywhere: bool, prompt: int, max_tokens: int | None
    ) -> None:
        classes = [MESH, CLOUD] if anywhere else [MESH]
        request_id = f"r{next(self.numbers)}"
        if entry == HOME:
            try:
                grant = self.book.reserve(
                    request_id=request_id,
                    user=user,
                    quota=self.quotas[user],
                    classes=classes,
                    prompt_tokens=prompt,
                    max_tokens=max_tokens,
                    now_ms=self.now,
                )
            except QuotaExceeded:
                return
            assert grant.max_tokens is not None
            self.answers.append(
                Answer(HOME, user, grant.classes, prompt + grant.max_tokens, self.now, request_id)
            )
            return
        decision = self.entries[entry].admit(
            user=user,
            version=self.versions[user],
            home=HOME,
            classes=frozenset(classes),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            now_ms=self.now,
        )
        self.note("admitted from a lease" if isinstance(decision, Leased) else "asked the home")
        if isinstance(decision, Leased):
            self.answers.append(
                Answer(
                    entry,
                    user,
                    frozenset(classes),
                    decision.tokens,
                    self.now,
                    lease_no=decision.lease_no,
                )
            )
            return
        reserve = lpb.Reserve(
            request_id=request_id,
            user=user,
            classes=[c.value for c in classes],
            prompt_tokens=prompt,
            lease_tokens=decision.lease_tokens,
            lease_returned=decision.lease_returned,
        )
        if max_tokens is not None:
            reserve.max_tokens = max_tokens
        self.calls.append(Call(entry, self.now, reserve=reserve, version=self.versions[user]))
        self.flush(entry)

    @precondition(lambda self: self.answers)
    @rule(i=st.integers(0, 10**6), fraction=st.floats(0, 1), pick=st.integers(0, 7))
    def finish(self, i: int, fraction: float, pick: int) -> None:
        """An answer ends, having used any part of what it reserved, in one of its
        classes, in up to three records."""
        if not self.answers:
            return
        answer = self.answers.pop(i % len(self.answers))
        used = int(answer.bound * fraction)
        classes = sorted(answer.classes)
        tier_class = classes[pick % len(classes)]
        parts = pick % 3 + (used > 0)
        sizes = (
            [used // parts] * (parts - 1) + [used - used // parts * (parts - 1)] if parts else []
        )
        records = [self.make_record(answer.user, tier_class, n) for n in sizes]
        signed = [r.signed for r in records]
        if answer.entry == HOME:
            self.count(signed)  # in this node's own ledger as the answer ends
            self.book.release(answer.request_id)
        elif answer.lease_no:
            views = {v.lease_no: v for v in self.entries[answer.entry].view()}
            if answer.lease_no in views and views[answer.lease_no].ended is not None:
                self.note("an answer ended after its lease")
            self.entries[answer.entry].settle(
                lease_no=answer.lease_no, taken=answer.bound, records=signed, now_ms=self.now
            )
            self.flush(answer.entry)
        else:
            release = lpb.Release(request_id=answer.request_id, records=signed)
            self.calls.append(Call(answer.entry, self.now, self.now, release=release))

    @rule(
        entry=st.sampled_from(ENTRIES),
        user=st.sampled_from(USERS),
        prompt=st.integers(0, 100),
        max_tokens=st.one_of(st.none(), st.integers(1, 200)),
    )
    def small_request(self, entry: str, user: str, prompt: int, max_tokens: int | None) -> None:
        """The common case, more often: a small request at an entry node, on the mesh."""
        self.request(entry, user, False, prompt, max_tokens)

    @rule(user=st.sampled_from(USERS), rarely=st.integers(0, 3))
    def change_user(self, user: str, rarely: int) -> None:
        """Their entry changed (privacy, key): entry nodes see a new version."""
        if rarely != 2:  # (integers() favours its bounds)
            return
        self.versions[user] = (self.versions[user][0] + 1, "k", False)

    @precondition(lambda self: any(a.lease_no for a in self.answers))
    @rule(i=st.integers(0, 10**6), prompt=st.integers(0, 100))
    def user_changes_under_an_answer(self, i: int, prompt: int) -> None:
        """The user of an answer admitted from a lease changes, and asks again at the same
        entry node: the lease ends while the answer runs."""
        leased = [a for a in self.answers if a.lease_no]
        answer = leased[i % len(leased)]
        self.change_user(answer.user, 2)
        self.request(answer.entry, answer.user, False, prompt, None)

    # --- the network -----------------------------------------------------------------------

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 10**6))
    def deliver_call(self, i: int) -> None:
        if self.calls:
            self.process(self.calls.pop(i % len(self.calls)))

    @precondition(lambda self: self.calls)
    @rule(i=st.integers(0, 10**6))
    def fail_call(self, i: int) -> None:
        """A call that never reached the home (its sender sees an error)."""
        if not self.calls:
            return
        call = self.calls.pop(i % len(self.calls))
        if call.reserve is not None:
            if call.reserve.lease_returned:  # still held there, for nobody
                name = lease_id(call.entry, call.reserve.user)
                self.leaked[name] = self.leaked.get(name, 0) + call.reserve.lease_returned
        elif call.release is not None:  # released again a moment later
            self.calls.append(Call(call.entry, self.now, call.origin_ms, release=call.release))
        elif call.report is not None:
            self.entries[call.entry].report_failed(call.report, self.now)

    @precondition(lambda self: self.calls)
    @rule()
    def round_trip(self) -> None:
        """The oldest call goes through and its answer comes back at once (the usual)."""
        call = self.calls.pop(0)
        self.process(call)
        self.deliver_reply(len(self.replies) - 1)

    @precondition(lambda self: self.replies)
    @rule(i=st.integers(0, 10**6))
    def deliver_reply(self, i: int) -> None:
        if not self.replies:
            return
        reply = self.replies.pop(i % len(self.replies))
        call, entry = reply.call, reply.call.entry
        if call.reserve is not None:
            if reply.lease_tokens:
                self.note("a lease grew")
                self.entries[entry].granted(
                    user=call.reserve.user,
                    version=call.version,
                    home=HOME,
                    classes=reply.grant_classes,
                    tokens=reply.lease_tokens,
                    asked_at_ms=call.sent_ms,
                    now_ms=self.now,
                )
            if reply.granted is not None:
                reply.granted.started_ms = self.now
                self.answers.append(reply.granted)
        elif call.report is not None:
            self.note("a report went through")
            self.entries[entry].reported(call.report)
        self.flush(entry)

    @precondition(lambda self: any(r.call.reserve is not None for r in self.replies))
    @rule(i=st.integers(0, 10**6))
    def lose_reply(self, i: int) -> None:
        """A reserve the home granted, whose answer never came back: the entry node
        refuses the request; the home holds the reservation and the lease growth for
        nobody until they expire."""
        reserves = [r for r in self.replies if r.call.reserve is not None]
        if not reserves:
            return
        reply = reserves[i % len(reserves)]
        self.replies.remove(reply)
        assert reply.call.reserve is not None
        self.orphans.add(reply.call.reserve.request_id)
        name = lease_id(reply.call.entry, reply.call.reserve.user)
        self.leaked[name] = self.leaked.get(name, 0) + reply.lease_tokens

    @precondition(lambda self: any(r.call.report is not None for r in self.replies))
    @rule(i=st.integers(0, 10**6))
    def lose_report_reply(self, i: int) -> None:
        """A lease report the home applied, whose answer never came back: the entry node
        sees a failure and sends what it had to tell again (with whatever came since)."""
        reports = [r for r in self.replies if r.call.report is not None]
        if not reports:
            return
        reply = reports[i % len(reports)]
        self.replies.remove(reply)
        assert reply.call.report is not None
        self.note("a report's answer was lost")
        self.entries[reply.call.entry].report_failed(reply.call.report, self.now)
        self.flush(reply.call.entry)

    @precondition(lambda self: len(self.counted) < len(self.records))
    @rule(i=st.integers(0, 10**6))
    def sync(self, i: int) -> None:
        """Ledger sync brings the home a record it had not counted."""
        pending = sorted(set(self.records) - self.counted)
        if pending:
            self.count([self.records[pending[i % len(pending)]].signed])

    # --- time, and nodes going away --------------------------------------------------------

    @rule(entry=st.sampled_from(ENTRIES), rarely=st.integers(0, 3))
    def tick(self, entry: str, rarely: int = 0) -> None:
        if rarely:
            return
        for lapsed in self.entries[entry].tick(self.now):
            if isinstance(lapsed, LeaseLapsed):  # the home may hold it until it expires
                self.note("a lease lapsed")
                name = lease_id(entry, lapsed.user)
                self.leaked[name] = self.leaked.get(name, 0) + lapsed.tokens
        self.flush(entry)

    @rule(ms=st.integers(1, 300), far=st.integers(0, 9), jump=st.integers(1, 3 * 86_400_000))
    def advance(self, ms: int, far: int, jump: int) -> None:
        """Time passes: mostly a moment, now and then up to days (as far as what is under
        way lets it: see the class docstring)."""
        ms = jump if far == 7 else ms
        self.now += max(min(ms, self.latest_ms() - self.now), 0)

    @rule(
        jump=st.one_of(
            st.integers(60_000, 3 * 86_400_000),
            st.integers(LEASE_VALID_MS - 60_000, HOLD_TTL_MS + 60_000),  # about the deadlines
        )
    )
    def lull(self, jump: int) -> None:
        """Everything under way completes, then nothing happens for a while (no tick
        either: the idle leases are still there): leases lapse, holds expire, days end."""
        self.complete_everything()
        self.bookkeeping()
        self.advance(jump, 7, jump)

    @rule(entry=st.sampled_from(ENTRIES), rarely=st.integers(0, 31))
    def crash(self, entry: str, rarely: int) -> None:
        """The entry node stops without a word: what it had under way is lost (its records
        still reach the home, by sync); the home holds its leases and reservations until
        they expire."""
        if rarely != 13:
            return
        self.entries[entry] = EntryLeases(incarnation=next(self.numbers), max_report_records=2)
        self.busy_since.pop(entry, None)
        for name in [n for n in self.leaked if n.startswith(f"lease/{entry}/")]:
            del self.leaked[name]
        for hold in self.book.holds():  # (what its calls under way would have changed too)
            name = str(hold["id"])
            if name.startswith(f"lease/{entry}/"):
                self.leaked[name] = int(str(hold["tokens"]))
        for answer in [a for a in self.answers if a.entry == entry]:
            self.answers.remove(answer)
            self.orphans.add(answer.request_id)
        for call in [c for c in self.calls if c.entry == entry]:
            self.calls.remove(call)
            if call.release is not None:
                self.orphans.add(call.release.request_id)
        for reply in [r for r in self.replies if r.call.entry == entry]:
            self.replies.remove(reply)
            if reply.call.reserve is not None:
                self.orphans.add(reply.call.reserve.request_id)

    # --- the invariant ---------------------------------------------------------------------

    @invariant()
    def no_user_can_pass_a_limit(self) -> None:
        self.bookkeeping()
        for user, quota in self.quotas.items():
            for limit in quota.limits:
                start, end = limit.period.bounds(self.now)
                spent = sum(
                    r.tokens
                    for r in self.records.values()
                    if r.user == user
                    and r.tier_class is limit.tier_class
                    and start <= r.ended_ms < end
                )
                outstanding = self.outstanding(user, limit.tier_class)
                assert spent + outstanding <= limit.tokens, (
                    f"{user} {limit.spec}: spent {spent} + outstanding {outstanding}"
                )

    @invariant()
    def the_home_holds_what_each_entry_node_may_still_use(self) -> None:
        """Per entry node and user: the home's hold for their leases there is at least
        what those leases have free, took for answers in flight and have to tell, give
        or take the calls under way, until the entry node lets them lapse."""
        rows = {str(row["id"]): row for row in self.book.holds()}
        for entry, leases in self.entries.items():
            for view in leases.view():
                assert min(view.free, view.taken, view.consumed, view.returned) >= 0, view
                assert view.in_flight >= 0, view
            for user in USERS:
                mine = [v for v in leases.view() if v.user == user]
                if mine and all(v.held_until_ms - CALL_MARGIN_MS <= self.now for v in mine):
                    continue  # lapsed: forgotten at the entry node's next step
                claims = sum(v.free + v.taken + v.consumed + v.returned for v in mine)
                # Less what the home applied of their reports that this node has not
                # heard it did (an answer on its way back, or lost).
                claims -= sum(self.applied.get((entry, v.key), v.told) - v.told for v in mine)
                for call in self.calls:
                    if call.entry == entry and call.reserve and call.reserve.user == user:
                        claims += call.reserve.lease_returned
                for reply in self.replies:
                    if reply.call.entry != entry:
                        continue
                    if reply.call.reserve and reply.call.reserve.user == user:
                        claims += reply.lease_tokens
                row = rows.get(lease_id(entry, user))
                held = 0
                if row is not None and int(str(row["expires_at_ms"])) > self.now:
                    held = int(str(row["tokens"]))
                assert held >= claims, (entry, user, held, claims, mine)

    def bookkeeping(self) -> None:
        """The model's delays: who has had something untold since when."""
        for entry, leases in self.entries.items():
            if leases.outstanding():
                self.busy_since.setdefault(entry, self.now)
            else:
                self.busy_since.pop(entry, None)

    def outstanding(self, user: str, tier_class: TierClass) -> int:
        total = sum(a.bound for a in self.answers if a.user == user and tier_class in a.classes)
        for reply in self.replies:
            if reply.call.reserve is None or reply.call.reserve.user != user:
                continue
            if tier_class in reply.grant_classes:
                total += reply.lease_tokens
                total += reply.granted.bound if reply.granted is not None else 0
        for leases in self.entries.values():
            total += sum(
                max(view.free, 0)
                for view in leases.view()
                if view.user == user
                and view.ended is None
                and tier_class in view.classes
                and self.now < view.valid_until_ms
            )
        return total

    def teardown(self) -> None:
        self.ending = True
        if not self.quotas or sys.exc_info()[0] is not None:
            return  # (teardown also runs after a step failed: that failure is the one)
        self.complete_everything()
        self.now += LEASE_IDLE_MS + 1
        for entry in ENTRIES:  # the idle leases go back
            self.tick(entry)
        self.complete_everything()
        for entry, leases in self.entries.items():
            assert leases.view() == [], entry
            assert not leases.outstanding()
        for row in self.book.holds():
            name, tokens = str(row["id"]), int(str(row["tokens"]))
            if int(str(row["expires_at_ms"])) <= self.now:
                continue  # expired (dropped at the home's next reservation)
            if name.startswith("lease/"):
                assert tokens <= self.leaked.get(name, 0), (row, self.leaked)
            else:
                assert name in self.orphans, row
        for key in set(self.records) - self.counted:  # what crashed nodes made
            self.count([self.records[key].signed])
        for (user, tier_class), tokens in self.spent_by_period().items():
            for (period, at_ms), total in tokens.items():
                assert self.book.used(user, tier_class, period, at_ms) == total
        self.now += HOLD_TTL_MS
        self.book.reserve(  # drops what expired
            request_id="end",
            user="nobody",
            quota=UNLIMITED,
            classes=[MESH],
            prompt_tokens=0,
            max_tokens=0,
            now_ms=self.now,
        )
        assert self.book.holds() == []
        for user in USERS:
            for tier_class in TierClass:
                assert self.book.held(user, tier_class) == 0

    def spent_by_period(self) -> dict[tuple[str, TierClass], dict[tuple[Period, int], int]]:
        """Every record's tokens by user and class, by period (and a time in it)."""
        out: dict[tuple[str, TierClass], dict[tuple[Period, int], int]] = {}
        starts: dict[tuple[Period, int], int] = {}
        for record in self.records.values():
            by_period = out.setdefault((record.user, record.tier_class), {})
            for period in Period:
                start, _ = period.bounds(record.ended_ms)
                at = starts.setdefault((period, start), record.ended_ms)
                by_period[(period, at)] = by_period.get((period, at), 0) + record.tokens
        return out

    # --- the entry nodes' and the home's sides of the calls ---------------------------------

    def note(self, what: str) -> None:
        """For --hypothesis-show-statistics (not from teardown, which also runs after a
        failure)."""
        if not self.ending:
            event(what)

    def flush(self, entry: str) -> None:
        for report in self.entries[entry].reports_to_send(self.now):
            self.calls.append(Call(entry, self.now, report=report))

    def process(self, call: Call) -> None:
        """As QuotaService.serve_call does at the home."""
        reply = Reply(call, self.now)
        if call.reserve is not None:
            reserve = call.reserve
            if reserve.lease_returned:
                self.take_back(call.entry, reserve.user, reserve.lease_returned)
            try:
                grant = self.book.reserve(
                    request_id=reserve.request_id,
                    user=reserve.user,
                    quota=self.quotas[reserve.user],
                    classes=[TierClass(c) for c in reserve.classes],
                    prompt_tokens=reserve.prompt_tokens,
                    max_tokens=reserve.max_tokens if reserve.HasField("max_tokens") else None,
                    now_ms=self.now,
                )
            except QuotaExceeded:
                self.replies.append(reply)
                return
            assert grant.max_tokens is not None
            reply.grant_classes = grant.classes
            reply.granted = Answer(
                call.entry,
                reserve.user,
                grant.classes,
                reserve.prompt_tokens + grant.max_tokens,
                self.now,
                reserve.request_id,
            )
            if reserve.lease_tokens:
                reply.lease_tokens = grow_at_home(
                    self.book,
                    entry_node_id=call.entry,
                    user=reserve.user,
                    quota=self.quotas[reserve.user],
                    classes=grant.classes,
                    asked=reserve.lease_tokens,
                    now_ms=self.now,
                )
        elif call.release is not None:
            self.count(list(call.release.records))
            self.book.release(call.release.request_id)
        elif call.report is not None:
            report = call.report
            self.count(list(report.records))
            self.take_back(
                call.entry,
                report.user,
                report.consumed + report.returned,
                report=report.key,
                total=report.total,
            )
        self.replies.append(reply)

    def take_back(
        self, entry: str, user: str, tokens: int, *, report: str = "", total: int = 0
    ) -> None:
        """An entry node gives lease tokens back (used or not): they must be in the lease
        the home holds for it now. A shrink arriving after the hold expired could take them
        from a newer lease of the same name. A report sent again after the home applied it
        takes only what its lease's total grew since."""
        cut = tokens
        if report:
            applied = self.applied.get((entry, report))
            cut = tokens if applied is None else max(total - applied, 0)
            self.applied[(entry, report)] = max(total, applied or 0)
        if cut:
            [row] = [r for r in self.book.holds() if r["id"] == lease_id(entry, user)] or [None]
            assert row is not None, f"{entry} gives back {cut} of a lease the home dropped"
            assert int(str(row["expires_at_ms"])) > self.now, "given back after it expired"
            assert int(str(row["tokens"])) >= cut, (row, cut)
        take_back_at_home(
            self.book,
            entry_node_id=entry,
            user=user,
            tokens=tokens,
            now_ms=self.now,
            report=report,
            total=total,
        )

    def make_record(self, user: str, tier_class: TierClass, tokens: int) -> Record:
        seq = next(self.numbers)
        usage = lpb.UsageRecord(
            node_id="S",
            seq=seq,
            user=user,
            route="cloud" if tier_class is CLOUD else "lan",
            kind=lpb.RECORD_KIND_COMPLETE,
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            ended_at_unix_ms=self.now,
        )
        record = Record(
            user, tier_class, tokens, self.now, lpb.SignedRecord(record=usage.SerializeToString())
        )
        self.records[("S", seq)] = record
        return record

    def count(self, records: list[lpb.SignedRecord]) -> None:
        """The home keeps each record once (by node and sequence) and counts it."""
        for signed in records:
            usage = lpb.UsageRecord.FromString(signed.record)
            key = (usage.node_id, usage.seq)
            if key not in self.counted:
                self.counted.add(key)
                self.book.count([usage])

    def latest_ms(self) -> int:
        """How far the clock may go with what is under way (the model's delays)."""
        limits = [a.started_ms + MAX_AGE_MS for a in self.answers]
        limits += [c.sent_ms + CALL_MARGIN_MS for c in self.calls]
        limits += [c.origin_ms + MAX_AGE_MS for c in self.calls if c.release is not None]
        limits += [r.processed_ms + MAX_AGE_MS for r in self.replies]
        limits += [since + MAX_AGE_MS for since in self.busy_since.values()]
        limits += [self.records[k].ended_ms + MAX_AGE_MS for k in set(self.records) - self.counted]
        return min(limits, default=self.now + 10**12)

    def complete_everything(self) -> None:
        """Every answer ends using all it reserved; every call and reply goes through,
        and what failed before is sent again."""
        for _ in range(10_000):
            self.bookkeeping()
            if self.answers:
                self.finish(0, 1.0, 0)
            elif self.calls:
                self.process(self.calls.pop(0))
            elif self.replies:
                self.deliver_reply(0)
            elif any(leases.outstanding() for leases in self.entries.values()):
                self.now += RETRY_MS
                for entry in ENTRIES:
                    self.flush(entry)
            else:
                return
        raise AssertionError("never quiet")


TestLeaseWorld = LeaseWorld.TestCase
# 100 runs of 60 steps: seeded bugs (a lease handing back what it gave the home, a
# settle returning one token too many) are found at 100 runs of 50 steps; a third (the
# unused part of an ended lease's answer kept as free instead of given back) is found by
# test_a_lease_ends_when_its_user_changes_and_what_it_had_goes_back.
TestLeaseWorld.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("tokens", [0, 1, 999])
def test_settling_nothing_of_an_unknown_lease_changes_nothing(tokens: int) -> None:
    leases = EntryLeases()
    leases.settle(lease_no=42, taken=tokens, records=[], now_ms=NOW)
    assert leases.view() == []
