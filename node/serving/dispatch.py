"""Where a request goes: this box, or the nearest capable peer (DESIGN.md "Scheduling").

`Dispatcher.open()` asks `mesh.routing.scheduler.plan` for an order of candidates and
tries them in turn until one produces its first event; a candidate that fails
before the first token is skipped silently. So every failure before the first
token is raised here, before an HTTP status or a gRPC stream is committed.

After the first token, `Answer.events()` keeps the client's stream whole: if the
serving peer fails mid-stream, the next candidate is asked to continue after the
text already delivered (`InferenceRequest.continuation`), and its tokens are
passed on as if nothing happened. Requests that came from a peer are served
here only (`Privacy.LOCAL_ONLY`): the mesh never forwards twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from mesh.errors import (
    ContextLengthExceeded,
    MeshError,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    RemoteProtocolError,
    SealingError,
    Unavailable,
)
from mesh.inference import (
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    Route,
    ServedBy,
    TextDelta,
    new_request_id,
)
from mesh.ledger.bounds import Delivered, completion_tokens_bound, implausible, prompt_tokens_bound
from mesh.ledger.records import Usage
from mesh.routing.peers import PeerEvent, PeerState, PeerTable
from mesh.routing.refusals import Next, after_candidate_failure
from mesh.routing.scheduler import DEFAULT_MAX_WAIT_MS, Candidate, Plan, Privacy, Scored, plan
from mesh.wire.v1 import ledger_pb2 as lpb
from node.serving.backends.base import Backend
from node.store.ledger_store import LedgerStore

logger = logging.getLogger(__name__)

SERVICE_SMOOTHING = 0.3
PRESELECT_PEERS = 8  # peers given a full look per request (the rest are failover-irrelevant)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Arrival:
    """Who let a request into the mesh, and the tier it took to reach this node."""

    entry_node_id: str
    route: Route


class PeerLinks(Protocol):
    """What the dispatcher needs from the peering layer."""

    def client(self, node_id: str) -> Any: ...

    def apply(self, events: list[PeerEvent]) -> None:
        """Log peer state changes and tell whoever listens (cards are re-signed)."""


class _Source:
    """One candidate's stream: its first event is already in hand."""

    def __init__(
        self,
        served_by: ServedBy,
        first: InferenceEvent,
        rest: AsyncIterator[InferenceEvent],
        closer: Any,
    ) -> None:
        self.served_by = served_by
        self.first = first
        self.rest = rest
        self._closer = closer

    async def aclose(self) -> None:
        await self._closer()


