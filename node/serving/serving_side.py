"""The serving side: a peer's request, run on this box's backend (the mesh never forwards
twice, so nothing is planned here).

`ServingSide.answer()` holds the mesh's cloud plan while it runs (an overflow node only),
checks this box can take the request (up, a free slot, room in its context: the same rules
the entry node planned with, `mesh.routing.scheduler.exclusion`), opens the backend, and
yields a `LocalAnswer` whose events end in a `Finished` that carries this node's signed
record (`node.serving.accounting`). A refusal is the same error the entry node would give
(`mesh.routing.refusals`), so it knows whether to try its next candidate.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from mesh.clock import SYSTEM, Clock
from mesh.errors import BackendError, MeshError, ModelNotFound, Overloaded
from mesh.inference import Finished, InferenceEvent, InferenceRequest, Route, ServedBy
from mesh.routing.candidates import Estimate
from mesh.routing.refusals import Failure, Next, after_candidate_failure, refusal
from mesh.routing.scheduler import Privacy, exclusion
from node.serving.accounting import Accountant, Arrival
from node.serving.backends.base import InferenceStream
from node.serving.models import LocalModels


class CloudPlan(Protocol):
    """The mesh's cloud plan, as an overflow node holds it while a request runs."""

    def plan_reserve(self, request: InferenceRequest) -> InferenceRequest | None: ...

    def plan_release(self, request_id: str) -> None: ...


class LocalAnswer:
    """A peer's request running on this box's backend."""

    def __init__(
        self,
        *,
        request: InferenceRequest,
        served_by: ServedBy,
        first: InferenceEvent,
        stream: InferenceStream,
        arrival: Arrival,
        models: LocalModels,
        accountant: Accountant,
        clock: Clock,
    ) -> None:
        self.request = request
        self.served_by = served_by
        self._first = first
        self._stream = stream
        self._arrival = arrival
        self._models = models
        self._accountant = accountant
        self._clock = clock
        self._started_ms = clock.now_ms()
        self._started = clock.monotonic()

    async def events(self) -> AsyncGenerator[InferenceEvent, None]:
        """The answer's events; the `Finished` carries this node's signed record. Closing
        early cancels the work and frees the slot."""
        rest = aiter(self._stream)
        event = self._first
        try:
            while not isinstance(event, Finished):
                yield event
                try:
                    event = await anext(rest)
                except StopAsyncIteration:
                    raise BackendError("the backend ended the answer without finishing") from None
            self._models.served((self._clock.monotonic() - self._started) * 1000)
            yield await self._accountant.served_here(
                model=self.served_by.model,
                asked=self.request,
                finished=event,
                arrival=self._arrival,
                started_ms=self._started_ms,
            )
        finally:
            await self._stream.aclose()


class ServingSide:
    def __init__(
        self,
        *,
        models: LocalModels,
        accountant: Accountant,
        cloud_plan: Callable[[], CloudPlan | None] = lambda: None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._models = models
        self._accountant = accountant
        self._cloud_plan = cloud_plan
        self._clock = clock

    @contextlib.asynccontextmanager
    async def answer(
        self, request: InferenceRequest, arrival: Arrival
    ) -> AsyncIterator[LocalAnswer]:
        """`request` (a peer's, that reached this node by `arrival`) started on this box's
        backend; raises, before any event, why this box cannot take it."""
        holder = self._cloud_plan()
        if holder is not None:
            request = holder.plan_reserve(request) or request  # released however it ends
        try:
            yield await self._open(request, arrival)
        finally:
            if holder is not None:
                holder.plan_release(request.request_id)  # its record counts now

    async def _open(self, request: InferenceRequest, arrival: Arrival) -> LocalAnswer:
        offer = self._models.offer(request.model)
        backend = self._models.resolve(request.model)
        if offer is None or backend is None:
            raise ModelNotFound(f"model {request.model!r} is not served here")
        candidate = offer.candidate()
        estimate = Estimate.of(request)
        left_out = exclusion(
            candidate,
            privacy=Privacy.LOCAL_ONLY,
            prompt_tokens=estimate.prompt_tokens,
            max_tokens=estimate.max_tokens,
            needs=request.needs(),
        )
        failures: list[Failure] = []
        if left_out is None:
            try:
                stream = await self._models.open(backend, request)
                try:
                    first = await anext(aiter(stream))
                except BaseException:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                    raise
            except MeshError as exc:
                if after_candidate_failure(exc) is Next.ANSWER:
                    raise
                failures.append(Failure(candidate=candidate, error=exc))
            else:
                return LocalAnswer(
                    request=request,
                    served_by=ServedBy(
                        node_id=self._models.node_id, route=Route.LOCAL, model=candidate.model
                    ),
                    first=first,
                    stream=stream,
                    arrival=arrival,
                    models=self._models,
                    accountant=self._accountant,
                    clock=self._clock,
                )
        error = refusal(
            request.model,
            excluded=[left_out] if left_out else [],
            failures=failures,
            embeddings=request.inputs is not None,
        )
        if isinstance(error, Overloaded):
            self._models.rejected(request.model)
        raise error
