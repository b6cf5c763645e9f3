from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_KIND_UNSPECIFIED: _ClassVar[RecordKind]
    RECORD_KIND_COMPLETE: _ClassVar[RecordKind]
    RECORD_KIND_PARTIAL: _ClassVar[RecordKind]
RECORD_KIND_UNSPECIFIED: RecordKind
RECORD_KIND_COMPLETE: RecordKind
RECORD_KIND_PARTIAL: RecordKind

class UsageRecord(_message.Message):
    __slots__ = ("node_id", "identity_public_key", "seq", "prev_hash", "request_id", "entry_node_id", "user", "model", "prompt_tokens", "completion_tokens", "route", "started_at_unix_ms", "ended_at_unix_ms", "kind", "served_by")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    identity_public_key: bytes
    seq: int
    prev_hash: bytes
    request_id: str
    entry_node_id: str
    user: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    route: str
    started_at_unix_ms: int
    ended_at_unix_ms: int
    kind: RecordKind
    served_by: str
    def __init__(self, node_id: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ..., seq: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., request_id: _Optional[str] = ..., entry_node_id: _Optional[str] = ..., user: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., route: _Optional[str] = ..., started_at_unix_ms: _Optional[int] = ..., ended_at_unix_ms: _Optional[int] = ..., kind: _Optional[_Union[RecordKind, str]] = ..., served_by: _Optional[str] = ...) -> None: ...

