"""Choosing who serves a request: the nearest capable peer (DESIGN.md "Scheduling").

Pure: candidates and a policy in, an ordered plan out (the first choice, then the
failover order), with the reason for every candidate left out.

1. Capable: serves the model (name or alias), can honour what the request asks
   (tools, structured output, logprobs, ...: `InferenceRequest.needs`), the context
   fits, not full, not down or draining, and the privacy policy allows its tier.
2. Nearest: tiers in order local -> lan -> relay -> cloud. Within a tier, the
   smallest estimated time to finish: RTT + wait + generation (tokens to make /
   measured tokens per second). A candidate decodes `parallel` requests at once:
   with a slot free the request starts at once but shares the decoding with the
   `busy` ones already running (counted as waiting: `busy` x its generation, as a
   CPU gains little from batching); with none free it waits for one (requests ahead
   x recent service time / parallel) and then shares with the others. With one
   slot this is the plain queue: requests ahead x service time.
   Every candidate also reads the request's prompt first: prompt tokens / its prompt
   speed (measured, or PROMPT_SPEEDUP x its decoding speed) -- less the part of the
   conversation it already holds (`cached_tokens`, mesh.routing.prefix).
3. A further tier is used only when every nearer one cannot serve or would make
   the request wait longer than `max_wait_ms`; if all would, the smallest
   estimate wins.
4. The cache: steps 2 and 3 choose as if nobody held anything; then a candidate
   holding the start of the conversation (its KV cache) is chosen instead when its
   estimate, with the prompt work it saves, is smaller than that choice's -- a next
   turn goes back to the box that holds its prefix, anywhere in the mesh, unless that
   box is busy beyond what it saves. The plan says when the cache decided
   (`Plan.by_cache`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from mesh.errors import InvalidRequest
from mesh.inference import Feature, Route

TIER_ORDER = (Route.LOCAL, Route.LAN, Route.RELAY, Route.CLOUD)
DEFAULT_SERVICE_MS = 2000.0  # assumed time per request ahead before we have measured one
DEFAULT_TOKENS_PER_SECOND = 20.0  # assumed speed before a model has been measured
DEFAULT_MAX_WAIT_MS = 0.0  # any wait on this box sends the request to an idle peer
# Prompt tokens are read this many times faster than answer tokens are made, until a prompt
# speed is measured (measured on a 2-core CPU: SmolLM2-135M 2.4x, Gemma-3-270M about 2x;
# GPUs read far faster, so this underestimates what a cache saves there).
PROMPT_SPEEDUP = 2.0


class Privacy(enum.StrEnum):
    LOCAL_ONLY = "local-only"  # never leaves this box
    MESH = "mesh"  # this box and other members (LAN or relay), never a cloud node
    ANY = "any"  # cloud overflow nodes too

    @classmethod
    def parse(cls, text: str) -> Privacy:
        try:
            return cls(text)
        except ValueError as exc:
            raise InvalidRequest(
                f"privacy must be one of {', '.join(p.value for p in cls)}, got {text!r}",
                param="privacy",
            ) from exc

    def allows(self, route: Route) -> bool:
        if self is Privacy.LOCAL_ONLY:
            return route is Route.LOCAL
        if self is Privacy.MESH:
            return route is not Route.CLOUD
        return True


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    node_id: str
    route: Route
    model: str  # canonical name there
    rtt_ms: float = 0.0
    busy: int = 0  # running + queued
    slots: int = 1  # admitted at most (running + queued)
    parallel: int = 1  # decoded at once
    service_ms: float = 0.0
    tokens_per_second: float = 0.0
    context_length: int = 0
    available: bool = True  # up (not suspect, down or draining)
    unavailable_reason: str = ""
    features: frozenset[Feature] = frozenset()  # what the model there honours
    prompt_tokens_per_second: float = 0.0  # measured; 0: PROMPT_SPEEDUP x tokens_per_second
    # The longest start of the request's conversation it holds (mesh.routing.prefix):
    # about this many prompt tokens it need not read, and that prefix's key.
    cached_tokens: int = 0
    cache_prefix: bytes = b""


class Exclusion(enum.StrEnum):
    """Why a candidate is left out of a plan (typed: the refusal diagnosis reads these,
    never the words)."""

    PRIVACY = "privacy"  # the request's privacy keeps it off the candidate's tier
    CLOSED = "closed"  # the tier is closed to this request (its user's quota)
    UNAVAILABLE = "unavailable"  # not up, or draining
    FULL = "full"  # every slot busy
    CONTEXT = "context"  # the prompt and max_tokens do not fit its context
    CAPABILITY = "capability"  # its model cannot honour a field of the request


Needs = tuple[tuple[Feature, str], ...]  # what a request asks, with the field asking it


def parse_needs(text: str) -> Needs:
    """`tools,logprobs`: capabilities asked by name (`route --explain --needs`)."""
    needs = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        try:
            feature = Feature(name)
        except ValueError as exc:
            raise InvalidRequest(
                f"needs: {name[:40]!r} is not a capability; known: "
                + ", ".join(f.value for f in Feature),
                param="needs",
            ) from exc
        needs.append((feature, feature.value))
    return tuple(needs)


def missing(candidate: Candidate, needs: Needs) -> tuple[int, Feature, str] | None:
    """The first thing asked that `candidate` cannot honour: its place among the needs,
    and its field."""
    for place, (feature, param) in enumerate(needs):
        if feature not in candidate.features:
            return place, feature, param
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Excluded:
    candidate: Candidate
    reason: Exclusion
    detail: str  # the same, in words, for people
    param: str = ""  # CAPABILITY: the request's field it cannot honour...
    honoured: int = 0  # ...after honouring this many of the fields asked (in order)


@dataclass(frozen=True, kw_only=True, slots=True)
class Scored:
    candidate: Candidate
    eta_ms: float
    wait_ms: float
    read_ms: float = 0.0  # reading the prompt (what it holds of it not counted)


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    order: tuple[Scored, ...]  # first = chosen; the rest = failover order
    excluded: tuple[Excluded, ...]
    reason: str
    by_cache: bool = False  # the cache decided: without it another candidate was chosen

    @property
    def chosen(self) -> Scored | None:
        return self.order[0] if self.order else None


def wait_ms(*, busy: float, parallel: float, service_ms: float, generation_ms: float) -> float:
    """How much longer than alone a request takes on a candidate (module docstring, 2)."""
    parallel = max(1.0, parallel)
    if busy < parallel:  # a slot is free: shared with those running
        return busy * generation_ms
    # Wait for a slot, then share it with the others.
    return (busy - parallel + 1) * service_ms / parallel + (parallel - 1) * generation_ms


def estimate(candidate: Candidate, *, new_tokens: int, prompt_tokens: int = 0) -> Scored:
    speed = candidate.tokens_per_second or DEFAULT_TOKENS_PER_SECOND
    generation = new_tokens / speed * 1000.0
    wait = wait_ms(
        busy=candidate.busy,
        parallel=candidate.parallel,
        service_ms=candidate.service_ms or DEFAULT_SERVICE_MS,
        generation_ms=generation,
    )
    reading = candidate.prompt_tokens_per_second or PROMPT_SPEEDUP * speed
    read = max(0, prompt_tokens - candidate.cached_tokens) / reading * 1000.0
    return Scored(
        candidate=candidate,
        eta_ms=candidate.rtt_ms + wait + read + generation,
        wait_ms=wait,
        read_ms=read,
    )


def exclusion(
    candidate: Candidate,
    *,
    privacy: Privacy,
    prompt_tokens: int,
    max_tokens: int | None,
    closed: Mapping[Route, str] | None = None,
    needs: Needs = (),
) -> Excluded | None:
    """Why `candidate` cannot take this request, or None when it can."""

    def out(reason: Exclusion, detail: str) -> Excluded:
        return Excluded(candidate=candidate, reason=reason, detail=detail)

    if not privacy.allows(candidate.route):
        return out(Exclusion.PRIVACY, f"privacy {privacy.value} keeps it off {candidate.route}")
    lacking = missing(candidate, needs)
    if lacking is not None:
        place, feature, param = lacking
        return Excluded(
            candidate=candidate,
            reason=Exclusion.CAPABILITY,
            detail=f"its model cannot honour {param} ({feature.value})",
            param=param,
            honoured=place,
        )
    if closed and candidate.route in closed:
        return out(Exclusion.CLOSED, closed[candidate.route])
    if not candidate.available:
        return out(Exclusion.UNAVAILABLE, candidate.unavailable_reason or "unavailable")
    if candidate.busy >= candidate.slots:
        return out(Exclusion.FULL, f"full ({candidate.busy} of {candidate.slots} slots)")
    if candidate.context_length and prompt_tokens + (max_tokens or 0) > candidate.context_length:
        return out(Exclusion.CONTEXT, f"context {candidate.context_length} too small")
    return None


def plan(
    candidates: Iterable[Candidate],
    *,
    privacy: Privacy,
    prompt_tokens: int,
    max_tokens: int | None,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    closed: Mapping[Route, str] | None = None,
    needs: Needs = (),
    cache_aware: bool = True,
) -> Plan:
    """`closed`: tiers this request may not use, and why (a user's quota, say); `needs`:
    what the request asks beyond plain sampling (`InferenceRequest.needs`); `cache_aware`:
    False plans as if no candidate held any of the conversation (module docstring, 4)."""
    new_tokens = max_tokens if max_tokens is not None else 256
    able: list[Candidate] = []
    excluded: list[Excluded] = []
    for candidate in candidates:
        left_out = exclusion(
            candidate,
            privacy=privacy,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            closed=closed,
            needs=needs,
        )
        if left_out is not None:
            excluded.append(left_out)
        else:
            able.append(candidate)
    holders = [c for c in able if c.cached_tokens > 0]
    blind = [replace(c, cached_tokens=0, cache_prefix=b"") if c.cached_tokens else c for c in able]
    order, reason = _order(blind, new_tokens, prompt_tokens, max_wait_ms)
    if not cache_aware or not holders:
        return Plan(order=order, excluded=tuple(excluded), reason=reason)
    # Step 4: the same order, each estimate counting what the candidate holds; a holder
    # quicker than the choice made without the cache goes first.
    aware = {
        id(b): estimate(c, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
        for b, c in zip(blind, able, strict=True)
    }
    rescored = [aware[id(s.candidate)] for s in order]
    chosen = rescored[0]
    best = min((s for s in rescored if s.candidate.cached_tokens > 0), key=lambda s: s.eta_ms)
    if best is chosen or best.eta_ms >= chosen.eta_ms:
        return Plan(order=tuple(rescored), excluded=tuple(excluded), reason=reason)
    reason = (
        f"cache: it holds ~{best.candidate.cached_tokens} tokens of this conversation, done "
        f"in ~{best.eta_ms:.0f} ms against ~{chosen.eta_ms:.0f} ms ({reason})"
    )
    order = (best, *(s for s in rescored if s is not best))
    return Plan(order=order, excluded=tuple(excluded), reason=reason, by_cache=True)


def _order(
    able: list[Candidate], new_tokens: int, prompt_tokens: int, max_wait_ms: float
) -> tuple[tuple[Scored, ...], str]:
    """Steps 2 and 3 of the module docstring: the chosen candidate first, then the rest
    by tier and estimate (the failover order), and why."""
    by_tier: dict[Route, list[Scored]] = {tier: [] for tier in TIER_ORDER}
    for candidate in able:
        by_tier[candidate.route].append(
            estimate(candidate, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
        )
    for scored in by_tier.values():
        scored.sort(key=lambda s: s.eta_ms)
    chosen: Scored | None = None
    reason = "nobody can serve it"
    for tier in TIER_ORDER:
        if by_tier[tier] and by_tier[tier][0].wait_ms <= max_wait_ms:
            chosen = by_tier[tier][0]
            reason = f"nearest tier with no wait: {tier}"
            break
    everyone = [s for tier in TIER_ORDER for s in by_tier[tier]]
    if chosen is None and everyone:
        chosen = min(everyone, key=lambda s: s.eta_ms)
        reason = "every tier is busy: smallest estimated time to finish"
    order = ([chosen] if chosen else []) + [s for s in everyone if s is not chosen]
    return tuple(order), reason
