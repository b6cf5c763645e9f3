"""What the entry node does when a candidate fails: try the next one, or answer the
client (issue 13: one table, not exception lists spread over the dispatcher).

A failure says either "this candidate, not this request" (it is down, full, out of its
cloud plan, cannot open our envelope, has too small a context, or refuses us) and the
next candidate may serve; or "this request" (it is malformed, asks for what its key
may not), and every candidate would say the same, so the client hears it at once. A
peer's refusal is always about the candidate: a peer that says "permission denied" or
"replayed" refuses this node's call, not the client's request, which another box may
take (the client then gets 503 naming each refusal, never the peer's 403).
"""

from __future__ import annotations

import enum

from mesh.errors import (
    BackendError,
    ContextLengthExceeded,
    MeshError,
    ModelNotFound,
    NotAMember,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    RemoteProtocolError,
    SealingError,
    Unauthenticated,
    Unavailable,
)


class Next(enum.Enum):
    TRY_NEXT = "try the next candidate"
    ANSWER = "answer the client"


# Whoever raised them (this node or a peer): the candidate, not the request.
_ABOUT_THE_CANDIDATE: tuple[type[MeshError], ...] = (
    Unavailable,
    Overloaded,
    RemoteProtocolError,
    SealingError,
    Unauthenticated,  # its keys, clock or signature: BadSignature, ClockSkew
    NotAMember,
    BackendError,
    ModelNotFound,
    QuotaExceeded,  # a cloud node's plan is used up: another may still serve
    ContextLengthExceeded,  # another box may have a larger context
)


def after_candidate_failure(error: MeshError, *, remote: bool) -> Next:
    """Whether the entry node tries the next candidate after `error` from one (`remote`:
    a peer said it, not this node's own backend)."""
    if isinstance(error, _ABOUT_THE_CANDIDATE):
        return Next.TRY_NEXT
    if remote and isinstance(error, PermissionDenied):
        return Next.TRY_NEXT  # the peer refuses this node (ReplayDetected, NotAMember, ...)
    return Next.ANSWER
