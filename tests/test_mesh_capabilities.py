"""Capabilities across the mesh, in process (tests/harness.py): cards advertise what each
model honours (tools, structured output, logprobs, ...), the scheduler sends a request only
where it can be honoured (a typed exclusion, shown by `explain`), a request nobody may
serve as asked is a 400 naming the field, and a failover continuation keeps the request's
constraints (tools and all) and goes only to a box that honours them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.config import embedded_model
from mesh.errors import UnsupportedParameter
from mesh.inference import (
    ChatMessage,
    Feature,
    Finished,
    FinishReason,
    InferenceRequest,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
)
from mesh.ledger.records import open_record
from mesh.routing.scheduler import Exclusion, Privacy, parse_needs
from node.serving.backends.llama_cpp import LlamaCppBackend
from node.store.config_file import embedded_model_path
from tests.harness import NodeSpec, Script, ScriptedBackend, ask, counting, mesh

MODEL = "shared"
TOOLS = frozenset({Feature.TOOLS, Feature.LOGPROBS})


def box(features: frozenset[Feature] = frozenset(), script: Script | None = None) -> NodeSpec:
    return NodeSpec(backends=[ScriptedBackend(script, model=MODEL, features=features)])


def with_tools(max_tokens: int = 60) -> InferenceRequest:
    return InferenceRequest(
        model=MODEL,
        messages=(
            ChatMessage(role="user", content="weather in Paris?"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=(ToolCall(id="call_1", name="weather", arguments='{"city":"Paris"}'),),
            ),
            ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ),
        sampling=Sampling(max_tokens=max_tokens, logprobs=True, top_logprobs=2),
        tools=(Tool(name="weather", parameters='{"type":"object"}'),),
        tool_choice=ToolChoice(mode=ToolChoiceMode.AUTO),
        parallel_tool_calls=False,
    )


async def test_a_request_with_tools_goes_past_a_nearer_box_that_cannot_honour_them(
    tmp_path: Path,
) -> None:
    specs = {"a": box(), "b": box(TOOLS, Script(tokens=("from", " b")))}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        plain = InferenceRequest(model=MODEL, prompt="hi", sampling=Sampling(max_tokens=4))
        assert (await ask(a.entry, plain)).answer.served_by.node_id == a.node_id  # local first
        got = await ask(a.entry, with_tools())
        assert (got.text, got.answer.served_by.node_id) == ("from b", b.node_id)
        # b's card said what it honours; what b was asked arrived whole over the wire.
        [asked] = b.backends[0].asked
        assert asked.tools == with_tools().tools
        assert asked.messages == with_tools().messages
        assert (asked.sampling.logprobs, asked.sampling.top_logprobs) == (True, 2)
        assert asked.parallel_tool_calls is False
        # explain shows the typed exclusion, by field.
        shown = a.entry.explain(MODEL, Privacy.MESH, None, parse_needs("tools"))
        [row] = [r for r in shown["candidates"] if r["node_id"] == a.node_id]
        assert "cannot honour tools" in row["status"]
        decided = a.entry.plan(with_tools(), Privacy.MESH)
        assert [x.reason for x in decided.excluded] == [Exclusion.CAPABILITY]
        assert decided.excluded[0].param == "tools"


async def test_nobody_who_may_serve_it_honours_a_field_is_a_400_naming_it(tmp_path: Path) -> None:
    specs = {"a": box(), "b": box(frozenset({Feature.LOGPROBS}))}
    async with mesh(tmp_path, specs) as m:
        a = m["a"]
        request = InferenceRequest(
            model=MODEL,
            prompt="hi",
            sampling=Sampling(max_tokens=4, presence_penalty=0.5, logprobs=True),
        )
        with pytest.raises(UnsupportedParameter) as info:
            await ask(a.entry, request)
        assert info.value.http_status == 400
        assert info.value.param == "presence_penalty"
        assert "presence_penalty" in info.value.message
        # Only a box the request may not reach honours it: still the field, not a 503.
        with pytest.raises(UnsupportedParameter) as local_only:
            await ask(
                a.entry,
                InferenceRequest(model=MODEL, prompt="hi", sampling=Sampling(logprobs=True)),
                Privacy.LOCAL_ONLY,
            )
        assert local_only.value.param == "logprobs"


async def test_a_peer_asked_directly_for_what_it_cannot_honour_refuses_it(tmp_path: Path) -> None:
    """The serving side checks too (a card may be stale): the entry node's plan lists b as
    able, b's own check says otherwise, and the client hears the field."""
    specs = {"a": NodeSpec(), "b": box(TOOLS)}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        b.backends[0].info = b.backends[0].info.__class__(name=MODEL, context_length=4096)
        with pytest.raises(UnsupportedParameter) as info:
            await ask(a.entry, with_tools())
        assert info.value.param == "tools"
        assert b.backends[0].asked == []


