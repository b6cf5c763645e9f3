"""Who could serve a request: this box's offer and the peers that serve the model, as the
scheduler's candidates; and the plan as people read it (`allerac route --explain`).

Pure: the peer table, this box's offer and a request in; candidates, estimates and rows out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.inference import InferenceRequest, Load, ModelInfo, Route
from mesh.routing.peers import PeerState, PeerTable
from mesh.routing.prefix import Boundary, longest_held
from mesh.routing.refusals import Unplanned
from mesh.routing.scheduler import Candidate, Needs, Plan, Privacy, Scored

PRESELECT_PEERS = 8  # peers given a full look per request (the rest are failover-irrelevant)
DEFAULT_NEW_TOKENS = 256  # what a request without max_tokens is assumed to make


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalOffer:
    """This box's side of a model: what it serves, how loaded it is, how long a request
    took here lately."""

    node_id: str
    info: ModelInfo
    load: Load
    service_ms: float

    def candidate(self, found: Sequence[Boundary] = ()) -> Candidate:
        """This box as a candidate; `found`: the request's conversation prefixes."""
        held = longest_held(found, self.info.prefixes) if found else None
        return Candidate(
            node_id=self.node_id,
            route=Route.LOCAL,
            model=self.info.name,
            busy=self.load.active_streams + self.load.queued,
            slots=self.load.slots,
            parallel=max(1, self.load.parallel),
            service_ms=self.service_ms,
            tokens_per_second=self.info.tokens_per_second,
            context_length=self.info.context_length,
            available=not self.load.draining,
            unavailable_reason="draining",
            features=self.info.features,
            prompt_tokens_per_second=self.info.prompt_tokens_per_second,
            cached_tokens=held.tokens if held else 0,
            cache_prefix=held.key if held else b"",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Estimate:
    """What the scheduler assumes of a request before any backend counts it exactly."""

    prompt_tokens: int  # characters / 4: a rough estimate; the server checks exactly
    new_tokens: int
    max_tokens: int | None

    @classmethod
    def of(cls, request: InferenceRequest) -> Estimate:
        chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
        # Embeddings: each input is embedded on its own, so the longest must fit.
        chars += max((len(text) for text in request.inputs or ()), default=0)
        wanted = request.sampling.max_tokens
        return cls(
            prompt_tokens=chars // 4,
            new_tokens=wanted or DEFAULT_NEW_TOKENS,
            max_tokens=wanted,
        )

    @property
    def needed_context(self) -> int:
        return self.prompt_tokens + (self.max_tokens or 0)


def candidates(
    model: str,
    *,
    local: LocalOffer | None,
    peers: PeerTable,
    estimate: Estimate | None = None,
    needs: Needs = (),
    found: Sequence[Boundary] = (),
) -> list[Candidate]:
    """This box (when it serves `model`) and the peers serving it. With an `estimate`, only
    the most promising peers for it (a vectorized pre-selection, so thousands of peers cost
    about nothing); without, every peer that serves it (for `explain`). A request that
    `needs` capabilities looks at every peer whose model has them (the pre-selection does
    not know capabilities, and could leave only peers that lack them). `found`: the
    request's conversation prefixes (mesh.routing.prefix); the peers holding one are
    looked at too, with what they hold."""
    out = [local.candidate(found)] if local is not None else []
    wanted = {feature for feature, _ in needs}
    capable = (
        [
            peer
            for peer in peers
            if (info := peer.serves(model)) is not None and wanted <= info.features
        ]
        if wanted
        else []
    )
    if capable:
        chosen = capable
    elif estimate is not None:  # (nobody capable: the usual few show why)
        chosen = peers.best(
            model,
            k=PRESELECT_PEERS,
            new_tokens=estimate.new_tokens,
            needed_context=estimate.needed_context,
        )
    else:
        chosen = list(peers)
    holding = peers.holding(found) if found else {}
    if holding:
        looked = {peer.node_id for peer in chosen}
        chosen += [peer for node_id, peer in holding.items() if node_id not in looked]
    # A peer that has not measured this model yet is assumed as fast as this box is at it
    # (rather than a pessimistic default that would keep it idle).
    local_speed = local.info.tokens_per_second if local is not None else 0.0
    for peer in chosen:
        info = peer.serves(model)
        if info is None:
            continue
        held = longest_held(found, info.prefixes) if peer.node_id in holding else None
        out.append(
            Candidate(
                node_id=peer.node_id,
                route=peer.route,
                model=info.name,
                rtt_ms=peer.rtt_ms,
                busy=peer.busy,
                slots=max(peer.load.slots, 1),
                parallel=max(peer.load.parallel, 1),
                service_ms=peer.service_ms,
                tokens_per_second=info.tokens_per_second or local_speed,
                context_length=info.context_length,
                available=peer.state is PeerState.UP and not peer.load.draining,
                unavailable_reason=f"peer is {peer.state}",
                features=info.features,
                prompt_tokens_per_second=info.prompt_tokens_per_second,
                cached_tokens=held.tokens if held else 0,
                cache_prefix=held.key if held else b"",
            )
        )
    return out


def unplanned(model: str, peers: PeerTable) -> list[Unplanned]:
    """The peers serving `model`, whatever their state (for a plan with no candidate)."""
    return [
        Unplanned(
            node_id=peer.node_id,
            route=str(peer.route),
            up=peer.state is PeerState.UP,
            state=str(peer.state),
        )
        for peer in peers
        if peer.serves(model) is not None
    ]


def mesh_models(
    local: list[ModelInfo], node_id: str, peers: PeerTable
) -> list[tuple[ModelInfo, list[str]]]:
    """Every model the mesh can serve, with the nodes (up) that serve it."""
    found: dict[str, tuple[ModelInfo, list[str]]] = {}
    for info in local:
        found[info.name] = (info, [node_id])
    for peer in peers:
        if peer.state is not PeerState.UP:
            continue
        for info in peer.models:
            found.setdefault(info.name, (info, []))[1].append(peer.node_id)
    return list(found.values())


def explain(model: str, privacy: Privacy, decided: Plan) -> dict[str, Any]:
    """The plan as `allerac route --explain` shows it: the chosen candidate, the failover
    order, and every candidate left out with the reason."""

    def row(scored: Scored | None, candidate: Candidate, status: str) -> dict[str, Any]:
        return {
            "node_id": candidate.node_id,
            "route": candidate.route.value,
            "model": candidate.model,
            "eta_ms": round(scored.eta_ms, 1) if scored else None,
            "wait_ms": round(scored.wait_ms, 1) if scored else None,
            "rtt_ms": round(candidate.rtt_ms, 2),
            "busy": candidate.busy,
            "slots": candidate.slots,
            "parallel": candidate.parallel,
            "tokens_per_second": candidate.tokens_per_second,
            "capabilities": sorted(f.value for f in candidate.features),
            "cached_tokens": candidate.cached_tokens,
            "read_ms": round(scored.read_ms, 1) if scored else None,
            "status": status,
        }

    rows = [
        row(s, s.candidate, "chosen" if i == 0 else f"failover #{i}")
        for i, s in enumerate(decided.order)
    ]
    rows += [row(None, x.candidate, x.detail) for x in decided.excluded]
    return {
        "model": model,
        "privacy": privacy.value,
        "reason": decided.reason,
        "by_cache": decided.by_cache,
        "candidates": rows,
    }
