"""Quotas per user, per period and per tier class, counted from the ledger (DESIGN.md
"Usage ledger and quotas"). Sans I/O: records, request sizes and `now_ms` in, grants and
refusals out.

A quota is written `CLASS=LIMIT[/PERIOD],...`, for example `mesh=unlimited,cloud=1M/month`:

- CLASS is `mesh` (this mesh's own hardware: local, LAN and relay routes) or `cloud`
  (cloud overflow nodes);
- LIMIT is `unlimited` or a token count with an optional k, M or G (1000s): `250k`, `1M`;
- PERIOD is `day` or `month` (UTC calendar periods; `month` when left out).

A class may carry one limit per period (`cloud=50k/day,cloud=1M/month`); a class not
named is unlimited. Tokens are prompt plus completion tokens, as the ledger records them.

How a request is held to it (`QuotaBook`): before it is scheduled, the node keeping the
user's quota reserves the most the request can use (the prompt's upper bound, see
`prompt_bound`, plus max_tokens) in every class it may run in; a class whose limits
cannot take that is closed to the request, and a request with no open class is refused
with `QuotaExceeded`, naming the quota and when it resets. When the answer ends, its
ledger records count and the reservation is released (idempotently, by request ID).
So the used tokens plus the reservations never pass a limit: the overrun is zero,
except what a mid-answer failover adds (its continuation is a new prompt: at most the
prompt plus the text already delivered, once per failover).
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mesh.errors import InvalidRequest, QuotaExceeded
from mesh.inference import InferenceRequest
from mesh.ledger.records import period_bounds
from mesh.wire.v1 import ledger_pb2 as lpb

MAX_LIMITS = 8
MAX_SPEC_CHARS = 256
# Without max_tokens, a request of a user with a limited quota may generate at most this
# much (and never more than the quota has left): a reservation needs a size.
DEFAULT_MAX_TOKENS = 4096
# Chat templates wrap each message in a few special tokens; a generous allowance.
TEMPLATE_TOKENS_PER_MESSAGE = 32
HOLD_TTL_MS = 30 * 60 * 1000  # a reservation whose entry node vanished expires
MESH_PLAN = "*"  # the "user" of a cloud node's plan: every user of the mesh together
LEASE_SHARE = 4  # a lease takes at most 1/4 of what a quota has left

PLAN_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_LIMIT = re.compile(r"(?P<n>\d{1,12})(?P<unit>[kKmMgG]?)")
_UNITS = {"": 1, "k": 1000, "m": 1_000_000, "g": 1_000_000_000}


class TierClass(enum.StrEnum):
    MESH = "mesh"  # the mesh's own hardware: local, lan, relay
    CLOUD = "cloud"  # cloud overflow nodes

    @classmethod
    def of_route(cls, route: str) -> TierClass:
        return cls.CLOUD if route == "cloud" else cls.MESH


class Period(enum.StrEnum):
    DAY = "day"
    MONTH = "month"

    def bounds(self, now_ms: int) -> tuple[int, int]:
        return period_bounds(self.value, now_ms=now_ms)


_PERIODS = tuple(Period)  # iterating the enum class itself is slow; counting does it per record


@dataclass(frozen=True, slots=True)
class Limit:
    tier_class: TierClass
    tokens: int
    period: Period

    @property
    def spec(self) -> str:
        return f"{self.tier_class}={_amount(self.tokens)}/{self.period}"


@dataclass(frozen=True, slots=True)
class Quota:
    limits: tuple[Limit, ...] = ()
    # The plan the limits came from (`mesh.quota.plans`), "" for a hand-written quota. It
    # travels in the spec (`plan=starter,cloud=1M/month`), so every box of the mesh knows
    # a user's plan from their signed entry.
    plan: str = ""

    @property
    def unlimited(self) -> bool:
        return not self.limits

    @property
    def spec(self) -> str:
        """Canonical text; `unlimited` when nothing is limited (and no plan is named)."""
        parts = ([f"plan={self.plan}"] if self.plan else []) + [x.spec for x in self.limits]
        return ",".join(parts) or "unlimited"

    def limits_on(self, tier_class: TierClass) -> tuple[Limit, ...]:
        return tuple(limit for limit in self.limits if limit.tier_class is tier_class)


UNLIMITED = Quota()


def _amount(tokens: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 1000)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def parse_quota(spec: str) -> Quota:
    """`mesh=unlimited,cloud=1M/month` -> Quota; InvalidRequest naming what is wrong."""

    def bad(problem: str) -> InvalidRequest:
        return InvalidRequest(
            f"not a quota: {spec[:80]!r} ({problem}); write CLASS=LIMIT[/PERIOD],... with "
            "CLASS mesh or cloud, LIMIT unlimited or tokens (250k, 1M), PERIOD day or month, "
            "e.g. mesh=unlimited,cloud=1M/month",
            param="quota",
        )

    if len(spec) > MAX_SPEC_CHARS:
        raise bad(f"longer than {MAX_SPEC_CHARS} characters")
    text = spec.strip()
    if text in ("", "unlimited"):
        return UNLIMITED
    limits: list[Limit] = []
    unlimited: set[TierClass] = set()
    plan = ""
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq:
            raise bad(f"{part.strip()!r} has no '='")
        if name.strip() == "plan":
            if plan or PLAN_NAME.fullmatch(value.strip()) is None:
                raise bad("plan= names one plan: lowercase letters, digits and -")
            plan = value.strip()
            continue
        try:
            tier_class = TierClass(name.strip())
        except ValueError:
            raise bad(f"unknown class {name.strip()!r}") from None
        amount, slash, period_text = value.strip().partition("/")
        amount = amount.strip()
        if amount == "unlimited":
            if slash:
                raise bad("unlimited takes no period")
            unlimited.add(tier_class)
            continue
        match = _LIMIT.fullmatch(amount)
        if match is None:
            raise bad(f"{amount!r} is not a token count")
        tokens = int(match["n"]) * _UNITS[match["unit"].lower()]
        try:
            period = Period(period_text.strip()) if slash else Period.MONTH
        except ValueError:
            raise bad(f"unknown period {period_text.strip()!r}") from None
        if any(x.tier_class is tier_class and x.period is period for x in limits):
            raise bad(f"{tier_class} has two {period} limits")
        limits.append(Limit(tier_class, tokens, period))
    if len(limits) > MAX_LIMITS:
        raise bad(f"more than {MAX_LIMITS} limits")
    both = unlimited & {limit.tier_class for limit in limits}
    if both:
        raise bad(f"{sorted(both)[0]} is both unlimited and limited")
    order = {TierClass.MESH: 0, TierClass.CLOUD: 1}
    limits.sort(key=lambda x: (order[x.tier_class], x.period != Period.DAY))
    return Quota(tuple(limits), plan)


def prompt_bound(request: InferenceRequest) -> int:
    """At least the prompt tokens any tokenizer makes of this request: a token is at
    least one byte of text (byte-level BPE), and the template adds a few per message."""
    if request.messages is not None:
        text_bytes = sum(len(m.content.encode("utf-8")) for m in request.messages)
        messages = len(request.messages) + 1  # and the assistant's turn
    elif request.inputs is not None:  # embeddings: each input on its own, special tokens too
        text_bytes = sum(len(text.encode("utf-8")) for text in request.inputs)
        messages = len(request.inputs)
    else:
        text_bytes = len((request.prompt or "").encode("utf-8"))
        messages = 1
    text_bytes += len(request.continuation.encode("utf-8"))
    # What a chat template renders besides the contents: tool definitions, tool calls and
    # results, participants' names, a response format's schema (for the guided decoding
    # that may put it in the prompt).
    extra = [
        part
        for m in request.messages or ()
        for part in (m.name, m.tool_call_id, *(c.id + c.name + c.arguments for c in m.tool_calls))
    ]
    extra += [t.name + t.description + t.parameters for t in request.tools]
    if request.response_format is not None:
        fmt = request.response_format
        extra.append(fmt.name + fmt.description + fmt.schema)
    text_bytes += sum(len(part.encode("utf-8")) for part in extra)
    messages += len(request.tools)
    return text_bytes + TEMPLATE_TOKENS_PER_MESSAGE * messages


@dataclass(frozen=True, slots=True)
class Grant:
    """What a reservation opened: the classes the request may run in, and the most it
    may generate (the cap the entry node puts on max_tokens)."""

    request_id: str
    classes: frozenset[TierClass]
    max_tokens: int | None
    refusals: tuple[str, ...] = ()  # why the other classes are closed


@dataclass(slots=True)
class _Hold:
    user: str
    classes: frozenset[TierClass]
    tokens: int
    expires_at_ms: int


@dataclass(kw_only=True)
class QuotaBook:
    """Used tokens per user, class and period (from ledger records), and the
    reservations of requests in flight."""

    _used: dict[tuple[str, TierClass, Period, int], int] = field(
        default_factory=lambda: defaultdict(int)
    )
    _holds: dict[str, _Hold] = field(default_factory=dict)
    _held: dict[tuple[str, TierClass], int] = field(default_factory=lambda: defaultdict(int))
    # Per lease and report key (mesh.quota.leases): the total given back the home applied,
    # and until when it is kept (as long as a hold: no report comes later than that).
    _told: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    # --- what was used ------------------------------------------------------------------

    def count(self, records: Iterable[lpb.UsageRecord]) -> None:
        """Add records (each exactly once: the ledger store calls this for new ones)."""
        for record in records:
            if record.kind not in (lpb.RECORD_KIND_COMPLETE, lpb.RECORD_KIND_PARTIAL):
                continue
            tokens = record.prompt_tokens + record.completion_tokens
            tier_class = TierClass.of_route(record.route)
            for period in _PERIODS:
                start, _ = period.bounds(record.ended_at_unix_ms)
                self._used[(record.user, tier_class, period, start)] += tokens

    def used(self, user: str, tier_class: TierClass, period: Period, now_ms: int) -> int:
        start, _ = period.bounds(now_ms)
        return self._used.get((user, tier_class, period, start), 0)

    def held(self, user: str, tier_class: TierClass) -> int:
        return self._held.get((user, tier_class), 0)

    # --- reservations -------------------------------------------------------------------

    def reserve(
        self,
        *,
        request_id: str,
        user: str,
        quota: Quota,
        classes: Sequence[TierClass],
        prompt_tokens: int,
        max_tokens: int | None,
        now_ms: int,
    ) -> Grant:
        """Reserve prompt_tokens + max_tokens in every class of `classes` (in the order
        the request would use them) that can take it; QuotaExceeded when none can.
        Reserving the same request again returns the same grant."""
        held = self._holds.get(request_id)
        if held is not None:
            return Grant(request_id, held.classes, max(held.tokens - prompt_tokens, 0))
        self._expire(now_ms)
        wanted = max_tokens
        if wanted is None and any(quota.limits_on(c) for c in classes):
            wanted = DEFAULT_MAX_TOKENS
        open_classes: list[TierClass] = []
        refusals: list[str] = []
        first_refusal: QuotaExceeded | None = None
        cap: int | None = None
        for tier_class in classes:
            room = self._room(user, quota, tier_class, now_ms)
            if room is None:  # unlimited
                open_classes.append(tier_class)
                continue
            limit, left = room
            needed = prompt_tokens + (max_tokens if max_tokens is not None else 1)
            if left < needed:
                error = _exceeded(user, limit, left, needed, now_ms)
                refusals.append(error.message)
                first_refusal = first_refusal or error
                continue
            open_classes.append(tier_class)
            fits = left - prompt_tokens
            cap = fits if cap is None else min(cap, fits)
        if not open_classes:
            assert first_refusal is not None
            raise first_refusal
        granted_max = wanted if cap is None or wanted is None else min(wanted, cap)
        tokens = prompt_tokens + (granted_max or 0)
        hold = _Hold(user, frozenset(open_classes), tokens, now_ms + HOLD_TTL_MS)
        if any(quota.limits_on(c) for c in open_classes):
            self._holds[request_id] = hold
            for tier_class in hold.classes:
                self._held[(user, tier_class)] += tokens
        return Grant(request_id, hold.classes, granted_max, tuple(refusals))

    def lease(
        self,
        *,
        lease_id: str,
        user: str,
        quota: Quota,
        classes: frozenset[TierClass],
        wanted: int,
        now_ms: int,
    ) -> int:
        """Grow a standing reservation (an entry node's lease) by up to `wanted` tokens,
        and by at most a quarter of what its tightest class has left, so that leases
        never take a whole quota from the other entry nodes. Returns the tokens added."""
        limited = frozenset(c for c in classes if quota.limits_on(c))
        if not limited or wanted <= 0:
            return 0
        self._expire(now_ms)
        rooms = [self._room(user, quota, c, now_ms) for c in limited]
        left = min(room[1] for room in rooms if room is not None)
        added = min(wanted, max(left, 0) // LEASE_SHARE)
        hold = self._holds.get(lease_id)
        if hold is not None and hold.classes != limited:
            return 0  # a lease is for one set of classes; the entry node asks per request
        if hold is None:
            if added <= 0:
                return 0
            hold = _Hold(user, limited, 0, 0)
            self._holds[lease_id] = hold
        hold.tokens += added
        hold.expires_at_ms = now_ms + HOLD_TTL_MS
        for tier_class in limited:
            self._held[(user, tier_class)] += added
        return added

    def shrink(self, lease_id: str, tokens: int, now_ms: int) -> None:
        """Take tokens off a lease: consumed ones (their records count now) or returned."""
        hold = self._holds.get(lease_id)
        if hold is None:
            return
        cut = min(max(tokens, 0), hold.tokens)
        hold.tokens -= cut
        hold.expires_at_ms = now_ms + HOLD_TTL_MS
        for tier_class in hold.classes:
            key = (hold.user, tier_class)
            self._held[key] -= cut
            if self._held[key] <= 0:
                del self._held[key]
        if hold.tokens == 0:
            del self._holds[lease_id]

    def told(self, lease_id: str, report: str, *, total: int, tokens: int, now_ms: int) -> int:
        """What a lease report shrinks its hold by: the growth of its lease's `total` since
        the last report applied for `report` (a lease), or `tokens` when none was (its
        first report, or one kept no longer); 0 for a report applied before."""
        for key in [k for k, (_, until) in self._told.items() if until <= now_ms]:
            del self._told[key]
        known = self._told.get((lease_id, report))
        if known is None and len(self._told) >= MAX_HOLDS:
            return tokens  # full (never in practice): as without report keys
        cut = tokens if known is None else max(total - known[0], 0)
        self._told[(lease_id, report)] = (
            max(total, known[0] if known else 0),
            now_ms + HOLD_TTL_MS,
        )
        return cut

    def told_rows(self) -> list[list[object]]:
        """The report totals kept (to keep on disk beside `holds`)."""
        return [
            [lease, report, total, until]
            for (lease, report), (total, until) in sorted(self._told.items())
        ]

    def restore_told(self, rows: object, now_ms: int) -> None:
        """Take back `told_rows`; ValueError naming the problem when they are not that."""
        if not isinstance(rows, list) or len(rows) > MAX_HOLDS:
            raise ValueError(f"not a list of at most {MAX_HOLDS} report totals")
        for i, row in enumerate(rows):
            if (
                not isinstance(row, list)
                or len(row) != 4
                or not all(isinstance(x, str) and len(x) <= 256 for x in row[:2])
                or not all(type(x) is int and x >= 0 for x in row[2:])
            ):
                raise ValueError(f"report total {i} is not [lease, report, total, until]")
            lease, report, total, until = row
            if until > now_ms:
                self._told[(lease, report)] = (total, until)

    def release(self, request_id: str) -> bool:
        """Drop a reservation (the answer's records count from now on). Idempotent."""
        hold = self._holds.pop(request_id, None)
        if hold is None:
            return False
        for tier_class in hold.classes:
            key = (hold.user, tier_class)
            self._held[key] -= hold.tokens
            if self._held[key] <= 0:
                del self._held[key]
        return True

    # --- the reservations, kept across a restart ----------------------------------------

    def holds(self) -> list[dict[str, object]]:
        """Every reservation and lease held now, as plain values (to keep on disk)."""
        return [
            {
                "id": hold_id,
                "user": hold.user,
                "classes": sorted(c.value for c in hold.classes),
                "tokens": hold.tokens,
                "expires_at_ms": hold.expires_at_ms,
            }
            for hold_id, hold in sorted(self._holds.items())
        ]

    def restore(self, rows: object, now_ms: int) -> int:
        """Take back reservations kept before a restart (`holds`); the expired ones are
        dropped. ValueError naming the problem when `rows` is not what `holds` made."""
        if not isinstance(rows, list) or len(rows) > MAX_HOLDS:
            raise ValueError(f"not a list of at most {MAX_HOLDS} reservations")
        restored = 0
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or set(row) != _HOLD_FIELDS:
                raise ValueError(f"reservation {i} does not have the fields {sorted(_HOLD_FIELDS)}")
            hold_id, user, classes = row["id"], row["user"], row["classes"]
            tokens, expires = row["tokens"], row["expires_at_ms"]
            if not isinstance(hold_id, str) or not isinstance(user, str) or len(hold_id) > 256:
                raise ValueError(f"reservation {i} has a bad id or user")
            if not isinstance(classes, list) or not all(c in _CLASS_VALUES for c in classes):
                raise ValueError(f"reservation {i} has unknown tier classes")
            for value in (tokens, expires):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"reservation {i} has a bad number")
            if expires <= now_ms or tokens == 0 or hold_id in self._holds:
                continue
            hold = _Hold(user, frozenset(TierClass(c) for c in classes), tokens, expires)
            self._holds[hold_id] = hold
            for tier_class in hold.classes:
                self._held[(user, tier_class)] += tokens
            restored += 1
        return restored

    def _expire(self, now_ms: int) -> None:
        for request_id in [r for r, h in self._holds.items() if h.expires_at_ms <= now_ms]:
            self.release(request_id)

    def _room(
        self, user: str, quota: Quota, tier_class: TierClass, now_ms: int
    ) -> tuple[Limit, int] | None:
        """The tightest limit on this class and what it has left; None if unlimited."""
        tightest: tuple[Limit, int] | None = None
        for limit in quota.limits_on(tier_class):
            used = self.used(user, tier_class, limit.period, now_ms) + self.held(user, tier_class)
            left = limit.tokens - used
            if tightest is None or left < tightest[1]:
                tightest = (limit, left)
        return tightest

    def describe(self, user: str, quota: Quota, now_ms: int) -> list[dict[str, object]]:
        """Each limit with what is used, held and left, and when it resets."""
        out: list[dict[str, object]] = []
        for limit in quota.limits:
            used = self.used(user, limit.tier_class, limit.period, now_ms)
            held = self.held(user, limit.tier_class)
            out.append(
                {
                    "limit": limit.spec,
                    "used": used,
                    "reserved": held,
                    "left": max(limit.tokens - used - held, 0),
                    "resets_at": _iso(limit.period.bounds(now_ms)[1]),
                }
            )
        return out


MAX_HOLDS = 100_000
_HOLD_FIELDS = frozenset({"id", "user", "classes", "tokens", "expires_at_ms"})
_CLASS_VALUES = frozenset(c.value for c in TierClass)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _exceeded(user: str, limit: Limit, left: int, needed: int, now_ms: int) -> QuotaExceeded:
    resets = _iso(limit.period.bounds(now_ms)[1])
    who = (
        "this mesh's cloud plan is used up" if user == MESH_PLAN else f"user {user!r} is over quota"
    )
    return QuotaExceeded(
        f"{who}: {limit.spec} on {limit.tier_class} hardware, {max(left, 0):,} of "
        f"{limit.tokens:,} tokens left this {limit.period}, this request needs up to "
        f"{needed:,}; it resets at {resets}",
        param="quota",
        resets_at=resets,
    )
