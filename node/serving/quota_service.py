"""Quotas at run time (the rules are `mesh.quota.rules`'s; this is who holds what, and where).

Every user's quota is kept by one node, the user's home (where they were added), so
concurrent requests entering at any box, office or relay are all counted in one place:

- `admit` (the entry node, before scheduling): for a user with a limited quota, reserve
  the most the request can use at the home node: in process when that is this node,
  otherwise by a sealed "quota" call (direct or through the relay). The admission caps
  max_tokens where the grant says and closes the tier classes the quota rules out. When
  the home cannot be reached the request is refused (503): a quota nobody can check
  is not spent.
- `settle` (the entry node, when the answer ends in any way): release the reservation,
  handing the home the answer's signed records, which it verifies and keeps, so they
  count at once (ledger sync brings them anyway; a record is counted once, by node and
  sequence). Idempotent by request ID.
- Leases: with a reservation, the home may grant the entry node a standing one for that
  user (at most LEASE_TOKENS and a quarter of what is left). The entry node then admits
  the user's requests from it without a round trip, puts back what each did not use,
  reports their records as they come (the lease shrinks by what they count), and hands
  the lease back when idle for LEASE_IDLE_S or when the user's entry changes. A lease is
  held at the home like any reservation, so the bound is the same. The lease state
  machine is `mesh.quota.leases` (pure); this class makes the calls it asks for.
- `serve_call` (the home node): the other side of all of it.

Restarts: the home keeps its reservations and leases in `quota-holds.json` (written,
without fsync, after every change: a crash of the node loses nothing, a power cut at
most the last changes) and takes them back at start, so a restarted home admits nothing
that the reservations it held before would not have let through. An entry node gives a
lease back (and releases a reservation) until the home says it has: a home that cannot
be reached is asked again every RETRY_S for as long as the reservation would be held.

Cloud overflow nodes hold the mesh to its cloud plan (`cloud_plan` in their config)
from their own ledger: `plan_reserve` before serving, `plan_release` after, RESOURCE_
EXHAUSTED (429 at the entry node) when the plan is used up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh.clock import SYSTEM, Clock
from mesh.errors import (
    ConfigError,
    InvalidRequest,
    MeshError,
    PermissionDenied,
    RemoteProtocolError,
    Unauthenticated,
    Unavailable,
)
from mesh.inference import InferenceRequest, Route
from mesh.ledger.sync import check_batch
from mesh.quota.leases import (
    LEASE_IDLE_MS,
    MAX_REPORT_RECORDS,
    RETRY_MS,
    AskHome,
    EntryLeases,
    LeaseEnded,
    LeaseEvent,
    LeaseLapsed,
    Report,
    grow_at_home,
    take_back_at_home,
)
from mesh.quota.rules import (
    HOLD_TTL_MS,
    MESH_PLAN,
    UNLIMITED,
    Grant,
    Quota,
    QuotaBook,
    TierClass,
    prompt_bound,
)
from mesh.routing.scheduler import Privacy
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.files import read_owner_only
from node.store.ledger_store import LedgerStore
from node.store.users_admin import UsersAdmin
from node.transport.directory import PeerDirectory

logger = logging.getLogger(__name__)

MAX_RELEASE_RECORDS = MAX_REPORT_RECORDS
LEASE_IDLE_S = LEASE_IDLE_MS / 1000  # a lease unused this long goes back to the home
RETRY_S = RETRY_MS / 1000  # how often a home that could not be told is told again
TEND_S = 1.0  # how often the leases are looked after (idle ones, reports due)


def classes_for(privacy: Privacy) -> list[TierClass]:
    """The tier classes a request may use, nearest first."""
    if privacy is Privacy.ANY:
        return [TierClass.MESH, TierClass.CLOUD]
    return [TierClass.MESH]


def closed_routes(grant: Grant, wanted: list[TierClass]) -> dict[Route, str]:
    """The routes a grant rules out, each with the quota's reason."""
    closed: dict[Route, str] = {}
    shut = [tier_class for tier_class in wanted if tier_class not in grant.classes]
    reasons = list(grant.refusals) + [""] * len(shut)
    for tier_class, why in zip(shut, reasons, strict=False):
        routes = (
            (Route.CLOUD,)
            if tier_class is TierClass.CLOUD
            else (Route.LOCAL, Route.LAN, Route.RELAY)
        )
        for route in routes:
            closed[route] = why or f"over quota on {tier_class} hardware"
    return closed


