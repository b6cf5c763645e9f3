"""Quotas at run time without processes: an entry node's and a home node's QuotaService
wired by an in-memory transport, with one fake clock. Leases admit without a call, and
what the home holds for them always covers what the entry node may still spend: after a
failover's overrun, after the lease ended under an answer in flight, and when a lease
ends while a report of it is on the way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from mesh.errors import InvalidRequest, QuotaExceeded, Unavailable
from mesh.inference import InferenceRequest, Sampling
from mesh.ledger.records import ChainWriter, Usage
from mesh.ledger.sync import Received
from mesh.quota.rules import Quota, TierClass, parse_quota, prompt_bound
from mesh.quota.users import UserRecord
from mesh.routing.scheduler import Privacy
from mesh.trust.identity import Identity
from mesh.wire.v1 import ledger_pb2 as lpb
from node.serving.quota_service import Admission, QuotaService
from node.transport.directory import PeerHandle

HOME, ENTRY = "H" * 52, "E" * 52
MESH = TierClass.MESH
START_MS = 1_795_000_000_000
PROMPT = "x"  # a prompt bound of 1 + 2 * 32 tokens
BOUND = prompt_bound(InferenceRequest(model="m", prompt=PROMPT, sampling=Sampling()))


class FakeClock:
    def __init__(self) -> None:
        self.ms = START_MS

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.ms / 1000


@dataclass
class Users:
    """The part of UsersAdmin a QuotaService reads."""

    node_id: str
    records: dict[str, UserRecord] = field(default_factory=dict)

    def get(self, name: str) -> UserRecord | None:
        return self.records.get(name)

    def home_of(self, record: UserRecord) -> str:
        return record.home_node_id or self.node_id


class Store:
    """The part of LedgerStore a home's QuotaService uses: records kept once each."""

    def __init__(self) -> None:
        self.on_records: Callable[[list[lpb.UsageRecord]], None] = lambda records: None
        self._seen: set[tuple[str, int]] = set()

    async def usage_records(self) -> list[lpb.UsageRecord]:
        return []

    async def ingest(self, received: Received) -> None:
        new = [r for r in received.records if (r.node_id, r.seq) not in self._seen]
        self._seen.update((r.node_id, r.seq) for r in new)
        self.on_records([lpb.UsageRecord.FromString(r.record) for r in new])


class Net:
    """Calls between the services, in memory: a node can be down, and calls can be held
    at the door (`hold`) until `let_through`."""

    def __init__(self) -> None:
        self.services: dict[str, QuotaService] = {}
        self.down: set[str] = set()
        self.calls: list[lpb.QuotaCall] = []
        self.waiting = 0
        self._door = asyncio.Event()
        self._door.set()

    def hold(self) -> None:
        self._door.clear()

    def let_through(self) -> None:
        self._door.set()

    def directory(self, me: str) -> Directory:
        return Directory(self, me)


@dataclass
class Client:
    net: Net
    sender: str
    target: str

    async def quota(self, card: object, call: lpb.QuotaCall) -> lpb.QuotaGrant:
        self.net.waiting += 1
        try:
            await self.net._door.wait()
        finally:
            self.net.waiting -= 1
        if self.target in self.net.down:
            raise Unavailable("down")
        self.net.calls.append(call)
        return await self.net.services[self.target].serve_call(call, self.sender)


@dataclass
class Directory:
    net: Net
    me: str

    def client(self, node_id: str) -> PeerHandle | None:
        if node_id in self.net.down:
            return None
        return PeerHandle(Client(self.net, self.me, node_id), None)  # type: ignore[arg-type]


