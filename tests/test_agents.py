"""What agents call, against one real node on the embedded model (a llama.cpp box whose
chat template knows no tools: the generic format, mesh.api.tool_calls): tools through the
official client, then LangChain's `bind_tools` and `with_structured_output`, as a user
with an API key.

Nothing here may reach the internet: LangChain is only asked what it sends to the node
(it counts no tokens, so tiktoken never fetches its BPE files), and LangSmith tracing is
off unless its environment variables turn it on."""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest

from tests.clients import openai_client
from tests.nodeproc import NodeProcess, run_cli

MODEL = "smollm2-135m-instruct"
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
UNITS = ["celsius", "fahrenheit"]
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": UNITS}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def key(node: NodeProcess) -> str:
    added = run_cli(node.home, "user", "add", "agent")
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


@pytest.fixture(scope="module")
def client(node: NodeProcess, key: str) -> Iterator[openai.OpenAI]:
    with openai_client(node.url + "/v1", key) as user:
        yield user


def _valid_weather(arguments: str) -> dict[str, Any]:
    """The arguments, checked against GET_WEATHER's schema (by hand: no jsonschema here)."""
    value = json.loads(arguments)
    assert isinstance(value, dict)
    assert set(value) == {"city", "unit"}
    assert isinstance(value["city"], str)
    assert value["unit"] in UNITS
    return value


def _usage_rows(node: NodeProcess, key: str) -> dict[str, Any]:
    request = urllib.request.Request(
        node.url + "/allerac/usage?by=user", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    [row] = body["rows"]
    return dict(row)


def test_a_forced_function_call_validates_and_the_ledger_counts_it(
    client: openai.OpenAI, node: NodeProcess, key: str
) -> None:
    before = _usage_rows(node, key) if _has_rows(node, key) else {"requests": 0}
    answer = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=[GET_WEATHER, GET_TIME],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **GREEDY,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert _valid_weather(call.function.arguments)["city"] == "Paris"  # type: ignore[union-attr]
    assert answer.usage is not None
    after = _usage_rows(node, key)
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] - before.get("completion_tokens", 0) == (
        answer.usage.completion_tokens
    )


def _has_rows(node: NodeProcess, key: str) -> bool:
    request = urllib.request.Request(
        node.url + "/allerac/usage?by=user", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return bool(json.loads(response.read())["rows"])


def test_required_makes_a_call_and_none_makes_none(client: openai.OpenAI) -> None:
    required = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=[GET_WEATHER, GET_TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        **GREEDY,
    )
    assert required.choices[0].finish_reason == "tool_calls"
    [call] = required.choices[0].message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]
    none = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,  # type: ignore[arg-type]
        tools=[GET_WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        **{**GREEDY, "max_tokens": 8},
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    assert none.choices[0].message.content
    # The tools are not described to a model that may not call them.
    assert none.usage is not None
    assert required.usage is not None
    assert none.usage.prompt_tokens < required.usage.prompt_tokens


def _streamed(client: openai.OpenAI, **fields: Any) -> tuple[str, list[dict[str, str]], str]:
    """(content, calls reassembled from their deltas, finish_reason) of a streamed answer."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish = ""
    stream = client.chat.completions.create(model=MODEL, stream=True, **{**GREEDY, **fields})
    for chunk in stream:
        [choice] = chunk.choices
        content.append(choice.delta.content or "")
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            if piece.id:
                assert not call["id"], "a call's id comes once, in its first piece"
                assert piece.type == "function"
                assert piece.function is not None
                assert piece.function.name
                call["id"] = piece.id
            if piece.function is not None:
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content), [calls[i] for i in sorted(calls)], finish


def test_a_tool_round_trip_streamed_and_not(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "messages": WEATHER_QUESTION,
        "tools": [GET_WEATHER],
        "tool_choice": "required",
    }
    plain = client.chat.completions.create(model=MODEL, **{**GREEDY, **asked})
    [call] = plain.choices[0].message.tool_calls or []
    content, [streamed_call], finish = _streamed(client, **asked)
    # Stream deltas reassemble into the same call (its id aside).
    assert (content, finish) == ("", "tool_calls")
    assert streamed_call["id"].startswith("call_")
    assert (streamed_call["name"], json.loads(streamed_call["arguments"])) == (
        call.function.name,  # type: ignore[union-attr]
        _valid_weather(call.function.arguments),  # type: ignore[union-attr]
    )
    conversation = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"},
    ]
    follow_up = {"messages": conversation, "tools": [GET_WEATHER], "tool_choice": "auto"}
    follow_up["max_tokens"] = 12
    final = client.chat.completions.create(model=MODEL, **{**GREEDY, **follow_up})
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    text = final.choices[0].message.content or ""
    assert "22 degrees" in text  # answered from the tool's result
    # Streamed too. (Not compared word for word: the second read of a prompt comes from
    # the prompt cache, whose last token is decoded alone, and a near tie between two
    # words can fall the other way.)
    streamed_text, streamed_calls, streamed_finish = _streamed(client, **follow_up)
    assert "22 degrees" in streamed_text
    assert (streamed_calls, streamed_finish in ("stop", "length")) == ([], True)


def test_a_tool_message_for_no_call_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[*WEATHER_QUESTION, {"role": "tool", "content": "22"}],  # type: ignore[list-item]
            tools=[GET_WEATHER],  # type: ignore[list-item]
        )
    assert info.value.body["param"] == "messages[1].tool_call_id"  # type: ignore[index]


# --- LangChain -------------------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    """Current weather in a city"""

    city: str
    unit: str


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection beyond this machine fails the test (CI reaches no internet)."""
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback:
            pytest.fail(f"a connection to {address} (nothing may be downloaded at run time)")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def chat_model(node: NodeProcess, key: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=node.url + "/v1",
        api_key=key,  # type: ignore[arg-type]
        model=MODEL,
        temperature=0,
        max_tokens=40,  # type: ignore[call-arg]
        max_retries=0,
    )


@pytest.mark.usefixtures("loopback_only")
def test_langchain_bind_tools_with_a_forced_tool_returns_a_valid_call(chat_model: Any) -> None:
    bound = chat_model.bind_tools([GET_WEATHER], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    assert call["id"].startswith("call_")
    _valid_weather(json.dumps(call["args"]))


@pytest.mark.usefixtures("loopback_only")
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(chat_model: Any, method: str) -> None:
    structured = chat_model.with_structured_output(Weather, method=method)
    weather = structured.invoke("Give the weather in Paris as JSON with a city and a unit.")
    assert isinstance(weather, Weather)
    assert weather.city