async def test_a_failover_continuation_keeps_the_constraints_and_skips_incapable_boxes(
    tmp_path: Path,
) -> None:
    specs = {
        "a": box(),  # nearest, but cannot honour tools: never asked
        "b": box(TOOLS, Script(tokens=counting(60), pause_after=10)),
        "c": box(TOOLS, Script(tokens=counting(60))),
    }
    async with mesh(tmp_path, specs) as m:
        a, b, c = m["a"], m["b"], m["c"]
        pieces: list[str] = []
        tokens = 0
        async with a.entry.answer(with_tools()) as answer:
            first = answer.served_by.node_id
            assert first in (b.node_id, c.node_id)
            serving, other = (b, c) if first == b.node_id else (c, b)
            async with contextlib.aclosing(answer.events()) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                        tokens += event.tokens
                        if tokens == 10:
                            m.net.cut(serving)
                    else:
                        assert isinstance(event, Finished)
            assert answer.failovers == [other.node_id]
        assert "".join(pieces) == "".join(counting(60))
        assert a.backends[0].asked == []
        [follow_up] = other.backends[0].asked
        assert follow_up.continuation == "".join(counting(10))
        assert follow_up.tools == with_tools().tools
        assert follow_up.tool_choice == with_tools().tool_choice
        assert follow_up.sampling.top_logprobs == 2


async def test_embeddings_go_to_the_peer_that_has_them_and_are_recorded(tmp_path: Path) -> None:
    specs = {"a": box(), "b": box(frozenset({Feature.EMBEDDINGS}))}
    async with mesh(tmp_path, specs) as m:
        a, b = m["a"], m["b"]
        request = InferenceRequest(model=MODEL, inputs=("one", "three"), user="")
        got = await ask(a.entry, request)
        assert got.answer.served_by.node_id == b.node_id
        assert got.finished.embeddings == ((3.0, 1.0), (5.0, 1.0))
        assert got.finished.prompt_tokens == 8
        await m.settled()
        await a.ledger.flush()  # a peer's record is committed just after the answer left
        [record] = [r for r in await a.ledger.records() if open_record(r).node_id == b.node_id]
        assert open_record(record).prompt_tokens == 8
        # Nobody else has embeddings: a 400 naming input.
        m.net.cut(a, b)
        with pytest.raises(UnsupportedParameter) as info:
            await ask(a.entry, InferenceRequest(model=MODEL, inputs=("x",)), Privacy.LOCAL_ONLY)
        assert info.value.param == "input"


