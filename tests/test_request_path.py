"""One request's journey through the node's middle, in process (issue 13 items 1 and 8):
the entry side's admission, plan, first candidate, failover mid-stream, accounting and
settlement, and the serving side's checks, with scripted backends and scripted peers and a
fake clock. No sockets, no processes, no timing: each test runs in milliseconds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    Unavailable,
)
from mesh.inference import (
    Finished,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    Route,
    TextDelta,
)
from mesh.ledger.records import open_record
from mesh.routing.peers import PeerState, PeerTable
from mesh.routing.refusals import Failure, refusal
from mesh.routing.scheduler import Candidate, Exclusion, Privacy
from mesh.trust.identity import Identity
from mesh.wire.v1 import ledger_pb2 as lpb
from node.serving.accounting import Accountant, Arrival
from node.serving.entry import EntrySide
from node.serving.models import LocalModels
from node.serving.quota_service import Admission
from node.serving.serving_side import ServingSide
from node.store.ledger_store import LedgerStore
from node.transport.directory import PeerHandle
from tests.harness import MODEL, FakeClock, Script, ScriptedBackend, chat, play


class ScriptedPeer:
    """A peer's client: `infer` plays its script (what a real PeerClient yields)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.asked: list[InferenceRequest] = []
        self.closed = 0

    async def infer(self, card: Any, request: InferenceRequest) -> AsyncIterator[InferenceEvent]:
        self.asked.append(request)
        try:
            async for event in play(self.script, request):
                yield event
        finally:
            self.closed += 1


class ScriptedPeering:
    def __init__(self) -> None:
        self.peers: dict[str, ScriptedPeer] = {}
        self.applied: list[Any] = []

    def client(self, node_id: str) -> PeerHandle | None:
        peer = self.peers.get(node_id)
        return PeerHandle(client=peer, card=None) if peer else None  # type: ignore[arg-type]

    def apply(self, events: list[Any]) -> None:
        self.applied.extend(events)


class Quota:
    """An admitter that records what it was asked to settle."""

    def __init__(self, *, closed: dict[Route, str] | None = None, refuse: bool = False) -> None:
        self.closed = closed or {}
        self.refuse = refuse
        self.settled: list[list[lpb.SignedRecord]] = []

    async def admit(self, request: InferenceRequest, privacy: Privacy) -> Admission:
        if self.refuse:
            raise QuotaExceeded("over quota", param="quota", resets_at="2026-12-01T00:00:00Z")
        return Admission(request=request, closed=dict(self.closed))

    def settle_soon(self, admission: Admission, records: list[lpb.SignedRecord]) -> None:
        self.settled.append(list(records))


def _peer_id(n: int) -> str:
    return f"P{n}".ljust(56, "x")


@dataclass
class Box:
    entry: EntrySide
    peering: ScriptedPeering
    table: PeerTable
    quota: Quota
    ledger: LedgerStore | None
    node_id: str


@contextlib.asynccontextmanager
async def box(
    tmp_path: Path,
    *,
    local: ScriptedBackend | None = None,
    peers: Sequence[tuple[Route, Script]] = (),
    quota: Quota | None = None,
    ledger: bool = True,
    privacy: Privacy = Privacy.MESH,
) -> AsyncIterator[Box]:
    identity = Identity.generate()
    clock = FakeClock()
    store = await LedgerStore.open(tmp_path / "ledger.db", identity) if ledger else None
    table = PeerTable()
    peering = ScriptedPeering()
    for i, (route, script) in enumerate(peers):
        node_id = _peer_id(i)
        table.verified(
            node_id=node_id,
            address=f"198.18.0.{i + 1}:8471",
            route=route,
            models=(ModelInfo(name=MODEL, context_length=4096, tokens_per_second=50.0),),
            display_name="",
            now_ms=clock.ms,
        )
        # Each further peer a little farther, so the plan's order is the list's order.
        table.heartbeat_ok(
            node_id, now_ms=clock.ms, rtt_ms=1.0 + i, load=Load(active_streams=0, queued=0, slots=4)
        )
        peering.peers[node_id] = ScriptedPeer(script)
    models = LocalModels(identity.node_id, [local] if local else [])  # type: ignore[list-item]
    admitter = quota or Quota()
    entry = EntrySide(
        models=models,
        peers=table,
        accountant=Accountant(node_id=identity.node_id, ledger=store, clock=clock),
        peering=peering,
        admitter=admitter,
        default_privacy=privacy,
        max_wait_ms=1e9,  # the nearest tier, always: the order is the tiers' order
        clock=clock,
    )
    try:
        yield Box(entry, peering, table, admitter, store, identity.node_id)
    finally:
        if store is not None:
            await store.close()


