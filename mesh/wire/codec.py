"""Protobuf <-> domain conversions for the v1 wire contract.

Everything coming off the wire is size-checked before it is parsed and
validated by the domain constructors, so a bad message becomes an
`InvalidRequest` / `RemoteProtocolError`, never another exception.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from mesh import PROTOCOL_VERSION
from mesh.errors import (
    BackendError,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    RemoteProtocolError,
    Unauthenticated,
    Unavailable,
    UnsupportedProtocol,
)
from mesh.inference import (
    MAX_EMBED_INPUTS,
    MAX_HELD_PREFIXES,
    MAX_MESSAGES,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    PREFIX_KEY_BYTES,
    ChatMessage,
    Feature,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    ServedBy,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    TopLogprob,
)
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb

M = TypeVar("M", bound=Message)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_CARD_FEATURES = 64
MAX_PARAM_CHARS = (
    256  # an error's field name, as a peer sent it  # capability names read from one model card
)

_REASON_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_REASON_FROM_PB = {v: k for k, v in _REASON_TO_PB.items()}
_CHOICE_TO_PB = {
    ToolChoiceMode.NONE: pb.ToolChoice.MODE_NONE,
    ToolChoiceMode.AUTO: pb.ToolChoice.MODE_AUTO,
    ToolChoiceMode.REQUIRED: pb.ToolChoice.MODE_REQUIRED,
    ToolChoiceMode.FUNCTION: pb.ToolChoice.MODE_FUNCTION,
}
_CHOICE_FROM_PB = {v: k for k, v in _CHOICE_TO_PB.items()}
_FORMAT_TO_PB = {
    ResponseFormatType.TEXT: pb.ResponseFormat.TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: pb.ResponseFormat.TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: pb.ResponseFormat.TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}
MAX_DELTA_LOGPROBS = 4096  # per wire delta (merged deltas carry many)
MAX_DELTA_TOOL_CALLS = 1024


def _sampling_to_pb(s: Sampling) -> pb.Sampling:
    sampling = pb.Sampling(
        stop=list(s.stop),
        logit_bias=[pb.LogitBias(token=t, bias=b) for t, b in s.logit_bias],
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        n=s.n,
        echo=s.echo,
    )
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(sampling, name, value)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None:
            setattr(sampling, name, value)
    return sampling


def _opt(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _sampling_from_pb(s: pb.Sampling) -> Sampling:
    return Sampling(
        max_tokens=_opt(s, "max_tokens"),
        temperature=_opt(s, "temperature"),
        top_p=_opt(s, "top_p"),
        seed=_opt(s, "seed"),
        stop=tuple(s.stop),
        presence_penalty=_opt(s, "presence_penalty"),
        frequency_penalty=_opt(s, "frequency_penalty"),
        logit_bias=tuple((b.token, b.bias) for b in s.logit_bias),
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        n=s.n or 1,
        echo=s.echo,
    )


def _message_to_pb(m: ChatMessage) -> pb.ChatMessage:
    return pb.ChatMessage(
        role=m.role,
        content=m.content,
        name=m.name,
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
        tool_call_id=m.tool_call_id,
    )


def _message_from_pb(m: pb.ChatMessage) -> ChatMessage:
    return ChatMessage(
        role=m.role,
        content=m.content,
        name=m.name,
        tool_calls=tuple(
            ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls
        ),
        tool_call_id=m.tool_call_id,
    )


def request_to_pb(request: InferenceRequest) -> pb.InferBody:
    """The request body that travels inside a sealed envelope."""
    body = pb.InferBody(
        request_id=request.request_id,
        model=request.model,
        sampling=_sampling_to_pb(request.sampling),
        user=request.user,
        continuation=request.continuation,
        tools=[
            pb.Tool(
                name=t.name,
                description=t.description,
                parameters_json=t.parameters,
                strict=t.strict,
            )
            for t in request.tools
        ],
        parallel_tool_calls=request.parallel_tool_calls,
        cache_prefix=request.cache_prefix,
    )
    if request.tool_choice is not None:
        body.tool_choice.CopyFrom(
            pb.ToolChoice(
                mode=_CHOICE_TO_PB[request.tool_choice.mode],
                function=request.tool_choice.function,
            )
        )
    fmt = request.response_format
    if fmt is not None:
        body.response_format.CopyFrom(
            pb.ResponseFormat(
                type=_FORMAT_TO_PB[fmt.type],
                name=fmt.name,
                description=fmt.description,
                schema_json=fmt.schema,
                strict=fmt.strict,
            )
        )
    if request.messages is not None:
        body.chat.messages.extend(_message_to_pb(m) for m in request.messages)
    elif request.inputs is not None:
        body.embed.inputs.extend(request.inputs)
        if request.dimensions is not None:
            body.embed.dimensions = request.dimensions
    else:
        body.prompt = request.prompt or ""
    return body


def _tool_choice_from_pb(body: pb.InferBody) -> ToolChoice | None:
    if not body.HasField("tool_choice"):
        return None
    mode = _CHOICE_FROM_PB.get(body.tool_choice.mode)
    if mode is None:
        raise InvalidRequest(f"unknown tool_choice mode {body.tool_choice.mode}")
    return ToolChoice(mode=mode, function=body.tool_choice.function)


def _format_from_pb(body: pb.InferBody) -> ResponseFormat | None:
    if not body.HasField("response_format"):
        return None
    fmt = body.response_format
    kind = _FORMAT_FROM_PB.get(fmt.type)
    if kind is None:
        raise InvalidRequest(f"unknown response_format type {fmt.type}")
    return ResponseFormat(
        type=kind,
        name=fmt.name,
        description=fmt.description,
        schema=fmt.schema_json,
        strict=_opt(fmt, "strict"),
    )


def request_from_pb(body: pb.InferBody) -> InferenceRequest:
    which = body.WhichOneof("input")
    if which not in ("chat", "prompt", "embed"):
        raise InvalidRequest("InferBody has neither chat messages, a prompt nor inputs")
    if which == "embed" and len(body.embed.inputs) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBED_INPUTS} inputs", param="input")
    if len(body.tools) > MAX_TOOLS:  # before building them all
        raise InvalidRequest(f"at most {MAX_TOOLS} tools", param="tools")
    if which == "chat" and len(body.chat.messages) > MAX_MESSAGES:
        raise InvalidRequest(f"at most {MAX_MESSAGES} messages", param="messages")
    return InferenceRequest(
        request_id=body.request_id,
        model=body.model,
        messages=(
            tuple(_message_from_pb(m) for m in body.chat.messages) if which == "chat" else None
        ),
        prompt=body.prompt if which == "prompt" else None,
        inputs=tuple(body.embed.inputs) if which == "embed" else None,
        dimensions=_opt(body.embed, "dimensions") if which == "embed" else None,
        sampling=_sampling_from_pb(body.sampling),
        user=body.user,
        continuation=body.continuation,
        tools=tuple(
            Tool(
                name=t.name,
                description=t.description,
                parameters=t.parameters_json,
                strict=_opt(t, "strict"),
            )
            for t in body.tools
        ),
        tool_choice=_tool_choice_from_pb(body),
        parallel_tool_calls=_opt(body, "parallel_tool_calls"),
        response_format=_format_from_pb(body),
        cache_prefix=body.cache_prefix,
    )


def parse_message(message_type: type[M], data: bytes) -> M:
    """Bytes from outside as one message, size-checked first (fuzzed in the tests)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidRequest(f"message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise InvalidRequest(f"not a {message_type.__name__}: {exc}") from exc
    return message


def parse_infer_request(data: bytes) -> InferenceRequest:
    """An InferBody's bytes, as opened from a sealed envelope (fuzzed in the tests)."""
    return request_from_pb(parse_message(pb.InferBody, data))


def check_protocol_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise UnsupportedProtocol(
            f"protocol version {version} is not spoken here (this node speaks {PROTOCOL_VERSION})"
        )


_ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def error_to_pb(error: MeshError) -> pb.InferEvent:
    return pb.InferEvent(
        error=pb.ErrorEvent(
            grpc_status=error.grpc_status,
            message=error.message,
            code=error.code,
            resets_at=error.resets_at if isinstance(error, QuotaExceeded) else "",
            param=(error.param or "")[:MAX_PARAM_CHARS],
        )
    )


def _delta_to_pb(event: TextDelta) -> pb.Delta:
    return pb.Delta(
        text=event.text,
        tokens=event.tokens,
        logprobs=[
            pb.TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,  # None leaves it unset
                top=[pb.TopLogprob(token=t.token, logprob=t.logprob) for t in lp.top],
            )
            for lp in event.logprobs
        ],
        tool_calls=[
            pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in event.tool_calls
        ],
    )


