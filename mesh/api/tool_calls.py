"""Tool calls for models without a tool-call format of their own: the generic format.

How it works. A model whose chat template does not render tools (the embedded SmolLM2,
most small models) is told about them in a system message (`instructions`): each
function's name, description and JSON schema, and how to call: answer with one JSON
object and nothing else,

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}

An earlier call comes back to it with its result,
`get_weather({"city": "Paris"}) returned:` followed by the result (`result_text`), in a
user turn (the one before it when there is one: Gemma's and Mistral's templates want user
and assistant turns to alternate); the assistant turn that only made calls is left out
(shown its own call again, SmolLM2 made it again instead of answering from the result).

A required or forced call (`tool_choice` `required` or a named function) is decoded under
a grammar made from `call_schema` (the wrapper, each allowed function's name as a
constant and its arguments by its own parameters schema), so the answer always parses
and the arguments validate. With `auto` the model may answer either way:
`ToolCallReader` reads the answer as it is made. Text that does not open like a call
goes out as text at once; an answer that opens like one (`{`, a json code fence,
`<tool_call>`) is held. A call in the generic form is streamed as OpenAI streams
calls: the call's id and name once its name is complete, then its arguments as they
come. Anything else held is parsed whole at the end (`parse_calls`, which also knows
the bare `{"name": ..., "arguments": ...}` of Llama 3 and the `<tool_call>` tags of
Hermes and Qwen templates), and becomes calls if it names known functions, text
otherwise. Text after a complete call is dropped. The reader never raises, whatever
the model writes (tests/test_tool_calls.py fuzzes it).

Pure: no I/O; ids come from `new_call_id` (random, like OpenAI's `call_...`).
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mesh.api.upstream import message_object, tool_fields
from mesh.inference import (
    ChatMessage,
    InferenceRequest,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceMode,
)

WRAPPER_KEY = "tool_calls"
_FENCE = "```"
_TAG_OPEN = "<tool_call>"
_TAG_CLOSE = "</tool_call>"
_CALL_OPENINGS = ("{", _FENCE, _TAG_OPEN)
_CALL_DEPTH = 3  # root object, the array, a call object
MAX_HELD_CHARS = 256 * 1024  # an "auto" answer held as a possible call beyond this is text


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def calls_asked(request: InferenceRequest) -> bool:
    """Does this request offer the model tools it may call (not `tool_choice: none`)?"""
    choice = request.tool_choice
    return bool(request.tools) and (choice is None or choice.mode is not ToolChoiceMode.NONE)


def call_forced(request: InferenceRequest) -> bool:
    """Must the answer be a call (`required`, or a named function)?"""
    choice = request.tool_choice
    return bool(request.tools) and (
        choice is not None and choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)
    )


def allowed_tools(request: InferenceRequest) -> tuple[Tool, ...]:
    choice = request.tool_choice
    if choice is not None and choice.mode is ToolChoiceMode.FUNCTION:
        return tuple(t for t in request.tools if t.name == choice.function)
    return request.tools


def parallel_allowed(request: InferenceRequest) -> bool:
    """Several calls in one answer: OpenAI's default, unless parallel_tool_calls is false
    or one named function is forced (one call of it)."""
    choice = request.tool_choice
    if choice is not None and choice.mode is ToolChoiceMode.FUNCTION:
        return False
    return request.parallel_tool_calls is not False


def _parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters schema (validated as a JSON object by `mesh.inference`); none
    given means any object."""
    value = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
    assert isinstance(value, dict)
    return value


def call_schema(request: InferenceRequest) -> dict[str, Any]:
    """The JSON schema of a call in the generic format, for the grammar of a required or
    forced call: `name` first (so a stream can name the call before its arguments)."""
    calls: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": _parameters(t)},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in allowed_tools(request)
            ]
        },
    }
    if not parallel_allowed(request):
        calls["maxItems"] = 1
    return {
        "type": "object",
        "properties": {WRAPPER_KEY: calls},
        "required": [WRAPPER_KEY],
        "additionalProperties": False,
    }


