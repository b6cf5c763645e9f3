"""Several nodes of one mesh in process (tests/harness.py): failover across the wire, the
records and countersignatures an answer leaves on both sides, and a box of another mesh.
Real peer clients, sealed calls and the nodes' own services over an in-memory transport,
scripted backends and one fake clock: each test runs in well under a second, and the same
way every time. The real-process and network-namespace tests keep the end-to-end proof."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from mesh.errors import (
    BackendError,
    ContextLengthExceeded,
    MeshError,
    ModelNotFound,
    Unavailable,
)
from mesh.inference import Finished, InferenceRequest, Route, Sampling, TextDelta
from mesh.ledger.records import open_record, record_hash, verify
from mesh.routing.peers import PeerState
from mesh.routing.scheduler import Privacy
from mesh.wire.v1 import ledger_pb2 as lpb
from tests.harness import NodeSpec, Script, ScriptedBackend, ask, chat, counting, mesh

SHARED = "shared"


def shared(script: Script | None = None, *, slots: int = 1) -> NodeSpec:
    return NodeSpec(backends=[ScriptedBackend(script, model=SHARED, slots=slots)])


def counting_to(n: int, **kwargs: object) -> Script:
    return Script(tokens=counting(n), **kwargs)  # type: ignore[arg-type]


def shared_request(max_tokens: int = 120, user: str = "") -> InferenceRequest:
    return InferenceRequest(
        model=SHARED, prompt="1, 2, 3, 4,", sampling=Sampling(max_tokens=max_tokens), user=user
    )


# --- failover --------------------------------------------------------------------------------


async def test_a_box_cut_off_mid_stream_costs_the_client_nothing(tmp_path: Path) -> None:
    """What the LAN and network-namespace tests do with kill -9: the serving box is gone
    after 20 tokens; the entry node continues on the next box after the text delivered."""
    specs = {
        "a": NodeSpec(),
        "b": shared(counting_to(120, pause_after=20)),
        "c": shared(counting_to(120)),
    }
    async with mesh(tmp_path, specs) as m:
        a, b, c = m["a"], m["b"], m["c"]
        pieces: list[str] = []
        tokens = 0
        async with a.entry.answer(shared_request()) as answer:
            assert (answer.served_by.node_id, answer.served_by.route) == (b.node_id, Route.LAN)
            async with contextlib.aclosing(answer.events()) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                        tokens += event.tokens
                        if tokens == 20:
                            m.net.cut(b)  # b is gone, mid-answer
                    else:
                        assert isinstance(event, Finished)
                        finished = event
            assert answer.failovers == [c.node_id]
        # One coherent answer: what b sent, then c's continuation; the client hears every
        # token the answer made.
        reference = await ask(c.entry, shared_request())
        assert "".join(pieces) == reference.text
        assert finished.completion_tokens == 120
        [follow_up] = c.backends[0].asked[:1]
        assert follow_up.continuation == "".join(counting(20))
        assert follow_up.sampling.max_tokens == 100
        # b's work was cancelled with the connection: its slot is free, it signed nothing.
        assert b.backends[0].active == 0
        assert await b.ledger.records() == []
        # The ledger at a holds both parts: a signed for what b delivered (b cannot sign
        # any more), c for its continuation, countersigned by a; together, the usage.
        records = await a.ledger.records()
        opened = [open_record(r) for r in records]
        [partial] = [r for r in opened if r.kind == lpb.RECORD_KIND_PARTIAL]
        assert (partial.node_id, partial.served_by, partial.route) == (a.node_id, b.node_id, "lan")
        assert partial.completion_tokens == 20
        [rest] = [r for r in opened if r.node_id == c.node_id]
        assert (rest.entry_node_id, rest.kind) == (a.node_id, lpb.RECORD_KIND_COMPLETE)
        assert partial.completion_tokens + rest.completion_tokens == finished.completion_tokens
        receipts = await a.ledger.receipts()
        assert verify(records, receipts).ok
        # b is suspect at once, and out of the rotation within 6 s of silence.
        peer = a.table.get(b.node_id)
        assert peer is not None
        assert peer.state is PeerState.SUSPECT
        silent = 0
        while peer.state is not PeerState.DOWN and silent < 6:
            await m.heartbeats(1)
            silent += 1
        assert peer.state is PeerState.DOWN
        assert silent < 6
        assert a.table.get(c.node_id).state is PeerState.UP  # type: ignore[union-attr]


async def test_a_peer_that_fails_before_its_first_token_is_skipped_silently(
    tmp_path: Path,
) -> None:
    specs = {
        "a": NodeSpec(),
        "b": shared(Script(fail_after=0, error=BackendError("out of memory"))),
        "c": shared(Script(tokens=("from", " c"))),
        "d": shared(),
    }
    async with mesh(tmp_path, specs) as m:
        a, c, d = m["a"], m["c"], m["d"]
        got = await ask(a.entry, shared_request(8))
        assert (got.text, got.answer.served_by.node_id) == ("from c", c.node_id)
        assert got.answer.failovers == []
        m.net.cut(a, c)  # unreachable before the call: the next one serves, silently
        got = await ask(a.entry, shared_request(8))
        assert got.answer.served_by.node_id == d.node_id
        assert a.table.get(c.node_id).state is PeerState.SUSPECT  # type: ignore[union-attr]


async def test_an_error_mid_stream_crosses_the_wire_and_the_next_box_continues(
    tmp_path: Path,
) -> None:
    specs = {
        "a": NodeSpec(),
        "b": shared(counting_to(30, fail_after=10, error=BackendError("the GPU fell off"))),
        "c": shared(counting_to(30)),
    }
    async with mesh(tmp_path, specs) as m:
        a, c = m["a"], m["c"]
        got = await ask(a.entry, shared_request(30))
        assert got.text == "".join(counting(30))
        assert got.finished.completion_tokens == 30
        assert got.answer.failovers == [c.node_id]
        [partial] = [
            r
            for r in map(open_record, await a.ledger.records())
            if r.kind == lpb.RECORD_KIND_PARTIAL
        ]
        assert partial.completion_tokens == 10


async def test_nobody_left_to_continue_says_what_broke_the_stream(tmp_path: Path) -> None:
    specs = {"a": NodeSpec(), "b": shared(counting_to(30, pause_after=5))}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]

        async def cut_after_five() -> None:
            async with a.entry.answer(shared_request(30)) as answer:
                delivered = 0
                async for event in answer.events():
                    assert isinstance(event, TextDelta)
                    delivered += event.tokens
                    if delivered == 5:  # b paused there
                        m.net.cut(b)

        with pytest.raises(Unavailable, match=r"failed mid-answer \(peer unreachable"):
            await cut_after_five()
        # The five tokens the client was sent are recorded all the same.
        [partial] = map(open_record, await a.ledger.records())
        assert (partial.kind, partial.completion_tokens) == (lpb.RECORD_KIND_PARTIAL, 5)


async def test_a_busy_box_hands_the_next_request_to_an_idle_peer(tmp_path: Path) -> None:
    specs = {"a": shared(counting_to(600, pause_after=3)), "b": shared()}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        async with a.entry.answer(shared_request(600)) as busy:
            assert busy.served_by.route is Route.LOCAL
            got = await ask(a.entry, shared_request(4))
            assert (got.answer.served_by.node_id, got.answer.served_by.route) == (
                b.node_id,
                Route.LAN,
            )
            assert got.finished.completion_tokens > 0


async def test_a_client_that_goes_away_mid_stream_is_still_counted(tmp_path: Path) -> None:
    specs = {"a": NodeSpec(), "c": shared(counting_to(200, pause_after=5))}
    async with mesh(tmp_path, specs) as m:
        a, c = m["a"], m["c"]
        seen = 0
        async with a.entry.answer(shared_request(200)) as answer:
            async with contextlib.aclosing(answer.events()) as events:
                async for event in events:
                    assert isinstance(event, TextDelta)
                    seen += event.tokens
                    if seen >= 5:
                        break  # the client hangs up mid-answer
        [record] = map(open_record, await a.ledger.records())
        assert record.kind == lpb.RECORD_KIND_PARTIAL
        assert (record.node_id, record.served_by, record.user) == (a.node_id, c.node_id, "")
        assert record.completion_tokens == seen
        assert 5 <= seen < 200
        assert c.backends[0].active == 0  # the work stopped with the call


async def test_a_context_refusal_across_the_wire_goes_to_a_box_with_room(tmp_path: Path) -> None:
    too_small = Script(fail_after=0, error=ContextLengthExceeded("the prompt is 399 tokens"))
    specs = {"a": NodeSpec(), "small": shared(too_small), "large": shared(Script(tokens=("ok",)))}
    async with mesh(tmp_path, specs) as m:
        got = await ask(m["a"].entry, shared_request(4))
        assert (got.text, got.answer.served_by.node_id) == ("ok", m["large"].node_id)
    specs = {"a": NodeSpec(), "small": shared(too_small)}
    async with mesh(tmp_path / "alone", specs) as m:
        with pytest.raises(ContextLengthExceeded):  # nobody has room: the client hears why
            await ask(m["a"].entry, shared_request(4))


async def test_a_model_only_one_box_serves_is_answered_by_that_box(tmp_path: Path) -> None:
    only = NodeSpec(backends=[ScriptedBackend(model="c-only"), ScriptedBackend()])
    async with mesh(tmp_path, {"a": NodeSpec(backends=[ScriptedBackend()]), "c": only}) as m:
        a, c = m["a"], m["c"]
        got = await ask(a.entry, chat(model="c-only"))
        assert (got.answer.served_by.node_id, got.answer.served_by.route) == (c.node_id, Route.LAN)
        listed = {info.name: nodes for info, nodes in a.entry.mesh_models()}
        assert listed["c-only"] == [c.node_id]
        assert sorted(listed["m"]) == sorted([a.node_id, c.node_id])
        explained = a.entry.explain("c-only", Privacy.MESH, None)
        assert c.node_id in str(explained)
        # local-only never leaves the box: a does not serve it, so nobody may.
        with pytest.raises(Unavailable, match="privacy local-only"):
            await ask(a.entry, chat(model="c-only"), Privacy.LOCAL_ONLY)


async def test_a_box_of_another_mesh_is_never_used(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": NodeSpec(), "b": NodeSpec()}) as m:
        a = m["a"]
        stranger = await m.add(
            "d", NodeSpec(backends=[ScriptedBackend(model="d-only")]), join=False
        )
        with pytest.raises(MeshError):
            await a.directory.learn(stranger)  # its card does not verify against our mesh
        with pytest.raises(MeshError):
            await stranger.directory.learn(a)
        assert stranger.node_id not in {p.node_id for p in a.table}
        assert len(stranger.table) == 0
        with pytest.raises(ModelNotFound):
            await ask(a.entry, chat(model="d-only"))


# --- records and countersignatures -------------------------------------------------------------


async def test_every_answer_leaves_a_signed_countersigned_record_with_the_answers_counts(
    tmp_path: Path,
) -> None:
    specs = {
        "a": NodeSpec(backends=[ScriptedBackend(Script(tokens=("1", "2", "3"), prompt_tokens=4))]),
        "c": NodeSpec(
            backends=[ScriptedBackend(Script(tokens=("x", "y"), prompt_tokens=5), model="c-only")]
        ),
    }
    async with mesh(tmp_path, specs) as m:
        a, c = m["a"], m["c"]
        by_c = await ask(a.entry, chat(5, model="c-only"))
        here = await ask(a.entry, chat(5), Privacy.LOCAL_ONLY)
        assert by_c.answer.served_by.node_id == c.node_id
        assert here.answer.served_by.route is Route.LOCAL
        records = await a.ledger.records()
        by_request = {open_record(r).request_id: open_record(r) for r in records}
        served_by_c = by_request[by_c.answer.request.request_id]
        served_here = by_request[here.answer.request.request_id]
        # c signed its record, a (the entry node) checked and countersigned it; both kept.
        assert (served_by_c.node_id, served_by_c.route) == (c.node_id, "lan")
        assert (served_here.node_id, served_here.route) == (a.node_id, "local")
        for record, got in ((served_by_c, by_c), (served_here, here)):
            assert record.entry_node_id == a.node_id
            assert record.completion_tokens == got.finished.completion_tokens
            assert record.prompt_tokens == got.finished.prompt_tokens
        assert (served_by_c.prompt_tokens, served_here.completion_tokens) == (5, 3)
        receipts = await a.ledger.receipts()
        report = verify([r for r in records if open_record(r).node_id == a.node_id], receipts)
        assert report.ok, report.problems
        c_records = await c.ledger.records()
        assert any(r.record_hash == record_hash(s) for r in receipts for s in c_records)
        # c's own ledger: the record it signed, one chain; a's countersignature reaches it
        # by ledger sync.
        assert verify(c_records, require_receipts=False).ok
        assert not verify(c_records, await c.ledger.receipts()).ok
        await m.sync()
        assert verify(await c.ledger.records(), await c.ledger.receipts()).ok