def _finite(value: float | None) -> float | None:
    """A peer's logprob as JSON can carry it (NaN and infinities are not JSON)."""
    return value if value is not None and math.isfinite(value) else None


def _delta_from_pb(delta: pb.Delta) -> TextDelta:
    if len(delta.logprobs) > MAX_DELTA_LOGPROBS or len(delta.tool_calls) > MAX_DELTA_TOOL_CALLS:
        raise RemoteProtocolError("a delta carries more logprobs or tool calls than allowed")
    if any(len(lp.top) > MAX_TOP_LOGPROBS for lp in delta.logprobs):
        raise RemoteProtocolError(f"a token has more than {MAX_TOP_LOGPROBS} alternatives")
    if any(c.index >= MAX_TOOL_CALLS for c in delta.tool_calls):
        raise RemoteProtocolError(f"a tool call index is beyond {MAX_TOOL_CALLS}")
    return TextDelta(
        delta.text,
        max(1, delta.tokens),
        tuple(
            TokenLogprob(
                token=lp.token,
                logprob=_finite(_opt(lp, "logprob")),
                top=tuple(
                    TopLogprob(token=t.token, logprob=_finite(t.logprob) or 0.0) for t in lp.top
                ),
            )
            for lp in delta.logprobs
        ),
        tuple(
            ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in delta.tool_calls
        ),
    )