def instructions(request: InferenceRequest) -> str:
    """The system message that tells a model the tools and the generic format."""
    tools = allowed_tools(request)
    lines = ["You can call these functions (each with a JSON schema of its arguments):"]
    for tool in tools:
        described = f"- {tool.name}"
        if tool.description:
            described += f": {tool.description}"
        lines.append(described)
        lines.append(f"  arguments schema: {json.dumps(_parameters(tool), ensure_ascii=False)}")
    example = tools[0].name if tools else "function_name"
    how = (
        'To call, answer with only this JSON object: {"tool_calls": [{"name": "'
        + example
        + '", "arguments": {...}}]}'
    )
    if parallel_allowed(request):
        how += " (several calls go in the list)."
    else:
        how += " (one call at a time)."
    lines.append(how)
    if call_forced(request):
        lines.append("You must call a function now.")
    else:
        lines.append("If no function is needed, answer normally in plain text.")
    return "\n".join(lines)


def _arguments_value(arguments: str) -> Any:
    """An earlier call's arguments as a JSON value (its text when it is not JSON)."""
    try:
        return json.loads(arguments) if arguments else {}
    except (ValueError, RecursionError):
        return arguments


def result_text(message: ChatMessage, calls: Mapping[str, ToolCall]) -> str:
    """A tool message, as the user message that brings its result back: the call it
    answers, written as a function call, and what it returned."""
    call = calls.get(message.tool_call_id)
    if call is None:
        about = f"{message.name or 'The call'} {message.tool_call_id}"
    else:
        arguments = json.dumps(_arguments_value(call.arguments), ensure_ascii=False)
        about = f"{call.name}({arguments})"
    return f"{about} returned:\n{message.content}"


def generic_messages(request: InferenceRequest, *, system_prompt: str = "") -> list[dict[str, str]]:
    """The conversation in roles any chat template knows (system, user, assistant), the
    tools described in the system message, earlier calls written out with their results."""
    assert request.messages is not None
    out: list[dict[str, str]] = []
    calls: dict[str, ToolCall] = {}
    for message in request.messages:
        for call in message.tool_calls:
            calls[call.id] = call
        if message.role == "tool":
            text = result_text(message, calls)
            if out and out[-1]["role"] == "user":
                # Into the user turn before (the question whose calls-only answer is left
                # out, or other results): templates that want user and assistant turns
                # to alternate (Gemma's, Mistral's) take it.
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": "user", "content": text})
            continue
        if message.tool_calls and not message.content:
            continue  # its calls are written out with their results
        out.append({"role": message.role, "content": message.content})
    has_system = bool(out) and out[0]["role"] == "system"
    if calls_asked(request):
        extra = instructions(request)
        if has_system:
            out[0]["content"] = f"{out[0]['content']}\n\n{extra}"
        else:
            base = f"{system_prompt}\n\n{extra}" if system_prompt else extra
            out.insert(0, {"role": "system", "content": base})
    elif system_prompt and not has_system:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def template_input(
    request: InferenceRequest, *, native_tools: bool, system_prompt: str = ""
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for a chat template. A template that renders
    tools itself (`native_tools`) gets OpenAI's shapes (the `openai` backend's own: tool
    calls' arguments as objects, as Hugging Face templates read them) and `tools`; any
    other gets `generic_messages`."""
    assert request.messages is not None
    if not native_tools:
        return list(generic_messages(request, system_prompt=system_prompt)), {}
    messages = []
    for message in request.messages:
        shaped = message_object(message)
        for call in shaped.get("tool_calls", ()):
            call["function"]["arguments"] = _arguments_value(call["function"]["arguments"])
        messages.append(shaped)
    if system_prompt and not any(m.role == "system" for m in request.messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    extra: dict[str, Any] = {}
    if calls_asked(request):
        fields = tool_fields(request)
        extra = {"tools": fields["tools"], "tool_choice": fields.get("tool_choice", "auto")}
    return messages, extra


# --- reading the model's answer -------------------------------------------------------------


def _arguments_text(value: Any) -> str | None:
    """A call's arguments as OpenAI sends them (JSON text of an object), or None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def _call_of(value: Any, known: frozenset[str]) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if isinstance(function, dict):  # OpenAI's own shape, as some models echo it
        value = function
    name = value.get("name")
    if not isinstance(name, str) or name not in known:
        return None
    raw = value.get("arguments", value.get("parameters", {}))
    arguments = _arguments_text(raw)
    if arguments is None:
        return None
    return name, arguments


def _calls_in(value: Any, known: frozenset[str]) -> list[tuple[str, str]] | None:
    if isinstance(value, dict) and WRAPPER_KEY in value:
        value = value[WRAPPER_KEY]
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item, known) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


