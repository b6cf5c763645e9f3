"""Cache-aware routing (issue 14 item 6): a conversation's prefixes are named the same way on
every node, the scheduler sends a next turn back to the box holding its start unless that box
is busy beyond what it saves, and, in process (tests/harness.py), a box's sealed card tells
its peers which conversations it holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidRequest
from mesh.inference import (
    MAX_HELD_PREFIXES,
    ChatMessage,
    InferenceRequest,
    ModelInfo,
    Route,
    Sampling,
    Tool,
    ToolCall,
)
from mesh.routing import prefix
from mesh.routing.peers import PeerTable
from mesh.routing.scheduler import Candidate, Privacy, estimate, plan
from mesh.wire import codec
from node.serving.backends.prompt_cache import PromptCache
from node.serving.models import MAX_CARD_PREFIXES, MIN_PREFIXES_PER_MODEL, LocalModels
from tests.harness import NodeSpec, Script, ScriptedBackend, ask, mesh

MODEL = "m"
LONG = " ".join(f"On day {i} we talked about the weather and it was fine." for i in range(100))

# --- the prefix keys -------------------------------------------------------------------------

texts = st.text(max_size=30)
calls = st.lists(
    st.builds(
        ToolCall,
        id=st.text(min_size=1, max_size=8),
        name=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
        arguments=texts,
    ),
    max_size=2,
)
messages = st.lists(
    st.one_of(
        st.builds(ChatMessage, role=st.sampled_from(["system", "user"]), content=texts),
        st.builds(ChatMessage, role=st.just("assistant"), content=texts, tool_calls=calls),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_node_names_every_prefix_the_same_way(chat: list[ChatMessage]) -> None:
    found = prefix.boundaries(chat)
    # The same messages, built anew (as another node parses them off the wire): same keys.
    again = [dataclasses.replace(m) for m in chat]
    assert prefix.boundaries(again) == found
    for n, boundary in enumerate(found, start=1):
        assert boundary.end == n
        assert boundary.key == prefix.conversation_key(chat[:n])  # what a holder advertises
        assert boundary.chars == sum(len(m.content) for m in chat[:n])
        assert len(boundary.key) == prefix.PREFIX_BYTES
    assert len({b.key for b in found}) == len(found)


@settings(max_examples=200, deadline=None)
@given(messages, messages)
def test_different_conversations_never_share_a_key(
    a: list[ChatMessage], b: list[ChatMessage]
) -> None:
    if a != b:
        assert prefix.conversation_key(a) != prefix.conversation_key(b)


def test_a_key_covers_every_field_that_reaches_the_prompt() -> None:
    chat = [ChatMessage(role="user", content="ab"), ChatMessage(role="assistant", content="c")]
    base = prefix.conversation_key(chat)
    moved = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="bc")]
    assert prefix.conversation_key(moved) != base  # message limits are part of the bytes
    assert prefix.conversation_key([dataclasses.replace(chat[0], name="zoe"), chat[1]]) != base
    assert prefix.conversation_key(chat, (Tool(name="weather"),)) != base  # tools are rendered
    lone = [ChatMessage(role="user", content="\ud800")]  # JSON may carry a lone surrogate
    assert prefix.conversation_key(lone) != prefix.conversation_key([])
    request = InferenceRequest(model=MODEL, messages=tuple(chat))
    assert prefix.request_key(request) == base
    assert prefix.request_key(dataclasses.replace(request, continuation="he")) is None
    assert prefix.request_boundaries(InferenceRequest(model=MODEL, prompt="ab")) == []


def test_a_text_prompt_is_named_by_its_whole_chunks() -> None:
    chunk = prefix.TEXT_CHUNK_CHARS
    assert prefix.request_key(InferenceRequest(model=MODEL, prompt="x" * (chunk - 1))) is None
    first = InferenceRequest(model=MODEL, prompt=LONG[: 3 * chunk + 10])
    key = prefix.request_key(first)
    # Its next turn (the prompt, its answer, more) holds that key among its boundaries, and
    # no chat shares a key with a text.
    then = prefix.request_boundaries(InferenceRequest(model=MODEL, prompt=LONG))
    assert prefix.longest_held(then, {key}) == prefix.Boundary(
        end=3 * chunk,
        key=key,
        chars=3 * chunk,  # type: ignore[arg-type]
    )
    chat = [ChatMessage(role="user", content=LONG[: 3 * chunk])]
    assert prefix.conversation_key(chat) not in {b.key for b in then}


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=1200), st.text(max_size=600))
def test_a_longer_prompt_keeps_the_boundaries_of_the_one_it_goes_on_from(
    start: str, more: str
) -> None:
    before = prefix.text_boundaries(start)
    after = prefix.text_boundaries(start + more)
    assert after[: len(before)] == before
    assert [b.end for b in after] == [
        prefix.TEXT_CHUNK_CHARS * (i + 1) for i in range(len(start + more) // 256)
    ]


def test_only_a_chat_or_a_prompt_carries_a_well_formed_cache_prefix() -> None:
    chat = (ChatMessage(role="user", content="hi"),)
    key = prefix.conversation_key(chat)
    sent = InferenceRequest(model=MODEL, messages=chat, cache_prefix=key)
    assert codec.request_from_pb(codec.request_to_pb(sent)) == sent  # sealed, whole
    with pytest.raises(InvalidRequest, match="cache_prefix"):
        InferenceRequest(model=MODEL, messages=chat, cache_prefix=b"short")
    InferenceRequest(model=MODEL, prompt="hi", cache_prefix=key)  # a text completion's
    with pytest.raises(InvalidRequest, match="cache_prefix"):
        InferenceRequest(model=MODEL, inputs=("hi",), cache_prefix=key)
    body = codec.request_to_pb(sent)
    body.cache_prefix = b"x" * 40  # a member's damaged request: refused, not used
    with pytest.raises(InvalidRequest, match="cache_prefix"):
        codec.request_from_pb(body)


def test_a_card_carries_a_bounded_set_of_well_formed_keys() -> None:
    keys = frozenset(bytes([i]) * prefix.PREFIX_BYTES for i in range(3))
    info = ModelInfo(name=MODEL, prefixes=keys, prompt_tokens_per_second=250.0)
    assert codec.model_from_pb(codec.model_to_pb(info)) == info
    for bad in (float("nan"), float("inf"), -3.0):
        damaged = codec.model_to_pb(info)
        damaged.prompt_tokens_per_second = bad
        assert codec.model_from_pb(damaged).prompt_tokens_per_second == 0.0  # not known
    card = codec.model_to_pb(info)
    card.prefixes.extend([b"bad", *(bytes([9, i]) * 8 for i in range(200))])
    read = codec.model_from_pb(card).prefixes
    assert len(read) <= MAX_HELD_PREFIXES
    assert all(len(k) == prefix.PREFIX_BYTES for k in read)


def test_a_box_with_many_models_keeps_its_card_small() -> None:
    class Holding(ScriptedBackend):
        def held_prefixes(self) -> frozenset[bytes]:
            return frozenset(f"{self.info.name}{i:06d}".encode()[-16:] for i in range(64))

    few = LocalModels("n", [Holding(model=f"m{i}") for i in range(2)])
    assert [len(info.prefixes) for info in few.models()] == [64, 64]
    many = LocalModels("n", [Holding(model=f"m{i}") for i in range(40)])
    sizes = [len(info.prefixes) for info in many.models()]
    assert all(size == MIN_PREFIXES_PER_MODEL for size in sizes)
    assert sum(sizes) <= max(MAX_CARD_PREFIXES, 40 * MIN_PREFIXES_PER_MODEL)
    assert many.models() == many.models()  # the same keys each time: no needless new card


def test_saved_prefixes_keep_the_keys_of_what_they_hold() -> None:
    cache = PromptCache(budget_bytes=100)
    assert cache.put([1, 2, 3], b"s" * 10, frozenset({b"a"}))
    assert cache.put([1, 2, 3, 4], b"s" * 10, frozenset({b"b"}))  # extends the first
    assert cache.keys() == [frozenset({b"a", b"b"})]  # the longer one holds both chats
    cache.add_keys([1, 2], frozenset({b"c"}))
    assert cache.keys() == [frozenset({b"a", b"b", b"c"})]
    assert cache.put([7] * 5, b"s" * 95, frozenset({b"d"}))  # over budget: the oldest goes
    assert cache.keys() == [frozenset({b"d"})]


# --- the scheduler's rule ----------------------------------------------------------------------

TURN_TOKENS = 1400  # the conversation so far, as the scheduler estimates it


def cand(node: str, route: Route, **kw: object) -> Candidate:
    defaults: dict[str, object] = {"model": MODEL, "slots": 16, "tokens_per_second": 50.0}
    return Candidate(node_id=node, route=route, **{**defaults, **kw})  # type: ignore[arg-type]


def holder(**kw: object) -> Candidate:
    return cand("holder", Route.LAN, rtt_ms=1.0, cached_tokens=TURN_TOKENS, **kw)


def decide(candidates: list[Candidate], **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "privacy": Privacy.MESH,
        "prompt_tokens": TURN_TOKENS + 20,
        "max_tokens": 50,
    }
    return plan(candidates, **{**args, **kw})  # type: ignore[arg-type]


def test_the_next_turn_goes_back_to_the_box_holding_its_start() -> None:
    here = cand("here", Route.LOCAL)
    decided = decide([here, holder()])
    assert decided.chosen is not None
    assert decided.chosen.candidate.node_id == "holder"
    assert decided.by_cache
    assert decided.reason.startswith("cache: it holds ~1400 tokens")
    # Off, the nearest idle box serves it (and reads the whole conversation).
    blind = decide([here, holder()], cache_aware=False)
    assert blind.chosen is not None
    assert blind.chosen.candidate.node_id == "here"
    assert not blind.by_cache
    assert all(s.candidate.cached_tokens == 0 for s in blind.order)


def test_reading_counts_the_measured_prompt_speed_less_what_is_held() -> None:
    assert estimate(cand("x", Route.LAN), new_tokens=0, prompt_tokens=1000).read_ms == 10_000
    measured = cand("x", Route.LAN, prompt_tokens_per_second=500.0)
    assert estimate(measured, new_tokens=0, prompt_tokens=1000).read_ms == 2000
    held = cand("x", Route.LAN, prompt_tokens_per_second=500.0, cached_tokens=900)
    assert estimate(held, new_tokens=0, prompt_tokens=1000).read_ms == 200
    assert estimate(held, new_tokens=0, prompt_tokens=10).read_ms == 0  # never below nothing


def test_a_busy_holder_loses_to_an_idle_box_once_its_wait_passes_what_it_saves() -> None:
    here = cand("here", Route.LOCAL)
    saved = (
        estimate(here, new_tokens=50, prompt_tokens=TURN_TOKENS + 20).read_ms
        - estimate(holder(), new_tokens=50, prompt_tokens=TURN_TOKENS + 20).read_ms
    )
    service_ms = 2000.0
    within = int(saved // service_ms) - 1  # requests ahead whose wait is less than it saves
    beyond = int(saved // service_ms) + 2
    busy = decide([here, holder(busy=within, service_ms=service_ms)])
    assert busy.chosen is not None
    assert busy.chosen.candidate.node_id == "holder"
    assert busy.by_cache
    too_busy = decide([here, holder(busy=beyond, service_ms=service_ms)])
    assert too_busy.chosen is not None
    assert too_busy.chosen.candidate.node_id == "here"
    assert not too_busy.by_cache
    assert [s.candidate.node_id for s in too_busy.order] == ["here", "holder"]  # failover


candidates_st = st.lists(
    st.builds(
        cand,
        node=st.sampled_from(["a", "b", "c", "d", "e"]),
        route=st.sampled_from(list(Route)),
        rtt_ms=st.floats(0, 80),
        busy=st.integers(0, 6),
        parallel=st.integers(1, 4),
        service_ms=st.sampled_from([0.0, 500.0, 5000.0]),
        tokens_per_second=st.sampled_from([0.0, 20.0, 80.0]),
        cached_tokens=st.sampled_from([0, 0, 200, 1400]),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda c: c.node_id,
)


@settings(max_examples=300, deadline=None)
@given(candidates_st, st.integers(0, 3000), st.sampled_from([0.0, 1000.0]))
def test_the_cache_only_ever_moves_a_request_to_a_quicker_holder(
    candidates: list[Candidate], prompt_tokens: int, max_wait_ms: float
) -> None:
    args = {
        "privacy": Privacy.ANY,
        "prompt_tokens": prompt_tokens,
        "max_tokens": 64,
        "max_wait_ms": max_wait_ms,
    }
    aware = plan(candidates, **args)  # type: ignore[arg-type]
    blind = plan(candidates, cache_aware=False, **args)  # type: ignore[arg-type]
    assert aware.chosen is not None
    assert blind.chosen is not None
    # The same candidates, in the same failover order but for the one the cache moved first.
    moved = [s.candidate.node_id for s in aware.order]
    assert [n for n in moved if n != moved[0]] == [
        s.candidate.node_id for s in blind.order if s.candidate.node_id != moved[0]
    ]
    if aware.by_cache:
        held = aware.chosen.candidate
        assert held.cached_tokens > 0
        assert aware.reason.startswith("cache:")
        # Quicker, counting what each candidate holds, than the choice without the cache.
        other = next(
            s for s in aware.order if s.candidate.node_id == blind.chosen.candidate.node_id
        )
        assert aware.chosen.eta_ms < other.eta_ms
    else:
        assert aware.chosen.candidate.node_id == blind.chosen.candidate.node_id
    if not any(c.cached_tokens for c in candidates):
        assert aware == blind


def test_the_peer_table_knows_who_holds_a_prefix() -> None:
    chat = [ChatMessage(role="user", content=LONG), ChatMessage(role="assistant", content="ok")]
    found = prefix.boundaries([*chat, ChatMessage(role="user", content="and then?")])
    table = PeerTable()

    def card(*keys: bytes) -> None:
        table.verified(
            node_id="p",
            address="a:1",
            route=Route.LAN,
            models=(ModelInfo(name=MODEL, prefixes=frozenset(keys)),),
            display_name="",
            now_ms=0,
        )

    card(prefix.conversation_key(chat[:1]))
    assert list(table.holding(found)) == ["p"]
    assert prefix.longest_held(found, table.get("p").models[0].prefixes) == found[0]  # type: ignore[union-attr]
    card()  # its next card: it holds nothing now
    assert table.holding(found) == {}
    table.note_held("p", MODEL, prefix.conversation_key(chat))  # it answered that chat
    assert list(table.holding(found)) == ["p"]
    card()  # its card, newer than the answer, says it holds nothing after all
    assert table.holding(found) == {}
    card(prefix.conversation_key(chat))
    assert list(table.holding(found)) == ["p"]
    table.forget("p", "gone")
    assert table.holding(found) == {}


# --- in process: two boxes, sealed cards -----------------------------------------------------


def conversation(*turns: str) -> InferenceRequest:
    """A chat whose first user message is ~1,400 tokens; `turns` alternate assistant/user."""
    said = [ChatMessage(role="user", content=LONG)]
    for i, text in enumerate(turns):
        said.append(ChatMessage(role="assistant" if i % 2 == 0 else "user", content=text))
    return InferenceRequest(
        model=MODEL, messages=tuple(said), sampling=Sampling(max_tokens=8), user="zoe"
    )


def box(script: Script | None = None) -> NodeSpec:
    return NodeSpec(backends=[ScriptedBackend(script, slots=16, remember=8)])


async def test_a_next_turn_goes_to_the_box_holding_its_start_unless_it_is_busy(
    tmp_path: Path,
) -> None:
    specs = {"a": box(), "b": box(Script(tokens=("from", " b")))}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        first = conversation()
        # The first turn enters at b, which serves it: b's prompt cache holds it now.
        assert (await ask(b.entry, first)).answer.served_by.node_id == b.node_id
        # a hears of it at its next heartbeat: a new card version, whose sealed card says so.
        await m.heartbeats(1)
        [info] = a.table.get(b.node_id).models  # type: ignore[union-attr]
        assert prefix.request_key(first) in info.prefixes
        # The next turn enters at a: idle, but b holds the conversation's start.
        second = conversation("from b", "and then?")
        decided = a.entry.plan(second, Privacy.MESH)
        assert decided.by_cache
        got = await ask(a.entry, second)
        assert (got.text, got.answer.served_by.node_id) == ("from b", b.node_id)
        # What b was asked carried the prefix it was chosen for, sealed; b still held it.
        assert b.backends[0].asked[-1].cache_prefix == prefix.request_key(first)
        assert b.models.cache_routed == {"asked": 1, "held": 1}
        assert a.backends[0].asked == []
        # At b's own door the conversation is served there; only what peers sent counts.
        mine = await ask(b.entry, conversation("from b", "and at b?"))
        assert mine.answer.served_by.node_id == b.node_id
        assert b.backends[0].asked[-1].cache_prefix == b""
        assert b.models.cache_routed == {"asked": 1, "held": 1}
        # explain (the route --messages path) shows the cache deciding, and what b holds.
        shown = a.entry.explain_request(conversation("from b", "and after?"), Privacy.MESH)
        assert shown["by_cache"]
        assert shown["reason"].startswith("cache:")
        [row] = [r for r in shown["candidates"] if r["node_id"] == b.node_id]
        assert (row["status"], row["cached_tokens"]) == ("chosen", len(LONG) // 4)

        # b busy beyond what it saves: twelve requests ahead of the turn wait longer there
        # (as a measures b's requests: 2 s each, one at a time) than a reads the whole
        # conversation (~14 s). Within it (a few ahead), b still gets the turn.
        others = [InferenceRequest(model=MODEL, prompt=f"other {i}") for i in range(12)]
        held_open = [await b.backends[0].open(request) for request in others[:3]]
        await m.heartbeats(1)
        assert a.entry.plan(conversation("from b", "and then?", "x", "?"), Privacy.MESH).by_cache
        held_open += [await b.backends[0].open(request) for request in others[3:]]
        try:
            await m.heartbeats(1)
            third = conversation("from b", "and then?", "fine", "more?")
            decided = a.entry.plan(third, Privacy.MESH)
            assert not decided.by_cache
            assert decided.chosen is not None
            assert decided.chosen.candidate.node_id == a.node_id
            [behind] = [s for s in decided.order if s.candidate.node_id == b.node_id]
            assert behind.candidate.cached_tokens > 0  # it still holds it, but is too busy
            assert (await ask(a.entry, third)).answer.served_by.node_id == a.node_id
        finally:
            for stream in held_open:
                await stream.aclose()


async def test_with_cache_aware_routing_off_the_nearest_box_serves(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box()}) as m:
        a, b = m["a"], m["b"]
        await ask(b.entry, conversation())
        await m.heartbeats(1)
        a.entry.reschedule(max_wait_ms=0, default_privacy=Privacy.MESH, cache_aware=False)
        second = conversation("Hello world", "and then?")
        assert (await ask(a.entry, second)).answer.served_by.node_id == a.node_id
        assert b.models.cache_routed == {"asked": 0, "held": 0}
        assert a.backends[0].asked[-1].cache_prefix == b""


async def test_a_box_holding_nothing_any_more_says_so_in_its_next_card(tmp_path: Path) -> None:
    async with mesh(tmp_path, {"a": box(), "b": box()}) as m:
        a, b = m["a"], m["b"]
        backend = b.backends[0]
        backend.remember = 1
        await ask(b.entry, conversation())
        await m.heartbeats(1)
        assert a.entry.plan(conversation("Hello world", "?"), Privacy.MESH).by_cache
        other = InferenceRequest(model=MODEL, messages=(ChatMessage(role="user", content="x"),))
        await ask(b.entry, other)  # b's one-conversation cache now holds another
        await m.heartbeats(1)
        decided = a.entry.plan(conversation("Hello world", "?"), Privacy.MESH)
        assert not decided.by_cache
        assert all(s.candidate.cached_tokens == 0 for s in decided.order)


async def test_the_entry_knows_at_once_what_a_peer_it_used_holds(tmp_path: Path) -> None:
    """A tool call's result or a quick reply comes back before the next heartbeat: the entry
    box that sent the chat to a peer knows the peer holds it from its answer on."""
    specs = {"a": box(), "b": box(Script(tokens=("from", " b")))}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        hog = await a.backends[0].open(InferenceRequest(model=MODEL, prompt="busy"))
        first = conversation()
        assert (await ask(a.entry, first)).answer.served_by.node_id == b.node_id  # a was busy
        await hog.aclose()
        [info] = a.table.get(b.node_id).models  # type: ignore[union-attr]
        assert prefix.request_key(first) in info.prefixes  # no heartbeat, no new card yet
        got = await ask(a.entry, conversation("from b", "and then?"))  # a is idle now
        assert got.answer.served_by.node_id == b.node_id
        assert b.models.cache_routed == {"asked": 1, "held": 1}
