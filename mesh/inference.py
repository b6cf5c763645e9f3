"""The inference domain: what a request is, what an answer stream carries.

The HTTP API (OpenAI JSON) and the gRPC agent (protobuf) both convert into
these types, so validation and limits live here once. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass, field

from mesh.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MAX_TOKENS = 1 << 20
REQUEST_ID_HEX_CHARS = 32


def new_request_id() -> str:
    """128 random bits, hex: the request's idempotency and ledger key."""
    return secrets.token_hex(REQUEST_ID_HEX_CHARS // 2)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_tokens reached or the context filled
    CANCELLED = "cancelled"  # the caller went away or the node is shutting down


class Route(enum.StrEnum):
    """Which tier answered (DESIGN.md "Scheduling")."""

    LOCAL = "local"
    LAN = "lan"
    RELAY = "relay"
    CLOUD = "cloud"


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """Sampling parameters; None means "the model's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_MAX_TOKENS:
            raise InvalidRequest(
                f"max_tokens must be an integer from 1 to {MAX_MAX_TOKENS}, got {self.max_tokens}",
                param="max_tokens",
            )
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0
        ):
            raise InvalidRequest(
                f"temperature must be from 0 to 2, got {self.temperature}", param="temperature"
            )
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(
                f"top_p must be greater than 0 and at most 1, got {self.top_p}", param="top_p"
            )
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 63):
            raise InvalidRequest("seed must fit in 64 bits", param="seed")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop)}", param="stop"
            )
        for stop in self.stop:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(
                    f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters", param="stop"
                )


@dataclass(frozen=True, kw_only=True, slots=True)
class InferenceRequest:
    """One request: chat (`messages`) or text completion (`prompt`), never both."""

    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = field(default_factory=new_request_id)
    user: str = ""
    continuation: str = ""  # failover: answer text already delivered; generate after it

    def __post_init__(self) -> None:
        if not self.model or len(self.model) > 256:
            raise InvalidRequest("model must be a non-empty name", param="model")
        if (self.messages is None) == (self.prompt is None):
            raise InvalidRequest("a request has either messages (chat) or a prompt")
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            if len(self.messages) > MAX_MESSAGES:
                raise InvalidRequest(f"at most {MAX_MESSAGES} messages", param="messages")
            for index, message in enumerate(self.messages):
                if message.role not in ROLES:
                    raise InvalidRequest(
                        f"messages[{index}].role must be one of {', '.join(ROLES)}, "
                        f"got {message.role!r}",
                        param=f"messages[{index}].role",
                    )
        if len(self.request_id) != REQUEST_ID_HEX_CHARS or any(
            c not in "0123456789abcdef" for c in self.request_id
        ):
            raise InvalidRequest(
                f"request_id must be {REQUEST_ID_HEX_CHARS} lowercase hex characters",
                param="request_id",
            )
        if len(self.user) > 256:
            raise InvalidRequest("user must be at most 256 characters", param="user")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


# --- the answer stream ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    tokens: int = 1  # how many generated tokens this text is (deltas get merged on the wire)


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # The serving node's signed usage record (serialized SignedRecord), once it has one.
    usage_record: bytes = b""


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedBy:
    """Who answered and why: shown to clients as x-allerac-node / x-allerac-route."""

    node_id: str
    route: Route
    model: str  # canonical model name


InferenceEvent = TextDelta | Finished


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """What a node says about a model it serves (goes into the node card)."""

    name: str
    aliases: tuple[str, ...] = ()
    family: str = ""
    parameter_count: int = 0
    quantization: str = ""
    context_length: int = 0
    backend: str = ""
    tokens_per_second: float = 0.0
    chat: bool = True
    # This box's own models only (`allerac status`; not on the card): decode threads and
    # slots (requests decoded at once); 0 where it does not apply or is not known.
    threads: int = 0
    parallel: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Load:
    """How busy a node (or one of its models) is: `active_streams` requests hold a slot,
    `queued` wait for one; `parallel` slots run at once and `slots` requests (running and
    waiting) are admitted at most, more get 429 at once."""

    active_streams: int
    queued: int
    slots: int
    draining: bool = False
    parallel: int = 1

    @property
    def free(self) -> int:
        """Slots free right now (a request admitted now starts at once)."""
        return max(0, self.parallel - self.active_streams)