@dataclass
class Mesh:
    net: Net
    clock: FakeClock
    home: QuotaService
    entry: QuotaService
    entry_users: Users
    writer: ChainWriter

    def answer(self, admission: Admission, tokens: int) -> list[lpb.SignedRecord]:
        """The signed record of an answer that used `tokens`."""
        request = admission.request
        signed = self.writer.append(
            Usage(
                request_id=request.request_id,
                entry_node_id=ENTRY,
                user=request.user,
                model="m",
                prompt_tokens=min(tokens, BOUND),
                completion_tokens=max(tokens - BOUND, 0),
                route="lan",
                started_at_ms=self.clock.ms - 10,
                ended_at_ms=self.clock.ms,
            )
        )
        return [signed]

    def held(self, user: str = "alice") -> int:
        return self.home.book.held(user, MESH)

    def used(self, user: str = "alice") -> int:
        quota = self.entry_users.records[user].quota
        return self.home.book.used(user, MESH, quota.limits[0].period, self.clock.ms)

    def change_user(self, user: str = "alice") -> None:
        """The user's entry changed (its quota, privacy or key): a new version."""
        record = self.entry_users.records[user]
        self.entry_users.records[user] = replace(
            record, updated_at_ms=max(record.updated_at_ms, record.created_at_ms) + 1
        )


def user(name: str, quota: Quota) -> UserRecord:
    return UserRecord(
        name=name,
        key_hash="0" * 64,
        privacy=Privacy.MESH,
        created_at_ms=START_MS - 1000,
        quota=quota,
        home_node_id=HOME,
    )


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    net, clock = Net(), FakeClock()
    alice = user("alice", parse_quota("mesh=100k/day"))
    home_users = Users(HOME, {"alice": alice})
    entry_users = Users(ENTRY, {"alice": alice})
    home = QuotaService(
        node_id=HOME,
        users=home_users,  # type: ignore[arg-type]
        store=Store(),  # type: ignore[arg-type]
        links=net.directory(HOME),
        clock=clock,
    )
    entry = QuotaService(
        node_id=ENTRY,
        users=entry_users,  # type: ignore[arg-type]
        store=None,
        links=net.directory(ENTRY),
        clock=clock,
    )
    net.services = {HOME: home, ENTRY: entry}
    await home.start()
    await entry.start()
    try:
        yield Mesh(net, clock, home, entry, entry_users, ChainWriter(Identity.generate()))
    finally:
        net.let_through()
        await entry.aclose(timeout_s=1.0)
        await home.aclose(timeout_s=1.0)


def request(max_tokens: int | None, name: str = "alice") -> InferenceRequest:
    return InferenceRequest(
        model="m", prompt=PROMPT, sampling=Sampling(max_tokens=max_tokens), user=name
    )


async def until(check: Callable[[], Any], what: str) -> None:
    """Let the tasks under way run until `check()` holds (no time passes)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


async def leased_mesh(mesh: Mesh) -> int:
    """A first request at the home that grows the entry node's lease; its free tokens."""
    first = await mesh.entry.admit(request(100), Privacy.MESH)
    assert first.home == HOME
    assert not first.leased
    lease = mesh.held() - (BOUND + 100)
    assert lease > 0
    await mesh.entry.settle(first, mesh.answer(first, 50))
    assert mesh.held() == lease
    return lease


async def test_a_lease_admits_without_a_call_and_its_use_is_reported(mesh: Mesh) -> None:
    lease = await leased_mesh(mesh)
    calls = len(mesh.net.calls)
    admitted = await mesh.entry.admit(request(200), Privacy.MESH)
    assert admitted.leased == BOUND + 200
    assert admitted.request.sampling.max_tokens == 200
    assert len(mesh.net.calls) == calls  # no call
    mesh.entry.settle_soon(admitted, mesh.answer(admitted, 120))
    await until(lambda: mesh.used() == 50 + 120, "the records reach the home")
    assert mesh.held() == lease - 120  # the unused part is the lease's again
    # Without max_tokens, a leased request may generate what the lease has left (at most
    # the default), as the home would grant.
    open_ended = await mesh.entry.admit(request(None), Privacy.MESH)
    assert open_ended.leased == lease - 120
    assert open_ended.request.sampling.max_tokens == lease - 120 - BOUND


