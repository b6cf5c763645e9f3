"""The scheduler and the peer table, without sockets."""

from __future__ import annotations

import random
import unittest.mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidRequest
from mesh.inference import Load, ModelInfo, Route
from mesh.routing import peer_index
from mesh.routing.peer_index import ModelColumns
from mesh.routing.peers import (
    DOWN_AFTER_MS,
    SUSPECT_AFTER_MS,
    PeerState,
    PeerStateChanged,
    PeerTable,
)
from mesh.routing.scheduler import Candidate, Exclusion, Privacy, estimate, plan


def cand(node: str, route: Route, **kw: object) -> Candidate:
    defaults: dict[str, object] = {"model": "m", "slots": 4, "tokens_per_second": 50.0}
    return Candidate(node_id=node, route=route, **{**defaults, **kw})  # type: ignore[arg-type]


def chosen(candidates: list[Candidate], **kw: object) -> str | None:
    args: dict[str, object] = {"privacy": Privacy.ANY, "prompt_tokens": 10, "max_tokens": 100}
    decided = plan(candidates, **{**args, **kw})  # type: ignore[arg-type]
    return decided.chosen.candidate.node_id if decided.chosen else None


def test_an_idle_local_box_serves_first() -> None:
    assert chosen([cand("lan", Route.LAN, rtt_ms=0.5), cand("me", Route.LOCAL)]) == "me"


def test_a_busy_box_hands_off_to_an_idle_peer_unless_waiting_is_allowed() -> None:
    busy_local = cand("me", Route.LOCAL, busy=1, service_ms=3000)
    idle_peer = cand("lan", Route.LAN, rtt_ms=1.0)
    assert chosen([busy_local, idle_peer]) == "lan"
    assert chosen([busy_local, idle_peer], max_wait_ms=5000) == "me"


def test_within_a_tier_the_smallest_estimated_time_wins() -> None:
    slow = cand("slow", Route.LAN, tokens_per_second=10)
    fast = cand("fast", Route.LAN, tokens_per_second=100, rtt_ms=3)
    queued = cand("queued", Route.LAN, tokens_per_second=200, busy=2, service_ms=1000)
    assert chosen([slow, fast, queued]) == "fast"
    assert estimate(queued, new_tokens=100).wait_ms == 2000


def test_a_free_slot_starts_at_once_but_shares_the_decoding() -> None:
    generation_ms = 100 / 50 * 1000  # 100 tokens at 50 tokens/s
    # Four slots, one in use: nothing to wait for, but the answer shares the CPU with one.
    shared = cand("me", Route.LOCAL, busy=1, slots=12, parallel=4, service_ms=3000)
    assert estimate(shared, new_tokens=100).wait_ms == generation_ms
    # So an idle peer still takes it: two boxes serve two requests at twice the speed.
    assert chosen([shared, cand("lan", Route.LAN, rtt_ms=1.0)]) == "lan"
    # Every slot in use: wait for one (requests ahead / slots x service), then share it.
    full = cand("me", Route.LOCAL, busy=5, slots=12, parallel=4, service_ms=4000)
    assert estimate(full, new_tokens=100).wait_ms == 2 * 4000 / 4 + 3 * generation_ms
    # One slot is the plain queue: requests ahead x service time.
    queue = cand("q", Route.LAN, busy=2, parallel=1, service_ms=1000)
    assert estimate(queue, new_tokens=100).wait_ms == 2000


def test_further_tiers_only_when_nearer_ones_cannot_serve() -> None:
    full_lan = cand("lan", Route.LAN, busy=4, slots=4)
    cloud = cand("cloud", Route.CLOUD)
    relay = cand("relay", Route.RELAY, rtt_ms=40)
    assert chosen([full_lan, cloud, relay]) == "relay"
    assert chosen([full_lan, cloud]) == "cloud"
    decided = plan([full_lan, cloud], privacy=Privacy.MESH, prompt_tokens=1, max_tokens=1)
    assert decided.chosen is None
    reasons = {x.candidate.node_id: x.detail for x in decided.excluded}
    assert reasons["lan"].startswith("full")
    assert "privacy mesh" in reasons["cloud"]


def test_local_only_never_leaves_the_box() -> None:
    candidates = [cand("me", Route.LOCAL, busy=4, slots=4), cand("lan", Route.LAN)]
    assert chosen(candidates, privacy=Privacy.LOCAL_ONLY) is None
    with pytest.raises(InvalidRequest, match="privacy"):
        Privacy.parse("everywhere")


def test_context_and_state_exclude_with_reasons() -> None:
    small = cand("small", Route.LAN, context_length=512)
    down = cand("down", Route.LAN, available=False, unavailable_reason="peer is down")
    decided = plan([small, down], privacy=Privacy.ANY, prompt_tokens=400, max_tokens=200)
    assert decided.chosen is None
    assert {x.detail for x in decided.excluded} == {"context 512 too small", "peer is down"}
    assert {x.reason for x in decided.excluded} == {Exclusion.CONTEXT, Exclusion.UNAVAILABLE}