class SignedRecord(_message.Message):
    __slots__ = ("record", "signature")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    signature: bytes
    def __init__(self, record: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("record_hash", "entry_node_id", "entry_public_key", "signature")
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record_hash: bytes
    entry_node_id: str
    entry_public_key: bytes
    signature: bytes
    def __init__(self, record_hash: _Optional[bytes] = ..., entry_node_id: _Optional[str] = ..., entry_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("heads", "receipts_after", "max_records", "want_receipts")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    WANT_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[ChainHead]
    receipts_after: int
    max_records: int
    want_receipts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, heads: _Optional[_Iterable[_Union[ChainHead, _Mapping]]] = ..., receipts_after: _Optional[int] = ..., max_records: _Optional[int] = ..., want_receipts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ChainHead(_message.Message):
    __slots__ = ("node_id", "seq", "hash", "signed_seq", "signed_receipts", "signed_by_answerer")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNED_SEQ_FIELD_NUMBER: _ClassVar[int]
    SIGNED_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_BY_ANSWERER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    seq: int
    hash: bytes
    signed_seq: int
    signed_receipts: int
    signed_by_answerer: bool
    def __init__(self, node_id: _Optional[str] = ..., seq: _Optional[int] = ..., hash: _Optional[bytes] = ..., signed_seq: _Optional[int] = ..., signed_receipts: _Optional[int] = ..., signed_by_answerer: _Optional[bool] = ...) -> None: ...

class SyncBatch(_message.Message):
    __slots__ = ("records", "receipts", "receipts_cursor", "more", "fork_proofs", "member_certs", "signed_heads", "refusals")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_CURSOR_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    FORK_PROOFS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_CERTS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_HEADS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    receipts_cursor: int
    more: bool
    fork_proofs: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    member_certs: _containers.RepeatedScalarFieldContainer[bytes]
    signed_heads: _containers.RepeatedCompositeFieldContainer[SignedHead]
    refusals: _containers.RepeatedCompositeFieldContainer[Refusal]
    def __init__(self, records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ..., receipts_cursor: _Optional[int] = ..., more: _Optional[bool] = ..., fork_proofs: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., member_certs: _Optional[_Iterable[bytes]] = ..., signed_heads: _Optional[_Iterable[_Union[SignedHead, _Mapping]]] = ..., refusals: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ...) -> None: ...

class HeadStatement(_message.Message):
    __slots__ = ("node_id", "identity_public_key", "seq", "hash", "signed_at_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    identity_public_key: bytes
    seq: int
    hash: bytes
    signed_at_unix_ms: int
    def __init__(self, node_id: _Optional[str] = ..., identity_public_key: _Optional[bytes] = ..., seq: _Optional[int] = ..., hash: _Optional[bytes] = ..., signed_at_unix_ms: _Optional[int] = ...) -> None: ...

class SignedHead(_message.Message):
    __slots__ = ("head", "signature", "receipts")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    head: bytes
    signature: bytes
    receipts: _containers.RepeatedCompositeFieldContainer[HeadReceipt]
    def __init__(self, head: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., receipts: _Optional[_Iterable[_Union[HeadReceipt, _Mapping]]] = ...) -> None: ...

class HeadReceipt(_message.Message):
    __slots__ = ("head_hash", "node_id", "public_key", "signature")
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    head_hash: bytes
    node_id: str
    public_key: bytes
    signature: bytes
    def __init__(self, head_hash: _Optional[bytes] = ..., node_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("record_hash", "entry_node_id", "entry_public_key", "reason", "signature")
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record_hash: bytes
    entry_node_id: str
    entry_public_key: bytes
    reason: str
    signature: bytes
    def __init__(self, record_hash: _Optional[bytes] = ..., entry_node_id: _Optional[str] = ..., entry_public_key: _Optional[bytes] = ..., reason: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class QuotaCall(_message.Message):
    __slots__ = ("reserve", "release")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    reserve: Reserve
    release: Release
    def __init__(self, reserve: _Optional[_Union[Reserve, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ...) -> None: ...

class Reserve(_message.Message):
    __slots__ = ("request_id", "user", "classes", "prompt_tokens", "max_tokens", "lease_tokens", "lease_returned")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_RETURNED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: int
    max_tokens: int
    lease_tokens: int
    lease_returned: int
    def __init__(self, request_id: _Optional[str] = ..., user: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., lease_tokens: _Optional[int] = ..., lease_returned: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("request_id", "records", "lease_user", "lease_consumed", "lease_returned", "lease_report", "lease_total")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_USER_FIELD_NUMBER: _ClassVar[int]
    LEASE_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    LEASE_RETURNED_FIELD_NUMBER: _ClassVar[int]
    LEASE_REPORT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    lease_user: str
    lease_consumed: int
    lease_returned: int
    lease_report: str
    lease_total: int
    def __init__(self, request_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., lease_user: _Optional[str] = ..., lease_consumed: _Optional[int] = ..., lease_returned: _Optional[int] = ..., lease_report: _Optional[str] = ..., lease_total: _Optional[int] = ...) -> None: ...

class QuotaGrant(_message.Message):
    __slots__ = ("classes", "max_tokens", "refusals", "lease_tokens")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    refusals: _containers.RepeatedScalarFieldContainer[str]
    lease_tokens: int
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., refusals: _Optional[_Iterable[str]] = ..., lease_tokens: _Optional[int] = ...) -> None: ...

class UserList(_message.Message):
    __slots__ = ("digest", "users", "signer_certs")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTS_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    users: _containers.RepeatedCompositeFieldContainer[UserEntry]
    signer_certs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, digest: _Optional[bytes] = ..., users: _Optional[_Iterable[_Union[UserEntry, _Mapping]]] = ..., signer_certs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class UserEntry(_message.Message):
    __slots__ = ("name", "key_hash", "privacy", "quota", "home_node_id", "created_at_unix_ms", "updated_at_unix_ms", "removed", "signer_node_id", "signature")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_HASH_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    HOME_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SIGNER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_hash: str
    privacy: str
    quota: str
    home_node_id: str
    created_at_unix_ms: int
    updated_at_unix_ms: int
    removed: bool
    signer_node_id: str
    signature: bytes
    def __init__(self, name: _Optional[str] = ..., key_hash: _Optional[str] = ..., privacy: _Optional[str] = ..., quota: _Optional[str] = ..., home_node_id: _Optional[str] = ..., created_at_unix_ms: _Optional[int] = ..., updated_at_unix_ms: _Optional[int] = ..., removed: _Optional[bool] = ..., signer_node_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...
