"""The inference domain: what a request is, what an answer stream carries.

The HTTP API (OpenAI JSON) and the gRPC agent (protobuf) both convert into
these types, so validation and limits live here once. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096
# Size caps on what a request may carry beyond its text (they travel on the wire too).
MAX_TOOLS = 128
MAX_TOOL_NAME_CHARS = 64
MAX_SCHEMA_CHARS = 64 * 1024  # a tool's parameters or a response_format schema, as JSON
MAX_DESCRIPTION_CHARS = 8 * 1024
MAX_TOOL_CALLS = 128  # in one assistant message
MAX_ARGUMENTS_CHARS = 64 * 1024  # a tool call's arguments, as JSON text
MAX_TOOL_CALL_ID_CHARS = 256
MAX_LOGIT_BIAS = 1024
MAX_TOKEN_ID = (1 << 31) - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's range for chat top_logprobs (completions: logprobs 0..5)
MAX_CHOICES = 128  # OpenAI's range for n
MAX_EMBED_INPUTS = 2048  # OpenAI's limit on one embeddings request's inputs
MAX_EMBED_DIMENSIONS = 1 << 16
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MAX_TOKENS = 1 << 20
REQUEST_ID_HEX_CHARS = 32
PREFIX_KEY_BYTES = 16  # a conversation prefix's key (mesh.routing.prefix)
MAX_HELD_PREFIXES = 64  # keys a box advertises per model (its most recently used)


def new_request_id() -> str:
    """128 random bits, hex: the request's idempotency and ledger key."""
    return secrets.token_hex(REQUEST_ID_HEX_CHARS // 2)


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_tokens reached or the context filled
    CANCELLED = "cancelled"  # the caller went away or the node is shutting down
    TOOL_CALLS = "tool_calls"  # the answer is one or more tool calls


class Feature(enum.StrEnum):
    """What a model can honour beyond plain sampling: advertised in cards, asked for by
    requests (`InferenceRequest.needs`), matched by the scheduler."""

    TOOLS = "tools"  # tools, tool_choice, tool calls and tool results in messages
    STRUCTURED_OUTPUT = "structured_output"  # response_format json_object / json_schema
    LOGPROBS = "logprobs"
    PENALTIES = "penalties"  # presence_penalty, frequency_penalty
    LOGIT_BIAS = "logit_bias"
    ECHO = "echo"  # completions: the prompt echoed before the answer
    CHOICES = "choices"  # n > 1 in one request (no card says it: the HTTP API splits n)
    EMBEDDINGS = "embeddings"

    @classmethod
    def parse_all(cls, names: Iterable[str]) -> frozenset[Feature]:
        """Names from a peer's card; a newer peer's unknown ones are left out."""
        known = {f.value for f in cls}
        return frozenset(cls(name) for name in names if name in known)


class Route(enum.StrEnum):
    """Which tier answered (DESIGN.md "Scheduling")."""

    LOCAL = "local"
    LAN = "lan"
    RELAY = "relay"
    CLOUD = "cloud"


_TOOL_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_TOOL_NAME_CHARS}}}")


def check_tool_name(name: str, param: str) -> None:
    if not _TOOL_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{param} must be 1 to {MAX_TOOL_NAME_CHARS} letters, digits, _ or -, "
            f"got {name[:80]!r}",
            param=param,
        )


