"""An entry node's leases: standing reservations at users' home nodes (DESIGN.md "Usage
ledger and quotas"; node/serving/quota_service.py makes the calls). Sans I/O: requests,
the home's grants, ended answers, how each call went and `now_ms` in; admissions, the
calls the home must get, and past-tense events out.

How it works. A user's quota is kept by one node, their home; asking it for every request
costs a round trip. So with a reservation the home may grant the asking entry node a
lease for that user: a standing reservation it holds like any other (named `lease_id`,
one per entry node and user), so the bound is the same.

- `admit`: a request of a user with a live lease here, for the same tier classes, still
  valid (LEASE_VALID_MS since the home last confirmed it), with room for its prompt bound
  plus max_tokens, is `Leased`: the tokens come off the lease, no call. Otherwise
  `AskHome`: reserve at the home, asking for LEASE_TOKENS more, and giving back what the
  lease has free (it would stand in the request's way). A lease whose user entry or
  home changed ends first.
- `granted`: the home's answer grew the lease (a new one when the live one is for other
  classes, another home or an older user entry; that one ends).
- `settle`: a leased answer ended. What it did not use goes back to its lease (or to the
  home, when the lease ended meanwhile); its records are to be reported, and the lease at
  the home shrinks by what they used of it, at most what the answer took (a failover's
  overrun counts once, from its records).
- `reports_to_send`: the Release calls due, at most one at a time per lease (two would
  report the same use twice); `reported` / `report_failed` say how each went, and a
  failed one is sent again RETRY_MS later.
- `tick`: a lease without answers in flight and unused for LEASE_IDLE_MS ends, so that
  it keeps no quota from the other boxes. An ended lease admits nothing more; what it
  holds goes back, reported until the home has it.

What the home holds under `lease_id(entry, user)` is the sum, over this node's leases for
that user there, of their free tokens, what their answers in flight took, and what is
used or given back but not told yet (plus what calls under way add or take). Every call
that shrinks it is sent once and only while the home surely still holds the lease: the
home keeps a hold HOLD_TTL_MS after the last call that touched it, so a lease not
confirmed for HOLD_TTL_MS - CALL_MARGIN_MS lapses here, and is forgotten, not reported.
Otherwise a late call could shrink a newer lease of the same name. A call that may or
may not have reached the home (a reserve whose answer was lost) can only leave the home
holding more, until its hold expires. A report the home applied but whose answer was lost
is sent again: it names its lease (`Report.key`: this node's `incarnation` and the
lease's number) and carries all the lease has given back so far (`Report.total`), so the home
shrinks the hold by what the total grew since the last report it applied for that lease
(`take_back_at_home`), never twice by the same tokens.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh.quota.rules import DEFAULT_MAX_TOKENS, HOLD_TTL_MS, Quota, QuotaBook, TierClass
from mesh.wire.v1 import ledger_pb2 as lpb

LEASE_TOKENS = 4096  # the most a lease grows by at once (and at most 1/4 of what is left)
LEASE_VALID_MS = 20 * 60 * 1000  # shorter than the home's hold TTL: never used past it
LEASE_IDLE_MS = 5000  # a lease unused this long goes back to the home
RETRY_MS = 1000  # how soon a call that failed is sent again
CALL_MARGIN_MS = 60 * 1000  # a call reaches the home within this (its deadline is 10 s)
MAX_REPORT_RECORDS = 64  # records per Release call
MAX_WIRE_TOKENS = 2**32 - 1  # Reserve.lease_returned is a uint32

UserVersion = tuple[int, str, bool]  # mesh.quota.users.UserRecord.version


def lease_id(entry_node_id: str, user: str) -> str:
    """The name the home holds an entry node's lease for a user under."""
    return f"lease/{entry_node_id}/{user}"


def record_tokens(signed: lpb.SignedRecord) -> int:
    record = lpb.UsageRecord.FromString(signed.record)
    return int(record.prompt_tokens + record.completion_tokens)


# --- the home's side ----------------------------------------------------------------------


def grow_at_home(
    book: QuotaBook,
    *,
    entry_node_id: str,
    user: str,
    quota: Quota,
    classes: frozenset[TierClass],
    asked: int,
    now_ms: int,
) -> int:
    """`AskHome.lease_tokens` at the home: grow the entry node's lease (by at most
    LEASE_TOKENS, and as `QuotaBook.lease` allows). Returns the tokens added."""
    return book.lease(
        lease_id=lease_id(entry_node_id, user),
        user=user,
        quota=quota,
        classes=classes,
        wanted=min(asked, LEASE_TOKENS),
        now_ms=now_ms,
    )


