from mesh.wire.v1 import ledger_pb2 as _ledger_pb2
from mesh.wire.v1 import trust_pb2 as _trust_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HOME: _ClassVar[Tier]
    TIER_CLOUD: _ClassVar[Tier]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_TOOL_CALLS: _ClassVar[FinishReason]
TIER_UNSPECIFIED: Tier
TIER_HOME: Tier
TIER_CLOUD: Tier
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_TOOL_CALLS: FinishReason

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SealedCall(_message.Message):
    __slots__ = ("infer", "card", "ledger", "quota", "users", "admin")
    INFER_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    infer: InferBody
    card: CardRequest
    ledger: _ledger_pb2.SyncRequest
    quota: _ledger_pb2.QuotaCall
    users: _ledger_pb2.UserList
    admin: AdminGrant
    def __init__(self, infer: _Optional[_Union[InferBody, _Mapping]] = ..., card: _Optional[_Union[CardRequest, _Mapping]] = ..., ledger: _Optional[_Union[_ledger_pb2.SyncRequest, _Mapping]] = ..., quota: _Optional[_Union[_ledger_pb2.QuotaCall, _Mapping]] = ..., users: _Optional[_Union[_ledger_pb2.UserList, _Mapping]] = ..., admin: _Optional[_Union[AdminGrant, _Mapping]] = ...) -> None: ...

class AdminGrant(_message.Message):
    __slots__ = ("cert", "revocations", "members")
    CERT_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    cert: _trust_pb2.SignedCert
    revocations: _trust_pb2.SignedRevocations
    members: _containers.RepeatedCompositeFieldContainer[KnownMember]
    def __init__(self, cert: _Optional[_Union[_trust_pb2.SignedCert, _Mapping]] = ..., revocations: _Optional[_Union[_trust_pb2.SignedRevocations, _Mapping]] = ..., members: _Optional[_Iterable[_Union[KnownMember, _Mapping]]] = ...) -> None: ...