class Answer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        request: InferenceRequest,
        plan_: Plan,
        source: _Source,
        tried: set[str],
        arrival: Arrival,
    ) -> None:
        self._dispatcher = dispatcher
        self._request = request
        self._plan = plan_
        self._source = source
        self._tried = tried
        self._arrival = arrival
        self._started_ms = int(time.time() * 1000)
        self.served_by = source.served_by
        self.failovers: list[str] = []
        # The ledger records of this answer (its parts, when it failed over): what its
        # user's quota is settled with.
        self.records: list[lpb.SignedRecord] = []

    async def events(self) -> AsyncGenerator[InferenceEvent, None]:
        """Every event of the answer; closing early cancels the work wherever it runs.
        A source that stops after delivering tokens without finishing (it failed, or the
        client went away) leaves a PARTIAL record of what it delivered."""
        delivered: list[str] = []
        delivered_tokens = 0  # tokens whose text the client has (as its sources counted)
        tokens_before = 0  # of those, made by sources that failed mid-stream
        seen = Delivered()  # what the current source delivered: what bounds its record
        started = time.monotonic()
        started_ms = self._started_ms
        source = self._source
        asked = self._request  # what the current source was asked (a failover asks anew)
        pending: InferenceEvent | None = source.first
        finished = False
        try:
            while True:
                try:
                    while True:
                        event = pending if pending is not None else await anext(source.rest)
                        pending = None
                        if isinstance(event, TextDelta):
                            delivered.append(event.text)
                            delivered_tokens += event.tokens
                            seen = seen.plus(event.text)
                            yield event
                            continue
                        self._dispatcher.record_service(
                            source.served_by, (time.monotonic() - started) * 1000
                        )
                        finished = True
                        event = await self._dispatcher.account(
                            source.served_by, asked, event, self._arrival, started_ms, seen
                        )
                        if event.usage_record:
                            self.records.append(lpb.SignedRecord.FromString(event.usage_record))
                        yield dataclasses.replace(
                            event, completion_tokens=event.completion_tokens + tokens_before
                        )
                        return
                except StopAsyncIteration:
                    failure: MeshError = RemoteProtocolError("the answer ended without finishing")
                except MeshError as exc:
                    remote = source.served_by.route is not Route.LOCAL
                    if after_candidate_failure(exc, remote=remote) is Next.ANSWER:
                        raise
                    failure = exc
                # Mid-stream failure: continue on the next candidate after what was delivered.
                await source.aclose()
                self._dispatcher.note_failure(source.served_by, failure)
                await self._partial(source.served_by, asked, delivered_tokens - tokens_before, seen)
                tokens_before = delivered_tokens
                seen = Delivered()
                text = "".join(delivered)
                wanted = self._request.sampling.max_tokens
                if wanted is not None and tokens_before >= wanted:
                    finished = True
                    yield Finished(
                        reason=FinishReason.LENGTH, prompt_tokens=0, completion_tokens=tokens_before
                    )
                    return
                follow_up = dataclasses.replace(
                    self._request,
                    request_id=new_request_id(),
                    continuation=self._request.continuation + text,
                    sampling=dataclasses.replace(
                        self._request.sampling,
                        max_tokens=None if wanted is None else wanted - tokens_before,
                    ),
                )
                logger.warning(
                    "%s failed mid-stream (%s); continuing on the next candidate",
                    source.served_by.node_id[:7],
                    failure.message,
                )
                failed = source.served_by
                try:
                    source = await self._dispatcher.start_first(follow_up, self._plan, self._tried)
                    asked = follow_up
                except MeshError as exc:
                    finished = True  # the failed part is recorded; nothing else was delivered
                    # Say what broke the stream, not only that nobody could take it over;
                    # the error keeps its kind and details (a quota's reset, its param).
                    raise exc.reworded(
                        f"{failed.node_id[:7]} ({failed.route}) failed mid-answer "
                        f"({failure.message}) and nobody could continue it: {exc.message}"
                    ) from exc
                self.failovers.append(source.served_by.node_id)
                pending = source.first
        finally:
            await source.aclose()
            if not finished:
                # The client went away (or an error ended the answer): what it was sent
                # from this source is still usage. Shielded: a cancelled request's record
                # is committed all the same.
                await asyncio.shield(
                    self._partial(source.served_by, asked, delivered_tokens - tokens_before, seen)
                )

    async def _partial(
        self, served_by: ServedBy, asked: InferenceRequest, tokens: int, seen: Delivered
    ) -> None:
        signed = await self._dispatcher.account_partial(
            served_by, asked, tokens, self._arrival, self._started_ms, seen
        )
        if signed is not None:
            self.records.append(signed)