def test_when_every_tier_waits_the_smallest_estimate_wins_and_the_rest_is_failover() -> None:
    local = cand("me", Route.LOCAL, busy=3, service_ms=2000)
    lan = cand("lan", Route.LAN, busy=1, service_ms=2000)
    decided = plan([local, lan], privacy=Privacy.ANY, prompt_tokens=1, max_tokens=10)
    assert [s.candidate.node_id for s in decided.order] == ["lan", "me"]


def info(name: str = "m", tps: float = 50.0) -> tuple[ModelInfo, ...]:
    return (ModelInfo(name=name, aliases=("alias",), context_length=4096, tokens_per_second=tps),)


def test_peer_states_follow_heartbeats_and_silence() -> None:
    table = PeerTable()
    table.verified(
        node_id="p", address="a:1", route=Route.LAN, models=info(), display_name="", now_ms=0
    )
    assert table.get("p").state is PeerState.UP  # type: ignore[union-attr]
    assert table.tick(SUSPECT_AFTER_MS - 1) == []
    events = table.tick(SUSPECT_AFTER_MS)
    assert events == [PeerStateChanged("p", PeerState.UP, PeerState.SUSPECT, "silent for 2.0 s")]
    assert table.tick(DOWN_AFTER_MS)[0].new is PeerState.DOWN  # type: ignore[union-attr]
    assert table.best("m", k=3, new_tokens=10, needed_context=0) == []
    table.heartbeat_ok(
        "p", now_ms=DOWN_AFTER_MS + 5, rtt_ms=2.0, load=Load(active_streams=0, queued=0, slots=2)
    )
    assert table.get("p").state is PeerState.UP  # type: ignore[union-attr]
    assert [p.node_id for p in table.best("alias", k=3, new_tokens=10, needed_context=0)] == ["p"]
    table.heartbeat_ok(
        "p",
        now_ms=DOWN_AFTER_MS + 6,
        rtt_ms=2.0,
        load=Load(active_streams=0, queued=0, slots=2, draining=True),
    )
    assert table.get("p").state is PeerState.DOWN  # type: ignore[union-attr]
    assert table.forget("p", "gone")[0].node_id == "p"  # type: ignore[union-attr]
    assert table.best("m", k=3, new_tokens=10, needed_context=0) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_the_index_picks_what_a_full_plan_picks(n: int, seed: int) -> None:
    rng = random.Random(seed)
    table = PeerTable()
    for i in range(n):
        node = f"n{i}"
        table.verified(
            node_id=node,
            address=f"h:{i}",
            route=Route.LAN,
            models=info(tps=rng.choice([0.0, 20.0, 80.0])),
            display_name="",
            now_ms=0,
        )
        table.heartbeat_ok(
            node,
            now_ms=0,
            rtt_ms=rng.random() * 10,
            load=Load(
                active_streams=rng.randint(0, 3), queued=0, slots=3, parallel=rng.randint(1, 3)
            ),
        )
        if rng.random() < 0.2:
            table.forget(node, "churn")
    everyone = [
        cand(
            p.node_id,
            Route.LAN,
            rtt_ms=p.rtt_ms,
            busy=p.load.active_streams,
            slots=3,
            parallel=p.load.parallel,
            tokens_per_second=p.models[0].tokens_per_second,
            context_length=4096,
        )
        for p in table
    ]
    full = plan(everyone, privacy=Privacy.MESH, prompt_tokens=0, max_tokens=50).chosen
    best = table.best("m", k=1, new_tokens=50, needed_context=50)
    if full is None:
        assert best == []
    else:
        assert best
        assert estimate(full.candidate, new_tokens=50).eta_ms == pytest.approx(
            estimate(
                next(c for c in everyone if c.node_id == best[0].node_id), new_tokens=50
            ).eta_ms
        )


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=32), st.integers(min_value=0, max_value=2**32))
def test_a_few_peers_are_ranked_as_the_vector_path_ranks_them(n: int, seed: int) -> None:
    """Small tables take a plain loop (numpy's fixed cost is more than a loop's there);
    it ranks exactly like the vector operations it stands in for."""
    rng = random.Random(seed)
    columns = ModelColumns()
    for i in range(n):
        columns.upsert(
            f"n{i}",
            rtt=rng.random() * 10,
            busy=rng.randint(0, 3),
            slots=rng.randint(1, 3),
            parallel=rng.randint(0, 3),
            service=rng.choice([0.0, 50.0, 400.0]),
            tps=rng.choice([0.0, 20.0, 80.0]),
            ctx=rng.choice([0, 64, 4096]),
            available=rng.random() < 0.8,
        )
    for k, needed in ((1, 50), (3, 100), (n, 0)):
        loop = columns.best(k=k, new_tokens=50, needed_context=needed)
        with unittest.mock.patch.object(peer_index, "SMALL_TABLE", 0):
            vector = columns.best(k=k, new_tokens=50, needed_context=needed)
        assert sorted(loop) == sorted(vector)
        assert loop == sorted(loop, key=vector.index)  # same order, ties aside
