"""The entry side: a request made to this node's own API, from admission to its last event
(DESIGN.md "Scheduling").

`EntrySide.answer()` admits the request (its user's quota, reserved at the user's home
before anything is planned), plans it (`mesh.routing.scheduler.plan` over the candidates of
`mesh.routing.candidates`), and opens an `EntryAnswer`, which owns that plan: it tries the
candidates in turn until one produces its first event (a candidate that fails before its
first token is skipped silently, so every failure before the first token is raised before
an HTTP status is committed), and when the serving node fails mid-stream it asks the next
candidate to continue after the text already delivered (`InferenceRequest.continuation`),
passing its tokens on as if nothing happened. Every answer leaves its records
(`node.serving.accounting`), and the quota is settled with them however the answer ends.

A reader follows one request top to bottom: admission, plan, first candidate, events,
failover, accounting, settlement; nothing calls back up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from mesh.clock import SYSTEM, Clock
from mesh.errors import (
    MeshError,
    ModelNotFound,
    Overloaded,
    RemoteProtocolError,
    SealingError,
    Unavailable,
)
from mesh.inference import (
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    ModelInfo,
    Route,
    ServedBy,
    TextDelta,
    new_request_id,
)
from mesh.ledger.bounds import Delivered
from mesh.routing import candidates as reach
from mesh.routing.peers import PeerEvent, PeerTable
from mesh.routing.prefix import request_boundaries, request_key
from mesh.routing.refusals import Failure, Next, after_candidate_failure, no_candidate, refusal
from mesh.routing.scheduler import DEFAULT_MAX_WAIT_MS, Candidate, Needs, Plan, Privacy, plan
from mesh.wire.v1 import ledger_pb2 as lpb
from node.serving.accounting import Accountant, Arrival
from node.serving.models import LocalModels
from node.serving.plans import PlanGate, model_info
from node.serving.quota_service import Admission
from node.transport.directory import PeerHandle

logger = logging.getLogger(__name__)


class Peering(Protocol):
    """What the entry side needs of peering: a peer to call, and a place to report what
    it learnt of a peer's health (peering logs it and re-signs cards)."""

    def client(self, node_id: str) -> PeerHandle | None: ...

    def apply(self, events: list[PeerEvent]) -> None: ...


class Admitter(Protocol):
    """Admission: the user's quota, reserved before planning and settled after."""

    async def admit(self, request: InferenceRequest, privacy: Privacy) -> Admission: ...

    def settle_soon(self, admission: Admission, records: list[lpb.SignedRecord]) -> None: ...


@dataclasses.dataclass(slots=True)
class Source:
    """One candidate's stream: its first event is already in hand."""

    served_by: ServedBy
    first: InferenceEvent
    rest: AsyncIterator[InferenceEvent]
    aclose: Callable[[], Awaitable[None]]


class Starter:
    """Starts a candidate (this box's backend, or a peer through its handle) and keeps the
    peer table told: streams in flight, failures, service times."""

    def __init__(self, *, models: LocalModels, peers: PeerTable, peering: Peering | None) -> None:
        self.models = models
        self.peers = peers
        self._peering = peering

    async def start(self, candidate: Candidate, request: InferenceRequest) -> Source:
        served_by = ServedBy(
            node_id=candidate.node_id, route=candidate.route, model=candidate.model
        )
        if candidate.cache_prefix and candidate.route is not Route.LOCAL:
            # The prefix a peer was chosen for, sealed inside the request (it counts
            # whether it still held it).
            request = dataclasses.replace(request, cache_prefix=candidate.cache_prefix)
        if candidate.route is Route.LOCAL:
            backend = self.models.resolve(request.model)
            if backend is None:
                raise ModelNotFound(f"model {request.model!r} is not served here")
            stream = await self.models.open(backend, request)
            try:
                first = await anext(aiter(stream))
            except BaseException:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                raise
            return Source(served_by, first, aiter(stream), stream.aclose)
        handle = self._peering.client(candidate.node_id) if self._peering else None
        if handle is None:
            raise Unavailable("no connection to that peer")
        generator = handle.client.infer(handle.card, request)
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
        return Source(served_by, first, generator, close)

    def failed(self, served_by: ServedBy, error: MeshError) -> None:
        if served_by.route is not Route.LOCAL and isinstance(
            error, Unavailable | RemoteProtocolError | SealingError
        ):
            events = self.peers.failed(served_by.node_id, error.message)
            if self._peering is not None:
                self._peering.apply(events)

    def served(
        self, served_by: ServedBy, elapsed_ms: float, asked: InferenceRequest | None = None
    ) -> None:
        """`asked` was answered whole by `served_by`: learn how long it took; a peer's
        prompt cache holds that chat now (known here at once, before its next card says
        so: a tool call's result or a quick reply goes back to it)."""
        if served_by.route is Route.LOCAL:
            self.models.served(elapsed_ms)
            return
        self.peers.served(served_by.node_id, elapsed_ms=elapsed_ms)
        key = request_key(asked) if asked is not None else None
        if key is not None:
            self.peers.note_held(served_by.node_id, served_by.model, key)


