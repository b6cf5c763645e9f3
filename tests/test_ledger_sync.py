"""Ledger anti-entropy between stores (mesh/ledger_sync.py, mesh/ledger_store.py): logs
converge by per-node sequence, transitively, in bounded calls; nothing is kept before it
verifies; a second history for a node is kept apart as fork proof and passed on."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidRequest, MeshError
from mesh.ledger.records import (
    ChainWriter,
    Usage,
    countersign,
    open_record,
    record_hash,
    summarize,
    verify,
)
from mesh.ledger.sync import Held, check_batch, check_record, plan_chain
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role, read_cert, verify_cert
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.ledger_checker import Checker
from node.store.ledger_store import Ask, LedgerStore, pull, read_ledger, read_ledger_file


def _usage(i: int, entry: Identity, user: str = "alice") -> Usage:
    return Usage(
        request_id=f"{i:032x}",
        entry_node_id=entry.node_id,
        user=user,
        model="m",
        prompt_tokens=3,
        completion_tokens=10 + i,
        route="lan",
        started_at_ms=1_800_000_000_000 + i,
        ended_at_ms=1_800_000_000_100 + i,
    )


async def _serve(store: LedgerStore, me: Identity, n: int, *, start: int = 0) -> None:
    """n answers served and countersigned by this node itself (entry = server)."""
    for i in range(start, start + n):
        await store.countersign(await store.append(_usage(i, me)))


def asker(source: LedgerStore, log: list[lpb.SyncRequest] | None = None, *, me: str = "") -> Ask:
    async def ask(request: lpb.SyncRequest) -> AsyncIterator[lpb.SyncBatch]:
        if log is not None:
            log.append(request)
        for frame in await source.answer(request, asker=me):
            # What travels is bytes: parse them again, as the peer would.
            yield lpb.SyncBatch.FromString(frame.SerializeToString())

    return ask


@pytest.fixture
def checker() -> Iterator[Checker]:
    made = Checker(workers=1)
    yield made
    made.close()


async def _everything(store: LedgerStore, path: Path) -> tuple[set[bytes], set[bytes]]:
    records, receipts = read_ledger(path)
    return {record_hash(r) for r in records}, {r.SerializeToString() for r in receipts}


async def test_two_logs_converge_and_verify_with_their_receipts(
    tmp_path: Path, checker: Checker
) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "a.db", a_id) as a,
        await LedgerStore.open(tmp_path / "b.db", b_id) as b,
    ):
        await _serve(a, a_id, 30)
        await _serve(b, b_id, 12, start=100)
        got = await pull(b, a_id.node_id, asker(a), checker)
        assert (got.records, got.receipts, got.forks, got.problems) == (30, 30, 0, [])
        await pull(a, b_id.node_id, asker(b, me=a_id.node_id), checker)
        again = await pull(b, a_id.node_id, asker(a, me=b_id.node_id), checker)
        assert (again.records, again.receipts) == (0, 0)  # the cursor and heads moved on
        assert await _everything(a, tmp_path / "a.db") == await _everything(b, tmp_path / "b.db")
        records, receipts = read_ledger(tmp_path / "b.db")
        report = verify(records, receipts)
        assert report.ok, report.problems
        assert (report.records, report.nodes) == (42, 2)
        # Each answer counted once wherever it is read.
        rows = summarize(records, by="node")
        assert {r.key: r.requests for r in rows} == {a_id.node_id: 30, b_id.node_id: 12}
        # ...and b goes on writing its own chain after taking in a's.
        await _serve(b, b_id, 1, start=200)
        assert verify(*read_ledger(tmp_path / "b.db")).ok


async def test_records_travel_transitively_in_bounded_calls(
    tmp_path: Path, checker: Checker
) -> None:
    ids = [Identity.generate() for _ in range(3)]
    async with (
        await LedgerStore.open(tmp_path / "a.db", ids[0]) as a,
        await LedgerStore.open(tmp_path / "b.db", ids[1]) as b,
        await LedgerStore.open(tmp_path / "c.db", ids[2]) as c,
    ):
        await _serve(a, ids[0], 2500)
        asked: list[lpb.SyncRequest] = []
        got = await pull(b, ids[0].node_id, asker(a, asked), checker, max_records=1000)
        assert got.records == 2500
        assert len(asked) == 3  # 1000 + 1000 + 500: each call bounded, `more` until done
        assert [h.seq for h in asked[-1].heads] == [2000]
        # c never talks to a: it gets a's records, and a's receipts, from b.
        await pull(c, ids[1].node_id, asker(b), checker)
        assert await _everything(c, tmp_path / "c.db") == await _everything(a, tmp_path / "a.db")


async def test_a_forged_or_tampered_batch_keeps_nothing_of_what_fails(
    tmp_path: Path, checker: Checker
) -> None:
    a_id, b_id, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "a.db", a_id) as a,
        await LedgerStore.open(tmp_path / "b.db", b_id) as b,
    ):
        await _serve(a, a_id, 3)
        frames = await a.answer(lpb.SyncRequest())
        batch = frames[0]
        # One record edited after signing; one receipt claimed by another node's key.
        batch.records[1].record = batch.records[1].record.replace(b"alice", b"carol")
        batch.receipts[2].entry_node_id = mallory.node_id

        async def tampered(request: lpb.SyncRequest) -> AsyncIterator[lpb.SyncBatch]:
            yield batch

        got = await pull(b, a_id.node_id, tampered, checker)
        assert got.records == 2  # 1 and 3: record 3 waits at a gap, reported by verify
        assert got.receipts == 1  # 1's: 2's is kept only with its record, 3's was forged
        assert len(got.problems) == 2
        records, receipts = read_ledger(tmp_path / "b.db")
        assert sorted(open_record(r).seq for r in records) == [1, 3]
        kinds = {p.kind for p in verify(records, receipts).problems}
        assert kinds == {"gap", "no_receipt"}  # the forged receipt was not kept
        # The honest copy fills the gap later: the chain is whole, every receipt with it.
        await pull(b, a_id.node_id, asker(a), checker)
        records, receipts = read_ledger(tmp_path / "b.db")
        report = verify(records, receipts)
        assert report.ok, report.problems


async def test_a_rewritten_history_is_kept_apart_as_fork_proof_and_passed_on(
    tmp_path: Path, checker: Checker
) -> None:
    x = Identity.generate()
    ids = [Identity.generate() for _ in range(2)]
    async with (
        await LedgerStore.open(tmp_path / "x1.db", x) as honest,
        await LedgerStore.open(tmp_path / "x2.db", x) as rewritten,  # same key, other history
        await LedgerStore.open(tmp_path / "b.db", ids[0]) as b,
        await LedgerStore.open(tmp_path / "c.db", ids[1]) as c,
    ):
        await _serve(honest, x, 4)
        for i in range(4):  # the same positions, cheaper answers
            signed = await rewritten.append(dataclasses.replace(_usage(i, x), completion_tokens=1))
            await rewritten.countersign(signed)
        await pull(b, x.node_id, asker(honest), checker)
        got = await pull(b, x.node_id + "-again", asker(rewritten), checker)
        assert got.records == 0
        assert got.forks == 1
        assert "fork" in got.problems[0]
        records, receipts = read_ledger(tmp_path / "b.db")
        report = verify(records, receipts)
        # Found where the two heads differ (chains are hash-linked: any earlier split shows).
        assert ("fork", x.node_id, 4) in {(p.kind, p.node_id, p.seq) for p in report.problems}
        # Usage keeps counting the history held first, once.
        assert sum(r.completion_tokens for r in summarize(records)) == sum(10 + i for i in range(4))
        # c learns the records and the proof from b.
        got = await pull(c, ids[0].node_id, asker(b), checker)
        assert got.forks == 1
        assert len(await c.forks()) == 1


async def test_a_node_restored_without_its_ledger_continues_its_chain(
    tmp_path: Path, checker: Checker
) -> None:
    me, peer = Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "me.db", me) as mine,
        await LedgerStore.open(tmp_path / "peer.db", peer) as theirs,
    ):
        await _serve(mine, me, 5)
        await pull(theirs, me.node_id, asker(mine), checker)
    (tmp_path / "me.db").unlink()  # the disk is replaced; the identity key was backed up
    async with (
        await LedgerStore.open(tmp_path / "me.db", me) as mine,
        await LedgerStore.open(tmp_path / "peer.db", peer) as theirs,
    ):
        await pull(mine, peer.node_id, asker(theirs), checker)
        record = await mine.append(_usage(99, me))
        assert open_record(record).seq == 6
        records, receipts = read_ledger(tmp_path / "me.db")
        assert verify(records, receipts, require_receipts=False).ok


async def test_a_sync_request_naming_too_many_nodes_is_refused(tmp_path: Path) -> None:
    async with await LedgerStore.open(tmp_path / "a.db", Identity.generate()) as a:
        heads = [lpb.ChainHead(node_id=str(i), seq=1) for i in range(100_001)]
        with pytest.raises(InvalidRequest):
            await a.answer(lpb.SyncRequest(heads=heads))


async def test_many_signatures_are_checked_in_worker_processes(tmp_path: Path) -> None:
    me = Identity.generate()
    writer = ChainWriter(me)
    records = [writer.append(_usage(i, me)) for i in range(600)]
    batch = lpb.SyncBatch(records=records, receipts=[countersign(me, r) for r in records])
    batch.records[7].signature = bytes(64)
    pool = Checker(workers=2)
    try:
        received = await pool.check(batch)
    finally:
        pool.close()
    assert len(received.records) == 599
    assert len(received.receipts) == 600
    assert len(received.rejected) == 1


def test_plan_chain_extends_fills_and_refuses_what_does_not_link() -> None:
    me = Identity.generate()
    writer = ChainWriter(me)
    chain = [
        check_record(s.record, s.signature)
        for s in (writer.append(_usage(i, me)) for i in range(5))
    ]
    held = {c.seq: Held(c.digest, c.prev_hash) for c in chain if c.seq in (1, 2, 4)}
    plan = plan_chain(held, [chain[2], chain[4]])  # fills 3, extends with 5
    assert [c.seq for c in plan.accept] == [3, 5]
    assert not plan.conflicts
    other = ChainWriter(me)
    stranger = [
        check_record(s.record, s.signature)
        for s in (other.append(_usage(50 + i, me)) for i in range(3))
    ]
    plan = plan_chain(held, [stranger[2]])  # #3 of another history between our 2 and 4
    assert plan.conflicts == [stranger[2]]
    assert plan.accept == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=80)), max_size=5),
    st.lists(st.binary(max_size=300), max_size=5),
)
def test_any_bytes_in_a_batch_are_rejected_never_crash(
    records: list[tuple[bytes, bytes]], receipts: list[bytes]
) -> None:
    received = check_batch(records, receipts, records)
    assert received.records == []
    assert received.receipts == []
    assert len(received.rejected) == 2 * len(records) + len(receipts)


async def test_from_a_cloud_node_only_its_own_records_are_kept(
    tmp_path: Path, checker: Checker
) -> None:
    ids = [Identity.generate() for _ in range(3)]
    async with (
        await LedgerStore.open(tmp_path / "a.db", ids[0]) as a,
        await LedgerStore.open(tmp_path / "cloud.db", ids[1]) as cloud,
        await LedgerStore.open(tmp_path / "b.db", ids[2]) as b,
    ):
        await _serve(a, ids[0], 3)
        await _serve(cloud, ids[1], 2, start=50)
        await pull(cloud, ids[0].node_id, asker(a), checker)  # it holds a's records too
        got = await pull(b, ids[1].node_id, asker(cloud), checker, own_only=True)
        assert got.records == 2
        assert "3 records of other nodes ignored" in got.problems
        held = {open_record(r).node_id for r in read_ledger(tmp_path / "b.db")[0]}
        assert held == {ids[1].node_id}


async def test_only_records_of_proven_members_are_kept(tmp_path: Path, checker: Checker) -> None:
    """With a `vouch`, records travel with their nodes' membership certificates and a
    node nobody can prove a member (a made-up one, or another mesh's) is ignored."""
    ours, theirs = MeshAuthority.generate(), MeshAuthority.generate()
    a_id, b_id, c_id, made_up = (Identity.generate() for _ in range(4))

    def cert(authority: MeshAuthority, who: Identity) -> bytes:
        signed = authority.issue(
            who.public_key_raw, role=Role.MEMBER, now_ms=1_800_000_000_000, ttl_ms=1000
        )
        return bytes(signed.SerializeToString())

    def vouch(raw: bytes) -> str | None:
        try:
            signed = tpb.SignedCert.FromString(raw)
            issued = read_cert(signed)[0].issued_at_unix_ms
            member = verify_cert(signed, mesh_public_key=ours.public_key, now_ms=issued)
        except (MeshError, ValueError):
            return None
        return member.node_id

    async with (
        await LedgerStore.open(tmp_path / "a.db", a_id) as a,
        await LedgerStore.open(tmp_path / "b.db", b_id) as b,
        await LedgerStore.open(tmp_path / "c.db", c_id) as c,
        await LedgerStore.open(tmp_path / "x.db", made_up) as x,
    ):
        await _serve(a, a_id, 3)
        await _serve(x, made_up, 2, start=50)
        await a.remember_members({a_id.node_id: cert(ours, a_id)})
        await pull(a, made_up.node_id, asker(x), checker)  # a took in x's records unchecked
        await a.remember_members({made_up.node_id: cert(theirs, made_up)})  # another mesh's
        got = await pull(b, a_id.node_id, asker(a), checker, vouch=vouch)
        assert got.records == 3
        assert "records of 1 node(s) not proven members of this mesh ignored" in got.problems
        # The certificates travel with the records: c, two hops away, proves a's too.
        got = await pull(c, b_id.node_id, asker(b), checker, vouch=vouch)
        assert got.records == 3
        held = {open_record(r).node_id for r in read_ledger(tmp_path / "c.db")[0]}
        assert held == {a_id.node_id}
        # Years later the certificate has expired: what a signed as a member still counts.
        assert vouch(cert(ours, a_id)) == a_id.node_id


async def test_a_box_rebuilt_from_its_peer_gets_every_receipt_back_and_hands_on_new_ones(
    tmp_path: Path, checker: Checker
) -> None:
    """Receipts are asked for by the records they countersign, never by a peer's row
    numbers: a box whose ledger was lost and rebuilt numbers its rows afresh."""
    me, peer = Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "me.db", me) as mine,
        await LedgerStore.open(tmp_path / "peer.db", peer) as theirs,
    ):
        await _serve(mine, me, 5)
        await _serve(theirs, peer, 3, start=100)
        await pull(mine, peer.node_id, asker(theirs, me=me.node_id), checker)
        await pull(theirs, me.node_id, asker(mine, me=peer.node_id), checker)
    (tmp_path / "me.db").unlink()  # the disk is replaced; the identity key was backed up
    async with (
        await LedgerStore.open(tmp_path / "me.db", me) as mine,
        await LedgerStore.open(tmp_path / "peer.db", peer) as theirs,
    ):
        await pull(mine, peer.node_id, asker(theirs, me=me.node_id), checker)
        report = verify(*read_ledger(tmp_path / "me.db"))
        assert report.ok, report.problems  # its own countersignatures came back too
        assert report.records == 8
        await _serve(mine, me, 2, start=5)  # new records, countersigned here
        await pull(theirs, me.node_id, asker(mine, me=peer.node_id), checker)
        report = verify(*read_ledger(tmp_path / "peer.db"))
        assert report.ok, report.problems
        assert report.records == 10