class Dispatcher:
    def __init__(
        self,
        *,
        node_id: str,
        backends: Sequence[Backend],
        peers: PeerTable | None = None,
        links: PeerLinks | None = None,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        default_privacy: Privacy = Privacy.MESH,
        ledger: LedgerStore | None = None,
    ) -> None:
        self._node_id = node_id
        self._ledger = ledger
        self._backends = list(backends)
        self._by_name: dict[str, Backend] = {}
        for backend in self._backends:
            for name in (backend.info.name, *backend.info.aliases):
                self._by_name[name] = backend
        self.peers = peers if peers is not None else PeerTable()
        self._links = links
        self._max_wait_ms = max_wait_ms
        self.default_privacy = default_privacy
        self._local_service_ms = 0.0
        self._rejected: dict[str, int] = {}  # turned away here before reaching a backend

    # --- what this node and the mesh serve ----------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return [backend.info for backend in self._backends]

    def mesh_models(self) -> list[tuple[ModelInfo, list[str]]]:
        """Every model the mesh can serve, with the nodes (up) that serve it."""
        found: dict[str, tuple[ModelInfo, list[str]]] = {}
        for info in self.models():
            found[info.name] = (info, [self._node_id])
        for peer in self.peers:
            if peer.state is not PeerState.UP:
                continue
            for info in peer.models:
                entry = found.setdefault(info.name, (info, []))
                entry[1].append(peer.node_id)
        return list(found.values())

    def counters(self) -> dict[str, dict[str, int]]:
        out = {backend.info.name: dict(backend.counters) for backend in self._backends}
        for name, count in self._rejected.items():
            out[name]["rejected"] = out[name].get("rejected", 0) + count
        return out

    def load(self) -> Load:
        loads = [backend.load() for backend in self._backends]
        return Load(
            active_streams=sum(x.active_streams for x in loads),
            queued=sum(x.queued for x in loads),
            slots=sum(x.slots for x in loads),
            draining=any(x.draining for x in loads),
        )

    def resolve(self, model: str) -> Backend | None:
        return self._by_name.get(model)

    # --- scheduling ---------------------------------------------------------------------------

    def candidates(
        self,
        model: str,
        *,
        best_of: int | None = None,
        new_tokens: int = 256,
        needed_context: int = 0,
    ) -> list[Candidate]:
        """This box and the peers serving `model`; with `best_of`, only the most promising
        peers (a vectorized pre-selection, so thousands of peers cost about nothing)."""
        out = []
        backend = self.resolve(model)
        if backend is not None:
            load = backend.load()
            out.append(
                Candidate(
                    node_id=self._node_id,
                    route=Route.LOCAL,
                    model=backend.info.name,
                    busy=load.active_streams + load.queued,
                    slots=load.slots,
                    service_ms=self._local_service_ms,
                    tokens_per_second=backend.info.tokens_per_second,
                    context_length=backend.info.context_length,
                    available=not load.draining,
                    unavailable_reason="draining",
                )
            )
        peers = (
            self.peers.best(model, k=best_of, new_tokens=new_tokens, needed_context=needed_context)
            if best_of is not None
            else list(self.peers)
        )
        # A peer that has not measured this model yet is assumed as fast as this box is
        # at it (rather than a pessimistic default that would keep it idle).
        local_speed = backend.info.tokens_per_second if backend is not None else 0.0
        for peer in peers:
            info = peer.serves(model)
            if info is None:
                continue
            out.append(
                Candidate(
                    node_id=peer.node_id,
                    route=peer.route,
                    model=info.name,
                    rtt_ms=peer.rtt_ms,
                    busy=peer.busy,
                    slots=max(peer.load.slots, 1),
                    service_ms=peer.service_ms,
                    tokens_per_second=info.tokens_per_second or local_speed,
                    context_length=info.context_length,
                    available=peer.state is PeerState.UP and not peer.load.draining,
                    unavailable_reason=f"peer is {peer.state}",
                )
            )
        return out

    def plan(
        self,
        request: InferenceRequest,
        privacy: Privacy,
        closed: Mapping[Route, str] | None = None,
    ) -> Plan:
        prompt_chars = len(request.prompt or "") + sum(
            len(m.content) for m in request.messages or ()
        )
        new_tokens = request.sampling.max_tokens or 256
        return plan(
            self.candidates(
                request.model,
                best_of=PRESELECT_PEERS,
                new_tokens=new_tokens,
                needed_context=prompt_chars // 4 + (request.sampling.max_tokens or 0),
            ),
            privacy=privacy,
            prompt_tokens=prompt_chars // 4,  # a rough estimate; the server checks exactly
            max_tokens=request.sampling.max_tokens,
            max_wait_ms=self._max_wait_ms,
            closed=closed,
        )

    def explain(self, model: str, privacy: Privacy, max_tokens: int | None) -> dict[str, Any]:
        decided = plan(
            self.candidates(model),
            privacy=privacy,
            prompt_tokens=0,
            max_tokens=max_tokens,
            max_wait_ms=self._max_wait_ms,
        )

        def row(scored: Scored | None, candidate: Candidate, why: str) -> dict[str, Any]:
            return {
                "node_id": candidate.node_id,
                "route": candidate.route.value,
                "model": candidate.model,
                "eta_ms": round(scored.eta_ms, 1) if scored else None,
                "wait_ms": round(scored.wait_ms, 1) if scored else None,
                "rtt_ms": round(candidate.rtt_ms, 2),
                "busy": candidate.busy,
                "slots": candidate.slots,
                "tokens_per_second": candidate.tokens_per_second,
                "status": why,
            }

        rows = [
            row(s, s.candidate, "chosen" if i == 0 else f"failover #{i}")
            for i, s in enumerate(decided.order)
        ]
        rows += [row(None, c, why) for c, why in decided.excluded]
        return {
            "model": model,
            "privacy": privacy.value,
            "reason": decided.reason,
            "candidates": rows,
        }

    # --- running it ---------------------------------------------------------------------------

    async def open(
        self,
        request: InferenceRequest,
        *,
        privacy: Privacy | None = None,
        arrival: Arrival | None = None,
        closed: Mapping[Route, str] | None = None,
    ) -> Answer:
        """`arrival`: who let the request in and how it reached this node (a peer's request
        served here); None for a request made to this node's own API. `closed`: tiers the
        request may not use (its user's quota), with the reason."""
        chosen_privacy = privacy or self.default_privacy
        decided = self.plan(request, chosen_privacy, closed)
        tried: set[str] = set()
        source = await self.start_first(request, decided, tried)
        here = arrival or Arrival(entry_node_id=self._node_id, route=Route.LOCAL)
        return Answer(self, request, decided, source, tried, here)

    # --- the usage ledger -------------------------------------------------------------------------

    async def account(
        self,
        served_by: ServedBy,
        asked: InferenceRequest,
        finished: Finished,
        arrival: Arrival,
        started_ms: int,
        delivered: Delivered,
    ) -> Finished:
        """Leave the answer's record in the ledger. Served here: this node signs a record
        (the ledger countersigns it too when the request came in here). Served by a peer: its
        record is checked against what this node saw itself (the request it sent, the
        text it `delivered`, mesh.ledger.bounds) and countersigned, or kept with a signed
        refusal when it claims more than that can be; the answer then reports what this
        node can vouch for."""
        ledger = self._ledger
        if ledger is None:
            return finished
        if served_by.route is Route.LOCAL:
            signed = await ledger.append(
                Usage(
                    request_id=asked.request_id,
                    entry_node_id=arrival.entry_node_id,
                    user=asked.user,
                    model=served_by.model,
                    prompt_tokens=finished.prompt_tokens,
                    completion_tokens=finished.completion_tokens,
                    route=arrival.route.value,
                    started_at_ms=started_ms,
                    ended_at_ms=int(time.time() * 1000),
                )
            )  # countersigned in its commit when the request came in here
            return dataclasses.replace(finished, usage_record=signed.SerializeToString())

        def judge(record: lpb.UsageRecord) -> str:
            if record.completion_tokens != finished.completion_tokens:
                return (
                    f"it counts {record.completion_tokens} completion tokens; its answer said "
                    f"{finished.completion_tokens}"
                )
            return implausible(record, asked, delivered)

        problem = await ledger.accept(
            finished.usage_record,
            served_by=served_by.node_id,
            request_id=asked.request_id,
            judge=judge,
        )
        if problem:
            logger.warning(
                "not countersigning the usage record of %s: %s", served_by.node_id[:7], problem
            )
            return dataclasses.replace(
                finished,
                usage_record=b"",  # not handed on either
                prompt_tokens=min(finished.prompt_tokens, prompt_tokens_bound(asked)),
                completion_tokens=min(
                    finished.completion_tokens, completion_tokens_bound(asked, delivered)
                ),
            )
        return finished

    async def account_partial(
        self,
        served_by: ServedBy,
        asked: InferenceRequest,
        delivered_tokens: int,
        arrival: Arrival,
        started_ms: int,
        delivered: Delivered,
    ) -> lpb.SignedRecord | None:
        """The entry node records the part of an answer a source delivered before it
        stopped without finishing: a server that died cannot sign for it, and what the
        client was sent is what the user used (the tokens the source counted, never more
        than the text `delivered` can be). A node serving a peer's request leaves this
        to that entry node."""
        ledger = self._ledger
        if ledger is None or delivered_tokens <= 0 or arrival.entry_node_id != self._node_id:
            return None
        if served_by.route is not Route.LOCAL:
            delivered_tokens = min(delivered_tokens, completion_tokens_bound(asked, delivered))
        try:
            signed = await ledger.append(
                Usage(
                    request_id=asked.request_id,
                    entry_node_id=self._node_id,
                    user=asked.user,
                    model=served_by.model,
                    prompt_tokens=0,  # the failed server never said; the continuation counts
                    completion_tokens=delivered_tokens,
                    route=served_by.route.value,
                    started_at_ms=started_ms,
                    ended_at_ms=int(time.time() * 1000),
                    partial=True,
                    served_by="" if served_by.route is Route.LOCAL else served_by.node_id,
                )
            )  # countersigned in its commit: this node is the entry node
        except MeshError as exc:
            logger.error("could not record a partial answer: %s", exc.message)
            return None
        return signed

    async def start_first(
        self, request: InferenceRequest, decided: Plan, tried: set[str]
    ) -> _Source:
        """The first candidate (in plan order, not yet tried) that produces an event."""
        failures: list[str] = []
        exhausted: list[QuotaExceeded] = []  # refused by a cloud plan
        too_small_here: list[str] = []  # candidates that counted the prompt and refused it
        busy = 0  # candidates that were full, or said so when asked
        for scored in decided.order:
            candidate = scored.candidate
            if candidate.node_id in tried:
                continue
            tried.add(candidate.node_id)
            try:
                return await self._start_on(candidate, request)
            except MeshError as exc:
                remote = candidate.route is not Route.LOCAL
                if after_candidate_failure(exc, remote=remote) is Next.ANSWER:
                    raise
                if isinstance(exc, ContextLengthExceeded):
                    too_small_here.append(f"{candidate.node_id[:7]}: {exc.message}")
                self.note_failure(
                    ServedBy(
                        node_id=candidate.node_id, route=candidate.route, model=candidate.model
                    ),
                    exc,
                )
                busy += isinstance(exc, Overloaded)
                if isinstance(exc, QuotaExceeded):
                    exhausted.append(exc)
                failures.append(f"{candidate.node_id[:7]} ({candidate.route}): {exc.message}")
        if not decided.order and not decided.excluded:
            # The pre-selection drops full and silent peers: a model they serve is no typo.
            serving = [peer for peer in self.peers if peer.serves(request.model) is not None]
            states = "; ".join(
                f"{peer.node_id[:7]} ({peer.route}): "
                + ("full" if peer.state is PeerState.UP else f"peer is {peer.state}")
                for peer in serving[:8]
            )
            if any(peer.state is PeerState.UP for peer in serving):
                raise Overloaded(f"every node serving {request.model!r} is busy: {states}")
            if serving:
                raise Unavailable(f"nobody can serve {request.model!r} right now: {states}")
            known = ", ".join(sorted({m.name for m, _ in self.mesh_models()})) or "none"
            raise ModelNotFound(
                f"model {request.model!r} is not served in this mesh; available: {known}",
                param="model",
            )
        busy += sum(why.startswith("full") for _, why in decided.excluded)
        reasons = failures + [f"{c.node_id[:7]} ({c.route}): {why}" for c, why in decided.excluded]
        detail = "; ".join(reasons) or "no node"
        if exhausted and len(exhausted) == len(failures):
            raise QuotaExceeded(
                f"nobody can serve {request.model!r} within quota: {detail}",
                param="quota",
                resets_at=exhausted[0].resets_at,
            )
        too_small = [why for _, why in decided.excluded if why.startswith("context")]
        too_small += too_small_here
        if too_small and len(too_small) == len(reasons):
            raise ContextLengthExceeded(
                f"no node serving {request.model!r} has room for this request "
                f"({'; '.join(too_small)}): shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        if busy and busy == len(reasons):
            local = self.resolve(request.model)
            if local is not None:
                name = local.info.name
                self._rejected[name] = self._rejected.get(name, 0) + 1
            raise Overloaded(f"every node serving {request.model!r} is busy: {detail}")
        raise Unavailable(f"nobody can serve {request.model!r} right now: {detail}")

    async def _start_on(self, candidate: Candidate, request: InferenceRequest) -> _Source:
        served_by = ServedBy(
            node_id=candidate.node_id, route=candidate.route, model=candidate.model
        )
        if candidate.route is Route.LOCAL:
            backend = self.resolve(request.model)
            if backend is None:
                raise ModelNotFound(f"model {request.model!r} is not served here")
            stream = await backend.open(request)
            try:
                first = await anext(aiter(stream))
            except BaseException:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                raise
            return _Source(served_by, first, aiter(stream), stream.aclose)
        link = self._links.client(candidate.node_id) if self._links else None
        if link is None:
            raise Unavailable("no connection to that peer")
        client, card = link
        generator = client.infer(card, request)
        self.peers.started(candidate.node_id)
        still_open = [True]

        async def close() -> None:
            if still_open[0]:
                still_open[0] = False
                self.peers.finished(candidate.node_id)
            await generator.aclose()

        try:
            first = await anext(generator)
        except BaseException:
            await close()
            raise
        return _Source(served_by, first, generator, close)

    def note_failure(self, served_by: ServedBy, error: MeshError) -> None:
        if served_by.route is not Route.LOCAL and isinstance(
            error, Unavailable | RemoteProtocolError | SealingError
        ):
            events = self.peers.failed(served_by.node_id, error.message)
            if self._links is not None:
                self._links.apply(events)

    def record_service(self, served_by: ServedBy, elapsed_ms: float) -> None:
        if served_by.route is Route.LOCAL:
            self._local_service_ms = (
                elapsed_ms
                if self._local_service_ms == 0
                else (
                    (1 - SERVICE_SMOOTHING) * self._local_service_ms
                    + SERVICE_SMOOTHING * elapsed_ms
                )
            )
        else:
            self.peers.served(served_by.node_id, elapsed_ms=elapsed_ms)