async def run(
    the_box: Box, request: InferenceRequest, privacy: Privacy | None = None
) -> tuple[str, Finished, Any]:
    async with the_box.entry.answer(request, privacy) as answer:
        text: list[str] = []
        async with contextlib.aclosing(answer.events()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                else:
                    return "".join(text), event, answer
    raise AssertionError("no Finished")


# --- the entry side --------------------------------------------------------------------------


async def test_served_here_leaves_a_signed_countersigned_record_and_settles_with_it(
    tmp_path: Path,
) -> None:
    async with box(tmp_path, local=ScriptedBackend()) as b:
        text, finished, answer = await run(b, chat())
        assert text == "Hello world"
        assert answer.served_by.route is Route.LOCAL
        assert finished.completion_tokens == 2
        assert finished.usage_record
        assert b.ledger is not None
        [stored] = await b.ledger.records()
        record = open_record(stored)
        assert (record.user, record.completion_tokens, record.route) == ("zoe", 2, "local")
        assert len(await b.ledger.receipts()) == 1  # the entry node countersigned it
        assert [len(r) for r in b.quota.settled] == [1]


async def test_a_peer_that_fails_before_its_first_token_is_skipped_silently(
    tmp_path: Path,
) -> None:
    peers = [
        (Route.LAN, Script(fail_after=0, error=Unavailable("connection refused"))),
        (Route.LAN, Script(tokens=("from", " B"))),
    ]
    async with box(tmp_path, peers=peers, ledger=False) as b:
        text, _, answer = await run(b, chat())
        assert text == "from B"
        assert answer.served_by.node_id == _peer_id(1)
        assert answer.failovers == []
        # The failed peer is suspect now, and peering was told.
        assert b.table.get(_peer_id(0)).state is not PeerState.UP  # type: ignore[union-attr]
        assert b.peering.applied


async def test_a_mid_stream_failure_continues_on_the_next_candidate_with_a_partial_record(
    tmp_path: Path,
) -> None:
    local = ScriptedBackend(Script(tokens=("One", " two", " three"), fail_after=2))
    peers = [(Route.LAN, Script(tokens=(" three", " four")))]
    async with box(tmp_path, local=local, peers=peers) as b:
        text, finished, answer = await run(b, chat(max_tokens=10))
        assert text == "One two three four"
        assert answer.failovers == [_peer_id(0)]
        # The client hears every token the answer made, across both sources.
        assert finished.completion_tokens == 4
        asked = b.peering.peers[_peer_id(0)].asked[0]
        assert asked.continuation == "One two"
        assert asked.sampling.max_tokens == 8
        assert asked.request_id != answer.request.request_id
        assert b.ledger is not None
        [partial] = [open_record(r) for r in await b.ledger.records()]
        assert partial.kind == lpb.RECORD_KIND_PARTIAL
        assert partial.completion_tokens == 2
        assert len(b.quota.settled[0]) == 1  # the partial; the peer's record was not signed


async def test_a_client_that_goes_away_still_leaves_a_partial_record(tmp_path: Path) -> None:
    local = ScriptedBackend(Script(tokens=("a", "b", "c", "d")))
    async with box(tmp_path, local=local) as b:
        async with b.entry.answer(chat()) as answer:
            async with contextlib.aclosing(answer.events()) as events:
                async for _ in events:
                    break  # the client hangs up after the first token
        assert b.ledger is not None
        [record] = [open_record(r) for r in await b.ledger.records()]
        assert record.kind == lpb.RECORD_KIND_PARTIAL
        assert record.completion_tokens == 1
        assert local.active == 0  # its slot is free again
        assert [len(r) for r in b.quota.settled] == [1]


async def test_a_context_refusal_goes_to_a_box_with_room(tmp_path: Path) -> None:
    local = ScriptedBackend(
        Script(fail_after=0, error=ContextLengthExceeded("the prompt is 5000 tokens"))
    )
    peers = [(Route.LAN, Script(tokens=("roomy",)))]
    async with box(tmp_path, local=local, peers=peers, ledger=False) as b:
        text, _, answer = await run(b, chat())
        assert (text, answer.served_by.route) == ("roomy", Route.LAN)


async def test_a_request_error_reaches_the_client_at_once(tmp_path: Path) -> None:
    local = ScriptedBackend(Script(fail_after=0, error=InvalidRequest("bad temperature")))
    peers = [(Route.LAN, Script())]
    async with box(tmp_path, local=local, peers=peers, ledger=False) as b:
        with pytest.raises(InvalidRequest):
            await run(b, chat())
        assert b.peering.peers[_peer_id(0)].asked == []  # every box would say the same
        assert b.quota.settled == [[]]  # the reservation is released all the same


async def test_every_box_busy_is_a_429_counted_as_rejected_here(tmp_path: Path) -> None:
    local = ScriptedBackend(Script(fail_after=0, error=Overloaded("queue full")))
    peers = [(Route.LAN, Script(fail_after=0, error=Overloaded("full")))]
    async with box(tmp_path, local=local, peers=peers, ledger=False) as b:
        with pytest.raises(Overloaded, match="every node serving 'm' is busy"):
            await run(b, chat())
        assert b.entry.models.counters()[MODEL]["rejected"] == 1


async def test_an_unknown_model_names_the_models_the_mesh_serves(tmp_path: Path) -> None:
    async with box(tmp_path, local=ScriptedBackend(), ledger=False) as b:
        with pytest.raises(ModelNotFound, match="available: m"):
            await run(b, InferenceRequest(model="nope", prompt="hi"))


async def test_a_quota_closed_tier_is_left_out_and_the_refusal_keeps_its_reset(
    tmp_path: Path,
) -> None:
    peers = [
        (
            Route.CLOUD,
            Script(
                fail_after=0, error=QuotaExceeded("plan used up", resets_at="2026-12-01T00:00:00Z")
            ),
        )
    ]
    async with box(tmp_path, peers=peers, ledger=False, privacy=Privacy.ANY) as b:
        with pytest.raises(QuotaExceeded) as caught:
            await run(b, chat())
        assert caught.value.resets_at == "2026-12-01T00:00:00Z"
    closed = Quota(closed={Route.LAN: "zoe's mesh quota is used up"})
    async with box(tmp_path / "2", peers=[(Route.LAN, Script())], quota=closed, ledger=False) as b:
        decided = b.entry.plan(chat(), Privacy.MESH, closed.closed)
        assert [x.reason for x in decided.excluded] == [Exclusion.CLOSED]
        with pytest.raises(Unavailable, match="mesh quota is used up"):
            await run(b, chat())


async def test_a_refused_admission_plans_nothing(tmp_path: Path) -> None:
    peers = [(Route.LAN, Script())]
    async with box(tmp_path, peers=peers, quota=Quota(refuse=True), ledger=False) as b:
        with pytest.raises(QuotaExceeded):
            await run(b, chat())
        assert b.peering.peers[_peer_id(0)].asked == []
        assert b.quota.settled == []  # nothing was reserved


async def test_nobody_can_continue_keeps_what_broke_the_stream(tmp_path: Path) -> None:
    local = ScriptedBackend(Script(tokens=("a", "b"), fail_after=1, error=BackendError("oom")))
    async with box(tmp_path, local=local, ledger=False) as b:
        with pytest.raises(Unavailable, match=r"failed mid-answer \(oom\)"):
            await run(b, chat())


# --- the serving side ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, backend: ScriptedBackend
) -> AsyncIterator[tuple[ServingSide, LocalModels, LedgerStore]]:
    identity = Identity.generate()
    store = await LedgerStore.open(tmp_path / "ledger.db", identity)
    models = LocalModels(identity.node_id, [backend])  # type: ignore[list-item]
    side = ServingSide(
        models=models,
        accountant=Accountant(node_id=identity.node_id, ledger=store, clock=FakeClock()),
        clock=FakeClock(),
    )
    try:
        yield side, models, store
    finally:
        await store.close()