async def test_a_failover_overrun_on_a_leased_request_counts_once(mesh: Mesh) -> None:
    """The answer's records count in full; the lease at the home shrinks by what the
    answer took of it, not by the overrun too (or the home would hold less than the
    entry node may still spend)."""
    lease = await leased_mesh(mesh)
    admitted = await mesh.entry.admit(request(100), Privacy.MESH)
    taken = admitted.leased
    overrun = 40  # a mid-answer failover's continuation
    mesh.entry.settle_soon(admitted, mesh.answer(admitted, taken + overrun))
    await until(lambda: mesh.used() == 50 + taken + overrun, "the records reach the home")
    await until(lambda: not mesh.entry._settling, "the report is through")
    assert mesh.held() == lease - taken


async def test_an_answer_that_ends_after_its_lease_ended_gives_its_tokens_back(
    mesh: Mesh,
) -> None:
    await leased_mesh(mesh)
    running = await mesh.entry.admit(request(300), Privacy.MESH)
    assert running.leased
    mesh.change_user()  # the lease ends at the next request; this one is refused
    with pytest.raises(QuotaExceeded):
        await mesh.entry.admit(request(10**6), Privacy.MESH)
    await until(lambda: mesh.held() == running.leased, "the free part is back")
    mesh.entry.settle_soon(running, mesh.answer(running, 100))
    await until(lambda: mesh.held() == 0, "the answer's part is back")
    assert mesh.used() == 50 + 100


async def test_a_lease_that_ends_while_a_report_is_on_the_way_is_reported_once(
    mesh: Mesh,
) -> None:
    """Reported twice, the home would shrink the lease by its use twice, and hold less
    than the answer still running may use."""
    await leased_mesh(mesh)
    first = await mesh.entry.admit(request(300), Privacy.MESH)
    second = await mesh.entry.admit(request(200), Privacy.MESH)
    assert first.leased
    assert second.leased
    mesh.net.hold()
    mesh.entry.settle_soon(first, mesh.answer(first, first.leased))
    await until(lambda: mesh.net.waiting == 1, "the report is on the way")
    mesh.change_user()  # the lease ends: the rest of it goes back
    refused = asyncio.create_task(mesh.entry.admit(request(10**6), Privacy.MESH))
    for _ in range(100):  # the reserve waits for the report to reach the home first
        await asyncio.sleep(0)
    assert mesh.net.waiting == 1
    mesh.net.let_through()
    with pytest.raises(QuotaExceeded):
        await refused
    await until(lambda: not mesh.entry._settling, "every report is through")
    assert mesh.held() == second.leased  # what the running answer may still use


async def test_an_idle_lease_goes_back_to_the_home(mesh: Mesh) -> None:
    await leased_mesh(mesh)
    mesh.clock.ms += 6000
    for _ in range(40):  # the upkeep looks every second (real time)
        if mesh.held() == 0:
            break
        await asyncio.sleep(0.1)
    assert mesh.held() == 0


async def test_without_its_home_a_lease_still_admits_until_it_runs_out(mesh: Mesh) -> None:
    lease = await leased_mesh(mesh)
    mesh.net.down.add(HOME)
    admitted = 0
    while admitted + BOUND + 1000 <= lease:
        taken = await mesh.entry.admit(request(1000), Privacy.MESH)
        assert taken.leased
        admitted += taken.leased
    assert admitted > 0
    with pytest.raises(Unavailable, match="kept by node"):
        await mesh.entry.admit(request(1000), Privacy.MESH)


async def test_a_lease_report_named_too_long_is_refused_clearly(mesh: Mesh) -> None:
    await leased_mesh(mesh)
    held = mesh.held()
    release = lpb.Release(
        lease_user="alice", lease_returned=10, lease_report="9" * 65, lease_total=10
    )
    with pytest.raises(InvalidRequest, match="at most 64 characters"):
        await mesh.home.serve_call(lpb.QuotaCall(release=release), ENTRY)
    assert mesh.held() == held  # nothing taken
