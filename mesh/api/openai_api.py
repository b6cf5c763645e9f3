"""The OpenAI-compatible HTTP API as pure functions: request bytes in, domain values
out; domain values in, JSON-ready dicts out. No sockets, so every parser here can be
fuzzed (`tests/test_openai_api.py`): any input gives a request or a `MeshError`.

Accepted (subset of the OpenAI API that a local model can honour):
  chat:        model, messages[{role, content}], max_tokens | max_completion_tokens,
               temperature, top_p, seed, stop, stream, stream_options, n (=1), user
  completions: model, prompt (string or one-string list), and the same sampling fields
Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mesh.clock import now_ms
from mesh.errors import InvalidRequest, MeshError, RequestTooLarge
from mesh.inference import (
    ChatMessage,
    Finished,
    FinishReason,
    InferenceRequest,
    ModelInfo,
    Sampling,
)

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


def _sampling(body: Mapping[str, Any]) -> Sampling:
    max_key = "max_completion_tokens"
    max_tokens = _opt_int(body, max_key)
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
    if n is not None and n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{max_key} must be at least 1, got {max_tokens}", param=max_key)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_opt_float(body, "temperature"),
        top_p=_opt_float(body, "top_p"),
        seed=_opt_int(body, "seed"),
        stop=stop,
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


def _stream(body: Mapping[str, Any]) -> bool:
    value = body.get("stream", False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong("stream", "a boolean", value)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    return value


def _content(index: int, content: object) -> str:
    """A message's content: a string, or an array of text parts (the newer OpenAI form)."""
    param = f"messages[{index}].content"
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


def parse_chat_request(body: bytes, *, max_bytes: int) -> tuple[InferenceRequest, bool]:
    """POST /v1/chat/completions -> (request, stream?)."""
    data = decode_json_body(body, max_bytes=max_bytes)
    model = _model(data)
    raw = data.get("messages")
    if raw is None:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(raw, list):
        raise _wrong("messages", "an array", raw)
    if not raw:
        raise InvalidRequest("messages must not be empty", param="messages")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _wrong(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _wrong(f"messages[{index}].role", "a string", role)
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        messages.append(ChatMessage(role=role, content=_content(index, message.get("content"))))
    stream = _stream(data)
    request = InferenceRequest(
        model=model, messages=tuple(messages), sampling=_sampling(data), user=_user(data)
    )
    return request, stream


def parse_completion_request(body: bytes, *, max_bytes: int) -> tuple[InferenceRequest, bool]:
    """POST /v1/completions -> (request, stream?)."""
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
    if data.get("suffix") is not None:
        raise InvalidRequest("suffix is not supported", param="suffix")
    stream = _stream(data)
    request = InferenceRequest(
        model=model, prompt=prompt, sampling=_sampling(data), user=_user(data)
    )
    return request, stream


# --- responses ------------------------------------------------------------------------------


def _finish_reason(reason: FinishReason) -> str:
    # OpenAI clients know "stop" and "length"; a cancelled stream ended early, like "length".
    return "stop" if reason is FinishReason.STOP else "length"


def usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


class ResponseIds:
    """The id/created/model trio every object of one answer shares."""

    def __init__(self, request: InferenceRequest, model: str, *, now: float | None = None) -> None:
        self.chat = request.is_chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request.request_id
        self.created = int(now_ms() / 1000 if now is None else now)
        self.model = model

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, text: str, finished: Finished) -> dict[str, Any]:
        if self.chat:
            body = self._base("chat.completion")
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": _finish_reason(finished.reason),
            }
        else:
            body = self._base("text_completion")
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": _finish_reason(finished.reason),
            }
        body["choices"] = [choice]
        body["usage"] = usage(finished)
        return body

    def chunk(self, text: str | None, finished: Finished | None = None) -> dict[str, Any]:
        """A streamed piece: text, or the final chunk carrying finish_reason."""
        reason = _finish_reason(finished.reason) if finished is not None else None
        if self.chat:
            body = self._base("chat.completion.chunk")
            delta: dict[str, Any] = {} if text is None else {"content": text}
            body["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            ]
        else:
            body = self._base("text_completion")
            body["choices"] = [
                {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            ]
        return body

    def role_chunk(self) -> dict[str, Any]:
        body = self._base("chat.completion.chunk")
        body["choices"] = [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        return body

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        """Sent after the final chunk of every stream (as with include_usage): usage in
        every answer is part of our contract, streamed or not."""
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(finished)
        return body


def models_list(models: list[ModelInfo], *, created: int = 0) -> dict[str, Any]:
    data = []
    for info in models:
        data.append(
            {
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
            }
        )
    return {"object": "list", "data": data}


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