@dataclass(kw_only=True)
class Admission:
    """A request let in under its user's quota."""

    request: InferenceRequest  # max_tokens capped where the grant said
    closed: dict[Route, str] = field(default_factory=dict)
    home: str = ""  # where the reservation is held; "" when nothing is
    settled: bool = False
    leased: int = 0  # admitted here from this node's lease: the tokens taken from it
    lease_no: int = 0  # which lease (mesh.quota.leases.Leased)


MAX_REPORT_KEY = 64  # Release.lease_report: "INCARNATION/LEASE_NO"
_HOLDS_KEYS = frozenset({"user", "plan", "told"})  # quota-holds.json ("told" since protocol 4)
TELL_WAIT_S = 2.0  # the longest a reserve waits for the same user's releases (`_told`)


class QuotaService:
    def __init__(
        self,
        *,
        node_id: str,
        users: UsersAdmin,
        store: LedgerStore | None,
        links: PeerDirectory | None = None,
        cloud_plan: Quota = UNLIMITED,
        clock: Clock = SYSTEM,
        holds_file: Path | None = None,
    ) -> None:
        self._node_id = node_id
        self._users = users
        self._store = store
        self._links = links
        self._clock = clock
        self.book = QuotaBook()
        self.cloud_plan = cloud_plan
        self.plan_book = QuotaBook()
        self._settling: set[asyncio.Task[None]] = set()
        self._telling: dict[str, set[asyncio.Future[None]]] = {}  # by user: releases, reports
        self._leases = EntryLeases(incarnation=secrets.randbits(62))  # this node's, at other homes
        self._upkeep: asyncio.Task[None] | None = None
        self._holds_file = holds_file
        self._kept: list[object] = []  # what the holds file says now

    def _now(self) -> int:
        return self._clock.now_ms()

    def _load_holds(self) -> None:
        """The reservations this node held before it stopped (or crashed)."""
        if self._holds_file is None:
            return
        try:
            data = read_owner_only(
                self._holds_file, what="quota reservations", max_bytes=64 << 20, error=ConfigError
            )
            if data is None:
                return
            body = json.loads(data.decode("utf-8"))
            if not isinstance(body, dict) or not {"user", "plan"} <= set(body) <= _HOLDS_KEYS:
                raise ValueError("not an object with user and plan reservations")
            restored = self.book.restore(body["user"], self._now())
            restored += self.plan_book.restore(body["plan"], self._now())
            self.book.restore_told(body.get("told", []), self._now())
        except (ValueError, RecursionError) as exc:
            # Kept for whoever looks; starting without them can only let a user spend what
            # was reserved before the crash a second time, so say so loudly.
            aside = self._holds_file.with_name(f"{self._holds_file.name}.bad-{self._now()}")
            self._holds_file.replace(aside)
            logger.error(
                "the quota reservations in %s are unreadable (%s); kept as %s, starting "
                "without them: requests in flight at other boxes may pass their quota once",
                self._holds_file,
                exc,
                aside,
            )
            return
        if restored:
            logger.info("took back %d quota reservation(s) held before the restart", restored)
        self._persist()

    def _persist(self) -> None:
        """Keep the reservations on disk when they changed (see the module docstring)."""
        if self._holds_file is None:
            return
        user, plan, told = self.book.holds(), self.plan_book.holds(), self.book.told_rows()
        holds: list[object] = [*user, *plan, *told]
        if holds == self._kept:
            return
        body = {"user": user, "plan": plan, "told": told}
        tmp = self._holds_file.with_name(f".{self._holds_file.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(body, separators=(",", ":")).encode())
            os.replace(tmp, self._holds_file)
        except OSError as exc:
            logger.error("cannot keep the quota reservations in %s: %s", self._holds_file, exc)
            return
        self._kept = holds

    async def start(self) -> None:
        """Take back the reservations held before a restart; count every record already
        held, then each new one as it is kept."""
        self._load_holds()
        self._upkeep = asyncio.create_task(self._tend_leases(), name="quota-leases")
        if self._store is None:
            return
        self.count(await self._store.usage_records())
        self._store.on_records = self.count

    def count(self, records: list[lpb.UsageRecord]) -> None:
        self.book.count(records)
        if not self.cloud_plan.unlimited:
            self.plan_book.count(
                [replace_user(r, MESH_PLAN) for r in records if r.node_id == self._node_id]
            )

    # --- the entry node -------------------------------------------------------------------

    async def admit(self, request: InferenceRequest, privacy: Privacy) -> Admission:
        record = self._users.get(request.user) if request.user else None
        if record is None or record.quota.unlimited:
            return Admission(request=request)  # the owner, or nothing to count
        wanted = classes_for(privacy)
        if not any(record.quota.limits_on(c) for c in wanted):
            return Admission(request=request)  # limited only where this request cannot go
        home = self._users.home_of(record)
        reserve = lpb.Reserve(
            request_id=request.request_id,
            user=request.user,
            classes=[c.value for c in wanted],
            prompt_tokens=min(prompt_bound(request), 2**32 - 1),
        )
        if request.sampling.max_tokens is not None:
            reserve.max_tokens = request.sampling.max_tokens
        if home == self._node_id:
            grant = self.reserve(reserve)
        else:
            asked_at = self._now()
            decision = self._leases.admit(
                user=request.user,
                version=record.version,
                home=home,
                classes=frozenset(wanted),
                prompt_tokens=reserve.prompt_tokens,
                max_tokens=request.sampling.max_tokens,
                now_ms=asked_at,
            )
            if not isinstance(decision, AskHome):
                return Admission(
                    request=_capped(request, decision.max_tokens),
                    home=home,
                    leased=decision.tokens,
                    lease_no=decision.lease_no,
                )
            if decision.ended is not None:
                self._lease_events([decision.ended])
            reserve.lease_tokens = decision.lease_tokens
            reserve.lease_returned = decision.lease_returned
            await self._told(request.user)
            reply = await self._call(home, lpb.QuotaCall(reserve=reserve), request.user)
            grant = Grant(
                request.request_id,
                frozenset(TierClass(c) for c in reply.classes if c in set(TierClass)),
                reply.max_tokens if reply.HasField("max_tokens") else None,
                tuple(reply.refusals),
            )
            if reply.lease_tokens:
                events = self._leases.granted(
                    user=request.user,
                    version=record.version,
                    home=home,
                    classes=grant.classes,
                    tokens=reply.lease_tokens,
                    asked_at_ms=asked_at,
                    now_ms=self._now(),
                )
                self._lease_events(events)
        capped = request
        if grant.max_tokens is not None:
            capped = _capped(request, grant.max_tokens)
        return Admission(request=capped, closed=closed_routes(grant, wanted), home=home)

    # --- leases: the calls `mesh.quota.leases` asks for ------------------------------------

    def _lease_events(self, events: list[LeaseEvent]) -> None:
        """Say what happened to leases, and send the reports now due."""
        for event in events:
            if isinstance(event, LeaseEnded):
                logger.debug(
                    "the lease of user %s at %s ended (%s): %d tokens go back",
                    event.user,
                    event.home[:7],
                    event.reason,
                    event.returned,
                )
            elif isinstance(event, LeaseLapsed):
                logger.warning(
                    "the home %s of user %s did not answer about a lease of theirs for too "
                    "long: forgotten here (%d tokens, which it no longer holds), %d record(s) "
                    "reach it by ledger sync",
                    event.home[:7],
                    event.user,
                    event.tokens,
                    event.records,
                )
        for report in self._leases.reports_to_send(self._now()):
            self._background(self._report(report), "quota-lease-report", user=report.user)

    async def _report(self, report: Report) -> None:
        """Tell the home what was used under a lease (with the records) and what is given
        back; the lease shrinks there by as much."""
        release = lpb.Release(
            records=report.records,
            lease_user=report.user,
            lease_consumed=report.consumed,
            lease_returned=report.returned,
            lease_report=report.key,
            lease_total=report.total,
        )
        try:
            await self._call(report.home, lpb.QuotaCall(release=release), report.user)
        except MeshError as exc:
            self._leases.report_failed(report, self._now())
            if report.final:
                logger.info(
                    "the home %s of user %s cannot be told the lease ended (%s); trying again",
                    report.home[:7],
                    report.user,
                    exc.message,
                )
            else:
                logger.warning("could not report lease use to %s: %s", report.home[:7], exc)
            return
        self._leases.reported(report)
        self._lease_events([])  # the rest, if there was more than one call's worth

    async def _tend_leases(self) -> None:
        """Every second: give back leases idle for a while (so they do not keep a quota
        from the other boxes), and send what is due."""
        while True:
            await asyncio.sleep(TEND_S)
            self._lease_events(self._leases.tick(self._now()))

    def settle_soon(self, admission: Admission, records: list[lpb.SignedRecord]) -> None:
        """`settle`, without holding up the answer it follows (a remote home is told
        while the response goes out)."""
        if not self._settle_here(admission, records):
            user = admission.request.user
            first_try = asyncio.get_running_loop().create_future()
            work = self.settle(admission, records, first_try)
            self._background(work, "quota-release", user=user, first_try=first_try)

    def _settle_here(self, admission: Admission, records: list[lpb.SignedRecord]) -> bool:
        """Settle what needs no call to another node; False when the home must be told."""
        if not admission.home or admission.settled:
            return True
        if admission.leased:
            admission.settled = True
            self._leases.settle(
                lease_no=admission.lease_no,
                taken=admission.leased,
                records=records,
                now_ms=self._now(),
            )
            self._lease_events([])
            return True
        if admission.home == self._node_id:
            admission.settled = True
            self.book.release(admission.request.request_id)
            self._persist()
            return True
        return False

    def _background(
        self,
        work: Coroutine[Any, Any, None],
        name: str,
        *,
        user: str = "",
        first_try: asyncio.Future[None] | None = None,
    ) -> None:
        """Quota business that must not hold anything up; `aclose` waits for it. A release
        or report about `user` is also awaited by the next reserve of theirs (`_told`):
        its first try (`first_try`, resolved by the work), or all of it."""
        task = asyncio.create_task(work, name=name)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        if user:
            awaited: asyncio.Future[None] = task if first_try is None else first_try
            telling = self._telling.setdefault(user, set())
            telling.add(awaited)

            def done(_: object) -> None:
                telling.discard(awaited)
                if not telling and self._telling.get(user) is telling:
                    del self._telling[user]

            awaited.add_done_callback(done)
            if first_try is not None:
                task.add_done_callback(lambda _: _resolve(first_try))

    async def _told(self, user: str) -> None:
        """Let this node's releases and lease reports about `user` reach the home before a
        reserve of theirs does. A client that sends its next request the moment an answer
        ends would otherwise find the home still holding the last request's reservation
        (or a lease's used tokens) beside its records: refused while there is room. Waits
        at most TELL_WAIT_S: a home that cannot be told will not answer the reserve either."""
        deadline = asyncio.get_running_loop().time() + TELL_WAIT_S
        while (telling := self._telling.get(user)) is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(set(telling), timeout=left)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Give leases back and let releases under way reach their home nodes."""
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep
            self._upkeep = None
        self._lease_events(self._leases.close())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._drain()
        for task in set(self._settling):  # a home still unreachable: its holds expire there
            task.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def _drain(self) -> None:
        """Until every release and lease report is through (each failed one sent again
        RETRY_S later)."""
        while self._settling or self._leases.outstanding():
            if self._settling:
                await asyncio.wait(
                    set(self._settling), timeout=RETRY_S, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(RETRY_S)
            self._lease_events(self._leases.tick(self._now()))

    async def settle(
        self,
        admission: Admission,
        records: list[lpb.SignedRecord],
        first_try: asyncio.Future[None] | None = None,
    ) -> None:
        """Release the reservation (the answer's records count from now on). Never
        raises: a home that cannot be told is told again until it is (or until the
        reservation would have expired there); the records reach it by ledger sync too.
        `first_try` resolves when the first call ends: a reserve of the same user waits
        for that, not for the tries again (the home did not answer it the first time)."""
        if self._settle_here(admission, records):
            return
        admission.settled = True
        request_id = admission.request.request_id
        release = lpb.Release(request_id=request_id, records=records[:MAX_RELEASE_RECORDS])
        # Until the home has it: as long as the home holds the reservation (so that a
        # home paused or restarting meanwhile does not keep it for nothing).
        give_up_at = self._now() + HOLD_TTL_MS
        while True:
            try:
                await self._call(admission.home, lpb.QuotaCall(release=release), "")
                return
            except MeshError as exc:
                if first_try is not None:
                    _resolve(first_try)
                if self._now() >= give_up_at:
                    logger.warning(
                        "could not release request %s at %s: %s (it expires there)",
                        request_id[:12],
                        admission.home[:7],
                        exc.message,
                    )
                    return
                logger.debug(
                    "release of %s at %s: %s; again",
                    request_id[:12],
                    admission.home[:7],
                    exc.message,
                )
            await asyncio.sleep(RETRY_S)

    async def _call(self, home: str, call: lpb.QuotaCall, user: str) -> lpb.QuotaGrant:
        link = self._links.client(home) if self._links is not None else None
        try:
            if link is None:
                raise Unavailable("no connection")
            client, card = link
            return await client.quota(card, call)
        except (Unavailable, RemoteProtocolError, Unauthenticated) as exc:
            whose = f"the quota of user {user!r}" if user else "this quota"
            raise Unavailable(
                f"{whose} is kept by node {home[:7]}, which cannot be reached right now "
                f"({exc.message}); try again when it is back"
            ) from exc

    # --- the home node --------------------------------------------------------------------

    def reserve(self, reserve: lpb.Reserve) -> Grant:
        record = self._users.get(reserve.user)
        if record is None:
            raise PermissionDenied(f"no user named {reserve.user[:80]!r} in this mesh")
        try:
            classes = [TierClass(c) for c in reserve.classes]
        except ValueError as exc:
            raise InvalidRequest(f"unknown tier class in {list(reserve.classes)[:4]}") from exc
        if not classes or len(classes) > len(TierClass) or len(reserve.request_id) > 64:
            raise InvalidRequest("a reservation names one or two classes and a request ID")
        grant = self.book.reserve(
            request_id=reserve.request_id,
            user=reserve.user,
            quota=record.quota,
            classes=classes,
            prompt_tokens=reserve.prompt_tokens,
            max_tokens=reserve.max_tokens if reserve.HasField("max_tokens") else None,
            now_ms=self._now(),
        )
        self._persist()
        return grant

    async def serve_call(self, call: lpb.QuotaCall, sender: str = "") -> lpb.QuotaGrant:
        """A member's reservation or release for a user whose quota this node keeps."""
        try:
            return await self._serve_call(call, sender)
        finally:
            self._persist()

    async def _serve_call(self, call: lpb.QuotaCall, sender: str) -> lpb.QuotaGrant:
        which = call.WhichOneof("call")
        if which == "reserve":
            if call.reserve.lease_returned and sender:
                take_back_at_home(
                    self.book,
                    entry_node_id=sender,
                    user=call.reserve.user,
                    tokens=call.reserve.lease_returned,
                    now_ms=self._now(),
                )
            grant = self.reserve(call.reserve)
            reply = lpb.QuotaGrant(
                classes=[c.value for c in grant.classes], refusals=list(grant.refusals)
            )
            if grant.max_tokens is not None:
                reply.max_tokens = grant.max_tokens
            record = self._users.get(call.reserve.user)
            if call.reserve.lease_tokens and sender and record is not None:
                reply.lease_tokens = grow_at_home(
                    self.book,
                    entry_node_id=sender,
                    user=call.reserve.user,
                    quota=record.quota,
                    classes=grant.classes,
                    asked=call.reserve.lease_tokens,
                    now_ms=self._now(),
                )
            return reply
        if which == "release":
            release = call.release
            if len(release.records) > MAX_RELEASE_RECORDS:
                raise InvalidRequest(f"a release carries at most {MAX_RELEASE_RECORDS} records")
            if release.records and self._store is not None:
                received = check_batch([(r.record, r.signature) for r in release.records], [])
                await self._store.ingest(received)
            if release.request_id:
                self.book.release(release.request_id)
            if release.lease_user and sender:
                # The consumed tokens' records count now (they came with this call, or by
                # sync before it): the lease holds them no longer.
                if len(release.lease_report) > MAX_REPORT_KEY:
                    raise InvalidRequest(
                        f"a lease report is named in at most {MAX_REPORT_KEY} characters"
                    )
                take_back_at_home(
                    self.book,
                    entry_node_id=sender,
                    user=release.lease_user,
                    tokens=release.lease_consumed + release.lease_returned,
                    now_ms=self._now(),
                    report=release.lease_report,
                    total=release.lease_total,
                )
            return lpb.QuotaGrant()
        raise InvalidRequest("a quota call is a reserve or a release")

    # --- a cloud node's plan --------------------------------------------------------------

    def plan_reserve(self, request: InferenceRequest) -> InferenceRequest | None:
        """Hold the mesh's cloud plan for a request this overflow node serves: the request
        to serve (max_tokens capped where the plan says), or None when there is no plan.
        Release it with `plan_release`."""
        if self.cloud_plan.unlimited:
            return None
        grant = self.plan_book.reserve(
            request_id=request.request_id,
            user=MESH_PLAN,
            quota=self.cloud_plan,
            classes=[TierClass.CLOUD],
            prompt_tokens=prompt_bound(request),
            max_tokens=request.sampling.max_tokens,
            now_ms=self._now(),
        )
        self._persist()
        if grant.max_tokens is None or grant.max_tokens == request.sampling.max_tokens:
            return request
        return replace(request, sampling=replace(request.sampling, max_tokens=grant.max_tokens))

    def plan_release(self, request_id: str) -> None:
        self.plan_book.release(request_id)
        self._persist()


def _capped(request: InferenceRequest, max_tokens: int) -> InferenceRequest:
    """The request, generating at most `max_tokens`."""
    if max_tokens == request.sampling.max_tokens:
        return request
    return replace(request, sampling=replace(request.sampling, max_tokens=max_tokens))


def replace_user(record: lpb.UsageRecord, user: str) -> lpb.UsageRecord:
    copy = lpb.UsageRecord()
    copy.CopyFrom(record)
    copy.user = user
    return copy


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