def take_back_at_home(
    book: QuotaBook,
    *,
    entry_node_id: str,
    user: str,
    tokens: int,
    now_ms: int,
    report: str = "",
    total: int = 0,
) -> None:
    """`AskHome.lease_returned` or a report's consumed and returned tokens, at the home
    (the consumed ones' records came with the report, or by sync before it). A report
    (`report`: `Report.key`, `total`: `Report.total`) shrinks the hold by what its lease's
    total grew since the last report applied for it: sent again, it takes nothing twice."""
    name = lease_id(entry_node_id, user)
    if report:
        tokens = book.told(name, report, total=total, tokens=tokens, now_ms=now_ms)
    book.shrink(name, tokens, now_ms)


# --- the entry node's side: values in and out ----------------------------------------------


class EndReason(enum.StrEnum):
    IDLE = "idle"
    USER_CHANGED = "the user's entry changed"
    REPLACED = "replaced by a lease for other classes"
    CLOSED = "this node is closing"


@dataclass(frozen=True, slots=True)
class Leased:
    """Admitted from a lease, without a call: `tokens` came off it; the request may
    generate at most `max_tokens`. Settle it with `settle(lease_no, tokens, ...)`."""

    lease_no: int
    tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class AskHome:
    """Not admitted here: reserve at the home, asking it to grow the lease by
    `lease_tokens` and giving `lease_returned` back first."""

    lease_tokens: int
    lease_returned: int = 0
    ended: LeaseEnded | None = None  # the user's lease, which ended on the way


@dataclass(frozen=True, slots=True)
class Report:
    """A Release call to `home` about the lease: its records, the tokens they used of it
    (`consumed`, sent with the last of them) and the tokens given back."""

    report_no: int
    lease_no: int
    home: str
    user: str
    records: tuple[lpb.SignedRecord, ...]
    consumed: int
    returned: int
    final: bool  # the lease ended: nobody else will tell the home
    sent_at_ms: int
    key: str = ""  # the lease's name for the home: "INCARNATION/LEASE_NO"
    total: int = 0  # consumed + returned of every report of the lease so far, this one's too


@dataclass(frozen=True, slots=True)
class LeaseEnded:
    user: str
    home: str
    reason: EndReason
    returned: int  # its free tokens, given back


@dataclass(frozen=True, slots=True)
class LeaseLapsed:
    """The home may no longer hold a lease (no call about it went through for
    HOLD_TTL_MS): forgotten, `tokens` and all (free, taken by answers in flight, used or
    given back but not told); its `records` not reported reach the home by ledger sync."""

    user: str
    home: str
    tokens: int
    records: int