class EntryAnswer:
    """One request let in here: its plan, the candidates tried, the source streaming now,
    and the records its parts left (what its user's quota is settled with)."""

    def __init__(
        self,
        *,
        request: InferenceRequest,
        plan: Plan,
        starter: Starter,
        accountant: Accountant,
        node_id: str,
        clock: Clock,
    ) -> None:
        self.request = request
        self._plan = plan
        self._starter = starter
        self._accountant = accountant
        self._arrival = Arrival(entry_node_id=node_id, route=Route.LOCAL)
        self._clock = clock
        self._tried: set[str] = set()
        self._started_ms = clock.now_ms()
        self._source: Source | None = None
        self._read = False  # events() ran: it closes the source itself
        self.failovers: list[str] = []
        self.records: list[lpb.SignedRecord] = []

    async def start(self) -> None:
        """Start the first candidate that produces an event; raise why none could."""
        self._source = await self._first(self.request)

    @property
    def served_by(self) -> ServedBy:
        """Who serves the answer now (the first candidate that started, until a failover)."""
        assert self._source is not None, "start() first"
        return self._source.served_by

    async def _first(self, request: InferenceRequest) -> Source:
        """The first candidate (in plan order, not yet tried) that produces an event."""
        failures: list[Failure] = []
        for scored in self._plan.order:
            candidate = scored.candidate
            if candidate.node_id in self._tried:
                continue
            self._tried.add(candidate.node_id)
            try:
                return await self._starter.start(candidate, request)
            except MeshError as exc:
                if after_candidate_failure(exc) is Next.ANSWER:
                    raise
                served_by = ServedBy(
                    node_id=candidate.node_id, route=candidate.route, model=candidate.model
                )
                self._starter.failed(served_by, exc)
                failures.append(Failure(candidate=candidate, error=exc))
        error = refusal(
            request.model,
            excluded=self._plan.excluded,
            failures=failures,
            embeddings=request.inputs is not None,
        )
        if isinstance(error, Overloaded):
            self._starter.models.rejected(request.model)
        raise error

    async def events(self) -> AsyncGenerator[InferenceEvent, None]:
        """Every event of the answer; closing early cancels the work wherever it runs.
        A source that stops after delivering tokens without finishing (it failed, or the
        client went away) leaves a PARTIAL record of what it delivered."""
        source = self._source
        assert source is not None, "start() first"
        self._read = True
        delivered: list[str] = []
        delivered_tokens = 0  # tokens whose text the client has (as its sources counted)
        tokens_before = 0  # of those, made by sources that failed mid-stream
        seen = Delivered()  # what the current source delivered: what bounds its record
        started = self._clock.monotonic()
        asked = self.request  # what the current source was asked (a failover asks anew)
        pending: InferenceEvent | None = source.first
        finished = False
        # A tool call's pieces (and what follows them) are held until the answer finishes:
        # a call is delivered whole, or, when its box fails mid-call, made again by the next
        # box under the same constraints (half a call cannot be continued: the client would
        # have its deltas, the next box no text to go on from).
        held: list[TextDelta] = []
        try:
            while True:
                try:
                    while True:
                        event = pending if pending is not None else await anext(source.rest)
                        pending = None
                        if isinstance(event, TextDelta) and (event.tool_calls or held):
                            held.append(event)
                            continue
                        # Out now: this text, or at the finish what was held.
                        ready, held = (
                            ([event], held) if isinstance(event, TextDelta) else (held, [])
                        )
                        for piece in ready:
                            delivered.append(piece.text)
                            delivered_tokens += piece.tokens
                            seen = seen.plus(piece.delivered)
                            yield piece
                        if isinstance(event, TextDelta):
                            continue
                        self._starter.served(
                            source.served_by, (self._clock.monotonic() - started) * 1000, asked
                        )
                        finished = True
                        event = await self._account(source.served_by, asked, event, seen)
                        yield dataclasses.replace(
                            event, completion_tokens=event.completion_tokens + tokens_before
                        )
                        return
                except StopAsyncIteration:
                    failure: MeshError = RemoteProtocolError("the answer ended without finishing")
                except MeshError as exc:
                    if after_candidate_failure(exc) is Next.ANSWER:
                        raise
                    failure = exc
                # Mid-stream failure: continue on the next candidate after what was delivered
                # (a tool call held back is made again there).
                held = []
                await source.aclose()
                self._starter.failed(source.served_by, failure)
                await self._partial(source.served_by, asked, delivered_tokens - tokens_before, seen)
                tokens_before = delivered_tokens
                seen = Delivered()
                wanted = self.request.sampling.max_tokens
                if wanted is not None and tokens_before >= wanted:
                    finished = True
                    yield Finished(
                        reason=FinishReason.LENGTH, prompt_tokens=0, completion_tokens=tokens_before
                    )
                    return
                failed = source.served_by
                follow_up = self._follow_up(delivered, tokens_before)
                logger.warning(
                    "%s failed mid-stream (%s); continuing on the next candidate",
                    source.served_by.node_id[:7],
                    failure.message,
                )
                try:
                    source = await self._first(follow_up)
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

    async def aclose(self) -> None:
        """End a started answer whose events are never read (one of `n` choices after the
        client left or another choice failed): its work stops wherever it runs. Nothing
        reached the client, so nothing is recorded. A no-op once events() ran."""
        if self._source is not None and not self._read:
            self._read = True
            await self._source.aclose()

    def _follow_up(self, delivered: list[str], tokens_before: int) -> InferenceRequest:
        """The request the next candidate continues: after the text delivered, for the
        tokens left, with every constraint of the original (tools, formats, logprobs...).
        An echoed prompt is not part of what to continue from, nor echoed again."""
        wanted = self.request.sampling.max_tokens
        continued = self.request.continuation + "".join(delivered)
        sampling = dataclasses.replace(
            self.request.sampling,
            max_tokens=None if wanted is None else wanted - tokens_before,
        )
        prompt = self.request.prompt
        if sampling.echo and prompt is not None and continued.startswith(prompt):
            continued = continued[len(prompt) :]
            sampling = dataclasses.replace(sampling, echo=False)
        return dataclasses.replace(
            self.request, request_id=new_request_id(), continuation=continued, sampling=sampling
        )

    async def _account(
        self, served_by: ServedBy, asked: InferenceRequest, finished: Finished, seen: Delivered
    ) -> Finished:
        if served_by.route is Route.LOCAL:
            finished = await self._accountant.served_here(
                model=served_by.model,
                asked=asked,
                finished=finished,
                arrival=self._arrival,
                started_ms=self._started_ms,
            )
        else:
            finished = await self._accountant.served_by_peer(
                served_by=served_by, asked=asked, finished=finished, delivered=seen
            )
        if finished.usage_record:
            self.records.append(lpb.SignedRecord.FromString(finished.usage_record))
        return finished

    async def _partial(
        self, served_by: ServedBy, asked: InferenceRequest, tokens: int, seen: Delivered
    ) -> None:
        signed = await self._accountant.partial(
            served_by=served_by,
            asked=asked,
            tokens=tokens,
            started_ms=self._started_ms,
            delivered=seen,
        )
        if signed is not None:
            self.records.append(signed)