async def test_an_echoed_prompt_is_not_continued_from_nor_echoed_twice(tmp_path: Path) -> None:
    prompt = "1, 2,"
    echoing = (prompt, " 3", ",", " 4", ",")
    echo = frozenset({Feature.ECHO})
    specs = {
        "a": NodeSpec(),
        "b": box(echo),
        "c": box(echo),
    }
    async with mesh(tmp_path, specs) as m:
        a, b, c = m["a"], m["b"], m["c"]
        for backend in (b.backends[0], c.backends[0]):  # whoever comes first pauses
            backend.script = Script(tokens=echoing, pause_after=2)
        request = InferenceRequest(
            model=MODEL, prompt=prompt, sampling=Sampling(max_tokens=5, echo=True)
        )
        pieces: list[str] = []
        async with a.entry.answer(request) as answer:
            serving = b if answer.served_by.node_id == b.node_id else c
            other = c if serving is b else b
            # What a box asked to continue after " 3" without echoing makes.
            other.backends[0].script = Script(tokens=echoing[1:])
            async with contextlib.aclosing(answer.events()) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                        if len(pieces) == 2:
                            m.net.cut(serving)
        assert "".join(pieces) == "".join(echoing)
        [follow_up] = other.backends[0].asked
        assert (follow_up.continuation, follow_up.sampling.echo) == (" 3", False)


async def test_a_tool_call_cut_mid_call_is_made_whole_by_the_next_box(tmp_path: Path) -> None:
    """A call's pieces reach the client when the answer finishes: a box failing half-way
    through a call costs the client nothing (the next box makes the call, under the same
    constraints), and the client never sees half a call."""
    calls = (
        ToolCallDelta(index=0, id="call_1", name="weather"),
        ToolCallDelta(index=0, arguments='{"city":'),
        ToolCallDelta(index=0, arguments='"Paris"}'),
    )
    paused = Script(tokens=(), calls=calls, pause_after=2)
    specs = {"a": NodeSpec(), "b": box(TOOLS, paused), "c": box(TOOLS, paused)}
    async with mesh(tmp_path, specs) as m:
        a = m["a"]
        got: list[ToolCallDelta] = []
        async with a.entry.answer(with_tools()) as answer:
            serving = m["b"] if answer.served_by.node_id == m["b"].node_id else m["c"]
            other = m["c"] if serving is m["b"] else m["b"]
            other.backends[0].script = Script(tokens=(), calls=calls)
            async with contextlib.aclosing(answer.events()) as events:
                reading = asyncio.create_task(anext(events))
                # The serving box has sent two pieces of the call and waits: none reached
                # the client yet.
                for _ in range(200):
                    if serving.backends[0].asked:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                assert not reading.done()
                m.net.cut(serving)
                event = await reading
                while isinstance(event, TextDelta):
                    got.extend(event.tool_calls)
                    event = await anext(events)
        assert isinstance(event, Finished)
        assert got == list(calls)  # one call, whole, from the other box
        assert answer.failovers == [other.node_id]
        [asked] = other.backends[0].asked
        assert asked.continuation == ""  # made again, not continued


def test_the_one_capable_peer_among_many_is_a_candidate_however_it_ranks() -> None:
    """The vectorized pre-selection knows nothing of capabilities: a request that needs some
    looks at every peer whose model has them, even the slowest, busiest one."""
    from mesh.inference import Load, ModelInfo, Route
    from mesh.routing.candidates import Estimate, candidates
    from mesh.routing.peers import PeerTable

    table = PeerTable()
    for i in range(20):
        capable = i == 19
        table.verified(
            node_id=f"n{i}",
            address=f"h:{i}",
            route=Route.LAN,
            models=(
                ModelInfo(
                    name=MODEL,
                    context_length=4096,
                    tokens_per_second=5.0 if capable else 80.0,
                    features=TOOLS if capable else frozenset(),
                ),
            ),
            display_name="",
            now_ms=0,
        )
        table.heartbeat_ok(
            f"n{i}",
            now_ms=0,
            rtt_ms=50.0 if capable else 1.0,
            load=Load(active_streams=2 if capable else 0, queued=0, slots=3),
        )
    request = with_tools()
    estimate = Estimate.of(request)
    plain = candidates(MODEL, local=None, peers=table, estimate=estimate)
    assert "n19" not in {c.node_id for c in plain}  # the pre-selection leaves it out
    found = candidates(MODEL, local=None, peers=table, estimate=estimate, needs=request.needs())
    assert [c.node_id for c in found] == ["n19"]


