"""The OpenAI-compatible HTTP API as pure functions: request bytes in, domain values
out; domain values in, JSON-ready dicts out. No sockets, so every parser here can be
fuzzed (`tests/test_openai_api.py`): any input gives a request or a `MeshError`.

Every field of OpenAI's chat and completions requests is read and checked against
OpenAI's ranges (`CHAT_FIELDS`, `COMPLETION_FIELDS` say what becomes of each); what a
model must be able to do for a request (tools, structured output, logprobs, penalties,
...) is `InferenceRequest.needs()`, and the scheduler sends a request only where it
can be honoured, or answers 400 naming the field. Fields that change nothing in the
answer (`metadata`, `store`, ...) are accepted and ignored (`IGNORED`); known fields of
other servers that would change it (`top_k`, `guided_json`, ...) are refused
(`REFUSED`); any other unknown field is ignored, as OpenAI-compatible servers do, so
newer clients work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from mesh.errors import InvalidRequest, MeshError, RequestTooLarge
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    ModelInfo,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    new_request_id,
)

# Accepted and ignored: they change nothing in the answer (OpenAI's bookkeeping, hints
# for its own models and caches).
IGNORED = (
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "prediction",  # a latency hint: the answer is the same without it
    "reasoning_effort",  # for OpenAI's reasoning models; open models here do not reason on demand
    "verbosity",
)
# Refused (400 naming the field): they would change the answer and nothing here does it.
REFUSED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions are not supported: send tools",
    "function_call": "the deprecated function_call is not supported: send tool_choice",
    "suffix": "suffix is not supported",
    # Other servers' sampling extensions: refused rather than silently ignored.
    "top_k": "top_k is not supported",
    "min_p": "min_p is not supported",
    "typical_p": "typical_p is not supported",
    "repetition_penalty": "repetition_penalty is not supported: use frequency_penalty",
    "repeat_penalty": "repeat_penalty is not supported: use frequency_penalty",
    "min_tokens": "min_tokens is not supported",
    "ignore_eos": "ignore_eos is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty is not supported",
    "mirostat": "mirostat is not supported",
    "grammar": "grammar is not supported: send response_format",
    "guided_json": "guided_json is not supported: send response_format json_schema",
    "guided_regex": "guided_regex is not supported",
    "guided_choice": "guided_choice is not supported",
    "guided_grammar": "guided_grammar is not supported",
    "json_schema": "a top-level json_schema is not supported: send response_format",
}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's range for completions' logprobs
MAX_BEST_OF = 20

MAX_JSON_DEPTH = 64


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"request body is not valid JSON: {name} is not a JSON number")


def decode_json_body(body: bytes, *, max_bytes: int) -> dict[str, Any]:
    if len(body) > max_bytes:
        raise RequestTooLarge(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except RecursionError as exc:
        raise InvalidRequest("request body nests too deeply") from exc
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise InvalidRequest(f"request body is not usable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"request body must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(f"{param} must be {expected}, not {_json_type(value)}", param=param)


def _opt_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(key, "an integer", value)
    return value


def _opt_float(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(key, "a number", value)
    try:
        return float(value)
    except OverflowError as exc:
        raise InvalidRequest(f"{key} is out of range", param=key) from exc


def _opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _wrong(key, "a boolean", value)
    return value


def _opt_str(body: Mapping[str, Any], key: str, param: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong(param, "a string", value)
    return value


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key, why in REFUSED.items():
        if body.get(key) is not None:
            if key == "modalities" and body[key] == ["text"]:
                continue
            raise InvalidRequest(why, param=key)


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _wrong("logit_bias", "an object of token ids to biases", value)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidRequest(
                f"logit_bias keys must be token ids (digits), got {key[:40]!r}", param="logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise _wrong("logit_bias values", "numbers", bias)
        number = float(bias) if not isinstance(bias, int) or abs(bias) <= 1000 else math.inf
        out[int(key)] = number
    return tuple(sorted(out.items()))


def _sampling(body: Mapping[str, Any], *, chat: bool) -> Sampling:
    max_key = "max_completion_tokens"
    max_tokens = _opt_int(body, max_key) if chat else None
    legacy = _opt_int(body, "max_tokens")  # type-checked even when the newer key wins
    if max_tokens is None:
        max_key, max_tokens = "max_tokens", legacy
    stop_value = body.get("stop")
    if stop_value is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_value, str):
        stop = (stop_value,)
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = tuple(stop_value)
    else:
        raise _wrong("stop", "a string or an array of strings", stop_value)
    n = _opt_int(body, "n")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{max_key} must be at least 1, got {max_tokens}", param=max_key)
    if chat:
        logprobs = bool(_opt_bool(body, "logprobs"))
        top = _opt_int(body, "top_logprobs")
        echo = False
    else:
        # Completions: logprobs is the number of alternatives (0..5) or null.
        asked = _opt_int(body, "logprobs")
        if asked is not None and not 0 <= asked <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequest(
                f"logprobs must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {asked}",
                param="logprobs",
            )
        logprobs, top = asked is not None, asked
        echo = bool(_opt_bool(body, "echo"))
        best_of = _opt_int(body, "best_of")
        if best_of is not None and best_of != 1:
            if not 1 <= best_of <= MAX_BEST_OF or best_of < (n or 1):
                raise InvalidRequest(
                    f"best_of must be from n to {MAX_BEST_OF}, got {best_of}", param="best_of"
                )
            raise InvalidRequest("best_of above 1 is not supported", param="best_of")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_opt_float(body, "temperature"),
        top_p=_opt_float(body, "top_p"),
        seed=_opt_int(body, "seed"),
        stop=stop,
        presence_penalty=_opt_float(body, "presence_penalty"),
        frequency_penalty=_opt_float(body, "frequency_penalty"),
        logit_bias=_logit_bias(body),
        logprobs=logprobs,
        top_logprobs=top or 0,
        n=1 if n is None else n,
        echo=echo,
    )


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("model is required", param="model")
    if not isinstance(model, str):
        raise _wrong("model", "a string", model)
    if not model.strip():
        raise InvalidRequest("model must not be empty", param="model")
    return model


def _user(body: Mapping[str, Any]) -> str:
    user = body.get("user", "")
    if user is None:
        return ""
    if not isinstance(user, str):
        raise _wrong("user", "a string", user)
    return user


class Parsed(NamedTuple):
    request: InferenceRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a usage chunk ends the stream


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    value = body.get("stream", False)
    if value is None:
        value = False
    if not isinstance(value, bool):
        raise _wrong("stream", "a boolean", value)
    options = body.get("stream_options")
    if options is None:
        return value, False
    if not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _wrong("stream_options.include_usage", "a boolean", include)
    if not value and include is not None:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    return value, bool(include)


def _content(param: str, content: object) -> str:
    """A message's content: a string, or an array of text parts (the newer OpenAI form)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if not isinstance(part, dict):
                raise _wrong(f"{param}[{part_index}]", "an object", part)
            if part.get("type") != "text":
                raise InvalidRequest(
                    f"{param}[{part_index}].type {part.get('type')!r} is not supported; "
                    "this model reads text parts only",
                    param=f"{param}[{part_index}].type",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _wrong(f"{param}[{part_index}].text", "a string", text)
            texts.append(text)
        return "".join(texts)
    raise _wrong(param, "a string or an array of text parts", content)


def _object(value: object, param: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(param, "an object", value)
    return value


def _json_text(value: object, param: str) -> str:
    """A JSON schema given as an object, kept as compact JSON text (it travels as text)."""
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise _wrong(param, "an object (a JSON schema)", value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _function_ref(value: object, param: str) -> Mapping[str, Any]:
    """{"type": "function", "function": {...}}: the function object."""
    outer = _object(value, param)
    kind = outer.get("type", "function")
    if kind != "function":
        raise InvalidRequest(
            f"{param}.type must be 'function', got {str(kind)[:40]!r}", param=f"{param}.type"
        )
    return _object(outer.get("function"), f"{param}.function")


def _tool_calls(value: object, param: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _wrong(param, "an array", value)
    calls = []
    for index, raw in enumerate(value):
        where = f"{param}[{index}]"
        function = _function_ref(raw, where)
        arguments = function.get("arguments", "")
        if not isinstance(arguments, str):
            raise _wrong(f"{where}.function.arguments", "a string (JSON text)", arguments)
        name = function.get("name")
        if not isinstance(name, str):
            raise _wrong(f"{where}.function.name", "a string", name)
        call_id = _object(raw, where).get("id")
        if not isinstance(call_id, str):
            raise _wrong(f"{where}.id", "a string", call_id)
        calls.append(ToolCall(id=call_id, name=name, arguments=arguments))
    return tuple(calls)


def _message(index: int, message: object) -> ChatMessage:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _wrong(param, "an object", message)
    role = message.get("role")
    if not isinstance(role, str):
        raise _wrong(f"{param}.role", "a string", role)
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role == "function":
        raise InvalidRequest(
            f"{param}.role 'function' (deprecated) is not supported: send role 'tool'",
            param=f"{param}.role",
        )
    if message.get("audio") is not None:
        raise InvalidRequest(f"{param}.audio is not supported", param=f"{param}.audio")
    return ChatMessage(
        role=role,
        content=_content(f"{param}.content", message.get("content")),
        name=_opt_str(message, "name", f"{param}.name"),
        tool_calls=_tool_calls(message.get("tool_calls"), f"{param}.tool_calls"),
        tool_call_id=_opt_str(message, "tool_call_id", f"{param}.tool_call_id"),
    )


def _tools(body: Mapping[str, Any]) -> tuple[Tool, ...]:
    value = body.get("tools")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _wrong("tools", "an array", value)
    tools = []
    for index, raw in enumerate(value):
        where = f"tools[{index}]"
        function = _function_ref(raw, where)
        name = function.get("name")
        if not isinstance(name, str):
            raise _wrong(f"{where}.function.name", "a string", name)
        tools.append(
            Tool(
                name=name,
                description=_opt_str(function, "description", f"{where}.function.description"),
                parameters=_json_text(function.get("parameters"), f"{where}.function.parameters"),
                strict=_opt_bool(function, "strict"),
            )
        )
    return tuple(tools)


def _tool_choice(body: Mapping[str, Any]) -> ToolChoice | None:
    value = body.get("tool_choice")
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"tool_choice must be none, auto, required or a function, got {value[:40]!r}",
                param="tool_choice",
            )
        return ToolChoice(mode=ToolChoiceMode(value))
    name = _function_ref(value, "tool_choice").get("name")
    if not isinstance(name, str):
        raise _wrong("tool_choice.function.name", "a string", name)
    return ToolChoice(mode=ToolChoiceMode.FUNCTION, function=name)


def _response_format(body: Mapping[str, Any]) -> ResponseFormat | None:
    value = body.get("response_format")
    if value is None:
        return None
    fmt = _object(value, "response_format")
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            f"response_format.type must be text, json_object or json_schema, got "
            f"{str(kind)[:40]!r}",
            param="response_format.type",
        )
    if kind != "json_schema":
        return ResponseFormat(type=ResponseFormatType(kind))
    spec = _object(fmt.get("json_schema"), "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str):
        raise _wrong("response_format.json_schema.name", "a string", name)
    return ResponseFormat(
        type=ResponseFormatType.JSON_SCHEMA,
        name=name,
        description=_opt_str(spec, "description", "response_format.json_schema.description"),
        schema=_json_text(spec.get("schema"), "response_format.json_schema.schema"),
        strict=_opt_bool(spec, "strict"),
    )


def parse_chat_request(body: bytes, *, max_bytes: int) -> Parsed:
    """POST /v1/chat/completions -> (request, stream?, include usage?)."""
    data = decode_json_body(body, max_bytes=max_bytes)
    model = _model(data)
    raw = data.get("messages")
    if raw is None:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(raw, list):
        raise _wrong("messages", "an array", raw)
    if not raw:
        raise InvalidRequest("messages must not be empty", param="messages")
    messages = tuple(_message(index, message) for index, message in enumerate(raw))
    _refuse_unsupported(data)
    for text_only in ("echo", "best_of"):
        if data.get(text_only) is not None:
            raise InvalidRequest(
                f"{text_only} is for text completions (POST /v1/completions)", param=text_only
            )
    stream, include_usage = _stream(data)
    request = InferenceRequest(
        model=model,
        messages=messages,
        sampling=_sampling(data, chat=True),
        user=_user(data),
        tools=_tools(data),
        tool_choice=_tool_choice(data),
        parallel_tool_calls=_opt_bool(data, "parallel_tool_calls"),
        response_format=_response_format(data),
    )
    return Parsed(request, stream, include_usage)


def parse_completion_request(body: bytes, *, max_bytes: int) -> Parsed:
    """POST /v1/completions -> (request, stream?, include usage?)."""
    data = decode_json_body(body, max_bytes=max_bytes)
    model = _model(data)
    prompt = data.get("prompt")
    if prompt is None:
        raise InvalidRequest("prompt is required", param="prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest(
                "prompt must be a string (or an array holding exactly one string)", param="prompt"
            )
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _wrong("prompt", "a string", prompt)
    _refuse_unsupported(data)
    for chat_only in ("tools", "tool_choice", "response_format", "top_logprobs"):
        if data.get(chat_only) is not None:
            raise InvalidRequest(
                f"{chat_only} is for chat completions (POST /v1/chat/completions)",
                param=chat_only,
            )
    stream, include_usage = _stream(data)
    request = InferenceRequest(
        model=model, prompt=prompt, sampling=_sampling(data, chat=False), user=_user(data)
    )
    return Parsed(request, stream, include_usage)


# --- responses ------------------------------------------------------------------------------


def _finish_reason(reason: FinishReason) -> str:
    # OpenAI clients know "stop", "length" and "tool_calls"; a cancelled stream ended
    # early, like "length".
    if reason is FinishReason.TOOL_CALLS:
        return "tool_calls"
    return "stop" if reason is FinishReason.STOP else "length"


def split_choices(request: InferenceRequest) -> list[InferenceRequest]:
    """`n` choices as `n` requests of one choice each, answered side by side (each in its
    own slot, or on its own box): the first keeps the request's id, the others get their
    own (each is its own usage record); a seed moves on by one per choice, so seeded
    choices differ from each other and are still repeatable."""
    count = request.sampling.n
    if count == 1:
        return [request]
    out = []
    for index in range(count):
        seed = request.sampling.seed
        if seed is not None:
            seed = (seed + index + (1 << 63)) % (1 << 64) - (1 << 63)
        sampling = replace(request.sampling, n=1, seed=seed)
        out.append(
            replace(
                request,
                sampling=sampling,
                request_id=request.request_id if index == 0 else new_request_id(),
            )
        )
    return out


def total(finished: list[Finished]) -> Finished:
    """The usage of several choices: their tokens summed (the last one's reason)."""
    return replace(
        finished[-1],
        prompt_tokens=sum(f.prompt_tokens for f in finished),
        completion_tokens=sum(f.completion_tokens for f in finished),
    )


def usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _token_bytes(lp.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token)}
                    for t in lp.top
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(logprobs: tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    """Completions' (legacy) logprobs object; `offset`: characters of text before these."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _tool_call_delta(call: ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": call.index}
    function: dict[str, Any] = {"arguments": call.arguments}
    if call.id:
        out["id"] = call.id
        out["type"] = "function"
    if call.name:
        function["name"] = call.name
    out["function"] = function
    return out


class Collected:
    """A whole answer gathered from its deltas (for a non-streamed response)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, delta: TextDelta) -> None:
        self.parts.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        for piece in delta.tool_calls:
            call = self.calls.setdefault(
                piece.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = call["id"] or piece.id
            call["function"]["name"] += piece.name
            call["function"]["arguments"] += piece.arguments

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[index] for index in sorted(self.calls)]


class ResponseIds:
    """The id/created/model trio every object of one answer shares, and the answer's
    objects in OpenAI's shapes."""

    def __init__(self, request: InferenceRequest, model: str, *, now: float) -> None:
        """`now`: Unix seconds, what `created` says."""
        self.chat = request.is_chat
        self.logprobs = request.sampling.logprobs
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request.request_id
        self.created = int(now)
        self.model = model
        # Completions: characters streamed so far per choice (logprobs' text_offset).
        self._offsets: dict[int, int] = {}

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, logprobs: tuple[TokenLogprob, ...], offset: int = 0) -> Any:
        if not self.logprobs:
            return None
        return chat_logprobs(logprobs) if self.chat else completion_logprobs(logprobs, offset)

    def complete(self, answer: Collected, finished: Finished) -> dict[str, Any]:
        return self.complete_choices([(answer, finished)])

    def complete_choices(self, answers: list[tuple[Collected, Finished]]) -> dict[str, Any]:
        """The whole response: one choice per answer (`n`), their usage summed."""
        body = self._base("chat.completion" if self.chat else "text_completion")
        body["choices"] = [
            self._choice(index, answer, finished)
            for index, (answer, finished) in enumerate(answers)
        ]
        body["usage"] = usage(total([finished for _, finished in answers]))
        return body

    def _choice(self, index: int, answer: Collected, finished: Finished) -> dict[str, Any]:
        logprobs = self._logprobs(tuple(answer.logprobs))
        if self.chat:
            calls = answer.tool_calls()
            message: dict[str, Any] = {
                "role": "assistant",
                "content": answer.text if answer.text or not calls else None,
            }
            if calls:
                message["tool_calls"] = calls
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": _finish_reason(finished.reason),
            }
        return {
            "index": index,
            "text": answer.text,
            "logprobs": logprobs,
            "finish_reason": _finish_reason(finished.reason),
        }

    def chunk(
        self, delta: TextDelta | None, finished: Finished | None = None, *, index: int = 0
    ) -> dict[str, Any]:
        """A streamed piece of choice `index`: a delta, or its final chunk carrying
        finish_reason."""
        reason = _finish_reason(finished.reason) if finished is not None else None
        offset = self._offsets.get(index, 0)
        logprobs = self._logprobs(delta.logprobs, offset) if delta is not None else None
        if self.chat:
            body = self._base("chat.completion.chunk")
            fields: dict[str, Any] = {}
            if delta is not None and (delta.text or not delta.tool_calls):
                fields["content"] = delta.text
            if delta is not None and delta.tool_calls:
                fields["tool_calls"] = [_tool_call_delta(c) for c in delta.tool_calls]
            body["choices"] = [
                {"index": index, "delta": fields, "logprobs": logprobs, "finish_reason": reason}
            ]
        else:
            body = self._base("text_completion")
            text = delta.text if delta is not None else ""
            self._offsets[index] = offset + len(text)
            body["choices"] = [
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            ]
        return body

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        body = self._base("chat.completion.chunk")
        body["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        return body

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        """Sent after the final chunk when the client asked (stream_options.include_usage)."""
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(finished)
        return body


def model_object(info: ModelInfo, *, created: int = 0) -> dict[str, Any]:
    """One model in OpenAI's shape, with what this mesh knows of it."""
    return {
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": "allerac",
        "aliases": list(info.aliases),
        "context_length": info.context_length,
        "family": info.family,
        "quantization": info.quantization,
        "parameter_count": info.parameter_count,
        "chat": info.chat,
        "tokens_per_second": info.tokens_per_second,
        "capabilities": sorted(f.value for f in info.features),
    }


def models_list(models: list[ModelInfo], *, created: int = 0) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(info, created=created) for info in models]}


def error_body(error: MeshError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }


def sse(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        + b"\n\n"
    )


SSE_DONE = b"data: [DONE]\n\n"