def _capped(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise InvalidRequest(
            f"{param} is {len(text)} characters; the limit is {limit}", param=param
        )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_object_text(text: str, param: str) -> None:
    """A schema travels as JSON text: it must be a JSON object (or empty: none)."""
    _capped(text, MAX_SCHEMA_CHARS, param)
    if not text:
        return
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"{param} is not valid JSON", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON object", param=param)


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCall:
    """A call the model made (in an assistant message, or in an answer)."""

    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def check(self, param: str) -> None:
        if not self.id or len(self.id) > MAX_TOOL_CALL_ID_CHARS:
            raise InvalidRequest(
                f"{param}.id must be 1 to {MAX_TOOL_CALL_ID_CHARS} characters", param=f"{param}.id"
            )
        check_tool_name(self.name, f"{param}.function.name")
        _capped(self.arguments, MAX_ARGUMENTS_CHARS, f"{param}.function.arguments")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatMessage:
    role: str
    content: str
    name: str = ""  # a participant's name (OpenAI's optional `name`)
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made
    tool_call_id: str = ""  # tool: the call this message answers

    def check(self, index: int) -> None:
        param = f"messages[{index}]"
        if self.role not in ROLES:
            raise InvalidRequest(
                f"{param}.role must be one of {', '.join(ROLES)}, got {self.role!r}",
                param=f"{param}.role",
            )
        _capped(self.name, MAX_TOOL_NAME_CHARS, f"{param}.name")
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest(
                f"{param}.tool_calls is only for assistant messages", param=f"{param}.tool_calls"
            )
        if len(self.tool_calls) > MAX_TOOL_CALLS:
            raise InvalidRequest(
                f"at most {MAX_TOOL_CALLS} tool calls in a message", param=f"{param}.tool_calls"
            )
        for call_index, call in enumerate(self.tool_calls):
            call.check(f"{param}.tool_calls[{call_index}]")
        if self.role == "tool":
            if not self.tool_call_id or len(self.tool_call_id) > MAX_TOOL_CALL_ID_CHARS:
                raise InvalidRequest(
                    f"{param}.tool_call_id is required for a tool message (1 to "
                    f"{MAX_TOOL_CALL_ID_CHARS} characters)",
                    param=f"{param}.tool_call_id",
                )
        elif self.tool_call_id:
            raise InvalidRequest(
                f"{param}.tool_call_id is only for tool messages", param=f"{param}.tool_call_id"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: str = ""  # its JSON schema as JSON text ("" = none given)
    strict: bool | None = None

    def check(self, param: str) -> None:
        check_tool_name(self.name, f"{param}.function.name")
        _capped(self.description, MAX_DESCRIPTION_CHARS, f"{param}.function.description")
        _json_object_text(self.parameters, f"{param}.function.parameters")


class ToolChoiceMode(enum.StrEnum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"  # the named function, always


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode
    function: str = ""  # with FUNCTION


class ResponseFormatType(enum.StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseFormat:
    type: ResponseFormatType
    name: str = ""  # json_schema: the schema's name
    description: str = ""
    schema: str = ""  # json_schema: the schema as JSON text
    strict: bool | None = None

    def check(self) -> None:
        if self.type is ResponseFormatType.JSON_SCHEMA:
            check_tool_name(self.name, "response_format.json_schema.name")
        _capped(self.description, MAX_DESCRIPTION_CHARS, "response_format.json_schema.description")
        _json_object_text(self.schema, "response_format.json_schema.schema")


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """Sampling parameters; None means "the model's default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), token ids ascending
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, with logprobs
    n: int = 1  # choices
    echo: bool = False  # completions: the prompt comes back before the answer

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise InvalidRequest(f"{name} must be from -2 to 2, got {value}", param=name)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(
                f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens", param="logit_bias"
            )
        for token, bias in self.logit_bias:
            if not 0 <= token <= MAX_TOKEN_ID:
                raise InvalidRequest(
                    f"logit_bias keys must be token ids from 0 to {MAX_TOKEN_ID}, got {token}",
                    param="logit_bias",
                )
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise InvalidRequest(
                    f"logit_bias values must be from -100 to 100, got {bias}", param="logit_bias"
                )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
                param="top_logprobs",
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidRequest(f"n must be from 1 to {MAX_CHOICES}, got {self.n}", param="n")


@dataclass(frozen=True, kw_only=True, slots=True)
class InferenceRequest:
    """One request: chat (`messages`), text completion (`prompt`) or embeddings
    (`inputs`), exactly one of them."""

    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    inputs: tuple[str, ...] | None = None  # embeddings: the texts to embed
    dimensions: int | None = None  # embeddings: the size asked (None: the model's own)
    sampling: Sampling = field(default_factory=Sampling)
    request_id: str = field(default_factory=new_request_id)
    user: str = ""
    continuation: str = ""  # failover: answer text already delivered; generate after it
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # None: the model's default (auto with tools)
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # The conversation prefix the entry node expects the serving box to hold (a key of
    # mesh.routing.prefix; empty: none), so that box can tell whether it still did.
    cache_prefix: bytes = b""

    def __post_init__(self) -> None:
        if not self.model or len(self.model) > 256:
            raise InvalidRequest("model must be a non-empty name", param="model")
        kinds = (self.messages is not None) + (self.prompt is not None) + (self.inputs is not None)
        if kinds != 1:
            raise InvalidRequest(
                "a request has exactly one of messages (chat), a prompt or inputs (embeddings)"
            )
        if self.inputs is not None:
            self._check_inputs()
        if self.messages is not None:
            if not self.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            if len(self.messages) > MAX_MESSAGES:
                raise InvalidRequest(f"at most {MAX_MESSAGES} messages", param="messages")
            for index, message in enumerate(self.messages):
                message.check(index)
        self._check_tools()
        if self.response_format is not None:
            if self.messages is None:
                raise InvalidRequest(
                    "response_format is for chat requests", param="response_format"
                )
            self.response_format.check()
        if self.sampling.echo and self.messages is not None:
            raise InvalidRequest("echo is for text completions", param="echo")
        if len(self.request_id) != REQUEST_ID_HEX_CHARS or any(
            c not in "0123456789abcdef" for c in self.request_id
        ):
            raise InvalidRequest(
                f"request_id must be {REQUEST_ID_HEX_CHARS} lowercase hex characters",
                param="request_id",
            )
        if len(self.user) > 256:
            raise InvalidRequest("user must be at most 256 characters", param="user")
        if self.cache_prefix and (
            len(self.cache_prefix) != PREFIX_KEY_BYTES or self.inputs is not None
        ):
            raise InvalidRequest(
                f"cache_prefix must be a chat's or a prompt's {PREFIX_KEY_BYTES}-byte prefix key",
                param="cache_prefix",
            )

    def _check_inputs(self) -> None:
        assert self.inputs is not None
        if not 1 <= len(self.inputs) <= MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"input must hold 1 to {MAX_EMBED_INPUTS} texts, got {len(self.inputs)}",
                param="input",
            )
        for index, text in enumerate(self.inputs):
            if not text:
                raise InvalidRequest(f"input[{index}] must not be empty", param="input")
        if self.dimensions is not None and not 1 <= self.dimensions <= MAX_EMBED_DIMENSIONS:
            raise InvalidRequest(
                f"dimensions must be from 1 to {MAX_EMBED_DIMENSIONS}, got {self.dimensions}",
                param="dimensions",
            )
        if self.continuation:
            raise InvalidRequest("an embeddings request cannot be continued")

    def _check_tools(self) -> None:
        if (self.tools or self.tool_choice or self.parallel_tool_calls is not None) and (
            self.messages is None
        ):
            raise InvalidRequest("tools are for chat requests", param="tools")
        if len(self.tools) > MAX_TOOLS:
            raise InvalidRequest(f"at most {MAX_TOOLS} tools", param="tools")
        names = set()
        for index, tool in enumerate(self.tools):
            tool.check(f"tools[{index}]")
            if tool.name in names:
                raise InvalidRequest(
                    f"tools[{index}].function.name {tool.name!r} is given twice",
                    param=f"tools[{index}].function.name",
                )
            names.add(tool.name)
        choice = self.tool_choice
        if choice is not None:
            if not self.tools:
                raise InvalidRequest(
                    "tool_choice is only allowed when tools are given", param="tool_choice"
                )
            if choice.mode is ToolChoiceMode.FUNCTION and choice.function not in names:
                raise InvalidRequest(
                    f"tool_choice names the function {choice.function[:80]!r}, which is not "
                    "among the tools",
                    param="tool_choice",
                )
        if self.parallel_tool_calls is not None and not self.tools:
            raise InvalidRequest(
                "parallel_tool_calls is only allowed when tools are given",
                param="parallel_tool_calls",
            )

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def needs(self) -> tuple[tuple[Feature, str], ...]:
        """What this request asks beyond plain sampling, each with the field that asks it
        (what a refusal names), in the order the fields are read."""
        found: list[tuple[Feature, str]] = []
        s = self.sampling
        if self.inputs is not None:
            found.append((Feature.EMBEDDINGS, "input"))
        if self.tools:
            found.append((Feature.TOOLS, "tools"))
        for index, message in enumerate(self.messages or ()):
            if message.tool_calls:
                found.append((Feature.TOOLS, f"messages[{index}].tool_calls"))
            elif message.role == "tool":
                found.append((Feature.TOOLS, f"messages[{index}].role"))
        fmt = self.response_format
        if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
            found.append((Feature.STRUCTURED_OUTPUT, "response_format"))
        if s.logprobs:
            found.append((Feature.LOGPROBS, "logprobs"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(s, name):
                found.append((Feature.PENALTIES, name))
        if s.logit_bias:
            found.append((Feature.LOGIT_BIAS, "logit_bias"))
        if s.echo:
            found.append((Feature.ECHO, "echo"))
        if s.n > 1:
            found.append((Feature.CHOICES, "n"))
        return tuple(found)


# --- the answer stream ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives."""

    token: str
    logprob: float | None  # None: none (an echoed prompt's first token has no logprob)
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call, as OpenAI streams them: the first piece of call `index`
    carries its id and name, later pieces more of its arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    tokens: int = 1  # how many generated tokens this text is (deltas get merged on the wire)
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens of this piece, when asked
    tool_calls: tuple[ToolCallDelta, ...] = ()

    @property
    def delivered(self) -> str:
        """What of this piece reaches the client as generated text: the text, and the
        tool calls' ids, names and arguments (what bounds its tokens in the ledger: a
        llama.cpp box's calls are written in a JSON wrapper the client does not see, a
        dozen tokens per call, which its id's 29 characters cover)."""
        if not self.tool_calls:
            return self.text
        return self.text + "".join(c.id + c.name + c.arguments for c in self.tool_calls)


@dataclass(frozen=True, kw_only=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # The serving node's signed usage record (serialized SignedRecord), once it has one.
    usage_record: bytes = b""
    # Embeddings: one vector per input, in order (float32 values).
    embeddings: tuple[tuple[float, ...], ...] = ()


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
    prompt_tokens_per_second: float = 0.0  # prompt tokens read a second, measured (0: not yet)
    chat: bool = True
    # This box's own models only (`allerac status`; not on the card): decode threads and
    # slots (requests decoded at once); 0 where it does not apply or is not known.
    threads: int = 0
    parallel: int = 0
    features: frozenset[Feature] = frozenset()  # what it honours beyond plain sampling
    # The conversation prefixes its slots and saved prompts hold (keys of
    # mesh.routing.prefix; at most MAX_HELD_PREFIXES), for cache-aware routing.
    prefixes: frozenset[bytes] = frozenset()


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
