"""Quotas across nodes in process (tests/harness.py): a user's quota kept at their home
node, reserved there by every entry node (in process at the home, by sealed quota calls
elsewhere), leases, settlement with the answers' records, entry nodes racing for the last
tokens, a home that is away or restarted, and a cloud node's plan. The real-process tests
(tests/test_quotas.py, tests/test_quota_restarts.py) keep the end-to-end proof."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from mesh.errors import MeshError, QuotaExceeded, Unauthenticated, Unavailable
from mesh.inference import InferenceRequest, Route, Sampling, TextDelta
from mesh.quota.leases import RETRY_MS
from mesh.quota.rules import parse_quota, prompt_bound
from mesh.routing.scheduler import Privacy
from mesh.trust.membership import Role
from mesh.wire.v1 import ledger_pb2 as lpb
from node.serving import quota_service
from tests.harness import (
    MODEL,
    LogWatch,
    Mesh,
    NodeSpec,
    Script,
    ScriptedBackend,
    all_records,
    ask,
    counting,
    mesh,
    spend_until_refused,
    spent,
)

LIMIT = 400


def box(script: Script | None = None, *, slots: int = 2) -> NodeSpec:
    return NodeSpec(backends=[ScriptedBackend(script or Script(tokens=counting(8)), slots=slots)])


def request(user: str, max_tokens: int = 8, model: str = MODEL) -> InferenceRequest:
    return InferenceRequest(
        model=model, prompt="1, 2, 3,", sampling=Sampling(max_tokens=max_tokens), user=user
    )


async def _leases_back(m: Mesh, *names: str) -> None:
    """The entry nodes named stop and start again: a stopping node gives its leases back."""
    for name in names:
        await m[name].restart()
    await m.connect()


async def test_several_entry_nodes_never_spend_more_than_the_quota(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box(), "c": box()}) as m:
        a, b, c = m["a"], m["b"], m["c"]
        await a.add_user("alice", f"mesh={LIMIT}/day")  # a is her home: it keeps her quota
        await m.sync()  # the user reaches b and c with the ledger sync
        assert b.users.get("alice") is not None
        assert c.users.get("alice") is not None
        answered: list[int] = []
        refusals: list[MeshError] = []

        async def spend(entry: str) -> None:
            while True:
                try:
                    got = await ask(m[entry].entry, request("alice"))
                except MeshError as exc:
                    refusals.append(exc)
                    return
                answered.append(got.finished.completion_tokens)

        # Three at a time at each of the three entry nodes, until each is refused.
        async with asyncio.timeout(60):
            await asyncio.gather(*(spend(n) for n in "abc" for _ in range(3)))
        assert len(refusals) == 9
        # Then one entry node spends what the racing ones left, until it is refused too,
        # each time once the boxes' leases are back at alice's home.
        for _ in range(2):
            await _leases_back(m, "b", "c")
            await m.settled()
            assert a.reserved("alice") == 0
            more, refused = await spend_until_refused(b.entry, request("alice"))
            answered += [got.finished.completion_tokens for got in more]
            refusals.append(refused)
        used = spent(await all_records([a, b, c]), "alice")
        # The bound: zero. Reservations hold each request's most until its records count.
        assert used <= LIMIT
        assert used > LIMIT - (prompt_bound(request("alice")) + 8)  # and it really was spent
        assert len(answered) >= 10
        for error in refusals:
            assert isinstance(error, QuotaExceeded), error
            assert f"user 'alice' is over quota: mesh={LIMIT}/day" in error.message
            assert "resets at " in error.message
            assert error.resets_at
        # The owner's requests on the same boxes are not counted against alice.
        await ask(b.entry, request(""))
        assert spent(await all_records([a, b, c]), "alice") == used
        await _leases_back(m, "b", "c")
        await m.settled()
        [state] = a.quota_state("alice")
        assert state["reserved"] == 0
        assert state["used"] == used  # the home counts every entry node's records


async def test_the_next_request_finds_the_last_ones_reservation_released(
    tmp_path: Path,
) -> None:
    """A client that asks again the moment an answer ends is not refused for the
    reservation its last request held: the entry node's release (sent while the answer
    goes out) reaches the home before its next reserve. Here each release takes 0.3 s."""
    async with mesh(tmp_path, {"a": box(), "b": box()}) as m:
        a, b = m["a"], m["b"]
        needs = prompt_bound(request("alice")) + 8
        # Room for one request's reservation beside another's records, not for two
        # reservations at once.
        await a.add_user("alice", f"mesh={2 * needs - 6}/day")
        await m.sync()
        b.table.forget(a.node_id, "a box without the model, for this test")  # b serves it
        call = b.quota._call

        async def slow_releases(home: str, what: lpb.QuotaCall, user: str) -> lpb.QuotaGrant:
            if what.WhichOneof("call") == "release":
                await asyncio.sleep(0.3)
            return await call(home, what, user)

        b.quota._call = slow_releases  # type: ignore[method-assign]
        first = await ask(b.entry, request("alice"))
        second = await ask(b.entry, request("alice"))  # at once: the first's release is slow
        assert first.finished.completion_tokens == second.finished.completion_tokens == 8


async def test_a_client_that_hangs_up_gives_its_reservation_back(tmp_path: Path) -> None:
    async with mesh(
        tmp_path, {"a": box(), "b": box(Script(tokens=counting(400), pause_after=6))}
    ) as m:
        a, b = m["a"], m["b"]
        await a.add_user("bob", "mesh=5000/day")
        await m.sync()
        b.table.forget(a.node_id, "a box without the model, for this test")  # b serves it
        seen = 0
        async with b.entry.answer(request("bob", 400)) as answer:
            async with contextlib.aclosing(answer.events()) as events:
                async for event in events:
                    assert isinstance(event, TextDelta)
                    seen += event.tokens
                    if seen == 6:
                        assert a.reserved("bob") >= 400  # held at bob's home while it runs
                        break  # the client hangs up
        # b records what was delivered and releases at a, handing the record over; its
        # lease goes back when it stops.
        await m.settled()
        await _leases_back(m, "b")
        await m.settled()
        [state] = a.quota_state("bob")
        assert state["reserved"] == 0
        assert 0 < int(state["used"]) < 400  # type: ignore[call-overload]
        assert state["used"] == spent(await b.ledger.records(), "bob")


async def test_a_quota_change_and_a_removal_reach_every_box(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "c": box()}) as m:
        a, c = m["a"], m["c"]
        key = await a.add_user("carol", "mesh=1M/month")
        await m.sync()
        await ask(c.entry, request("carol"))  # c holds a lease for her now
        changed = await a.users.update("carol", quota=parse_quota("mesh=10/day"))
        assert changed["quota"] == "mesh=10/day"
        await m.sync()
        with pytest.raises(QuotaExceeded):  # the smaller quota holds at c, lease or not
            await ask(c.entry, request("carol"))
        await a.users.remove("carol")
        await m.sync()
        assert c.users.get("carol") is None
        with pytest.raises(Unauthenticated):
            c.users.caller(f"Bearer {key}", loopback=False)


async def test_without_its_home_a_limited_user_is_refused_clearly(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box()}) as m:
        a, b = m["a"], m["b"]
        await a.add_user("erin", "mesh=800/month")
        await m.sync()
        await ask(b.entry, request("erin", 1))  # b holds a lease: a quarter of what is left
        m.net.cut(a)  # a is gone
        # What the lease holds (reserved at a before it went) is still erin's to use; then
        # b cannot reserve anything more and says why, at once: it does not wait for its
        # release of the first request, which already failed to reach a and waits to try
        # again (it waited TELL_WAIT_S for it).
        loop = asyncio.get_running_loop()
        started = loop.time()
        served, refused = await spend_until_refused(b.entry, request("erin", 1))
        assert loop.time() - started < quota_service.TELL_WAIT_S
        assert served
        assert isinstance(refused, Unavailable)
        assert "quota of user 'erin' is kept by node" in refused.message
        assert spent(await b.ledger.records(), "erin") <= 800 // 4 + 40


async def test_a_cloud_node_holds_the_mesh_to_its_cloud_plan(tmp_path: Path) -> None:
    cloud = NodeSpec(
        backends=[ScriptedBackend(Script(tokens=counting(8)), model="cloud-only")],
        role=Role.OVERFLOW,
        cloud_plan=parse_quota("cloud=150/day"),
    )
    async with mesh(tmp_path, {"a": box(), "cloud": cloud}) as m:
        a = m["a"]
        served, refused = await spend_until_refused(
            a.entry, request("", model="cloud-only"), Privacy.ANY, most=50
        )
        assert served
        assert all(got.answer.served_by.route is Route.CLOUD for got in served)
        assert isinstance(refused, QuotaExceeded)
        assert "this mesh's cloud plan is used up: cloud=150/day" in refused.message
        assert refused.resets_at
        # Counted from the cloud node's own ledger: never past the plan.
        assert spent(await m["cloud"].ledger.records(), "") <= 150


# --- across a restart of the user's home ---------------------------------------------------------


async def test_a_homes_reservations_survive_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh(tmp_path, {"home": box(), "entry": box()}) as m:
        home, entry = m["home"], m["entry"]
        await home.add_user("ursula", "mesh=100k/day")
        await m.sync()
        await ask(entry.entry, request("ursula", 2))
        await m.settled()  # its reservation released; the lease stays
        held = home.reserved("ursula")
        assert held > 0  # the entry node's lease, reserved at her home
        caplog.set_level(logging.INFO, logger="node.serving.quota_service")
        await home.restart(crash=True)  # no chance to write anything on the way out
        assert home.reserved("ursula") == held  # taken back: nothing can be spent twice
        assert "took back" in caplog.text


async def test_a_lease_given_back_while_the_home_is_away_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_service, "RETRY_S", 0.01)
    async with mesh(tmp_path, {"home": box(), "entry": box()}) as m:
        home, entry = m["home"], m["entry"]
        await home.add_user("victor", "mesh=100k/day")
        await m.sync()
        await ask(entry.entry, request("victor", 2))
        assert home.reserved("victor") > 0
        m.net.cut(home)  # away while the entry node gives the lease back
        with LogWatch(quota_service.__name__, "cannot be told the lease ended") as retrying:
            stopping = asyncio.create_task(entry.close())
            async with asyncio.timeout(10):
                await retrying.seen.wait()
        assert home.reserved("victor") > 0
        m.net.restore(home)
        m.clock.advance(RETRY_MS / 1000)  # the next try is due (leases keep the node's time)
        await stopping
        assert home.reserved("victor") == 0  # the lease is back at the home