class KnownMember(_message.Message):
    __slots__ = ("node_id", "role", "display_name", "addresses", "joined_at_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    display_name: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    joined_at_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., display_name: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., joined_at_unix_ms: _Optional[int] = ...) -> None: ...

class CardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignedCard(_message.Message):
    __slots__ = ("card", "signature")
    CARD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    card: bytes
    signature: bytes
    def __init__(self, card: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class NodeCard(_message.Message):
    __slots__ = ("protocol_version", "node_id", "identity_public_key", "software_version", "tier", "hardware", "models", "grpc_addresses", "issued_at_unix_ms", "display_name", "membership", "encryption_keys", "mesh_id", "peer_addresses")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEYS_FIELD_NUMBER: _ClassVar[int]
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    identity_public_key: bytes
    software_version: str
    tier: Tier
    hardware: Hardware
    models: _containers.RepeatedCompositeFieldContainer[ModelCard]
    grpc_addresses: _containers.RepeatedScalarFieldContainer[str]
    issued_at_unix_ms: int
    display_name: str
    membership: _trust_pb2.SignedCert
    encryption_keys: _trust_pb2.SignedEncryptionKeys
    mesh_id: str
    peer_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ..., software_version: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelCard, _Mapping]]] = ..., grpc_addresses: _Optional[_Iterable[str]] = ..., issued_at_unix_ms: _Optional[int] = ..., display_name: _Optional[str] = ..., membership: _Optional[_Union[_trust_pb2.SignedCert, _Mapping]] = ..., encryption_keys: _Optional[_Union[_trust_pb2.SignedEncryptionKeys, _Mapping]] = ..., mesh_id: _Optional[str] = ..., peer_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("cpu_count", "cpu_model", "memory_bytes", "gpu", "gpu_memory_bytes", "profile")
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    cpu_count: int
    cpu_model: str
    memory_bytes: int
    gpu: str
    gpu_memory_bytes: int
    profile: str
    def __init__(self, cpu_count: _Optional[int] = ..., cpu_model: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., gpu: _Optional[str] = ..., gpu_memory_bytes: _Optional[int] = ..., profile: _Optional[str] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "aliases", "family", "parameter_count", "quantization", "context_length", "backend", "tokens_per_second", "chat", "features", "prefixes", "prompt_tokens_per_second")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    family: str
    parameter_count: int
    quantization: str
    context_length: int
    backend: str
    tokens_per_second: float
    chat: bool
    features: _containers.RepeatedScalarFieldContainer[str]
    prefixes: _containers.RepeatedScalarFieldContainer[bytes]
    prompt_tokens_per_second: float
    def __init__(self, name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., family: _Optional[str] = ..., parameter_count: _Optional[int] = ..., quantization: _Optional[str] = ..., context_length: _Optional[int] = ..., backend: _Optional[str] = ..., tokens_per_second: _Optional[float] = ..., chat: _Optional[bool] = ..., features: _Optional[_Iterable[str]] = ..., prefixes: _Optional[_Iterable[bytes]] = ..., prompt_tokens_per_second: _Optional[float] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("nonce", "sent_at_unix_ms", "leaving_node_id", "recipient_node_id", "card_issued_at_unix_ms", "goodbye_signature")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    sent_at_unix_ms: int
    leaving_node_id: str
    recipient_node_id: str
    card_issued_at_unix_ms: int
    goodbye_signature: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., sent_at_unix_ms: _Optional[int] = ..., leaving_node_id: _Optional[str] = ..., recipient_node_id: _Optional[str] = ..., card_issued_at_unix_ms: _Optional[int] = ..., goodbye_signature: _Optional[bytes] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("nonce", "node_id", "received_at_unix_ms", "load", "card_issued_at_unix_ms")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CARD_ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    node_id: str
    received_at_unix_ms: int
    load: Load
    card_issued_at_unix_ms: int
    def __init__(self, nonce: _Optional[bytes] = ..., node_id: _Optional[str] = ..., received_at_unix_ms: _Optional[int] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., card_issued_at_unix_ms: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("active_streams", "queued", "slots", "draining", "parallel")
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    active_streams: int
    queued: int
    slots: int
    draining: bool
    parallel: int
    def __init__(self, active_streams: _Optional[int] = ..., queued: _Optional[int] = ..., slots: _Optional[int] = ..., draining: _Optional[bool] = ..., parallel: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("protocol_version", "sealed")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sealed: _trust_pb2.SealedEnvelope
    def __init__(self, protocol_version: _Optional[int] = ..., sealed: _Optional[_Union[_trust_pb2.SealedEnvelope, _Mapping]] = ...) -> None: ...

class InferBody(_message.Message):
    __slots__ = ("request_id", "model", "chat", "prompt", "embed", "sampling", "user", "continuation", "tools", "tool_choice", "parallel_tool_calls", "response_format", "cache_prefix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CACHE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    chat: ChatInput
    prompt: str
    embed: EmbedInput
    sampling: Sampling
    user: str
    continuation: str
    tools: _containers.RepeatedCompositeFieldContainer[Tool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    response_format: ResponseFormat
    cache_prefix: bytes
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., chat: _Optional[_Union[ChatInput, _Mapping]] = ..., prompt: _Optional[str] = ..., embed: _Optional[_Union[EmbedInput, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., user: _Optional[str] = ..., continuation: _Optional[str] = ..., tools: _Optional[_Iterable[_Union[Tool, _Mapping]]] = ..., tool_choice: _Optional[_Union[ToolChoice, _Mapping]] = ..., parallel_tool_calls: _Optional[bool] = ..., response_format: _Optional[_Union[ResponseFormat, _Mapping]] = ..., cache_prefix: _Optional[bytes] = ...) -> None: ...

class Tool(_message.Message):
    __slots__ = ("name", "description", "parameters_json", "strict")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters_json: str
    strict: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters_json: _Optional[str] = ..., strict: _Optional[bool] = ...) -> None: ...

class ToolChoice(_message.Message):
    __slots__ = ("mode", "function")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[ToolChoice.Mode]
        MODE_NONE: _ClassVar[ToolChoice.Mode]
        MODE_AUTO: _ClassVar[ToolChoice.Mode]
        MODE_REQUIRED: _ClassVar[ToolChoice.Mode]
        MODE_FUNCTION: _ClassVar[ToolChoice.Mode]
    MODE_UNSPECIFIED: ToolChoice.Mode
    MODE_NONE: ToolChoice.Mode
    MODE_AUTO: ToolChoice.Mode
    MODE_REQUIRED: ToolChoice.Mode
    MODE_FUNCTION: ToolChoice.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    mode: ToolChoice.Mode
    function: str
    def __init__(self, mode: _Optional[_Union[ToolChoice.Mode, str]] = ..., function: _Optional[str] = ...) -> None: ...

class ResponseFormat(_message.Message):
    __slots__ = ("type", "name", "description", "schema_json", "strict")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[ResponseFormat.Type]
        TYPE_TEXT: _ClassVar[ResponseFormat.Type]
        TYPE_JSON_OBJECT: _ClassVar[ResponseFormat.Type]
        TYPE_JSON_SCHEMA: _ClassVar[ResponseFormat.Type]
    TYPE_UNSPECIFIED: ResponseFormat.Type
    TYPE_TEXT: ResponseFormat.Type
    TYPE_JSON_OBJECT: ResponseFormat.Type
    TYPE_JSON_SCHEMA: ResponseFormat.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    type: ResponseFormat.Type
    name: str
    description: str
    schema_json: str
    strict: bool
    def __init__(self, type: _Optional[_Union[ResponseFormat.Type, str]] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., schema_json: _Optional[str] = ..., strict: _Optional[bool] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("inputs", "dimensions")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    dimensions: int
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., dimensions: _Optional[int] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ChatInput(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name", "tool_calls", "tool_call_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_call_id: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "n", "echo")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.RepeatedCompositeFieldContainer[LogitBias]
    logprobs: bool
    top_logprobs: int
    n: int
    echo: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Iterable[_Union[LogitBias, _Mapping]]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., n: _Optional[int] = ..., echo: _Optional[bool] = ...) -> None: ...

class LogitBias(_message.Message):
    __slots__ = ("token", "bias")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    token: int
    bias: float
    def __init__(self, token: _Optional[int] = ..., bias: _Optional[float] = ...) -> None: ...

class InferEvent(_message.Message):
    __slots__ = ("delta", "finish", "sealed", "error", "card", "ledger", "quota", "users")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    delta: Delta
    finish: Finish
    sealed: _trust_pb2.SealedFrame
    error: ErrorEvent
    card: SignedCard
    ledger: _ledger_pb2.SyncBatch
    quota: _ledger_pb2.QuotaGrant
    users: _ledger_pb2.UserList
    def __init__(self, delta: _Optional[_Union[Delta, _Mapping]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ..., sealed: _Optional[_Union[_trust_pb2.SealedFrame, _Mapping]] = ..., error: _Optional[_Union[ErrorEvent, _Mapping]] = ..., card: _Optional[_Union[SignedCard, _Mapping]] = ..., ledger: _Optional[_Union[_ledger_pb2.SyncBatch, _Mapping]] = ..., quota: _Optional[_Union[_ledger_pb2.QuotaGrant, _Mapping]] = ..., users: _Optional[_Union[_ledger_pb2.UserList, _Mapping]] = ...) -> None: ...

class ErrorEvent(_message.Message):
    __slots__ = ("grpc_status", "message", "code", "resets_at", "param")
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    grpc_status: str
    message: str
    code: str
    resets_at: str
    param: str
    def __init__(self, grpc_status: _Optional[str] = ..., message: _Optional[str] = ..., code: _Optional[str] = ..., resets_at: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class PushRevocationsResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("text", "tokens", "logprobs", "tool_calls")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallDelta]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallDelta, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "logprob")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "prompt_tokens", "completion_tokens", "served_by", "route", "model", "usage_record", "embeddings")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_RECORD_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    served_by: str
    route: str
    model: str
    usage_record: _ledger_pb2.SignedRecord
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., served_by: _Optional[str] = ..., route: _Optional[str] = ..., model: _Optional[str] = ..., usage_record: _Optional[_Union[_ledger_pb2.SignedRecord, _Mapping]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ...) -> None: ...