async def test_signed_heads_are_countersigned_as_members_sync_and_come_back(
    tmp_path: Path, checker: Checker
) -> None:
    """Each node signs how far its chain reaches; a member holding the chain that far
    countersigns it, and the countersigned head travels on, back to its node too."""
    a_id, b_id, c_id = Identity.generate(), Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "a.db", a_id) as a,
        await LedgerStore.open(tmp_path / "b.db", b_id) as b,
        await LedgerStore.open(tmp_path / "c.db", c_id) as c,
    ):
        await _serve(a, a_id, 4)
        got = await pull(b, a_id.node_id, asker(a, me=b_id.node_id), checker)
        assert got.heads > 0
        await pull(a, b_id.node_id, asker(b, me=a_id.node_id), checker)
        await pull(c, b_id.node_id, asker(b, me=c_id.node_id), checker)
        for path in ("a.db", "b.db", "c.db"):
            held = read_ledger_file(tmp_path / path)
            report = verify(held.records, held.receipts, heads=held.heads)
            assert report.ok, report.problems
            head = report.heads[a_id.node_id]
            assert head.seq == 4
            assert b_id.node_id in head.countersigned_by, path
        # Nothing new: nothing more travels.
        again = await pull(b, a_id.node_id, asker(a, me=b_id.node_id), checker)
        assert again.progress == (0, 0, 0, 0, 0)
        # a moves on: it signs a new head when next asked.
        await _serve(a, a_id, 1, start=10)
        await pull(b, a_id.node_id, asker(a, me=b_id.node_id), checker)
        held = read_ledger_file(tmp_path / "b.db")
        assert verify(held.records, held.receipts, heads=held.heads).heads[a_id.node_id].seq == 5