_TAGGED = re.compile(re.escape(_TAG_OPEN) + r"(.*?)" + re.escape(_TAG_CLOSE), re.DOTALL)
_FENCED = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?```\s*\Z", re.DOTALL | re.IGNORECASE)


def parse_calls(text: str, known: frozenset[str]) -> list[tuple[str, str]] | None:
    """(name, arguments JSON text) of every call in a whole answer, when the whole answer
    is calls of `known` functions (generic format, a bare call or a list of them, maybe
    in a json code fence, or Hermes-style `<tool_call>` tags); None otherwise."""
    stripped = text.strip()
    if stripped.startswith(_TAG_OPEN):
        found = _TAGGED.findall(stripped)
        if not found or _TAGGED.sub("", stripped).strip():
            return None
        calls: list[tuple[str, str]] = []
        for inner in found:
            some = _calls_in(_loads(inner.strip()), known)
            if some is None:
                return None
            calls.extend(some)
        return calls
    fenced = _FENCED.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    return _calls_in(_loads(stripped), known)


class _Mode(enum.Enum):
    UNDECIDED = 1  # nothing but whitespace, or the start of what opens a call
    TEXT = 2  # plain text: out as it comes
    CALL = 3  # (maybe) a call: held, streamed as calls when it is the generic form


class ToolCallReader:
    """Reads a model's answer as it is made: plain text, or calls (module docstring).

    `feed(text)` and `finish()` return (text to send, call pieces to send)."""

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        forced: bool,
        parallel: bool,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._known = frozenset(t.name for t in tools)
        self._forced = forced
        self._parallel = parallel
        self._new_id = new_id
        self._mode = _Mode.CALL if forced else _Mode.UNDECIDED
        self._held: list[str] = []
        self._held_chars = 0
        self.calls = 0  # calls sent (their first piece)
        self._streaming = True  # the held text still follows the generic form
        self.done = False  # the generic form's object is complete: the answer is over
        # The scanner of the generic form (a JSON tokenizer over the held text).
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False
        self._expect_key: list[bool] = []
        self._keys: list[str] = []
        self._string: list[str] | None = None  # a key or the name being read
        self._string_is_key = False
        self._value_key = ""  # the key of the value about to start at call depth
        self._args: list[str] | None = None  # the arguments being read (raw JSON)
        self._call_name = ""
        self._call_index = -1  # the index this call is sent as (-1: not yet sent)
        self._call_args_sent = False
        self._pending_args = ""  # arguments read before the name

    # --- the public side ---------------------------------------------------------------------

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        if self.done or not text:
            return "", ()
        if self._mode is _Mode.TEXT:
            return text, ()
        self._held.append(text)
        self._held_chars += len(text)
        if self._mode is _Mode.UNDECIDED:
            held = "".join(self._held).lstrip()
            if not held or any(o.startswith(held) for o in _CALL_OPENINGS if len(held) < len(o)):
                return "", ()
            if not held.startswith(_CALL_OPENINGS) or _plain_fence(held):
                return self._to_text()
            if held.startswith(_FENCE) and "\n" not in held:
                return "", ()  # its language is not known yet
            self._mode = _Mode.CALL
            self._streaming = held.startswith("{")
            text = held
        elif not self._forced and self._held_chars > MAX_HELD_CHARS and not self.calls:
            return self._to_text()
        out: list[ToolCallDelta] = []
        if self._streaming:
            for char in text:
                self._scan(char, out)
                if self.done or not self._streaming:
                    break
        return "", _merged(out)

    def finish(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The answer ended: what is still held, as calls or as text."""
        if self._mode is _Mode.TEXT or self.done:
            return "", ()
        if self.calls:
            return "", self._close_call(complete=False)
        held = "".join(self._held)
        calls = parse_calls(held, self._known)
        if calls:
            if not self._parallel:
                calls = calls[:1]
            out: list[ToolCallDelta] = []
            for name, arguments in calls:
                index = self.calls
                self.calls += 1
                out.append(ToolCallDelta(index=index, id=self._new_id(), name=name))
                out.append(ToolCallDelta(index=index, arguments=arguments))
            return "", tuple(out)
        if self._forced:
            return "", ()  # cut off before a call was named: nothing to send
        self._mode = _Mode.TEXT
        self._held = []
        return held, ()

    # --- the rest ----------------------------------------------------------------------------

    def _to_text(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        self._mode = _Mode.TEXT
        held, self._held = "".join(self._held), []
        return held, ()

    def _give_up_streaming(self) -> None:
        """The held text is not the generic form: parse it whole at the end (unless a
        call already went out: then what follows is dropped)."""
        self._streaming = False
        if self.calls:
            self.done = True

    def _scan(self, char: str, out: list[ToolCallDelta]) -> None:
        depth = len(self._stack)
        if self._args is not None:
            self._args.append(char)
        if self._in_string:
            if self._string is not None:
                self._string.append(char)
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                self._string_done(out)
            self._flush_args(out)
            return
        if char in " \t\r\n":
            return
        if depth == _CALL_DEPTH and self._expect_value_at_call():
            if self._value_key == "arguments" and self._args is None:
                self._args = [char]
        if char == '"':
            self._in_string = True
            self._escape = False
            expecting_key = bool(self._stack) and self._stack[-1] == "{" and self._expect_key[-1]
            self._string_is_key = expecting_key
            if expecting_key or (depth == _CALL_DEPTH and self._value_key == "name"):
                self._string = []
            if not expecting_key and depth == _CALL_DEPTH:
                self._value_started()
            self._flush_args(out)
            return
        if char in "{[":
            if not self._opening_ok(char):
                self._give_up_streaming()
                return
            if depth == _CALL_DEPTH:
                self._value_started()
            self._stack.append(char)
            self._expect_key.append(char == "{")
            self._keys.append("")
        elif char in "}]":
            if not self._stack or {"}": "{", "]": "["}[char] != self._stack[-1]:
                self._give_up_streaming()
                return
            self._stack.pop()
            self._expect_key.pop()
            self._keys.pop()
            if len(self._stack) == _CALL_DEPTH - 1 and char == "}":
                self._call_done(out)
            elif len(self._stack) == _CALL_DEPTH and self._args is not None:
                self._args_done(out)
            elif not self._stack:
                self.done = bool(self.calls)
                if not self.done:
                    self._give_up_streaming()
        elif char == ":":
            if not self._stack or self._stack[-1] != "{":
                self._give_up_streaming()
                return
            self._expect_key[-1] = False
            if len(self._stack) == _CALL_DEPTH:
                self._value_key = self._keys[-1]
        elif char == ",":
            if len(self._stack) == _CALL_DEPTH and self._args is not None:
                self._args.pop()  # the comma is not part of them
                self._args_done(out)
            if self._stack and self._stack[-1] == "{":
                self._expect_key[-1] = True
            if len(self._stack) == _CALL_DEPTH:
                self._value_key = ""
        else:  # a number or a literal
            if depth == _CALL_DEPTH:
                self._value_started()
            if depth < _CALL_DEPTH:
                self._give_up_streaming()
                return
        self._flush_args(out)

    def _expect_value_at_call(self) -> bool:
        return self._stack[-1] == "{" and not self._expect_key[-1] and self._value_key != ""

    def _value_started(self) -> None:
        """A value at call depth started: the next one needs a new key first."""
        if self._value_key != "arguments":
            self._value_key = self._value_key if self._value_key == "name" else ""

    def _opening_ok(self, char: str) -> bool:
        """The generic form: an object, whose `tool_calls` is an array of objects."""
        depth = len(self._stack)
        if depth == 0:
            return char == "{"
        if depth == 1:
            return char == "[" and self._keys[-1] == WRAPPER_KEY and not self._expect_key[-1]
        if depth == 2:
            return char == "{"
        return True

    def _string_done(self, out: list[ToolCallDelta]) -> None:
        raw, self._string = self._string, None
        if raw is None:
            return
        text = _loads('"' + "".join(raw))
        if not isinstance(text, str):
            self._give_up_streaming()
            return
        if self._string_is_key:
            self._keys[-1] = text
            depth = len(self._stack)
            if depth == 1 and text != WRAPPER_KEY:
                self._give_up_streaming()
            return
        if len(self._stack) == _CALL_DEPTH and self._value_key == "name":
            self._value_key = ""
            self._named(text, out)

    def _named(self, name: str, out: list[ToolCallDelta]) -> None:
        if name not in self._known or self._call_index >= 0 or self._call_name:
            self._give_up_streaming()
            return
        if self.calls and not self._parallel:
            self.done = True  # one call only: the rest is dropped
            return
        self._call_name = name
        self._call_index = self.calls
        self.calls += 1
        out.append(ToolCallDelta(index=self._call_index, id=self._new_id(), name=name))
        if self._pending_args:
            out.append(ToolCallDelta(index=self._call_index, arguments=self._pending_args))
            self._pending_args = ""
            self._call_args_sent = True

    def _flush_args(self, out: list[ToolCallDelta]) -> None:
        """Arguments read so far go out once their call is named."""
        if self._args is None or not self._args:
            return
        piece = "".join(self._args)
        self._args.clear()
        if self._call_index >= 0:
            out.append(ToolCallDelta(index=self._call_index, arguments=piece))
            self._call_args_sent = True
        else:
            self._pending_args += piece

    def _args_done(self, out: list[ToolCallDelta]) -> None:
        self._flush_args(out)
        self._args = None
        self._value_key = ""
        if self._call_index < 0 and self._pending_args and _loads(self._pending_args) is None:
            self._give_up_streaming()

    def _call_done(self, out: list[ToolCallDelta]) -> None:
        if self._args is not None:
            self._args.pop()  # the closing brace is the call's
            self._args_done(out)
        if self._call_index < 0:
            self._give_up_streaming()  # a call without a (known) name
            return
        out.extend(self._close_call(complete=True))

    def _close_call(self, *, complete: bool) -> tuple[ToolCallDelta, ...]:
        """The call being read ends: a complete one with no arguments gets `{}` (a call
        cut off keeps what it has, as OpenAI's do)."""
        out: tuple[ToolCallDelta, ...] = ()
        if complete and self._call_index >= 0 and not self._call_args_sent:
            out = (ToolCallDelta(index=self._call_index, arguments="{}"),)
        self._call_name = ""
        self._call_index = -1
        self._call_args_sent = False
        self._pending_args = ""
        self._value_key = ""
        return out


def _merged(pieces: list[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """Consecutive argument pieces of one call as one piece."""
    out: list[ToolCallDelta] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last is not None and last.index == piece.index and not piece.id and not piece.name:
            out[-1] = ToolCallDelta(
                index=last.index,
                id=last.id,
                name=last.name,
                arguments=last.arguments + piece.arguments,
            )
        else:
            out.append(piece)
    return tuple(out)


def _plain_fence(held: str) -> bool:
    """A code fence of some other language than JSON: plain text."""
    if not held.startswith(_FENCE) or "\n" not in held:
        return False
    language = held[len(_FENCE) : held.index("\n")].strip().lower()
    return language not in ("", "json")
