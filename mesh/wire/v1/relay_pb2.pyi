from mesh.wire.v1 import node_pb2 as _node_pb2
from mesh.wire.v1 import trust_pb2 as _trust_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PacketKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACKET_KIND_UNSPECIFIED: _ClassVar[PacketKind]
    PACKET_KIND_CALL: _ClassVar[PacketKind]
    PACKET_KIND_CANCEL: _ClassVar[PacketKind]
    PACKET_KIND_REPLY: _ClassVar[PacketKind]
    PACKET_KIND_END: _ClassVar[PacketKind]

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_UNKNOWN_PEER: _ClassVar[RefusalReason]
    REFUSAL_REASON_PEER_FULL: _ClassVar[RefusalReason]
    REFUSAL_REASON_RATE_LIMITED: _ClassVar[RefusalReason]
    REFUSAL_REASON_NOT_ALLOWED: _ClassVar[RefusalReason]
    REFUSAL_REASON_MALFORMED: _ClassVar[RefusalReason]
    REFUSAL_REASON_RELAY_FULL: _ClassVar[RefusalReason]
PACKET_KIND_UNSPECIFIED: PacketKind
PACKET_KIND_CALL: PacketKind
PACKET_KIND_CANCEL: PacketKind
PACKET_KIND_REPLY: PacketKind
PACKET_KIND_END: PacketKind
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_UNKNOWN_PEER: RefusalReason
REFUSAL_REASON_PEER_FULL: RefusalReason
REFUSAL_REASON_RATE_LIMITED: RefusalReason
REFUSAL_REASON_NOT_ALLOWED: RefusalReason
REFUSAL_REASON_MALFORMED: RefusalReason
REFUSAL_REASON_RELAY_FULL: RefusalReason

class RelayStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RelayStats(_message.Message):
    __slots__ = ("sessions", "meshes", "sessions_opened", "hellos_refused", "packets_forwarded", "bytes_forwarded", "packets_refused", "queued_bytes", "uptime_s")
    class PacketsRefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MESHES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPENED_FIELD_NUMBER: _ClassVar[int]
    HELLOS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FORWARDED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FORWARDED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    meshes: int
    sessions_opened: int
    hellos_refused: int
    packets_forwarded: int
    bytes_forwarded: int
    packets_refused: _containers.ScalarMap[str, int]
    queued_bytes: int
    uptime_s: int
    def __init__(self, sessions: _Optional[int] = ..., meshes: _Optional[int] = ..., sessions_opened: _Optional[int] = ..., hellos_refused: _Optional[int] = ..., packets_forwarded: _Optional[int] = ..., bytes_forwarded: _Optional[int] = ..., packets_refused: _Optional[_Mapping[str, int]] = ..., queued_bytes: _Optional[int] = ..., uptime_s: _Optional[int] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("challenge", "hello", "welcome", "directory", "packet", "refusal", "revocations")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    PACKET_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    challenge: RelayChallenge
    hello: RelayHello
    welcome: RelayWelcome
    directory: RelayDirectory
    packet: RelayPacket
    refusal: RelayRefusal
    revocations: _trust_pb2.SignedRevocations
    def __init__(self, challenge: _Optional[_Union[RelayChallenge, _Mapping]] = ..., hello: _Optional[_Union[RelayHello, _Mapping]] = ..., welcome: _Optional[_Union[RelayWelcome, _Mapping]] = ..., directory: _Optional[_Union[RelayDirectory, _Mapping]] = ..., packet: _Optional[_Union[RelayPacket, _Mapping]] = ..., refusal: _Optional[_Union[RelayRefusal, _Mapping]] = ..., revocations: _Optional[_Union[_trust_pb2.SignedRevocations, _Mapping]] = ...) -> None: ...

class RelayChallenge(_message.Message):
    __slots__ = ("protocol_version", "nonce", "relay_time_unix_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    RELAY_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    nonce: bytes
    relay_time_unix_ms: int
    def __init__(self, protocol_version: _Optional[int] = ..., nonce: _Optional[bytes] = ..., relay_time_unix_ms: _Optional[int] = ...) -> None: ...

class RelayHello(_message.Message):
    __slots__ = ("protocol_version", "membership", "signature", "revocations")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    membership: _trust_pb2.SignedCert
    signature: bytes
    revocations: _trust_pb2.SignedRevocations
    def __init__(self, protocol_version: _Optional[int] = ..., membership: _Optional[_Union[_trust_pb2.SignedCert, _Mapping]] = ..., signature: _Optional[bytes] = ..., revocations: _Optional[_Union[_trust_pb2.SignedRevocations, _Mapping]] = ...) -> None: ...

class RelayWelcome(_message.Message):
    __slots__ = ("node_id", "mesh_id", "max_packet_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESH_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    mesh_id: str
    max_packet_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., mesh_id: _Optional[str] = ..., max_packet_bytes: _Optional[int] = ...) -> None: ...

class RelayDirectory(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[RelayMember]
    def __init__(self, members: _Optional[_Iterable[_Union[RelayMember, _Mapping]]] = ...) -> None: ...

class RelayMember(_message.Message):
    __slots__ = ("node_id", "role")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: _trust_pb2.Role
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[_trust_pb2.Role, str]] = ...) -> None: ...

class RelayPacket(_message.Message):
    __slots__ = ("peer", "stream_id", "kind", "method", "payload", "error", "timeout_s")
    PEER_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    peer: str
    stream_id: int
    kind: PacketKind
    method: str
    payload: bytes
    error: _node_pb2.ErrorEvent
    timeout_s: float
    def __init__(self, peer: _Optional[str] = ..., stream_id: _Optional[int] = ..., kind: _Optional[_Union[PacketKind, str]] = ..., method: _Optional[str] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[_node_pb2.ErrorEvent, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RelayRefusal(_message.Message):
    __slots__ = ("peer", "stream_id", "kind", "reason", "message")
    PEER_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    peer: str
    stream_id: int
    kind: PacketKind
    reason: RefusalReason
    message: str
    def __init__(self, peer: _Optional[str] = ..., stream_id: _Optional[int] = ..., kind: _Optional[_Union[PacketKind, str]] = ..., reason: _Optional[_Union[RefusalReason, str]] = ..., message: _Optional[str] = ...) -> None: ...
