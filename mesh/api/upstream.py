"""Speaking to an OpenAI-compatible upstream (vLLM, llama.cpp's server, a hosted API),
sans I/O: what to send, how to read what comes back, what its errors mean.

How it works:
- Every request goes upstream streamed (`stream: true`, `stream_options.include_usage`),
  whatever the client asked for, so tokens pass through as they come and the ledger gets
  the upstream's own token counts from the final `usage` chunk.
- `request_body` turns an `InferenceRequest` into the JSON body. A failover
  continuation (text the client already has) is sent so the upstream goes on after
  it: for text completions it is appended to the prompt; for chat it becomes a final
  assistant message with vLLM's `continue_final_message: true, add_generation_prompt:
  false`. Servers without that extension (hosted APIs) refuse or ignore it;
  `error_from_status` then reports a failure the scheduler retries elsewhere.
- `AnswerReader` reads the `data` of each server-sent event (`mesh.api.sse` splits the
  stream): text deltas out, one `Finished` at the end. A content chunk counts as one
  token unless the chunk carries a cumulative `usage` (vLLM's continuous usage stats).
  Stop sequences are enforced here too (`mesh.api.stops`), so an upstream that ignores
  `stop` still never leaks one to the client.
- `error_from_status` maps an upstream's HTTP error to the `MeshError` that says what
  it means for us; `read_models_list` reads `GET /models`.
Anything malformed raises `RemoteProtocolError` with what was wrong; nothing else
escapes these functions.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh.api.stops import StopScanner
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
    MAX_TOOL_CALLS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    ResponseFormatType,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolChoiceMode,
    TopLogprob,
)

DONE = "[DONE]"
MAX_SHOWN_CHARS = 300  # of an upstream's error message, in ours
MAX_TOKEN_COUNT = 1 << 31
_CONTEXT_RE = re.compile(
    r"context[ _-]?(length|size|window)|maximum context|too many tokens|exceed_context",
    re.IGNORECASE,
)


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelDefaults:
    """What the operator configured for requests that set nothing themselves."""

    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None


def _schema(text: str) -> dict[str, Any]:
    """A schema the domain checked is a JSON object (`mesh.inference`)."""
    value = json.loads(text) if text else {}
    assert isinstance(value, dict)
    return value


def message_object(m: ChatMessage) -> dict[str, Any]:
    """A message as OpenAI spells it (also what tool-aware chat templates read)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def tool_fields(request: InferenceRequest) -> dict[str, Any]:
    """tools, tool_choice, parallel_tool_calls and response_format, as OpenAI spells them."""
    out: dict[str, Any] = {}
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {"name": tool.name}
            if tool.description:
                function["description"] = tool.description
            if tool.parameters:
                function["parameters"] = _schema(tool.parameters)
            if tool.strict is not None:
                function["strict"] = tool.strict
            tools.append({"type": "function", "function": function})
        out["tools"] = tools
    choice = request.tool_choice
    if choice is not None:
        out["tool_choice"] = (
            {"type": "function", "function": {"name": choice.function}}
            if choice.mode is ToolChoiceMode.FUNCTION
            else choice.mode.value
        )
    if request.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = request.parallel_tool_calls
    fmt = request.response_format
    if fmt is not None:
        if fmt.type is ResponseFormatType.JSON_SCHEMA:
            spec: dict[str, Any] = {"name": fmt.name}
            if fmt.description:
                spec["description"] = fmt.description
            if fmt.schema:
                spec["schema"] = _schema(fmt.schema)
            if fmt.strict is not None:
                spec["strict"] = fmt.strict
            out["response_format"] = {"type": "json_schema", "json_schema": spec}
        else:
            out["response_format"] = {"type": fmt.type.value}
    return out


def request_body(
    request: InferenceRequest, *, model: str, defaults: ModelDefaults = ModelDefaults()
) -> tuple[str, dict[str, Any]]:
    """(path under the API base, JSON body) for `request`, always streamed."""
    body: dict[str, Any] = {"model": model}
    if request.messages is not None:
        path = "chat/completions"
        messages = [message_object(m) for m in request.messages]
        if defaults.system_prompt and not any(m.role == "system" for m in request.messages):
            messages.insert(0, {"role": "system", "content": defaults.system_prompt})
        if request.continuation:
            messages.append({"role": "assistant", "content": request.continuation})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body["messages"] = messages
    else:
        assert request.prompt is not None
        path = "completions"
        body["prompt"] = request.prompt + request.continuation
    sampling = request.sampling
    temperature = sampling.temperature
    if temperature is None:
        temperature = defaults.temperature
    top_p = sampling.top_p if sampling.top_p is not None else defaults.top_p
    optional = {
        "max_tokens": sampling.max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "logit_bias": {str(t): b for t, b in sampling.logit_bias} or None,
        "n": sampling.n if sampling.n != 1 else None,
    }
    if sampling.logprobs:
        if request.is_chat:
            optional["logprobs"] = True
            optional["top_logprobs"] = sampling.top_logprobs or None
        else:
            optional["logprobs"] = sampling.top_logprobs  # completions: an int, 0..5
    if sampling.echo:
        optional["echo"] = True
    body.update({key: value for key, value in optional.items() if value is not None})
    body.update(tool_fields(request))
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return path, body