async def test_a_refusal_travels_with_its_record_and_the_record_does_not_count(
    tmp_path: Path, checker: Checker
) -> None:
    """An entry node that refuses to countersign a record keeps it with its signed
    refusal; the serving node asks for the missing receipt by the record and gets the
    refusal; every box names the record and leaves it out of usage and quotas."""
    entry_id, server_id = Identity.generate(), Identity.generate()
    async with (
        await LedgerStore.open(tmp_path / "entry.db", entry_id) as entry,
        await LedgerStore.open(tmp_path / "server.db", server_id) as server,
    ):
        counted: list[int] = []
        entry.on_records = lambda records: counted.extend(r.seq for r in records)
        honest = await server.append(_usage(1, entry_id))
        greedy = await server.append(dataclasses.replace(_usage(2, entry_id), prompt_tokens=10**6))

        def judge(record: lpb.UsageRecord) -> str:
            return "it claims 1000000 prompt tokens" if record.prompt_tokens > 100 else ""

        for signed, request in ((honest, _usage(1, entry_id)), (greedy, _usage(2, entry_id))):
            await entry.accept(
                signed.SerializeToString(),
                served_by=server_id.node_id,
                request_id=request.request_id,
                judge=judge,
            )
        assert counted == [1]  # the refused record is kept, but not counted
        assert len(await entry.refusals()) == 1
        await entry.flush()  # the countersigned one is kept just after its answer
        assert await server.wanted() == [record_hash(greedy), record_hash(honest)]
        got = await pull(server, entry_id.node_id, asker(entry), checker)
        assert (got.receipts, got.refusals) == (1, 1)
        assert await server.wanted() == []
        held = read_ledger_file(tmp_path / "server.db")
        problems = verify(held.records, held.receipts, refusals=held.refusals).problems
        assert [(p.kind, p.seq) for p in problems] == [("refused", 2)]
        assert [r.seq for r in await server.usage_records()] == [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5), st.lists(st.binary(max_size=300), max_size=5))
