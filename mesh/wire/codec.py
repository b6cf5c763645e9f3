"""Protobuf <-> domain conversions for the v1 wire contract.

Everything coming off the wire is size-checked before it is parsed and
validated by the domain constructors, so a bad message becomes an
`InvalidRequest` / `RemoteProtocolError`, never another exception.
"""

from __future__ import annotations

import re
from typing import TypeVar

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
    ChatMessage,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    Sampling,
    ServedBy,
    TextDelta,
)
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb

M = TypeVar("M", bound=Message)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_REASON_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_REASON_FROM_PB = {v: k for k, v in _REASON_TO_PB.items()}


def request_to_pb(request: InferenceRequest) -> pb.InferBody:
    """The request body that travels inside a sealed envelope."""
    s = request.sampling
    sampling = pb.Sampling(stop=list(s.stop))
    if s.max_tokens is not None:
        sampling.max_tokens = s.max_tokens
    if s.temperature is not None:
        sampling.temperature = s.temperature
    if s.top_p is not None:
        sampling.top_p = s.top_p
    if s.seed is not None:
        sampling.seed = s.seed
    body = pb.InferBody(
        request_id=request.request_id,
        model=request.model,
        sampling=sampling,
        user=request.user,
        continuation=request.continuation,
    )
    if request.messages is not None:
        body.chat.messages.extend(
            pb.ChatMessage(role=m.role, content=m.content) for m in request.messages
        )
    else:
        body.prompt = request.prompt or ""
    return body


def request_from_pb(body: pb.InferBody) -> InferenceRequest:
    s = body.sampling
    sampling = Sampling(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )
    which = body.WhichOneof("input")
    if which == "chat":
        return InferenceRequest(
            request_id=body.request_id,
            model=body.model,
            messages=tuple(ChatMessage(role=m.role, content=m.content) for m in body.chat.messages),
            sampling=sampling,
            user=body.user,
            continuation=body.continuation,
        )
    if which == "prompt":
        return InferenceRequest(
            request_id=body.request_id,
            model=body.model,
            prompt=body.prompt,
            sampling=sampling,
            user=body.user,
            continuation=body.continuation,
        )
    raise InvalidRequest("InferBody has neither chat messages nor a prompt")


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
        )
    )


def event_to_pb(event: InferenceEvent, served_by: ServedBy) -> pb.InferEvent:
    if isinstance(event, TextDelta):
        return pb.InferEvent(delta=pb.Delta(text=event.text, tokens=event.tokens))
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
        )
    )


def event_from_pb(message: pb.InferEvent) -> InferenceEvent:
    which = message.WhichOneof("event")
    if which == "delta":
        return TextDelta(message.delta.text, max(1, message.delta.tokens))
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
        )
    if which == "error":
        error = error_from_status(
            message.error.grpc_status, message.error.message, message.error.code
        )
        if isinstance(error, QuotaExceeded) and _ISO_UTC.fullmatch(message.error.resets_at):
            error.resets_at = message.error.resets_at
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
        chat=info.chat,
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
        chat=card.chat,
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
