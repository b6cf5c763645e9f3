"""Tool calls in the generic format (mesh.api.tool_calls): the prompt a model without a
tool-aware template gets, the grammar's schema, and the reader of its answers, fuzzed."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.api.tool_calls import (
    ToolCallReader,
    call_schema,
    generic_messages,
    instructions,
    parse_calls,
    template_input,
)
from mesh.inference import (
    ChatMessage,
    InferenceRequest,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
)

WEATHER = Tool(
    name="get_weather",
    description="Current weather in a city",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
)
TIME = Tool(name="get_time")
TOOLS = (WEATHER, TIME)
KNOWN = frozenset(t.name for t in TOOLS)


def _read(
    pieces: list[str], *, forced: bool = False, parallel: bool = True
) -> tuple[str, dict[int, list[str]], bool]:
    """Feed `pieces` to a reader: (text sent, {index: [id, name, arguments]}, done)."""
    ids = (f"call_{i}" for i in itertools.count())
    reader = ToolCallReader(TOOLS, forced=forced, parallel=parallel, new_id=lambda: next(ids))
    texts: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        text, calls = reader.feed(piece)
        texts.append(text)
        deltas.extend(calls)
    text, calls = reader.finish()
    texts.append(text)
    deltas.extend(calls)
    assembled: dict[int, list[str]] = {}
    for delta in deltas:
        call = assembled.setdefault(delta.index, ["", "", ""])
        if delta.id:
            assert not call[0], "a call's id comes once"
            assert delta.name, "the first piece names the call"
        call[0] += delta.id
        call[1] += delta.name
        call[2] += delta.arguments
    return "".join(texts), assembled, reader.done


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


GENERIC = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
    '"n": [1, {"a": "]"}]}}, {"name": "get_time", "arguments": {}}]}'
)


@settings(deadline=None)  # a loaded machine must not fail it
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_a_call_streams_the_same_however_the_text_is_cut(cuts: list[int]) -> None:
    text, calls, done = _read(_split(GENERIC, cuts))
    assert text == ""
    assert done
    assert calls == {
        0: ["call_0", "get_weather", '{"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}'],
        1: ["call_1", "get_time", "{}"],
    }
    assert json.loads(calls[0][2]) == {"city": 'Pa"ris}', "n": [1, {"a": "]"}]}


def test_one_call_only_when_parallel_calls_are_off() -> None:
    _, calls, done = _read([GENERIC], parallel=False)
    assert list(calls) == [0]
    assert done


@pytest.mark.parametrize(
    "answer",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # Llama 3's bare call
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '```json\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}\n```',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '{"tool_calls": [{"arguments": {"city": "Paris"}, "name": "get_weather"}]}',
        '{"tool_calls": [{"type": "function", "function": {"name": "get_weather", '
        '"arguments": "{\\"city\\": \\"Paris\\"}"}}]}',  # OpenAI's own shape
    ],
)
def test_other_ways_of_writing_a_call_are_read_whole(answer: str) -> None:
    text, calls, _ = _read(list(answer))
    assert text == ""
    [(call_id, name, arguments)] = calls.values()
    assert (call_id, name, json.loads(arguments)) == ("call_0", "get_weather", {"city": "Paris"})


@pytest.mark.parametrize(
    "answer",
    [
        "The weather in Paris is sunny.",
        '{"tool_calls": [{"name": "launch_rockets", "arguments": {}}]}',  # not a tool given
        '{"city": "Paris"}',
        "```python\nprint(1)\n```",
        '  {"tool_calls": [{"name": "get_wea',  # cut off before its name is complete
        'Sure: {"tool_calls": []}',
    ],
)
def test_what_is_not_a_call_goes_out_as_text_unchanged(answer: str) -> None:
    assert _read(list(answer)) == (answer, {}, False)


def test_plain_text_goes_out_at_once() -> None:
    reader = ToolCallReader(TOOLS, forced=False, parallel=True)
    assert reader.feed("  ") == ("", ())
    assert reader.feed("Hel") == ("  Hel", ())
    assert reader.feed("lo") == ("lo", ())


def test_a_forced_call_cut_off_sends_what_it_has() -> None:
    text, calls, done = _read(
        ['{"tool_calls": [{"name": "get_weather", "arguments": {"ci'], forced=True
    )
    assert (text, calls, done) == ("", {0: ["call_0", "get_weather", '{"ci']}, False)
    assert _read(['{"tool_calls": [{"na'], forced=True) == ("", {}, False)


@settings(deadline=None)  # a loaded machine must not fail it
@given(st.text(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_the_reader_never_raises_and_loses_no_text(text: str, cuts: list[int]) -> None:
    for forced in (False, True):
        sent, calls, _ = _read(_split(text, cuts), forced=forced)
        for _, name, _ in calls.values():
            assert name in KNOWN
        if not forced and not calls:
            assert sent == text
        if forced:
            assert sent == ""


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(sorted(KNOWN)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["tool_calls", "name", "arguments", "parameters", "function", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(deadline=None)  # a loaded machine must not fail it
@given(JSONISH, st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_the_reader_never_raises_on_call_shaped_json(value: Any, cuts: list[int]) -> None:
    text = json.dumps(value)
    for forced in (False, True):
        sent, calls, _ = _read(_split(text, cuts), forced=forced)
        assert all(name in KNOWN for _, name, _ in calls.values())
        assert forced or calls or sent == text
    assert parse_calls(text, KNOWN) is None or isinstance(parse_calls(text, KNOWN), list)


def _request(*messages: ChatMessage, choice: ToolChoice | None = None) -> InferenceRequest:
    return InferenceRequest(model="m", messages=messages, tools=TOOLS, tool_choice=choice)


USER = ChatMessage(role="user", content="What is the weather in Paris?")
CALLED = ChatMessage(
    role="assistant",
    content="",
    tool_calls=(ToolCall(id="call_9", name="get_weather", arguments='{"city": "Paris"}'),),
)
RESULT = ChatMessage(role="tool", content="22 degrees and sunny", tool_call_id="call_9")


def test_the_generic_prompt_describes_the_tools_and_writes_out_calls_and_results() -> None:
    second = ChatMessage(role="tool", content="12:00", tool_call_id="call_8", name="get_time")
    messages = generic_messages(
        _request(USER, CALLED, RESULT, second, USER), system_prompt="Be brief."
    )
    assert [m["role"] for m in messages] == ["system", "user", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.")
    assert json.dumps(json.loads(WEATHER.parameters)) in system
    assert '{"tool_calls": [{"name": "get_weather"' in system
    # The call (an assistant turn with nothing else) comes back with its results, in the
    # user's turn (user and assistant turns still alternate).
    assert messages[1]["content"] == (
        f"{USER.content}\n\n"
        'get_weather({"city": "Paris"}) returned:\n22 degrees and sunny\n\n'
        "get_time call_8 returned:\n12:00"
    )
    none = _request(USER, choice=ToolChoice(mode=ToolChoiceMode.NONE))
    assert generic_messages(none) == [{"role": "user", "content": USER.content}]


def test_a_forced_function_is_the_only_one_described_and_called() -> None:
    forced = _request(USER, choice=ToolChoice(mode=ToolChoiceMode.FUNCTION, function="get_time"))
    text = instructions(forced)
    assert "get_time" in text
    assert "get_weather" not in text
    schema = call_schema(forced)
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1
    [only] = calls["items"]["anyOf"]
    assert only["properties"]["name"] == {"const": "get_time"}
    assert list(only["properties"]) == ["name", "arguments"]  # named before its arguments
    required = call_schema(_request(USER, choice=ToolChoice(mode=ToolChoiceMode.REQUIRED)))
    assert "maxItems" not in required["properties"]["tool_calls"]


HERMES = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>\n"
    "{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments.city }}</tool_call>{% endfor %}\n{% endfor %}<|assistant|>"
)


def test_a_template_that_renders_tools_gets_them_in_openais_shapes() -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from node.serving.backends.llama_cpp import renders_tools

    native = Jinja2ChatFormatter(template=HERMES, eos_token="", bos_token="")
    plain = Jinja2ChatFormatter(
        template="{% for m in messages %}{{ m.content }}{% endfor %}", eos_token="", bos_token=""
    )
    assert renders_tools(native)
    assert not renders_tools(plain)
    messages, extra = template_input(_request(USER, CALLED, RESULT), native_tools=True)
    prompt = native(messages=messages, **extra).prompt
    assert "<tools>get_weather get_time </tools>" in prompt
    assert "<tool_call>get_weather Paris</tool_call>" in prompt  # arguments as an object
    assert "<|tool|>22 degrees and sunny" in prompt