def test_any_bytes_as_refusals_or_heads_are_rejected_never_crash(
    refusals: list[bytes], heads: list[bytes]
) -> None:
    received = check_batch([], [], [], refusals, heads)
    assert received.refusals == []
    assert received.heads == []
    assert len(received.rejected) == len(refusals) + len(heads)


async def test_records_a_node_signed_after_its_revocation_are_not_kept(
    tmp_path: Path, checker: Checker
) -> None:
    """Issue 12, finding 2: what a revoked node signs from then on counts nowhere, even when
    it reaches a member through a third node; what it signed before stays."""
    revoked, b_id = Identity.generate(), Identity.generate()
    revoked_at = 1_800_000_000_100 + 5  # records 0..4 ended before it, 5.. after
    async with (
        await LedgerStore.open(tmp_path / "c.db", revoked) as c,
        await LedgerStore.open(tmp_path / "b.db", b_id) as b,
    ):
        await _serve(c, revoked, 10)
        got = await pull(
            b,
            revoked.node_id,
            asker(c),
            checker,
            revoked_at=lambda node_id: revoked_at if node_id == revoked.node_id else None,
        )
        assert got.records == 5
        assert any("after their revocation" in p for p in got.problems)
        kept = {open_record(r).seq for r in read_ledger(tmp_path / "b.db")[0]}
        assert kept == {1, 2, 3, 4, 5}