async def test_a_peers_request_is_served_and_signed_for_its_entry_node(tmp_path: Path) -> None:
    entry_id = _peer_id(9)
    async with serving(tmp_path, ScriptedBackend()) as (side, _, store):
        arrival = Arrival(entry_node_id=entry_id, route=Route.LAN)
        async with side.answer(chat(), arrival) as answer:
            events = [e async for e in answer.events()]
        finished = events[-1]
        assert isinstance(finished, Finished)
        assert finished.usage_record
        record = open_record(lpb.SignedRecord.FromString(finished.usage_record))
        assert (record.entry_node_id, record.route) == (entry_id, "lan")
        assert await store.receipts() == []  # the entry node countersigns, not this one


@pytest.mark.parametrize(
    ("backend", "request_", "error"),
    [
        (ScriptedBackend(slots=0), chat(), Overloaded),
        (ScriptedBackend(context=16), chat(content="x" * 400), ContextLengthExceeded),
        (ScriptedBackend(), InferenceRequest(model="other", prompt="hi"), ModelNotFound),
    ],
)
async def test_the_serving_side_refuses_what_it_cannot_take(
    tmp_path: Path, backend: ScriptedBackend, request_: InferenceRequest, error: type[Exception]
) -> None:
    async with serving(tmp_path, backend) as (side, _, _):
        with pytest.raises(error):
            async with side.answer(request_, Arrival(entry_node_id="e", route=Route.LAN)):
                pass
        assert backend.asked == []


