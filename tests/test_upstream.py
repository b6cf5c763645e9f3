"""mesh.api.upstream: what goes to an OpenAI-compatible upstream and how its answers read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.upstream import (
    AnswerReader,
    ModelDefaults,
    error_from_status,
    error_message,
    read_models_list,
    request_body,
)
from mesh.errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    Overloaded,
    RemoteProtocolError,
    RequestTooLarge,
    Unavailable,
)
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    Sampling,
    TextDelta,
)

HELLO = (ChatMessage(role="user", content="Hello"),)


def chat_chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> str:
    delta = {} if content is None else {"content": content}
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return json.dumps(chunk)


def usage_chunk(prompt: int, completion: int) -> str:
    return json.dumps(
        {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )


def read(reader: AnswerReader, chunks: list[str]) -> tuple[list[TextDelta], Finished]:
    deltas = []
    for data in chunks:
        delta = reader.feed(data)
        if delta is not None:
            deltas.append(delta)
        if reader.complete:
            break
    tail, finished = reader.finish()
    if tail is not None:
        deltas.append(tail)
    return deltas, finished


# --- request bodies -------------------------------------------------------------------------


def test_chat_body_streams_with_usage_and_passes_every_sampling_field() -> None:
    request = InferenceRequest(
        model="front-name",
        messages=HELLO,
        sampling=Sampling(max_tokens=50, temperature=0.2, top_p=0.9, seed=7, stop=("END",)),
        user="alice",
    )
    path, body = request_body(request, model="meta-llama/Llama-3.1-8B-Instruct")
    assert path == "chat/completions"
    assert body == {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "user" not in body  # who asked stays in the mesh


def test_unset_sampling_fields_are_left_to_the_configured_defaults_or_the_upstream() -> None:
    request = InferenceRequest(model="m", messages=HELLO)
    _, bare = request_body(request, model="m")
    assert not {"max_tokens", "temperature", "top_p", "seed", "stop"} & set(bare)
    defaults = ModelDefaults(system_prompt="Be brief.", temperature=0.0, top_p=0.5)
    _, body = request_body(request, model="m", defaults=defaults)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["temperature"], body["top_p"]) == (0.0, 0.5)
    own = InferenceRequest(
        model="m",
        messages=(ChatMessage(role="system", content="Mine."), *HELLO),
        sampling=Sampling(temperature=1.0),
    )
    _, body = request_body(own, model="m", defaults=defaults)
    assert [m["content"] for m in body["messages"]] == ["Mine.", "Hello"]
    assert body["temperature"] == 1.0


def test_chat_continuation_asks_vllm_to_continue_the_final_assistant_message() -> None:
    request = InferenceRequest(model="m", messages=HELLO, continuation="Hi! How can")
    _, body = request_body(request, model="m")
    assert body["messages"][-1] == {"role": "assistant", "content": "Hi! How can"}
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    _, plain = request_body(InferenceRequest(model="m", messages=HELLO), model="m")
    assert "continue_final_message" not in plain


def test_text_completion_continuation_is_appended_to_the_prompt() -> None:
    request = InferenceRequest(model="m", prompt="1, 2,", continuation=" 3, 4,")
    path, body = request_body(request, model="m")
    assert path == "completions"
    assert body["prompt"] == "1, 2, 3, 4,"


# --- reading an answer ----------------------------------------------------------------------


def test_chat_answer_with_usage_counts_from_the_usage() -> None:
    reader = AnswerReader(chat=True)
    deltas, finished = read(
        reader,
        [
            chat_chunk(""),  # the role chunk
            chat_chunk("Hello"),
            chat_chunk(" world"),
            chat_chunk(None, "stop"),
            usage_chunk(12, 3),
            "[DONE]",
        ],
    )
    assert deltas == [TextDelta("Hello", 1), TextDelta(" world", 1)]
    assert finished == Finished(reason=FinishReason.STOP, prompt_tokens=12, completion_tokens=3)


def test_without_usage_every_content_chunk_is_one_token() -> None:
    reader = AnswerReader(chat=False)
    text = [json.dumps({"choices": [{"text": t, "finish_reason": None}]}) for t in "abc"]
    end = json.dumps({"choices": [{"text": "", "finish_reason": "length"}]})
    deltas, finished = read(reader, [*text, end, "[DONE]"])
    assert "".join(d.text for d in deltas) == "abc"
    assert finished == Finished(reason=FinishReason.LENGTH, prompt_tokens=0, completion_tokens=3)
    assert reader.usage is None


def test_cumulative_usage_on_every_chunk_gives_exact_tokens_per_delta() -> None:
    # vLLM with continuous_usage_stats: each chunk says how many tokens so far.
    reader = AnswerReader(chat=True)
    deltas, _ = read(
        reader,
        [
            chat_chunk("Hel", usage={"prompt_tokens": 5, "completion_tokens": 2}),
            chat_chunk("lo!", usage={"prompt_tokens": 5, "completion_tokens": 5}),
            chat_chunk(None, "stop", usage={"prompt_tokens": 5, "completion_tokens": 5}),
            "[DONE]",
        ],
    )
    assert [d.tokens for d in deltas] == [2, 3]


def test_a_stop_sequence_the_upstream_ignored_ends_the_answer_here() -> None:
    reader = AnswerReader(chat=True, stops=("END",))
    deltas, finished = read(
        reader, [chat_chunk("one E"), chat_chunk("ND two"), chat_chunk(" three", "stop")]
    )
    assert "".join(d.text for d in deltas) == "one "
    assert finished.reason is FinishReason.STOP
    # As with llama_cpp: the tokens that made the stop string count as generated, but
    # no delta carries them (their text never goes out).
    assert finished.completion_tokens == 2
    assert sum(d.tokens for d in deltas) == 1


def test_a_held_stop_prefix_is_released_when_the_answer_ends_without_the_stop() -> None:
    reader = AnswerReader(chat=True, stops=("END",))
    deltas, finished = read(reader, [chat_chunk("almost EN"), chat_chunk(None, "length")])
    assert [d.text for d in deltas] == ["almost ", "EN"]
    assert sum(d.tokens for d in deltas) == 1
    assert finished.reason is FinishReason.LENGTH


def test_an_upstream_running_past_max_tokens_is_cut_at_max_tokens() -> None:
    reader = AnswerReader(chat=True, max_tokens=2)
    deltas, finished = read(reader, [chat_chunk(t) for t in ["a", "b", "c", "d"]])
    assert "".join(d.text for d in deltas) == "ab"
    assert finished == Finished(reason=FinishReason.LENGTH, prompt_tokens=0, completion_tokens=2)


def test_an_answer_that_ends_before_finishing_is_a_protocol_error() -> None:
    reader = AnswerReader(chat=True)
    reader.feed(chat_chunk("partial"))
    with pytest.raises(RemoteProtocolError, match="ended before it finished"):
        reader.finish()


def test_finish_reason_without_done_is_a_complete_answer() -> None:
    reader = AnswerReader(chat=True)
    reader.feed(chat_chunk("ok", "stop"))
    assert reader.finish()[1].reason is FinishReason.STOP


def test_an_error_chunk_mid_answer_is_a_backend_error_with_the_upstreams_words() -> None:
    reader = AnswerReader(chat=True)
    reader.feed(chat_chunk("partial"))
    with pytest.raises(BackendError, match="failed mid-answer: CUDA out of memory"):
        reader.feed(json.dumps({"error": {"message": "CUDA out of memory", "code": 500}}))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("NaN", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"choices": "x"}', "choices must be a list of objects"),
        ('{"choices": [1]}', "choices must be a list of objects"),
        ('{"choices": [{"delta": "x"}]}', "delta must be an object"),
        ('{"choices": [{"delta": {"content": 5}}]}', "delta.content must be a string"),
        ('{"choices": [{"finish_reason": 1}]}', "finish_reason must be a string"),
        ('{"choices": [], "usage": 3}', "usage must be an object"),
        ('{"choices": [], "usage": {"prompt_tokens": -1}}', "usage.prompt_tokens must be"),
        ('{"choices": [], "usage": {"completion_tokens": "4"}}', "usage.completion_tokens"),
        ("[" * 100_000, "nests too deeply|not valid JSON"),
    ],
)
def test_malformed_chunks_are_protocol_errors_that_say_what_was_wrong(
    data: str, expected: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=expected):
        AnswerReader(chat=True).feed(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
chunk_shaped = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "index": json_values,
                    "delta": json_values
                    | st.fixed_dictionaries(
                        {"content": json_values},
                        optional={
                            "tool_calls": json_values
                            | st.lists(
                                st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "index": json_values,
                                        "id": json_values,
                                        "function": json_values
                                        | st.fixed_dictionaries(
                                            {"name": json_values, "arguments": json_values}
                                        ),
                                    },
                                ),
                                max_size=2,
                            )
                        },
                    ),
                    "text": json_values,
                    "finish_reason": json_values,
                    "logprobs": json_values
                    | st.fixed_dictionaries(
                        {},
                        optional={
                            "content": json_values
                            | st.lists(
                                st.fixed_dictionaries(
                                    {"token": json_values, "logprob": json_values},
                                    optional={"top_logprobs": json_values},
                                ),
                                max_size=2,
                            ),
                            "tokens": json_values,
                            "token_logprobs": json_values,
                            "top_logprobs": json_values,
                        },
                    ),
                },
            ),
            max_size=2,
        )
        | json_values,
        "usage": json_values
        | st.fixed_dictionaries({"prompt_tokens": json_values, "completion_tokens": json_values}),
        "error": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    chunks=st.lists(chunk_shaped.map(json.dumps) | st.text(max_size=40), max_size=5),
    chat=st.booleans(),
)
def test_any_chunks_give_deltas_or_a_mesh_error(chunks: list[str], chat: bool) -> None:
    reader = AnswerReader(chat=chat, stops=("x",), max_tokens=3)
    try:
        deltas, finished = read(reader, chunks)
    except (RemoteProtocolError, BackendError):
        return
    assert all(isinstance(d.text, str) and (d.text or d.tool_calls) for d in deltas)
    assert all(d.tokens >= 0 for d in deltas)
    assert "x" not in "".join(d.text for d in deltas)
    assert finished.completion_tokens >= 0


# --- errors ---------------------------------------------------------------------------------


def status_error(status: int, body: object, *, continuation: bool = False) -> MeshError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return error_from_status(
        status, raw, source="upstream http://gpu:8000/v1", model="llama", continuation=continuation
    )


@pytest.mark.parametrize(
    ("status", "body", "kind", "words"),
    [
        (429, {"error": {"message": "too many requests"}}, Overloaded, "too many requests"),
        (401, {"error": {"message": "bad key"}}, Unavailable, "check api_key_env"),
        (404, {"error": {"message": "The model `llama` does not exist."}}, ModelNotFound, "exist"),
        (413, b"too big", RequestTooLarge, "too big"),
        (
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens. However, you "
                "requested 5000 tokens",
                "type": "BadRequestError",
            },
            ContextLengthExceeded,
            "maximum context length is 2048",
        ),
        (
            400,
            {"error": {"message": "the request exceeds the available context size"}},
            ContextLengthExceeded,
            "context size",
        ),
        (422, {"detail": [{"msg": "field required"}]}, InvalidRequest, "field required"),
        (400, {"error": {"message": "temperature too high"}}, InvalidRequest, "temperature"),
        (503, b"<html>Service Unavailable</html>", Unavailable, "Service Unavailable"),
        (500, {"message": "engine died"}, BackendError, "engine died"),
        (302, b"", RemoteProtocolError, "unexpected HTTP status 302"),
    ],
)
def test_upstream_statuses_map_to_what_they_mean_for_the_client(
    status: int, body: object, kind: type[MeshError], words: str
) -> None:
    error = status_error(status, body)
    assert type(error) is kind
    assert words in error.message
    assert "upstream http://gpu:8000/v1" in error.message


def test_a_refused_continuation_is_retried_elsewhere_not_blamed_on_the_client() -> None:
    error = status_error(400, {"error": {"message": "Unrecognized argument"}}, continuation=True)
    assert isinstance(error, BackendError)
    assert "could not continue a partial answer" in error.message


def test_error_messages_are_one_short_printable_line() -> None:
    said = error_message(("line one\n\x1bred\x00 " + "x" * 1000).encode())
    assert said.startswith("line one red x")
    assert len(said) <= 300
    assert said.isprintable()
    assert error_message(b"") == "no details"


# --- GET /models ----------------------------------------------------------------------------


def test_models_list_from_vllm_gives_the_context_length() -> None:
    body = json.dumps(
        {"object": "list", "data": [{"id": "llama", "object": "model", "max_model_len": 8192}]}
    ).encode()
    listed = read_models_list(body, "llama")
    assert (listed.listed, listed.names, listed.context_length) == (True, ("llama",), 8192)


def test_models_list_of_an_allerac_node_knows_aliases() -> None:
    body = json.dumps(
        {"data": [{"id": "smollm2", "aliases": ["default"], "context_length": 2048}]}
    ).encode()
    assert read_models_list(body, "default").context_length == 2048
    other = read_models_list(body, "gpt-4")
    assert (other.listed, other.names, other.context_length) == (False, ("smollm2",), 0)


@pytest.mark.parametrize("body", [b"<html>", b"{}", b'{"data": [{"name": "x"}]}', b"\xff"])
def test_malformed_models_lists_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        read_models_list(body, "x")