LeaseEvent = LeaseEnded | LeaseLapsed


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A lease as it stands (for status pages and tests)."""

    lease_no: int
    user: str
    home: str
    classes: frozenset[TierClass]
    free: int
    in_flight: int
    taken: int  # by its answers in flight
    consumed: int  # used, not told yet
    returned: int  # given back, not told yet
    records: int  # not reported yet
    valid_until_ms: int
    held_until_ms: int  # the home holds it until at least then
    ended: EndReason | None
    key: str = ""  # as its reports name it to the home (`Report.key`)
    told: int = 0  # what the home said it applied of its reports (`Report.total`)


@dataclass(kw_only=True, slots=True)
class _Lease:
    number: int
    user: str
    home: str
    classes: frozenset[TierClass]
    version: UserVersion
    confirmed_at_ms: int  # when the call the home last answered about it was sent
    idle_since_ms: int
    free: int = 0
    in_flight: int = 0
    taken: int = 0
    records: list[lpb.SignedRecord] = field(default_factory=list)
    consumed: int = 0
    returned: int = 0
    told: int = 0  # consumed + returned the home has said it applied (`Report.total`)
    ended: EndReason | None = None
    reporting: Report | None = None
    retry_at_ms: int = 0

    @property
    def valid_until_ms(self) -> int:
        return self.confirmed_at_ms + LEASE_VALID_MS

    @property
    def held_until_ms(self) -> int:
        return self.confirmed_at_ms + HOLD_TTL_MS

    def untold(self) -> bool:
        return bool(self.records or self.consumed or self.returned)

    def done(self) -> bool:
        """Ended, and nothing left to tell or wait for."""
        return (
            self.ended is not None
            and not self.in_flight
            and not self.untold()
            and self.reporting is None
        )

    def lapsed(self, now_ms: int) -> bool:
        """Too late to tell the home anything that shrinks it."""
        return now_ms + CALL_MARGIN_MS >= self.held_until_ms


class EntryLeases:
    """This entry node's leases at its users' homes, one live lease per user (see the
    module docstring). `incarnation`: a number this run of the node is known by, new at
    every start (its leases' numbers start again at 1). `max_report_records` is
    MAX_REPORT_RECORDS but in tests."""

    def __init__(
        self, *, incarnation: int = 0, max_report_records: int = MAX_REPORT_RECORDS
    ) -> None:
        self._incarnation = incarnation
        self._max_records = max_report_records
        self._live: dict[str, _Lease] = {}  # by user
        self._all: dict[int, _Lease] = {}  # by number: live, and ended ones not done
        self._numbers = itertools.count(1)
        self._events: list[LeaseEvent] = []  # lapses seen between two ticks

    # --- admitting ------------------------------------------------------------------------

    def admit(
        self,
        *,
        user: str,
        version: UserVersion,
        home: str,
        classes: frozenset[TierClass],
        prompt_tokens: int,
        max_tokens: int | None,
        now_ms: int,
    ) -> Leased | AskHome:
        """A request of `user` (whose quota `home` keeps, limited in some of `classes`):
        admitted from the lease, or what to ask the home."""
        self._expire(now_ms)
        lease = self._live.get(user)
        ended = None
        if lease is not None and (lease.version != version or lease.home != home):
            ended = self._end(lease, EndReason.USER_CHANGED)  # their quota may have changed
            lease = None
        if lease is not None and lease.classes == classes and now_ms < lease.valid_until_ms:
            if max_tokens is not None:
                generate = max_tokens
            else:
                generate = min(DEFAULT_MAX_TOKENS, lease.free - prompt_tokens)
            need = prompt_tokens + generate
            if generate >= 1 and need <= lease.free:
                lease.free -= need
                lease.in_flight += 1
                lease.taken += need
                return Leased(lease.number, need, generate)
        returned = 0
        if lease is not None and lease.free:
            # Too little left (or not for these classes): give it back with the asking,
            # so that this node's own lease does not stand in the request's way.
            returned = min(lease.free, MAX_WIRE_TOKENS)
            lease.free -= returned
        return AskHome(LEASE_TOKENS, returned, ended)

    def granted(
        self,
        *,
        user: str,
        version: UserVersion,
        home: str,
        classes: frozenset[TierClass],
        tokens: int,
        asked_at_ms: int,
        now_ms: int,
    ) -> list[LeaseEvent]:
        """The home grew this node's lease for `user` by `tokens` (> 0), for a reserve
        sent at `asked_at_ms` that opened `classes`."""
        self._expire(now_ms)
        events: list[LeaseEvent] = []
        if tokens <= 0:
            return events
        lease = self._live.get(user)
        if lease is not None and (
            lease.classes != classes or lease.home != home or lease.version != version
        ):
            events.append(self._end(lease, EndReason.REPLACED))
            lease = None
        if lease is None:
            number = next(self._numbers)
            lease = _Lease(
                number=number,
                user=user,
                home=home,
                classes=classes,
                version=version,
                confirmed_at_ms=asked_at_ms,
                idle_since_ms=now_ms,
            )
            self._live[user] = self._all[number] = lease
        lease.free += tokens
        self._confirm(home, user, asked_at_ms)
        return events

    def settle(
        self, *, lease_no: int, taken: int, records: Sequence[lpb.SignedRecord], now_ms: int
    ) -> None:
        """A request admitted from lease `lease_no` (`Leased`) ended with these records."""
        self._expire(now_ms)
        lease = self._all.get(lease_no)
        if lease is None:
            return  # lapsed meanwhile: its hold at the home expired; the records sync
        used = sum(record_tokens(r) for r in records)
        unused = max(taken - used, 0)
        lease.in_flight -= 1
        lease.taken -= taken
        if lease.ended is None:
            lease.free += unused
        else:
            lease.returned += unused
        lease.consumed += taken - unused
        lease.records += records
        lease.idle_since_ms = now_ms
        self._forget_if_done(lease)

    # --- telling the home ----------------------------------------------------------------

    def reports_to_send(self, now_ms: int) -> list[Report]:
        """The Release calls to make now; each must come back through `reported` or
        `report_failed`."""
        self._expire(now_ms)
        reports: list[Report] = []
        for lease in self._all.values():
            if lease.reporting is not None or not lease.untold() or now_ms < lease.retry_at_ms:
                continue
            records = tuple(lease.records[: self._max_records])
            consumed = lease.consumed if len(records) == len(lease.records) else 0
            report = Report(
                report_no=next(self._numbers),
                lease_no=lease.number,
                home=lease.home,
                user=lease.user,
                records=records,
                consumed=consumed,
                returned=lease.returned,
                final=lease.ended is not None,
                sent_at_ms=now_ms,
                key=f"{self._incarnation}/{lease.number}",
                total=lease.told + consumed + lease.returned,
            )
            lease.reporting = report
            reports.append(report)
        return reports

    def reported(self, report: Report) -> None:
        """The home has it."""
        lease = self._all.get(report.lease_no)
        if lease is None or lease.reporting is not report:
            return
        lease.reporting = None
        del lease.records[: len(report.records)]
        lease.consumed -= report.consumed
        lease.returned -= report.returned
        lease.told = report.total
        self._confirm(lease.home, lease.user, report.sent_at_ms)
        self._forget_if_done(lease)

    def report_failed(self, report: Report, now_ms: int) -> None:
        """The home could not be told (nothing of it reached the home): again later."""
        self._expire(now_ms)
        lease = self._all.get(report.lease_no)
        if lease is None or lease.reporting is not report:
            return
        lease.reporting = None
        lease.retry_at_ms = now_ms + RETRY_MS

    # --- time ----------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[LeaseEvent]:
        """End the leases idle for LEASE_IDLE_MS; forget those the home no longer holds."""
        self._expire(now_ms)
        events, self._events = self._events, []
        for lease in list(self._live.values()):
            if not lease.in_flight and now_ms - lease.idle_since_ms > LEASE_IDLE_MS:
                events.append(self._end(lease, EndReason.IDLE))
        return events

    def close(self) -> list[LeaseEvent]:
        """End every lease (the node is stopping): what they hold goes back."""
        return [self._end(lease, EndReason.CLOSED) for lease in list(self._live.values())]

    # --- looking ---------------------------------------------------------------------------

    def outstanding(self) -> bool:
        """Some lease has answers in flight, or something the home has not been told."""
        return any(
            lease.in_flight or lease.untold() or lease.reporting is not None
            for lease in self._all.values()
        )

    def view(self) -> list[LeaseView]:
        return [
            LeaseView(
                lease_no=lease.number,
                user=lease.user,
                home=lease.home,
                classes=lease.classes,
                free=lease.free,
                in_flight=lease.in_flight,
                taken=lease.taken,
                consumed=lease.consumed,
                returned=lease.returned,
                records=len(lease.records),
                valid_until_ms=lease.valid_until_ms if lease.ended is None else 0,
                held_until_ms=lease.held_until_ms,
                ended=lease.ended,
                key=f"{self._incarnation}/{lease.number}",
                told=lease.told,
            )
            for lease in self._all.values()
        ]

    # --- inside ----------------------------------------------------------------------------

    def _end(self, lease: _Lease, reason: EndReason) -> LeaseEnded:
        del self._live[lease.user]
        lease.ended = reason
        returned, lease.free = lease.free, 0
        lease.returned += returned
        self._forget_if_done(lease)
        return LeaseEnded(lease.user, lease.home, reason, returned)

    def _expire(self, now_ms: int) -> None:
        """Forget the leases the home may no longer hold (see `_Lease.lapsed`): nothing
        about them may shrink its hold any more. Answers of theirs still in flight settle
        into nothing; their records reach the home by ledger sync."""
        for lease in [x for x in self._all.values() if x.lapsed(now_ms)]:
            del self._all[lease.number]
            if self._live.get(lease.user) is lease:
                del self._live[lease.user]
            tokens = lease.free + lease.taken + lease.consumed + lease.returned
            if tokens or lease.records:
                self._events.append(LeaseLapsed(lease.user, lease.home, tokens, len(lease.records)))

    def _confirm(self, home: str, user: str, at_ms: int) -> None:
        """The home answered a call sent at `at_ms` that touched its hold for `user`'s
        leases here (one hold for all of them): it holds them HOLD_TTL_MS from then."""
        for lease in self._same_hold(home, user):
            lease.confirmed_at_ms = max(lease.confirmed_at_ms, at_ms)

    def _same_hold(self, home: str, user: str) -> Iterable[_Lease]:
        return (x for x in self._all.values() if x.home == home and x.user == user)

    def _forget_if_done(self, lease: _Lease) -> None:
        if lease.done():
            del self._all[lease.number]