async def test_a_backend_that_ends_without_finishing_is_an_error_not_a_crash(
    tmp_path: Path,
) -> None:
    class Truncated(ScriptedBackend):
        async def open(self, request: InferenceRequest) -> Any:
            stream = await super().open(request)

            async def cut() -> AsyncGenerator[InferenceEvent, None]:
                yield TextDelta("half")

            stream._events = cut()
            return stream

    async def drain(side: ServingSide) -> None:
        async with side.answer(chat(), Arrival(entry_node_id="e", route=Route.LAN)) as answer:
            async for _ in answer.events():
                pass

    async with serving(tmp_path, Truncated()) as (side, _, _):
        with pytest.raises(BackendError):
            await drain(side)


# --- the refusal diagnosis (pure) ------------------------------------------------------------


def test_the_diagnosis_reads_typed_reasons() -> None:
    c = Candidate(node_id=_peer_id(1), route=Route.LAN, model=MODEL)
    assert isinstance(
        refusal(MODEL, excluded=[], failures=[Failure(candidate=c, error=Overloaded("x"))]),
        Overloaded,
    )
    assert isinstance(
        refusal(
            MODEL,
            excluded=[],
            failures=[Failure(candidate=c, error=ContextLengthExceeded("long"))],
        ),
        ContextLengthExceeded,
    )
    mixed = refusal(
        MODEL,
        excluded=[],
        failures=[
            Failure(candidate=c, error=Overloaded("x")),
            Failure(candidate=c, error=Unavailable("down")),
        ],
    )
    assert type(mixed) is Unavailable
