from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MEMBER: _ClassVar[Role]
    ROLE_OVERFLOW: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]

class Kem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEM_UNSPECIFIED: _ClassVar[Kem]
    KEM_X25519: _ClassVar[Kem]
    KEM_MLKEM768_X25519: _ClassVar[Kem]
ROLE_UNSPECIFIED: Role
ROLE_MEMBER: Role
ROLE_OVERFLOW: Role
ROLE_ADMIN: Role
KEM_UNSPECIFIED: Kem
KEM_X25519: Kem
KEM_MLKEM768_X25519: Kem

class MembershipCert(_message.Message):
    __slots__ = ("mesh_public_key", "node_id", "identity_public_key", "role", "issued_at_unix_ms", "expires_at_unix_ms")
    MESH_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    mesh_public_key: bytes
    node_id: str
    identity_public_key: bytes
    role: Role
    issued_at_unix_ms: int
    expires_at_unix_ms: int
    def __init__(self, mesh_public_key: _Optional[bytes] = ..., node_id: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ..., role: _Optional[_Union[Role, str]] = ..., issued_at_unix_ms: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class SignedCert(_message.Message):
    __slots__ = ("cert", "signature", "issuer")
    CERT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    cert: bytes
    signature: bytes
    issuer: SignedCert
    def __init__(self, cert: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., issuer: _Optional[_Union[SignedCert, _Mapping]] = ...) -> None: ...

class RevocationList(_message.Message):
    __slots__ = ("mesh_public_key", "version", "revoked_node_ids", "issued_at_unix_ms", "revoked_at_unix_ms")
    class RevokedAtUnixMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MESH_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVOKED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    mesh_public_key: bytes
    version: int
    revoked_node_ids: _containers.RepeatedScalarFieldContainer[str]
    issued_at_unix_ms: int
    revoked_at_unix_ms: _containers.ScalarMap[str, int]
    def __init__(self, mesh_public_key: _Optional[bytes] = ..., version: _Optional[int] = ..., revoked_node_ids: _Optional[_Iterable[str]] = ..., issued_at_unix_ms: _Optional[int] = ..., revoked_at_unix_ms: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SignedRevocations(_message.Message):
    __slots__ = ("revocations", "signature", "issuer")
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    revocations: bytes
    signature: bytes
    issuer: SignedCert
    def __init__(self, revocations: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., issuer: _Optional[_Union[SignedCert, _Mapping]] = ...) -> None: ...

class EncryptionKeys(_message.Message):
    __slots__ = ("node_id", "key_id", "x25519_public_key", "mlkem768_public_key", "not_before_unix_ms", "expires_at_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    X25519_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MLKEM768_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    key_id: str
    x25519_public_key: bytes
    mlkem768_public_key: bytes
    not_before_unix_ms: int
    expires_at_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., key_id: _Optional[str] = ..., x25519_public_key: _Optional[bytes] = ..., mlkem768_public_key: _Optional[bytes] = ..., not_before_unix_ms: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class SignedEncryptionKeys(_message.Message):
    __slots__ = ("keys", "signature")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    keys: bytes
    signature: bytes
    def __init__(self, keys: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EnvelopeHeader(_message.Message):
    __slots__ = ("protocol_version", "sender_id", "recipient_id", "request_id", "issued_at_unix_ms", "recipient_key_id", "kem", "sender_cert", "sender_offers_hybrid")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEM_FIELD_NUMBER: _ClassVar[int]
    SENDER_CERT_FIELD_NUMBER: _ClassVar[int]
    SENDER_OFFERS_HYBRID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sender_id: str
    recipient_id: str
    request_id: bytes
    issued_at_unix_ms: int
    recipient_key_id: str
    kem: Kem
    sender_cert: SignedCert
    sender_offers_hybrid: bool
    def __init__(self, protocol_version: _Optional[int] = ..., sender_id: _Optional[str] = ..., recipient_id: _Optional[str] = ..., request_id: _Optional[bytes] = ..., issued_at_unix_ms: _Optional[int] = ..., recipient_key_id: _Optional[str] = ..., kem: _Optional[_Union[Kem, str]] = ..., sender_cert: _Optional[_Union[SignedCert, _Mapping]] = ..., sender_offers_hybrid: _Optional[bool] = ...) -> None: ...

class SealedEnvelope(_message.Message):
    __slots__ = ("header", "ciphertext", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    ciphertext: bytes
    signature: bytes
    def __init__(self, header: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SealedRequestBody(_message.Message):
    __slots__ = ("response_key", "body")
    RESPONSE_KEY_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    response_key: bytes
    body: bytes
    def __init__(self, response_key: _Optional[bytes] = ..., body: _Optional[bytes] = ...) -> None: ...

class SealedFrame(_message.Message):
    __slots__ = ("seq", "final", "ciphertext")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    final: bool
    ciphertext: bytes
    def __init__(self, seq: _Optional[int] = ..., final: _Optional[bool] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class Invite(_message.Message):
    __slots__ = ("secret", "mesh_public_key", "inviter_node_id", "inviter_addresses", "role", "expires_at_unix_ms")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MESH_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    INVITER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INVITER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    mesh_public_key: bytes
    inviter_node_id: str
    inviter_addresses: _containers.RepeatedScalarFieldContainer[str]
    role: Role
    expires_at_unix_ms: int
    def __init__(self, secret: _Optional[bytes] = ..., mesh_public_key: _Optional[bytes] = ..., inviter_node_id: _Optional[str] = ..., inviter_addresses: _Optional[_Iterable[str]] = ..., role: _Optional[_Union[Role, str]] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("invite_id", "identity_public_key", "sent_at_unix_ms", "proof", "signature", "display_name", "addresses")
    INVITE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    invite_id: bytes
    identity_public_key: bytes
    sent_at_unix_ms: int
    proof: bytes
    signature: bytes
    display_name: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, invite_id: _Optional[bytes] = ..., identity_public_key: _Optional[bytes] = ..., sent_at_unix_ms: _Optional[int] = ..., proof: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., display_name: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("cert", "revocations")
    CERT_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    cert: SignedCert
    revocations: SignedRevocations
    def __init__(self, cert: _Optional[_Union[SignedCert, _Mapping]] = ..., revocations: _Optional[_Union[SignedRevocations, _Mapping]] = ...) -> None: ...
