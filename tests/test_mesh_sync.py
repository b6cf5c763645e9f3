"""Ledger sync between nodes in process (tests/harness.py): three boxes each record what
they serve while one of them is cut off, and once the link is back their ledgers converge
to the same verified history, with every receipt, by `LedgerSync` rounds alone (driven
here, not by its timer). The end-to-end proof of sync between real processes is
tests/test_ledger_truncation.py (a box that lost records gets them back from its peer)
and tests/test_lan_mesh.py (`ledger verify` on every box after answers across it)."""

from __future__ import annotations

from pathlib import Path

from mesh.inference import InferenceRequest, Sampling
from mesh.ledger.records import open_record, verify
from mesh.routing.scheduler import Privacy
from tests.harness import MODEL, NodeSpec, Script, ScriptedBackend, ask, mesh


def _request(model: str = MODEL) -> InferenceRequest:
    return InferenceRequest(model=model, prompt="Say hi.", sampling=Sampling(max_tokens=4))


async def test_three_ledgers_converge_after_a_partition_heals(tmp_path: Path) -> None:
    def box(*models: str) -> NodeSpec:
        return NodeSpec(
            backends=[ScriptedBackend(Script(tokens=("hi", "!")), model=m) for m in models]
        )

    specs = {"a": box(MODEL), "b": box(MODEL), "c": box(MODEL, "c-only")}
    async with mesh(tmp_path, specs) as m:
        a, b, c = m["a"], m["b"], m["c"]
        got = await ask(a.entry, _request("c-only"))  # served by c for a: a countersigns
        assert got.answer.served_by.node_id == c.node_id
        m.net.cut(c)
        for node in (a, b, c):  # each side keeps serving, and recording, on its own
            for _ in range(2):
                await ask(node.entry, _request(), Privacy.LOCAL_ONLY)
        await ask(a.entry, _request())
        cut_off = await m.sync()
        assert any(outcome.error for outcome in cut_off)  # nobody reaches c, c nobody
        assert await c.held() != await a.held()
        m.net.restore(c)
        rounds = 0
        while not (await a.held() == await b.held() == await c.held()):
            rounds += 1
            assert rounds <= 2, "the ledgers did not converge in two rounds"
            outcomes = await m.sync()
            assert not [o.error for o in outcomes if o.error]
        records, receipts = await c.ledger.records(), await c.ledger.receipts()
        report = verify(records, receipts)  # every record, every node, every receipt
        assert report.ok, report.problems
        assert report.nodes == 3
        assert report.records >= 8
        # Every box tells the same story of who used what, where.
        usage = [
            sorted((r.node_id, r.route, r.completion_tokens) for r in map(open_record, records))
            for records in [await n.ledger.records() for n in (a, b, c)]
        ]
        assert usage[0] == usage[1] == usage[2]
        # A round with nothing new moves nothing.
        assert all(o.records == o.receipts == 0 for o in await m.sync())


async def test_a_user_added_on_one_box_reaches_every_box_by_sync(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": NodeSpec(), "b": NodeSpec(), "c": NodeSpec()}) as m:
        a, b, c = m["a"], m["b"], m["c"]
        key = await b.add_user("dora")
        m.net.cut(b, c)  # c learns of dora through a
        await m.sync(rounds=2)
        for node in (a, c):
            record = node.users.get("dora")
            assert record is not None
            assert node.users.home_of(record) == b.node_id
            assert node.users.caller(f"Bearer {key}", loopback=False).user == "dora"
