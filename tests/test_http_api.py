"""The OpenAI-compatible HTTP API of one real node, driven by the official client."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.clients import openai_client
from tests.nodeproc import NodeProcess

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Iterator[openai.OpenAI]:
    # Loopback needs no key: the box's owner sends none.
    with openai_client(node.url + "/v1") as owner:
        yield owner


def raw_post(
    node: NodeProcess, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_models_list_names_the_embedded_model(client: openai.OpenAI) -> None:
    models = [m.id for m in client.models.list()]
    assert models == [MODEL]


def test_chat_greedy_answers_paris_with_usage_and_route_headers(
    client: openai.OpenAI, node: NodeProcess
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40
    )
    assert raw.headers["x-allerac-node"] == node.node_id
    assert raw.headers["x-allerac-route"] == "local"
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert "Paris" in text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 5
    assert 0 < completion.usage.completion_tokens <= 40
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_chat_stream_matches_non_streamed_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CAPITAL,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_alias_default_reaches_the_same_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=CAPITAL, temperature=0, max_tokens=5
    )
    assert completion.model == MODEL


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert "Paris" in whole.choices[0].text
    assert whole.usage.completion_tokens == 8
    assert whole.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=20
    )
    assert " 5" in free.choices[0].text
    stopped = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", temperature=0, max_tokens=20, stop=[" 5"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text.split(" 5")[0]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL,
            prompt="My favourite colour is",
            temperature=1.0,
            max_tokens=24,
            seed=seed,
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(1, 5)}) > 1


BAD_INPUTS = [
    ("malformed JSON", b'{"model": "default", "messages": [', 400, "invalid_request"),
    ("missing messages", b'{"model": "default"}', 400, "invalid_request"),
    (
        "unknown model",
        b'{"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}',
        404,
        "model_not_found",
    ),
    (
        "negative max_tokens",
        b'{"model": "default", "max_tokens": -3, "messages": [{"role": "user", "content": "hi"}]}',
        400,
        "invalid_request",
    ),
    (
        "invalid UTF-8",
        b'{"model": "default", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        "invalid_request",
    ),
    ("messages not a list", b'{"model": "default", "messages": "hi"}', 400, "invalid_request"),
    (
        "model not a string",
        b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
        400,
        "invalid_request",
    ),
    (
        "temperature a string",
        b'{"model": "default", "temperature": "hot", '
        b'"messages": [{"role": "user", "content": "x"}]}',
        400,
        "invalid_request",
    ),
    (
        "bad role",
        b'{"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}',
        400,
        "invalid_request",
    ),
    ("body not an object", b"[1, 2, 3]", 400, "invalid_request"),
    (
        "too long for the context",
        json.dumps(
            {
                "model": "default",
                "max_tokens": 4000,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode(),
        400,
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_chat_input_gets_openai_style_error(
    node: NodeProcess, body: bytes, status: int, code: str
) -> None:
    got, payload = raw_post(node, "/v1/chat/completions", body)
    assert got == status
    error = payload["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"] in ("invalid_request_error",)


def test_oversized_body_gets_413_and_node_keeps_serving(
    node: NodeProcess, client: openai.OpenAI
) -> None:
    huge = json.dumps(
        {"model": "default", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    ).encode()
    status, payload = raw_post(node, "/v1/chat/completions", huge)
    assert status == 413
    assert payload["error"]["code"] == "request_too_large"
    answer = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=3)
    assert answer.usage.completion_tokens > 0


def test_bad_completion_inputs(node: NodeProcess) -> None:
    cases = [
        (b'{"model": "default"}', 400),
        (b'{"model": "default", "prompt": ["a", "b"]}', 400),
        (b'{"model": "default", "prompt": "x", "max_tokens": 0}', 400),
        (b'{"model": "default", "prompt": "x", "n": 3}', 400),
        (b'{"model": "nope", "prompt": "x"}', 404),
    ]
    for body, status in cases:
        got, payload = raw_post(node, "/v1/completions", body)
        assert (got, sorted(payload["error"])) == (status, ["code", "message", "param", "type"])


def test_the_client_sees_errors_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert "no-such-model" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_unknown_endpoint_is_a_json_404(node: NodeProcess) -> None:
    status, payload = raw_post(node, "/v1/embeddings", b"{}")
    assert status == 404
    assert payload["error"]["code"] == "not_found"


def test_node_still_serves_after_every_bad_input(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=40
    )
    assert "Paris" in answer.choices[0].message.content
