"""The one error tree of Allerac Mesh.

Every failure the library reports is a `MeshError`. Each class carries how it
travels: `grpc_status` (a `grpc.StatusCode` name), `http_status`, and the
OpenAI-style `error_type` / `code` that the HTTP API puts in its error body.
The agent maps a `MeshError` to gRPC in exactly one place and to HTTP in
exactly one place; foreign exceptions (`cryptography`, `grpc`, `sqlite3`,
`llama_cpp`) are converted where they enter, with `raise ... from exc`.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Self


class MeshError(Exception):
    """Base of every error Allerac Mesh raises on purpose."""

    grpc_status: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Said by a peer (decoded from its answer), not by this node: the same class and
        # code, told apart the way h11 tells local from remote protocol errors.
        self.from_peer = False

    def said_by_peer(self) -> Self:
        """This error, as a peer's: what the wire codec returns for a peer's refusal."""
        self.from_peer = True
        return self

    def reworded(self, message: str) -> Self:
        """The same error (class, code, param and any detail such as a quota's reset) with
        another message: what a caller adds context with, losing nothing."""
        clone = copy.copy(self)
        clone.message = message
        clone.args = (message,)
        return clone


# --- local problems: the operator's setup -------------------------------------------------


class ConfigError(MeshError):
    """A configuration file, flag or model entry is invalid."""

    code = "config_error"


class LedgerError(MeshError):
    """The usage ledger failed while running (a commit, a closed store): not the
    operator's configuration, and not the caller's request."""

    code = "ledger_error"


class BackupError(MeshError):
    """A backup cannot be made or restored: wrong passphrase, a damaged or foreign file, a
    home that would be overwritten."""

    code = "backup_error"


class IdentityError(MeshError):
    """The node's identity key is missing, unreadable or corrupt."""

    code = "identity_error"


# --- a caller's request ---------------------------------------------------------------------


class InvalidRequest(MeshError):
    """The caller sent something malformed or out of range (our answer: 400)."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    http_status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    """A JSON endpoint was sent something that does not say it is JSON."""

    http_status = 415
    code = "unsupported_media_type"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    """A field no node that could serve the request can honour (`param` names it)."""

    code = "unsupported_parameter"


class UnsupportedProtocol(InvalidRequest):
    grpc_status = "FAILED_PRECONDITION"
    code = "unsupported_protocol_version"


class Unauthenticated(MeshError):
    grpc_status = "UNAUTHENTICATED"
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MeshError):
    grpc_status = "PERMISSION_DENIED"
    http_status = 403
    error_type = "permission_error"
    code = "permission_denied"


class OwnerRequired(Unauthenticated):
    """Administration asked without the owner's token."""

    code = "owner_token_required"


class ForeignRequest(PermissionDenied):
    """A request that names another host (DNS rebinding) or comes from a web page whose
    origin is not allowed."""

    code = "forbidden_origin"


class CsrfRequired(PermissionDenied):
    """A console session's request without its CSRF token (a stolen cookie alone, or a
    page that is not the console)."""

    code = "csrf_token_required"


class MeshNotEmpty(InvalidRequest):
    """Joining another mesh would leave one that has other members."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 409
    code = "mesh_not_empty"


class NameSetInConfig(InvalidRequest):
    """A change the config file decides (the box's display name set there)."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 409
    code = "set_in_config"


class PrivacyNotAllowed(PermissionDenied):
    """A request asked for a looser privacy policy than its API key allows."""

    code = "privacy_not_allowed"


class ModelNotInPlan(PermissionDenied):
    """The caller's plan does not include the model asked for."""

    code = "model_not_in_plan"


class UserExists(InvalidRequest):
    grpc_status = "ALREADY_EXISTS"
    http_status = 409
    code = "user_exists"


class ModelExists(InvalidRequest):
    """A model added under a name (or alias) this node already serves."""

    grpc_status = "ALREADY_EXISTS"
    http_status = 409
    code = "model_exists"


class UserNotFound(MeshError):
    grpc_status = "NOT_FOUND"
    http_status = 404
    error_type = "invalid_request_error"
    code = "user_not_found"


class ModelNotFound(MeshError):
    grpc_status = "NOT_FOUND"
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


# --- capacity and availability --------------------------------------------------------------


class Overloaded(MeshError):
    """Every slot and queue place is taken: answered at once, never by waiting."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class QuotaExceeded(MeshError):
    """A user (or a mesh's cloud plan) has no quota left for this request this period."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "insufficient_quota"
    code = "quota_exceeded"

    def __init__(self, message: str, *, param: str | None = None, resets_at: str = "") -> None:
        super().__init__(message, param=param)
        self.resets_at = resets_at  # ISO 8601 UTC, when known


class Unavailable(MeshError):
    """Nobody can serve this right now (shutting down, backend gone)."""

    grpc_status = "UNAVAILABLE"
    http_status = 503
    error_type = "server_error"
    code = "unavailable"


class BackendError(MeshError):
    """The inference engine failed while serving a request."""

    code = "backend_error"


class RemoteProtocolError(MeshError):
    """A peer sent bytes that break the wire contract."""

    grpc_status = "INVALID_ARGUMENT"
    http_status = 502
    code = "remote_protocol_error"


# --- trust: membership and sealing ----------------------------------------------------------


class NotAMember(PermissionDenied):
    """The peer proved who it is, but it is not (or no longer) a member of this mesh."""

    code = "not_a_member"


class BadSignature(Unauthenticated):
    """A signature or certificate does not verify: forged, tampered or for another mesh."""

    code = "bad_signature"


class SealingError(Unauthenticated):
    """A sealed envelope or frame cannot be opened: tampered, wrong recipient, wrong key."""

    code = "sealing_error"


class ReplayDetected(PermissionDenied):
    code = "replay"


class ClockSkew(Unauthenticated):
    """The sender's clock is too far from ours for the replay window to protect us."""

    code = "clock_skew"


class InviteError(PermissionDenied):
    """An invite is unknown, expired or already used, or a join it allows is refused."""

    code = "invite_invalid"


class MalformedInvite(InvalidRequest):
    """What was given as an invite code is not one (mistyped, cut short, damaged): a bad
    request (400), not a refusal."""

    code = "invite_malformed"
