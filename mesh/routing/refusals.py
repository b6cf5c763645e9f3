"""What the entry node does when a candidate fails: try the next one, or answer the
client (issue 13: one table, not exception lists spread over the entry side).

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
from collections.abc import Sequence
from dataclasses import dataclass

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
    UnsupportedParameter,
)
from mesh.routing.scheduler import Candidate, Excluded, Exclusion


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
    UnsupportedParameter,  # another box's model may honour the field
)


def after_candidate_failure(error: MeshError) -> Next:
    """Whether the entry node tries the next candidate after `error` from one (a peer's
    refusal carries `from_peer`: the peer said it, not this node)."""
    if isinstance(error, _ABOUT_THE_CANDIDATE):
        return Next.TRY_NEXT
    if error.from_peer and isinstance(error, PermissionDenied):
        return Next.TRY_NEXT  # the peer refuses this node (ReplayDetected, NotAMember, ...)
    return Next.ANSWER


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """A candidate that was tried and failed before its first event."""

    candidate: Candidate
    error: MeshError


@dataclass(frozen=True, kw_only=True, slots=True)
class Unplanned:
    """A node that serves the model but was not even a candidate (the pre-selection
    leaves out full and silent peers)."""

    node_id: str
    route: str
    up: bool
    state: str


def no_candidate(
    model: str, *, unplanned: Sequence[Unplanned], known_models: Sequence[str]
) -> MeshError:
    """The error for a plan with no candidate at all: busy or down nodes that serve `model`
    (`unplanned`: the pre-selection leaves them out), or the models the mesh does serve."""
    states = "; ".join(
        f"{n.node_id[:7]} ({n.route}): " + ("full" if n.up else f"peer is {n.state}")
        for n in unplanned[:8]
    )
    if any(n.up for n in unplanned):
        return Overloaded(f"every node serving {model!r} is busy: {states}")
    if unplanned:
        return Unavailable(f"nobody can serve {model!r} right now: {states}")
    known = ", ".join(sorted(set(known_models))) or "none"
    return ModelNotFound(
        f"model {model!r} is not served in this mesh; available: {known}", param="model"
    )


def refusal(
    model: str,
    *,
    excluded: Sequence[Excluded],
    failures: Sequence[Failure],
    embeddings: bool = False,
) -> MeshError:
    """The one error the client hears when no candidate of a plan could serve `model`:
    each was left out of the plan (`excluded`) or tried and failed (`failures`)."""

    def who(candidate: Candidate) -> str:
        return f"{candidate.node_id[:7]} ({candidate.route})"

    reasons = [f"{who(f.candidate)}: {f.error.message}" for f in failures]
    reasons += [f"{who(x.candidate)}: {x.detail}" for x in excluded]
    detail = "; ".join(reasons) or "no node"
    over_quota = [f.error for f in failures if isinstance(f.error, QuotaExceeded)]
    if over_quota and len(over_quota) == len(failures):
        return QuotaExceeded(
            f"nobody can serve {model!r} within quota: {detail}",
            param="quota",
            resets_at=over_quota[0].resets_at,
        )
    # Privacy-excluded candidates do not count: a field only the cloud could honour is still
    # a field this request cannot have (the client hears which field, not a 503).
    cannot = [x for x in excluded if x.reason is Exclusion.CAPABILITY]
    cannot_failed = [f for f in failures if isinstance(f.error, UnsupportedParameter)]
    others = [x for x in excluded if x.reason not in (Exclusion.CAPABILITY, Exclusion.PRIVACY)]
    if (cannot or cannot_failed) and not others and len(cannot_failed) == len(failures):
        # The field the most capable candidate stops at: the one nobody honours.
        furthest = max(cannot, key=lambda x: x.honoured) if cannot else None
        param = furthest.param if furthest else (cannot_failed[0].error.param or "")
        said = "; ".join(
            [
                f"{who(x.candidate)}: {x.detail}"
                for x in cannot + [x for x in excluded if x.reason is Exclusion.PRIVACY]
            ]
            + [f"{who(f.candidate)}: {f.error.message}" for f in cannot_failed]
        )
        return UnsupportedParameter(
            f"{param} is not supported by any node that may serve {model!r} ({said})",
            param=param,
        )
    too_small = [
        f"{x.candidate.node_id[:7]}: {x.detail}" for x in excluded if x.reason is Exclusion.CONTEXT
    ] + [
        f"{f.candidate.node_id[:7]}: {f.error.message}"
        for f in failures
        if isinstance(f.error, ContextLengthExceeded)
    ]
    if too_small and len(too_small) == len(reasons):
        if embeddings:
            return ContextLengthExceeded(
                f"no node serving {model!r} can embed an input this long "
                f"({'; '.join(too_small)}): shorten it",
                param="input",
            )
        return ContextLengthExceeded(
            f"no node serving {model!r} has room for this request "
            f"({'; '.join(too_small)}): shorten the prompt or lower max_tokens",
            param="max_tokens",
        )
    busy = sum(x.reason is Exclusion.FULL for x in excluded)
    busy += sum(isinstance(f.error, Overloaded) for f in failures)
    if busy and busy == len(reasons):
        return Overloaded(f"every node serving {model!r} is busy: {detail}")
    return Unavailable(f"nobody can serve {model!r} right now: {detail}")