async def test_a_forced_tool_call_made_by_a_peer_comes_back_whole_and_counted(
    tmp_path: Path,
) -> None:
    """A real llama.cpp box behind the wire: the call's deltas arrive at the entry node in
    OpenAI's order, the answer ends with tool_calls, and the entry node countersigns what
    the peer claims (the wrapper the client never sees is within what bounds its tokens)."""
    config = replace(embedded_model(embedded_model_path()), name=MODEL, parallel=1, threads=1)
    real = LlamaCppBackend(config)
    await real.start()
    weather = Tool(
        name="get_weather",
        parameters=json.dumps(
            {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        ),
    )
    request = InferenceRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content="What is the weather in Paris?"),),
        sampling=Sampling(max_tokens=40, temperature=0),
        tools=(Tool(name="get_time"), weather),
        tool_choice=ToolChoice(mode=ToolChoiceMode.FUNCTION, function="get_weather"),
    )
    try:
        specs = {"a": NodeSpec(), "b": NodeSpec(backends=[real])}  # type: ignore[list-item]
        async with mesh(tmp_path, specs) as m:
            a, b = m["a"], m["b"]
            pieces: list[ToolCallDelta] = []
            async with a.entry.answer(request) as answer:
                async with contextlib.aclosing(answer.events()) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            assert event.text == ""
                            pieces.extend(event.tool_calls)
                        else:
                            finished = event
            assert answer.served_by.node_id == b.node_id
            assert finished.reason is FinishReason.TOOL_CALLS
            first, *rest = pieces
            assert (first.index, first.name) == (0, "get_weather")
            assert first.id.startswith("call_")
            assert all(p.index == 0 and not p.id and not p.name for p in rest)
            arguments = json.loads(first.arguments + "".join(p.arguments for p in rest))
            assert isinstance(arguments["city"], str)
            await m.settled()
            await a.ledger.flush()  # a peer's record is committed just after the answer left
            [record] = [r for r in await a.ledger.records() if open_record(r).node_id == b.node_id]
            # Not clamped: the entry node vouches for every token the peer counted.
            assert open_record(record).completion_tokens == finished.completion_tokens > 10
    finally:
        await real.aclose()


async def test_a_structured_answer_cut_mid_stream_is_finished_under_its_schema(
    tmp_path: Path,
) -> None:
    """Failover of a json_schema answer: the entry box's own source breaks after the first
    pieces of the object; a real llama.cpp box on the peer is asked to continue after them
    and starts its grammar past them, so what the client got, whole, parses and fits."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    halves = ('{"', "name", '": "', "Al")
    broken = Script(tokens=(*halves, "ice", '"'), fail_after=len(halves))
    structured = frozenset({Feature.STRUCTURED_OUTPUT})
    config = replace(embedded_model(embedded_model_path()), name=MODEL, parallel=1, threads=1)
    real = LlamaCppBackend(config)
    await real.start()
    request = InferenceRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content="Make up a person: name and age."),),
        sampling=Sampling(max_tokens=40, temperature=0),
        response_format=ResponseFormat(
            type=ResponseFormatType.JSON_SCHEMA, name="person", schema=json.dumps(schema)
        ),
    )
    try:
        specs = {
            "a": box(structured, broken),
            "b": NodeSpec(backends=[real]),  # type: ignore[list-item]
        }
        async with mesh(tmp_path, specs) as m:
            a, b = m["a"], m["b"]
            got = await ask(a.entry, request)
            assert got.answer.failovers == [b.node_id]
            [asked] = a.backends[0].asked
            assert asked.response_format == request.response_format
            assert got.text.startswith("".join(halves))
            assert got.finished.reason is FinishReason.STOP
            person = json.loads(got.text)
            assert set(person) == {"name", "age"}
            assert person["name"].startswith("Al")
            assert type(person["age"]) is int
    finally:
        await real.aclose()
