"""Issue 15, pure: every OpenAI chat/completions field is read, checked against OpenAI's
ranges and either honoured somewhere (what a request `needs`) or refused with a 400 naming
it; the wire carries it all; the `openai` upstream backend forwards it and maps tool calls
and logprobs back; the answer reaches clients in OpenAI's shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.api.openai_api import (
    IGNORED,
    REFUSED,
    Collected,
    ResponseIds,
    parse_chat_request,
    parse_completion_request,
)
from mesh.api.upstream import AnswerReader, request_body
from mesh.errors import InvalidRequest, RemoteProtocolError
from mesh.inference import (
    Feature,
    Finished,
    FinishReason,
    ResponseFormatType,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolChoiceMode,
    TopLogprob,
)
from mesh.wire import codec

MAX = 1 << 20
USER_HI = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
EVERYTHING: dict[str, Any] = {
    "model": "m",
    "messages": ROUND_TRIP,
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    "logprobs": True,
    "top_logprobs": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"15": -100, "7": 2.5},
    "seed": 7,
    "max_completion_tokens": 20,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": ["END"],
    "metadata": {"a": "b"},
    "store": False,
}


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": USER_HI, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "Once", **fields}).encode()


def test_every_chat_field_is_read_and_asks_for_what_it_needs() -> None:
    parsed = parse_chat_request(json.dumps(EVERYTHING).encode(), max_bytes=MAX)
    request = parsed.request
    assert request.tools[0].name == "get_weather"
    assert json.loads(request.tools[0].parameters)["properties"]["city"] == {"type": "string"}
    assert request.tools[0].strict is True
    assert request.tool_choice is not None
    assert request.tool_choice.mode is ToolChoiceMode.FUNCTION
    assert request.parallel_tool_calls is False
    assert request.response_format is not None
    assert request.response_format.type is ResponseFormatType.JSON_SCHEMA
    s = request.sampling
    assert (s.logprobs, s.top_logprobs, s.presence_penalty, s.frequency_penalty) == (
        True,
        3,
        0.5,
        -0.5,
    )
    assert s.logit_bias == ((7, 2.5), (15, -100.0))
    assert request.messages is not None
    assert request.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert request.messages[2].tool_call_id == "call_1"
    assert [param for _, param in request.needs()] == [
        "tools",
        "messages[1].tool_calls",
        "messages[2].role",
        "response_format",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    ]
    # The wire carries all of it, unchanged.
    assert codec.request_from_pb(codec.request_to_pb(request)) == request


def test_completions_read_echo_logprobs_and_n() -> None:
    request = parse_completion_request(
        completion(echo=True, logprobs=2, n=2, best_of=1), max_bytes=MAX
    ).request
    assert (request.sampling.echo, request.sampling.logprobs, request.sampling.top_logprobs) == (
        True,
        True,
        2,
    )
    assert {f for f, _ in request.needs()} == {Feature.ECHO, Feature.LOGPROBS, Feature.CHOICES}
    assert codec.request_from_pb(codec.request_to_pb(request)) == request


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(presence_penalty=2.5), "presence_penalty"),
        (chat(frequency_penalty=-2.01), "frequency_penalty"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(top_logprobs=2), "top_logprobs"),  # without logprobs
        (chat(logit_bias={"1": 101}), "logit_bias"),
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(logit_bias={"1": 10**400}), "logit_bias"),
        (chat(n=0), "n"),
        (chat(n=129), "n"),
        (chat(tool_choice="auto"), "tool_choice"),  # without tools
        (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (
            chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
        ),
        (chat(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
        (chat(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
        (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
        (chat(parallel_tool_calls=True), "parallel_tool_calls"),
        (chat(response_format={"type": "yaml"}), "response_format.type"),
        (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
        (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role"),
        (
            chat(messages=[{"role": "user", "content": "x", "tool_calls": []}, *USER_HI]),
            None,
        ),
        (chat(stream_options={"include_usage": True}), "stream_options"),  # without stream
        (
            chat(stream=True, stream_options={"include_usage": "yes"}),
            "stream_options.include_usage",
        ),
        (chat(audio={"voice": "x"}), "audio"),
        (chat(modalities=["text", "audio"]), "modalities"),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(top_k=40), "top_k"),
        (chat(guided_json={}), "guided_json"),
        (completion(logprobs=6), "logprobs"),
        (completion(best_of=2), "best_of"),
        (completion(tools=[WEATHER]), "tools"),
        (completion(suffix="x"), "suffix"),
        (chat(echo=True), "echo"),
    ],
)
def test_out_of_range_or_unsupported_fields_are_a_400_naming_them(
    body: bytes, param: str | None
) -> None:
    parse = parse_completion_request if b'"prompt"' in body else parse_chat_request
    if param is None:  # an empty tool_calls list on a user message is harmless
        parse(body, max_bytes=MAX)
        return
    with pytest.raises(InvalidRequest) as info:
        parse(body, max_bytes=MAX)
    assert info.value.http_status == 400
    assert info.value.param == param


def test_cosmetic_fields_are_ignored_and_refused_ones_are_not() -> None:
    request = parse_chat_request(
        chat(**dict.fromkeys(IGNORED, "x"), modalities=["text"]), max_bytes=MAX
    ).request
    assert request.needs() == ()
    assert not set(IGNORED) & set(REFUSED)


def test_include_usage_is_read_only_with_stream() -> None:
    assert parse_chat_request(chat(stream=True), max_bytes=MAX)[1:] == (True, False)
    streamed = chat(stream=True, stream_options={"include_usage": True})
    assert parse_chat_request(streamed, max_bytes=MAX)[1:] == (True, True)


# --- through an OpenAI-compatible upstream ---------------------------------------------------


def test_the_upstream_is_sent_every_field_as_openai_spells_it() -> None:
    request = parse_chat_request(json.dumps(EVERYTHING).encode(), max_bytes=MAX).request
    path, body = request_body(request, model="up")
    assert path == "chat/completions"
    for key in (
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "temperature",
        "top_p",
        "stop",
        "top_logprobs",
        "logprobs",
    ):
        assert body[key] == EVERYTHING[key], key
    assert body["logit_bias"] == {"7": 2.5, "15": -100.0}
    assert body["max_tokens"] == 20
    assert body["messages"] == ROUND_TRIP
    text = parse_completion_request(completion(echo=True, logprobs=2), max_bytes=MAX).request
    _, body = request_body(text, model="up")
    assert (body["echo"], body["logprobs"]) == (True, 2)


def _chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
    return json.dumps(
        {"choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    )


def test_streamed_tool_calls_and_logprobs_come_back() -> None:
    reader = AnswerReader(chat=True)
    lp = {
        "content": [
            {"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}]}
        ]
    }
    deltas = [
        reader.feed(_chunk({"content": "Hi"}, logprobs=lp)),
        reader.feed(
            _chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            )
        ),
        reader.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]})),
        reader.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ':"X"}'}}]})),
        reader.feed(_chunk({}, "tool_calls")),
    ]
    got = [d for d in deltas if d is not None]
    assert got[0].logprobs == (
        TokenLogprob(token="Hi", logprob=-0.1, top=(TopLogprob(token="Hi", logprob=-0.1),)),
    )
    assert got[1].tool_calls == (ToolCallDelta(index=0, id="call_9", name="get_weather"),)
    tail, finished = reader.finish()
    assert tail is None
    assert finished.reason is FinishReason.TOOL_CALLS
    # The client's objects: the calls put together, finish_reason tool_calls.
    answer = Collected()
    for delta in got:
        answer.add(codec.event_from_pb(codec.event_to_pb(delta, served_by=None)))  # type: ignore[arg-type]
    request = parse_chat_request(chat(logprobs=True, tools=[WEATHER]), max_bytes=MAX).request
    body = ResponseIds(request, "m", now=0).complete(answer, finished)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"X"}'},
        }
    ]
    assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "Hi"
    stream = ResponseIds(request, "m", now=0)
    piece = stream.chunk(got[1])["choices"][0]["delta"]
    assert piece == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_9",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }


def test_completion_logprobs_come_back_in_the_legacy_shape() -> None:
    reader = AnswerReader(chat=False)
    data = {
        "choices": [
            {
                "index": 0,
                "text": " Paris",
                "logprobs": {
                    "tokens": [" Paris"],
                    "token_logprobs": [-0.25],
                    "top_logprobs": [{" Paris": -0.25, " Lyon": -3.0}],
                },
                "finish_reason": "length",
            }
        ]
    }
    delta = reader.feed(json.dumps(data))
    assert delta is not None
    request = parse_completion_request(completion(logprobs=2), max_bytes=MAX).request
    chunk = ResponseIds(request, "m", now=0).chunk(delta)
    assert chunk["choices"][0]["logprobs"] == {
        "tokens": [" Paris"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{" Paris": -0.25, " Lyon": -3.0}],
        "text_offset": [0],
    }


@pytest.mark.parametrize(
    "bad",
    [
        _chunk({"tool_calls": "x"}),
        _chunk({"tool_calls": [{"index": -1}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"name": 5}}]}),
        _chunk({"content": "x"}, logprobs={"content": [{"token": 1, "logprob": 0}]}),
        _chunk({"content": "x"}, logprobs={"content": [{"token": "a", "logprob": "x"}]}),
        _chunk({"content": "x"}, logprobs=[1]),
    ],
)
def test_malformed_tool_calls_or_logprobs_are_protocol_errors(bad: str) -> None:
    with pytest.raises(RemoteProtocolError):
        AnswerReader(chat=True).feed(bad)


def test_a_finished_tool_call_answer_crosses_the_wire() -> None:
    finished = Finished(reason=FinishReason.TOOL_CALLS, prompt_tokens=3, completion_tokens=4)
    delta = TextDelta(
        "", 2, (TokenLogprob(token="{", logprob=None),), (ToolCallDelta(index=1, arguments="{}"),)
    )
    served = None
    assert codec.event_from_pb(codec.event_to_pb(delta, served)) == delta  # type: ignore[arg-type]
    back = codec.event_from_pb(codec.event_to_pb(finished, _served()))
    assert isinstance(back, Finished)
    assert back.reason is FinishReason.TOOL_CALLS


def _served() -> Any:
    from mesh.inference import Route, ServedBy

    return ServedBy(node_id="n", route=Route.LAN, model="m")


def test_the_ledger_bounds_count_tools_and_tool_calls() -> None:
    """A serving node's honest record of a tool answer is within what the entry node
    bounds: tool schemas and calls in the prompt, call arguments in the answer."""
    from mesh.ledger.bounds import Delivered, completion_tokens_bound
    from mesh.quota.rules import prompt_bound

    plain = parse_chat_request(
        json.dumps(
            {
                **EVERYTHING,
                "tools": None,
                "tool_choice": None,
                "parallel_tool_calls": None,
                "response_format": None,
                "max_completion_tokens": None,
                "messages": USER_HI,
            }
        ).encode(),
        max_bytes=MAX,
    ).request
    rich = parse_chat_request(json.dumps(EVERYTHING).encode(), max_bytes=MAX).request
    schema_bytes = len(rich.tools[0].parameters) + len(rich.tools[0].description)
    assert prompt_bound(rich) - prompt_bound(plain) > schema_bytes
    call = TextDelta("", 30, (), (ToolCallDelta(index=0, name="get_weather", arguments="{" * 40),))
    seen = Delivered().plus(call.delivered)
    assert completion_tokens_bound(plain, seen) >= 30


def test_a_peers_non_finite_logprob_never_reaches_json() -> None:
    from mesh.wire.v1 import node_pb2 as pb

    wire = pb.InferEvent(
        delta=pb.Delta(
            text="a",
            tokens=1,
            logprobs=[pb.TokenLogprob(token="a", logprob=float("nan"), top=[])],
        )
    )
    delta = codec.event_from_pb(wire)
    assert isinstance(delta, TextDelta)
    assert delta.logprobs[0].logprob is None