# --- errors ---------------------------------------------------------------------------------


def _shown(text: str) -> str:
    """An upstream's words, made safe to put in our message: one line, printable, short."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= MAX_SHOWN_CHARS else flat[: MAX_SHOWN_CHARS - 3] + "..."


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), or of the
    forms vLLM and FastAPI use; else the body's text."""
    text = body.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:  # JSONDecodeError, or a number beyond the digit limit
        return _shown(text) or "no details"
    message = _message_of(value)
    return _shown(message) if message else _shown(text) or "no details"


def _message_of(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # FastAPI's validation errors: [{"msg": ...}, ...]
        return "; ".join(filter(None, (_message_of(item) for item in value[:5])))
    if isinstance(value, Mapping):
        for key in ("error", "message", "detail", "msg"):
            if key in value:
                found = _message_of(value[key])
                if found:
                    return found
    return ""


def error_from_status(
    status: int, body: bytes, *, source: str, model: str, continuation: bool = False
) -> MeshError:
    """What an upstream's HTTP error status means for us. `source` names the upstream in
    the message; `continuation` says the request continued a partial answer."""
    said = error_message(body)
    where = f"{source} answered HTTP {status}: {said}"
    if status == 429:
        return Overloaded(f"{where} (the upstream is busy; retry shortly)")
    if status in (401, 403):
        return Unavailable(f"{where} (it refused this node's credentials: check api_key_env)")
    if status == 404:
        return ModelNotFound(
            f"{where} (is url the API base, such as http://host:8000/v1, and does the upstream "
            f"serve {model!r}?)"
        )
    if status == 413:
        return RequestTooLarge(where)
    if 400 <= status < 500:
        if _CONTEXT_RE.search(said):
            return ContextLengthExceeded(where, param="messages")
        if continuation:
            # The client already has part of the answer; a refusal here is very likely the
            # continuation itself (no continue_final_message): let another node continue.
            return BackendError(f"{where} (it could not continue a partial answer)")
        return InvalidRequest(where)
    if status in (502, 503, 504):
        return Unavailable(where)
    if status >= 500:
        return BackendError(where)
    return RemoteProtocolError(f"{source} answered with an unexpected HTTP status {status}")


# --- the streamed answer --------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(data: str, what: str) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise RemoteProtocolError(f"{what} nests too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, a bad constant, too many digits
        raise RemoteProtocolError(f"{what} is not valid JSON ({exc}): {_shown(data)}") from exc


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TOKEN_COUNT:
        raise RemoteProtocolError(f"{what} must be a token count, not {_shown(repr(value))}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _usage(value: object) -> Usage | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RemoteProtocolError("an answer chunk's usage must be an object")
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    return Usage(
        prompt_tokens=0 if prompt is None else _count(prompt, "usage.prompt_tokens"),
        completion_tokens=0
        if completion is None
        else _count(completion, "usage.completion_tokens"),
    )


_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
}
MAX_CHUNK_LOGPROBS = 4096


def _number(value: object, what: str) -> float | None:
    """A logprob: a finite number, or None (null, or one JSON cannot carry back)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RemoteProtocolError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise RemoteProtocolError(f"{what} is out of range") from exc
    return number if math.isfinite(number) else None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what} must be a string")
    return value


def _top(pairs: list[tuple[object, object]]) -> tuple[TopLogprob, ...]:
    return tuple(
        TopLogprob(
            token=_text(token, "a top logprob's token"),
            logprob=_number(logprob, "a top logprob") or 0.0,
        )
        for token, logprob in pairs[:MAX_TOP_LOGPROBS]
    )


def _logprobs(value: object, *, chat: bool) -> tuple[TokenLogprob, ...]:
    """A choice's logprobs: chat's {"content": [...]} or completions' parallel arrays."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise RemoteProtocolError("an answer chunk's logprobs must be an object")
    if chat:
        content = value.get("content")
        if content is None:
            return ()
        if not isinstance(content, list) or len(content) > MAX_CHUNK_LOGPROBS:
            raise RemoteProtocolError("logprobs.content must be a list")
        out = []
        for entry in content:
            if not isinstance(entry, Mapping):
                raise RemoteProtocolError("logprobs.content holds a non-object")
            top = entry.get("top_logprobs") or []
            if not isinstance(top, list) or not all(isinstance(t, Mapping) for t in top):
                raise RemoteProtocolError("top_logprobs must be a list of objects")
            out.append(
                TokenLogprob(
                    token=_text(entry.get("token"), "a logprob's token"),
                    logprob=_number(entry.get("logprob"), "a logprob"),
                    top=_top([(t.get("token"), t.get("logprob")) for t in top]),
                )
            )
        return tuple(out)
    tokens, values = value.get("tokens") or [], value.get("token_logprobs") or []
    tops = value.get("top_logprobs") or []
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
        raise RemoteProtocolError("completion logprobs must hold lists")
    if len(tokens) > MAX_CHUNK_LOGPROBS:
        raise RemoteProtocolError("too many logprobs in one chunk")
    out = []
    for index, token in enumerate(tokens):
        top = tops[index] if index < len(tops) else None
        if top is not None and not isinstance(top, Mapping):
            raise RemoteProtocolError("completion top_logprobs must be objects")
        out.append(
            TokenLogprob(
                token=_text(token, "a logprob's token"),
                logprob=_number(values[index] if index < len(values) else None, "a logprob"),
                top=_top(list((top or {}).items())),
            )
        )
    return tuple(out)


def _tool_call_deltas(value: object) -> tuple[ToolCallDelta, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOL_CALLS:
        raise RemoteProtocolError("delta.tool_calls must be a list")
    out = []
    for position, call in enumerate(value):
        if not isinstance(call, Mapping):
            raise RemoteProtocolError("delta.tool_calls holds a non-object")
        index = call.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
            raise RemoteProtocolError("a tool call's index must be a small integer")
        function = call.get("function") or {}
        if not isinstance(function, Mapping):
            raise RemoteProtocolError("a tool call's function must be an object")
        out.append(
            ToolCallDelta(
                index=index,
                id=_text(call.get("id") or "", "a tool call's id"),
                name=_text(function.get("name") or "", "a tool call's name"),
                arguments=_text(function.get("arguments") or "", "a tool call's arguments"),
            )
        )
    return tuple(out)


class AnswerReader:
    """One streamed answer, chunk by chunk (the `data` of each server-sent event).

    `feed()` returns the text a chunk released (None if nothing); `complete` turns true
    at `[DONE]`, at a stop sequence, or when the upstream ran past `max_tokens`; then (or
    at the end of the stream) `finish()` gives the rest of the text and the `Finished`.
    """

    def __init__(
        self, *, chat: bool, stops: tuple[str, ...] = (), max_tokens: int | None = None
    ) -> None:
        self._chat = chat
        self._scanner = StopScanner(stops)
        self._max_tokens = max_tokens
        self.counted = 0  # completion tokens, counted from the chunks
        self._unsent = 0  # of those, tokens whose text the stop scanner still holds
        self.reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.done = False  # [DONE] seen
        self.stopped = False  # ended here: a stop sequence, or past max_tokens
        self._held_logprobs: list[TokenLogprob] = []  # of text the stop scanner holds

    @property
    def complete(self) -> bool:
        return self.done or self.stopped

    def feed(self, data: str) -> TextDelta | None:
        if self.complete:
            return None
        if data.strip() == DONE:
            self.done = True
            return None
        chunk = _loads(data, "an answer chunk")
        if not isinstance(chunk, Mapping):
            raise RemoteProtocolError(
                f"an answer chunk must be a JSON object, not {_shown(repr(chunk))}"
            )
        error = chunk.get("error")
        if error is not None:
            raise BackendError(f"the upstream failed mid-answer: {_shown(_message_of(error))}")
        usage = _usage(chunk.get("usage"))
        content, logprobs, calls = self._piece(chunk)
        if usage is not None:
            self.usage = usage
        if not content and not calls and not logprobs:
            return None
        if usage is not None and usage.completion_tokens > 0:
            tokens = max(0, usage.completion_tokens - self.counted)  # cumulative counts
        else:
            tokens = max(1, len(logprobs))
        if self._max_tokens is not None and self.counted + tokens > self._max_tokens:
            # The upstream ignored max_tokens: end the answer where the client asked.
            self.reason = FinishReason.LENGTH
            self.stopped = True
            return None
        self.counted += tokens
        self._unsent += tokens
        self._held_logprobs.extend(logprobs)
        released, hit = self._scanner.feed(content) if content else ("", False)
        if hit:
            self.reason = FinishReason.STOP
            self.stopped = True
        if not released and not calls:
            return None
        sent, self._unsent = self._unsent, 0
        held, self._held_logprobs = tuple(self._held_logprobs), []
        return TextDelta(released, max(sent, 1) if calls else sent, held, calls)

    def _piece(
        self, chunk: Mapping[str, Any]
    ) -> tuple[str, tuple[TokenLogprob, ...], tuple[ToolCallDelta, ...]]:
        """(text, logprobs, tool-call pieces) of choice 0 of a chunk."""
        choices = chunk.get("choices")
        if choices is None or choices == []:
            return "", (), ()  # the usage chunk, or a keep-alive
        if not isinstance(choices, list) or not isinstance(choices[0], Mapping):
            raise RemoteProtocolError("an answer chunk's choices must be a list of objects")
        choice = next((c for c in choices if isinstance(c, Mapping) and c.get("index") == 0), None)
        choice = choice if choice is not None else choices[0]
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise RemoteProtocolError("an answer chunk's finish_reason must be a string")
            self.reason = _FINISH_REASONS.get(reason, FinishReason.STOP)
        logprobs = _logprobs(choice.get("logprobs"), chat=self._chat)
        calls: tuple[ToolCallDelta, ...] = ()
        if self._chat:
            delta = choice.get("delta")
            if delta is None:
                return "", logprobs, ()
            if not isinstance(delta, Mapping):
                raise RemoteProtocolError("a chat answer chunk's delta must be an object")
            content = delta.get("content")
            calls = _tool_call_deltas(delta.get("tool_calls"))
        else:
            content = choice.get("text")
        if content is None:
            return "", logprobs, calls
        if not isinstance(content, str):
            raise RemoteProtocolError(
                f"an answer chunk's {'delta.content' if self._chat else 'text'} must be a string"
            )
        return content, logprobs, calls

    def finish(self) -> tuple[TextDelta | None, Finished]:
        """The end: held text (if any) and the counts. Raises RemoteProtocolError when the
        upstream never said the answer ended."""
        if self.reason is None:
            raise RemoteProtocolError("the upstream's answer ended before it finished")
        tail = None
        if not self._scanner.stopped:
            rest, hit = self._scanner.flush()
            if hit:
                self.reason = FinishReason.STOP
            if rest:
                tail = TextDelta(rest, self._unsent, tuple(self._held_logprobs))
        if self.usage is not None and not self.stopped:
            prompt, completion = self.usage.prompt_tokens, self.usage.completion_tokens
        else:
            # No usage (or we ended it early and stopped reading): what we counted.
            prompt = self.usage.prompt_tokens if self.usage is not None else 0
            completion = self.counted
        return tail, Finished(
            reason=self.reason, prompt_tokens=prompt, completion_tokens=completion
        )


# --- GET /models ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ListedModel:
    listed: bool  # the upstream names the model (by id, or by an alias it reports)
    names: tuple[str, ...]  # every model id it lists
    context_length: int  # what it reports (vLLM's max_model_len), 0 if nothing


def read_models_list(body: bytes, model: str) -> ListedModel:
    """What an upstream's `GET /models` says about `model`."""
    value = _loads(body.decode("utf-8", errors="replace"), "the upstream's model list")
    data = value.get("data") if isinstance(value, Mapping) else None
    if not isinstance(data, list):
        raise RemoteProtocolError("the upstream's model list has no data array")
    names: list[str] = []
    found: Mapping[str, Any] | None = None
    for entry in data:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            raise RemoteProtocolError("the upstream's model list has an entry without an id")
        names.append(entry["id"])
        aliases = entry.get("aliases")  # an Allerac node lists its aliases
        if entry["id"] == model or (isinstance(aliases, list) and model in aliases):
            found = found or entry
    context = 0
    if found is not None:
        for key in ("max_model_len", "context_length"):
            length = found.get(key)
            if isinstance(length, int) and not isinstance(length, bool) and 0 < length < 1 << 30:
                context = length
                break
    return ListedModel(listed=found is not None, names=tuple(names), context_length=context)