def event_to_pb(event: InferenceEvent, served_by: ServedBy) -> pb.InferEvent:
    if isinstance(event, TextDelta):
        return pb.InferEvent(delta=_delta_to_pb(event))
    return pb.InferEvent(
        finish=pb.Finish(
            reason=_REASON_TO_PB[event.reason],
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            served_by=served_by.node_id,
            route=served_by.route.value,
            model=served_by.model,
            usage_record=(
                lpb.SignedRecord.FromString(event.usage_record) if event.usage_record else None
            ),
            embeddings=[pb.Embedding(values=vector) for vector in event.embeddings],
        )
    )


def event_from_pb(message: pb.InferEvent) -> InferenceEvent:
    which = message.WhichOneof("event")
    if which == "delta":
        return _delta_from_pb(message.delta)
    if which == "finish":
        reason = _REASON_FROM_PB.get(message.finish.reason)
        if reason is None:
            raise RemoteProtocolError(f"unknown finish reason {message.finish.reason}")
        return Finished(
            reason=reason,
            prompt_tokens=message.finish.prompt_tokens,
            completion_tokens=message.finish.completion_tokens,
            usage_record=(
                message.finish.usage_record.SerializeToString()
                if message.finish.HasField("usage_record")
                else b""
            ),
            embeddings=tuple(tuple(e.values) for e in message.finish.embeddings),
        )
    if which == "error":
        error = error_from_status(
            message.error.grpc_status, message.error.message, message.error.code
        )
        if isinstance(error, QuotaExceeded) and _ISO_UTC.fullmatch(message.error.resets_at):
            error.resets_at = message.error.resets_at
        if message.error.param and error.param is None:
            error.param = message.error.param[:MAX_PARAM_CHARS]
        raise error
    raise RemoteProtocolError("InferEvent carries neither a delta nor a finish")


def load_to_pb(load: Load) -> pb.Load:
    return pb.Load(
        active_streams=load.active_streams,
        queued=load.queued,
        slots=load.slots,
        draining=load.draining,
        parallel=load.parallel,
    )


def load_from_pb(message: pb.Load) -> Load:
    return Load(
        active_streams=message.active_streams,
        queued=message.queued,
        slots=message.slots,
        draining=message.draining,
        parallel=message.parallel,
    )


def model_to_pb(info: ModelInfo) -> pb.ModelCard:
    return pb.ModelCard(
        name=info.name,
        aliases=list(info.aliases),
        family=info.family,
        parameter_count=info.parameter_count,
        quantization=info.quantization,
        context_length=info.context_length,
        backend=info.backend,
        tokens_per_second=info.tokens_per_second,
        prompt_tokens_per_second=info.prompt_tokens_per_second,
        chat=info.chat,
        features=sorted(f.value for f in info.features),
        prefixes=sorted(info.prefixes),
    )


_STATUS_TO_ERROR: dict[str, type[MeshError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "FAILED_PRECONDITION": UnsupportedProtocol,
    "NOT_FOUND": ModelNotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "INTERNAL": BackendError,
}


def _by_code() -> dict[str, type[MeshError]]:
    found: dict[str, type[MeshError]] = {}
    pending: list[type[MeshError]] = [MeshError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def _speed(value: float) -> float:
    """A peer's measured speed, or 0 (not known) when it is not a positive number."""
    return value if math.isfinite(value) and value > 0 else 0.0


def model_from_pb(card: pb.ModelCard) -> ModelInfo:
    return ModelInfo(
        name=card.name,
        aliases=tuple(card.aliases),
        family=card.family,
        parameter_count=card.parameter_count,
        quantization=card.quantization,
        context_length=card.context_length,
        backend=card.backend,
        tokens_per_second=card.tokens_per_second,
        prompt_tokens_per_second=_speed(card.prompt_tokens_per_second),
        chat=card.chat,
        features=Feature.parse_all(card.features[:MAX_CARD_FEATURES]),
        # Only well-formed keys count (a wrong one could only misroute: it is left out).
        prefixes=frozenset(
            key for key in card.prefixes[:MAX_HELD_PREFIXES] if len(key) == PREFIX_KEY_BYTES
        ),
    )


def error_from_status(code_name: str, details: str, error_code: str = "") -> MeshError:
    """A peer's gRPC status (and our error code, when the peer sent one) back into the
    error tree, marked as the peer's (`MeshError.from_peer`)."""
    cls = _by_code().get(error_code) if error_code else None
    if cls is not None and cls.grpc_status == code_name:
        return cls(details).said_by_peer()
    fallback = _STATUS_TO_ERROR.get(code_name)
    if fallback is None:
        return RemoteProtocolError(f"{code_name}: {details}").said_by_peer()
    return fallback(details).said_by_peer()
