"""The OpenAI-compatible request parsers and response builders (pure functions, no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.openai_api import (
    SSE_DONE,
    Collected,
    ResponseIds,
    decode_json_body,
    error_body,
    parse_chat_request,
    parse_completion_request,
    split_choices,
    sse,
)
from mesh.errors import (
    BackendError,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
)
from mesh.inference import (
    MAX_MAX_TOKENS,
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    Sampling,
    TextDelta,
)

MAX = 1 << 20
USER_HI = [{"role": "user", "content": "hi"}]


def chat_body(**fields: Any) -> bytes:
    data: dict[str, Any] = {"model": "m", "messages": USER_HI}
    data.update(fields)
    return json.dumps(data).encode()


def completion_body(**fields: Any) -> bytes:
    data: dict[str, Any] = {"model": "m", "prompt": "Once upon"}
    data.update(fields)
    return json.dumps(data).encode()


def without(body: dict[str, Any], key: str) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != key}).encode()


# --- valid requests -------------------------------------------------------------------------


def test_chat_with_string_content() -> None:
    request, stream, _ = parse_chat_request(chat_body(), max_bytes=MAX)
    assert request.is_chat
    assert request.model == "m"
    assert request.messages == (ChatMessage(role="user", content="hi"),)
    assert request.prompt is None
    assert stream is False
    assert len(request.request_id) == 32


def test_each_parse_gets_a_fresh_request_id() -> None:
    first, _, _ = parse_chat_request(chat_body(), max_bytes=MAX)
    second, _, _ = parse_chat_request(chat_body(), max_bytes=MAX)
    assert first.request_id != second.request_id


def test_chat_with_text_part_array_joins_the_parts() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
        },
        {"role": "assistant", "content": None},
    ]
    request, _, _ = parse_chat_request(chat_body(messages=messages), max_bytes=MAX)
    assert request.messages == (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hello"),
        ChatMessage(role="assistant", content=""),
    )


def test_developer_role_becomes_system() -> None:
    messages = [{"role": "developer", "content": "rules"}, *USER_HI]
    request, _, _ = parse_chat_request(chat_body(messages=messages), max_bytes=MAX)
    assert request.messages is not None
    assert request.messages[0] == ChatMessage(role="system", content="rules")


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("END", ("END",)), (["a", "\n\n"], ("a", "\n\n")), (None, ()), ([], ())],
)
def test_stop_as_string_or_list(stop: Any, expected: tuple[str, ...]) -> None:
    request, _, _ = parse_chat_request(chat_body(stop=stop), max_bytes=MAX)
    assert request.sampling.stop == expected


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request, _, _ = parse_chat_request(
        chat_body(max_completion_tokens=7, max_tokens=99), max_bytes=MAX
    )
    assert request.sampling.max_tokens == 7
    request, _, _ = parse_chat_request(chat_body(max_tokens=99), max_bytes=MAX)
    assert request.sampling.max_tokens == 99


def test_sampling_fields_and_stream() -> None:
    body = chat_body(
        temperature=1,
        top_p=0.5,
        seed=-3,
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        user="alice",
        some_future_field={"x": 1},
    )
    request, stream, _ = parse_chat_request(body, max_bytes=MAX)
    assert stream is True
    assert request.sampling.temperature == 1.0
    assert isinstance(request.sampling.temperature, float)
    assert request.sampling.top_p == 0.5
    assert request.sampling.seed == -3
    assert request.sampling.max_tokens is None
    assert request.user == "alice"


def test_absent_sampling_fields_are_none() -> None:
    request, _, _ = parse_chat_request(chat_body(temperature=None, user=None), max_bytes=MAX)
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (
        None,
        None,
        None,
        None,
    )
    assert request.user == ""


@pytest.mark.parametrize("prompt", ["Once upon", ["Once upon"], ""])
def test_completion_prompt_forms(prompt: Any) -> None:
    request, stream, _ = parse_completion_request(
        completion_body(prompt=prompt, stream=True, max_tokens=5, stop="\n"), max_bytes=MAX
    )
    assert not request.is_chat
    assert request.messages is None
    assert request.prompt == (prompt[0] if isinstance(prompt, list) else prompt)
    assert stream is True
    assert request.sampling.max_tokens == 5
    assert request.sampling.stop == ("\n",)


def test_body_exactly_at_the_limit_is_accepted() -> None:
    body = chat_body()
    request, _, _ = parse_chat_request(body, max_bytes=len(body))
    assert request.model == "m"


# --- bad input ------------------------------------------------------------------------------

CHAT_ERRORS: list[tuple[str, bytes, str | None]] = [
    ("malformed json", b'{"model": "m", "messages": [', None),
    ("trailing garbage", chat_body() + b"x", None),
    ("empty body", b"", None),
    ("blank body", b"  \n\t", None),
    ("array body", b"[]", None),
    ("number body", b"1", None),
    ("string body", b'"hello"', None),
    ("null body", b"null", None),
    ("invalid utf-8", b'{"model": "m\xff", "messages": []}', None),
    ("deep nesting", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ("NaN", chat_body().replace(b'"model"', b'"temperature": NaN, "model"'), None),
    ("Infinity", chat_body().replace(b'"model"', b'"top_p": Infinity, "model"'), None),
    ("-Infinity", chat_body().replace(b'"model"', b'"seed": -Infinity, "model"'), None),
    ("missing model", without({"messages": USER_HI}, "model"), "model"),
    ("model not a string", chat_body(model=5), "model"),
    ("model blank", chat_body(model="  "), "model"),
    ("model too long", chat_body(model="m" * 257), "model"),
    ("missing messages", without({"model": "m"}, "messages"), "messages"),
    ("null messages", chat_body(messages=None), "messages"),
    ("empty messages", chat_body(messages=[]), "messages"),
    ("messages not array", chat_body(messages={"role": "user"}), "messages"),
    ("message not object", chat_body(messages=["hi"]), "messages[0]"),
    ("role missing", chat_body(messages=[{"content": "hi"}]), "messages[0].role"),
    ("role not string", chat_body(messages=[{"role": 1, "content": "x"}]), "messages[0].role"),
    ("unknown role", chat_body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (
        "content number",
        chat_body(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
    ),
    (
        "content part not object",
        chat_body(messages=[{"role": "user", "content": ["hi"]}]),
        "messages[0].content[0]",
    ),
    (
        "image part",
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages[0].content[0].type",
    ),
    (
        "part text not string",
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        "messages[0].content[0].text",
    ),
    ("max_tokens zero", chat_body(max_tokens=0), "max_tokens"),
    ("max_tokens negative", chat_body(max_tokens=-5), "max_tokens"),
    ("max_tokens too big", chat_body(max_tokens=MAX_MAX_TOKENS + 1), "max_tokens"),
    ("max_tokens string", chat_body(max_tokens="10"), "max_tokens"),
    ("max_tokens float", chat_body(max_tokens=1.5), "max_tokens"),
    ("max_tokens bool", chat_body(max_tokens=True), "max_tokens"),
    ("max_completion_tokens zero", chat_body(max_completion_tokens=0), "max_completion_tokens"),
    (
        "max_completion_tokens negative",
        chat_body(max_completion_tokens=-1),
        "max_completion_tokens",
    ),
    ("max_completion_tokens str", chat_body(max_completion_tokens="1"), "max_completion_tokens"),
    (
        "max_tokens bad type beside mct",
        chat_body(max_completion_tokens=5, max_tokens="x"),
        "max_tokens",
    ),
    ("temperature string", chat_body(temperature="hot"), "temperature"),
    ("temperature bool", chat_body(temperature=True), "temperature"),
    ("temperature above 2", chat_body(temperature=2.5), "temperature"),
    ("temperature negative", chat_body(temperature=-0.1), "temperature"),
    ("temperature huge float", chat_body(temperature=1e308 * 10), None),
    ("top_p zero", chat_body(top_p=0), "top_p"),
    ("top_p above 1", chat_body(top_p=1.5), "top_p"),
    ("top_p list", chat_body(top_p=[0.5]), "top_p"),
    ("seed float", chat_body(seed=1.5), "seed"),
    ("seed beyond 64 bits", chat_body(seed=1 << 63), "seed"),
    ("stop number", chat_body(stop=5), "stop"),
    ("stop list with number", chat_body(stop=["a", 1]), "stop"),
    ("too many stops", chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("empty stop", chat_body(stop=""), "stop"),
    ("stop too long", chat_body(stop="x" * 257), "stop"),
    ("n zero", chat_body(n=0), "n"),
    ("n string", chat_body(n="1"), "n"),
    ("stream string", chat_body(stream="yes"), "stream"),
    ("stream number", chat_body(stream=1), "stream"),
    ("stream_options string", chat_body(stream_options="x"), "stream_options"),
    ("user number", chat_body(user=5), "user"),
    ("user too long", chat_body(user="u" * 257), "user"),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS]
)
def test_bad_chat_request_is_a_400(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body, max_bytes=MAX)
    error = info.value
    assert type(error) is InvalidRequest
    assert error.http_status == 400
    if param is not None:
        assert error.param == param
    # The error body the client gets is well formed JSON.
    assert json.loads(json.dumps(error_body(error)))["error"]["code"] == "invalid_request"


def test_json_constants_are_named_in_the_error() -> None:
    body = chat_body().replace(b'"model"', b'"temperature": NaN, "model"')
    with pytest.raises(InvalidRequest, match="NaN is not a JSON number"):
        parse_chat_request(body, max_bytes=MAX)


def test_non_object_body_says_what_it_got() -> None:
    with pytest.raises(InvalidRequest, match="must be a JSON object, not an array"):
        decode_json_body(b"[1, 2]", max_bytes=MAX)


def test_malformed_json_names_line_and_column() -> None:
    with pytest.raises(InvalidRequest, match=r"line 2, column \d+"):
        decode_json_body(b'{"a": 1,\n "b" 2}', max_bytes=MAX)


def test_invalid_utf8_names_the_byte() -> None:
    with pytest.raises(InvalidRequest, match="not valid UTF-8 \\(byte 3\\)"):
        decode_json_body(b'{"a\xc3(": 1}', max_bytes=MAX)


@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
def test_oversized_body_is_a_413(parse: Any) -> None:
    body = chat_body(messages=[{"role": "user", "content": "x" * 2000}], prompt="x")
    with pytest.raises(RequestTooLarge) as info:
        parse(body, max_bytes=len(body) - 1)
    assert info.value.http_status == 413
    assert error_body(info.value)["error"]["code"] == "request_too_large"


def test_oversized_body_is_rejected_before_decoding() -> None:
    # Not even valid UTF-8, but too large: the size is what the client hears about.
    with pytest.raises(RequestTooLarge):
        decode_json_body(b"\xff" * 11, max_bytes=10)


COMPLETION_ERRORS: list[tuple[str, bytes, str | None]] = [
    ("missing prompt", without({"model": "m", "prompt": "x"}, "prompt"), "prompt"),
    ("prompt number", completion_body(prompt=5), "prompt"),
    ("prompt two strings", completion_body(prompt=["a", "b"]), "prompt"),
    ("prompt empty list", completion_body(prompt=[]), "prompt"),
    ("prompt token ids", completion_body(prompt=[1, 2]), "prompt"),
    ("prompt list of number", completion_body(prompt=[1]), "prompt"),
    ("suffix", completion_body(suffix="end"), "suffix"),
    ("missing model", without({"model": "m", "prompt": "x"}, "model"), "model"),
    ("max_tokens zero", completion_body(max_tokens=0), "max_tokens"),
    ("temperature range", completion_body(temperature=3), "temperature"),
    ("stream string", completion_body(stream="true"), "stream"),
    ("non-object", b"[]", None),
    ("bad json", b"{", None),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in COMPLETION_ERRORS], ids=[c[0] for c in COMPLETION_ERRORS]
)
def test_bad_completion_request_is_a_400(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(body, max_bytes=MAX)
    assert type(info.value) is InvalidRequest
    assert info.value.http_status == 400
    if param is not None:
        assert info.value.param == param


def test_huge_integer_temperature_is_a_400() -> None:
    body = chat_body().replace(b'"model"', b'"temperature": 1' + b"0" * 400 + b', "model"')
    with pytest.raises(InvalidRequest):
        parse_chat_request(body, max_bytes=MAX)


def test_integer_with_too_many_digits_is_a_400() -> None:
    body = chat_body().replace(b'"model"', b'"seed": 1' + b"0" * 5000 + b', "model"')
    with pytest.raises(InvalidRequest):
        parse_chat_request(body, max_bytes=MAX)


def test_error_names_the_field_that_was_actually_wrong() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(chat_body(max_completion_tokens=None, max_tokens=0), max_bytes=MAX)
    assert info.value.param == "max_tokens"


# --- responses ------------------------------------------------------------------------------


def collected(text: str) -> Collected:
    answer = Collected()
    answer.add(TextDelta(text))
    return answer


CHAT_REQUEST = InferenceRequest(model="alias", messages=(ChatMessage(role="user", content="q"),))
TEXT_REQUEST = InferenceRequest(model="alias", prompt="p")
DONE = Finished(reason=FinishReason.STOP, prompt_tokens=11, completion_tokens=4)
USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def test_chat_complete_shape() -> None:
    ids = ResponseIds(CHAT_REQUEST, "canonical-model", now=1_700_000_000.9)
    body = ids.complete(collected("Hello!"), DONE)
    assert body == {
        "id": "chatcmpl-" + CHAT_REQUEST.request_id,
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "canonical-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }


def test_text_complete_shape() -> None:
    ids = ResponseIds(TEXT_REQUEST, "canonical-model", now=5)
    finished = Finished(reason=FinishReason.LENGTH, prompt_tokens=2, completion_tokens=8)
    body = ids.complete(collected(" there"), finished)
    assert body["id"] == "cmpl-" + TEXT_REQUEST.request_id
    assert body["object"] == "text_completion"
    assert body["created"] == 5
    assert body["choices"] == [
        {"index": 0, "text": " there", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}


@pytest.mark.parametrize(
    ("reason", "wire"),
    [
        (FinishReason.STOP, "stop"),
        (FinishReason.LENGTH, "length"),
        (FinishReason.CANCELLED, "length"),
    ],
)
def test_finish_reasons_are_ones_openai_clients_know(reason: FinishReason, wire: str) -> None:
    finished = Finished(reason=reason, prompt_tokens=1, completion_tokens=1)
    for request in (CHAT_REQUEST, TEXT_REQUEST):
        ids = ResponseIds(request, "m", now=0)
        assert ids.complete(collected(""), finished)["choices"][0]["finish_reason"] == wire
        assert ids.chunk(None, finished)["choices"][0]["finish_reason"] == wire


def test_chat_stream_chunks() -> None:
    ids = ResponseIds(CHAT_REQUEST, "m", now=42)
    role = ids.role_chunk()
    piece = ids.chunk(TextDelta("Hel"))
    final = ids.chunk(None, DONE)
    tail = ids.usage_chunk(DONE)
    for body in (role, piece, final, tail):
        assert body["object"] == "chat.completion.chunk"
        assert body["id"] == "chatcmpl-" + CHAT_REQUEST.request_id
        assert body["created"] == 42
        assert body["model"] == "m"
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert piece["choices"] == [
        {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    ]
    assert final["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert "usage" not in piece
    assert tail["choices"] == []
    assert tail["usage"] == USAGE


def test_text_stream_chunks() -> None:
    ids = ResponseIds(TEXT_REQUEST, "m", now=1)
    piece = ids.chunk(TextDelta("abc"))
    final = ids.chunk(None, DONE)
    tail = ids.usage_chunk(DONE)
    for body in (piece, final, tail):
        assert body["object"] == "text_completion"
        assert body["id"] == "cmpl-" + TEXT_REQUEST.request_id
    assert piece["choices"] == [
        {"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}
    ]
    assert final["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]
    assert tail["choices"] == []
    assert tail["usage"] == USAGE


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            InvalidRequest("bad temperature", param="temperature"),
            {
                "message": "bad temperature",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_request",
            },
        ),
        (
            RequestTooLarge("too big"),
            {
                "message": "too big",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            },
        ),
        (
            ModelNotFound("no such model"),
            {
                "message": "no such model",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            },
        ),
        (
            Overloaded("busy"),
            {"message": "busy", "type": "rate_limit_error", "param": None, "code": "overloaded"},
        ),
        (
            BackendError("crashed"),
            {"message": "crashed", "type": "server_error", "param": None, "code": "backend_error"},
        ),
    ],
)
def test_error_body_shape(error: MeshError, expected: dict[str, Any]) -> None:
    assert error_body(error) == {"error": expected}


def test_sse_framing() -> None:
    payload = {"text": "line one\nline two\n\nhéllo ☃", "n": 1}
    frame = sse(payload)
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    line = frame[len(b"data: ") : -2]
    assert b"\n" not in line  # a newline in the text cannot end the event early
    assert "héllo ☃".encode() in line  # UTF-8, not \\u escapes
    assert json.loads(line.decode("utf-8")) == payload
    assert SSE_DONE == b"data: [DONE]\n\n"


# --- fuzzing: a request or a 400, nothing else ----------------------------------------------

# Integers stay within 64 bits here: bigger ones hit the known float-overflow and
# digit-limit bugs, which the xfail tests above pin down deterministically.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=1 << 64)
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | json_values
contents = (
    st.text(max_size=20)
    | st.lists(
        st.fixed_dictionaries(
            {}, optional={"type": st.just("text") | json_values, "text": st.text() | json_values}
        ),
        max_size=3,
    )
    | json_values
)
tool_call = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=5) | json_values,
        "type": st.just("function") | json_values,
        "function": st.fixed_dictionaries(
            {}, optional={"name": st.text(max_size=5) | json_values, "arguments": json_values}
        )
        | json_values,
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": roles,
            "content": contents,
            "tool_calls": st.lists(tool_call, max_size=2) | json_values,
            "tool_call_id": st.text(max_size=5) | json_values,
            "name": st.text(max_size=5) | json_values,
        },
    )
    | json_values,
    max_size=3,
)
field_values = {
    key: json_values
    for key in (
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "user",
        "suffix",
        # issue 15: every other OpenAI field, fuzzed too
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "echo",
        "best_of",
        "metadata",
        "modalities",
        "functions",
    )
}
shaped_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=10) | json_values,
        "messages": messages | json_values,
        "prompt": st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=2) | json_values,
        **field_values,
    },
)

PARSERS = [parse_chat_request, parse_completion_request]


def _request_or_400(parse: Any, body: bytes) -> None:
    try:
        request, stream, _ = parse(body, max_bytes=4096)
    except MeshError as exc:
        error = exc
    else:
        assert isinstance(request, InferenceRequest)
        assert isinstance(stream, bool)
        request.needs()  # and what it asks is readable
        return
    assert isinstance(error, InvalidRequest)
    assert error.http_status in (400, 413)
    json.dumps(error_body(error))


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=250, deadline=None)
@given(body=st.binary(max_size=512))
def test_arbitrary_bytes_give_a_request_or_a_mesh_error(parse: Any, body: bytes) -> None:
    _request_or_400(parse, body)


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=250, deadline=None)
@given(value=json_values)
def test_arbitrary_json_gives_a_request_or_a_mesh_error(parse: Any, value: Any) -> None:
    _request_or_400(parse, json.dumps(value).encode())


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=150, deadline=None)
@given(value=shaped_bodies)
def test_request_shaped_json_gives_a_request_or_a_mesh_error(parse: Any, value: Any) -> None:
    _request_or_400(parse, json.dumps(value).encode())


def test_n_choices_are_n_requests_of_one_with_their_own_ids_and_seeds() -> None:
    edge = (1 << 63) - 2
    request = InferenceRequest(model="m", prompt="x", sampling=Sampling(n=3, seed=edge))
    choices = split_choices(request)
    assert [c.sampling.n for c in choices] == [1, 1, 1]
    assert choices[0].request_id == request.request_id
    assert len({c.request_id for c in choices}) == 3  # each its own usage record
    # The seed moves on by one per choice, wrapping within 64 bits.
    assert [c.sampling.seed for c in choices] == [edge, edge + 1, -(1 << 63)]
    unseeded = split_choices(InferenceRequest(model="m", prompt="x", sampling=Sampling(n=2)))
    assert [c.sampling.seed for c in unseeded] == [None, None]
    one = InferenceRequest(model="m", prompt="x")
    assert split_choices(one) == [one]


def test_choices_render_with_their_index_and_usage_summed() -> None:
    request = InferenceRequest(model="m", prompt="x", sampling=Sampling(n=2))
    ids = ResponseIds(request, "m", now=0)
    answers = []
    for index, text in enumerate(["a", "bc"]):
        collected = Collected()
        collected.add(TextDelta(text))
        finished = Finished(reason=FinishReason.STOP, prompt_tokens=3, completion_tokens=index + 1)
        answers.append((collected, finished))
    body = ids.complete_choices(answers)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "a"), (1, "bc")]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    assert ids.chunk(TextDelta("z"), index=1)["choices"][0]["index"] == 1
