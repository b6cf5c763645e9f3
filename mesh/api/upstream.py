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
from mesh.inference import Finished, FinishReason, InferenceRequest, TextDelta

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


def request_body(
    request: InferenceRequest, *, model: str, defaults: ModelDefaults = ModelDefaults()
) -> tuple[str, dict[str, Any]]:
    """(path under the API base, JSON body) for `request`, always streamed."""
    body: dict[str, Any] = {"model": model}
    if request.messages is not None:
        path = "chat/completions"
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
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
    }
    body.update({key: value for key, value in optional.items() if value is not None})
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
        content = self._content(chunk)
        if usage is not None:
            self.usage = usage
        if not content:
            return None
        if usage is not None and usage.completion_tokens > 0:
            tokens = max(0, usage.completion_tokens - self.counted)  # cumulative counts
        else:
            tokens = 1
        if self._max_tokens is not None and self.counted + tokens > self._max_tokens:
            # The upstream ignored max_tokens: end the answer where the client asked.
            self.reason = FinishReason.LENGTH
            self.stopped = True
            return None
        self.counted += tokens
        self._unsent += tokens
        released, hit = self._scanner.feed(content)
        if hit:
            self.reason = FinishReason.STOP
            self.stopped = True
        if not released:
            return None
        sent, self._unsent = self._unsent, 0
        return TextDelta(released, sent)

    def _content(self, chunk: Mapping[str, Any]) -> str:
        choices = chunk.get("choices")
        if choices is None or choices == []:
            return ""  # the usage chunk, or a keep-alive
        if not isinstance(choices, list) or not isinstance(choices[0], Mapping):
            raise RemoteProtocolError("an answer chunk's choices must be a list of objects")
        choice = next((c for c in choices if isinstance(c, Mapping) and c.get("index") == 0), None)
        choice = choice if choice is not None else choices[0]
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise RemoteProtocolError("an answer chunk's finish_reason must be a string")
            self.reason = FinishReason.LENGTH if reason == "length" else FinishReason.STOP
        if self._chat:
            delta = choice.get("delta")
            if delta is None:
                return ""
            if not isinstance(delta, Mapping):
                raise RemoteProtocolError("a chat answer chunk's delta must be an object")
            content = delta.get("content")
        else:
            content = choice.get("text")
        if content is None:
            return ""
        if not isinstance(content, str):
            raise RemoteProtocolError(
                f"an answer chunk's {'delta.content' if self._chat else 'text'} must be a string"
            )
        return content

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
                tail = TextDelta(rest, self._unsent)
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