class EntrySide:
    """Requests made to this node's own API: admitted, planned, answered, settled."""

    def __init__(
        self,
        *,
        models: LocalModels,
        peers: PeerTable,
        accountant: Accountant,
        peering: Peering | None = None,
        admitter: Admitter | None = None,
        plans: PlanGate | None = None,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        default_privacy: Privacy = Privacy.MESH,
        cache_aware: bool = True,
        clock: Clock = SYSTEM,
    ) -> None:
        self.models = models
        self.peers = peers
        self.default_privacy = default_privacy
        self._accountant = accountant
        self._admitter = admitter
        self._plans = plans
        self._max_wait_ms = max_wait_ms
        self.cache_aware = cache_aware  # send a conversation back to the box holding it
        self._clock = clock
        self._starter = Starter(models=models, peers=peers, peering=peering)

    def reschedule(
        self, *, max_wait_ms: float, default_privacy: Privacy, cache_aware: bool = True
    ) -> None:
        """New scheduler settings (a reloaded configuration), for the next request."""
        self._max_wait_ms = max_wait_ms
        self.default_privacy = default_privacy
        self.cache_aware = cache_aware

    def mesh_models(self) -> list[tuple[ModelInfo, list[str]]]:
        """Every model the mesh can serve, with the nodes (up) that serve it."""
        return reach.mesh_models(self.models.models(), self.models.node_id, self.peers)

    def plan(
        self,
        request: InferenceRequest,
        privacy: Privacy,
        closed: Mapping[Route, str] | None = None,
    ) -> Plan:
        estimate = reach.Estimate.of(request)
        needs = request.needs()
        # The conversation's prefixes, hashed once per request (mesh.routing.prefix).
        found = request_boundaries(request) if self.cache_aware else []
        return plan(
            reach.candidates(
                request.model,
                local=self.models.offer(request.model),
                peers=self.peers,
                estimate=estimate,
                needs=needs,
                found=found,
            ),
            privacy=privacy,
            prompt_tokens=estimate.prompt_tokens,
            max_tokens=estimate.max_tokens,
            max_wait_ms=self._max_wait_ms,
            closed=closed,
            needs=needs,
            cache_aware=self.cache_aware,
        )

    def explain(
        self, model: str, privacy: Privacy, max_tokens: int | None, needs: Needs = ()
    ) -> dict[str, Any]:
        decided = plan(
            reach.candidates(model, local=self.models.offer(model), peers=self.peers),
            privacy=privacy,
            prompt_tokens=0,
            max_tokens=max_tokens,
            max_wait_ms=self._max_wait_ms,
            needs=needs,
        )
        return reach.explain(model, privacy, decided)

    def explain_request(self, request: InferenceRequest, privacy: Privacy) -> dict[str, Any]:
        """Where `request` itself would go now, and why (its prompt, what it asks, and the
        boxes holding the start of its conversation, as `answer` would plan it)."""
        shown = reach.explain(request.model, privacy, self.plan(request, privacy))
        shown["cache_aware"] = self.cache_aware
        return shown

    @contextlib.asynccontextmanager
    async def answer(
        self, request: InferenceRequest, privacy: Privacy | None = None
    ) -> AsyncIterator[EntryAnswer]:
        """The answer to `request`, started on its first candidate; its user's quota is
        reserved before it is planned and settled when the block ends, however it ends (a
        client that hangs up included). Raises, before anything is sent, why nobody can
        serve it."""
        chosen = privacy or self.default_privacy
        if self._plans is not None:  # a model outside the user's plan: 403 naming it
            # The rank is where a full box's queue will put the request (slots, to come).
            self._plans.check(request, model_info(request.model, self.mesh_models()))
        admission = await self._admitter.admit(request, chosen) if self._admitter else None
        answer: EntryAnswer | None = None
        try:
            admitted = admission.request if admission is not None else request
            decided = self.plan(admitted, chosen, admission.closed if admission else None)
            if not decided.order and not decided.excluded:
                raise no_candidate(
                    admitted.model,
                    unplanned=reach.unplanned(admitted.model, self.peers),
                    known_models=[info.name for info, _ in self.mesh_models()],
                )
            answer = EntryAnswer(
                request=admitted,
                plan=decided,
                starter=self._starter,
                accountant=self._accountant,
                node_id=self.models.node_id,
                clock=self._clock,
            )
            await answer.start()
            yield answer
        finally:
            if admission is not None and self._admitter is not None:
                self._admitter.settle_soon(admission, answer.records if answer else [])
