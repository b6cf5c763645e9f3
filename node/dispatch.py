"""Where a request goes. Today: the model on this box (route `local`).

`Dispatcher.open()` resolves the model by name or alias, admits the request and
waits for the first event, so every failure that happens before the first
token (unknown model, full queue, prompt too long) is raised here, before an
HTTP status or a gRPC stream has been committed. The LAN and relay tiers of
DESIGN.md plug in here; the handlers above do not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from mesh.errors import ModelNotFound
from mesh.inference import (
    Finished,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    Route,
    ServedBy,
)
from node.backends.base import Backend, InferenceStream


@dataclass(eq=False)
class Answer:
    served_by: ServedBy
    _first: InferenceEvent
    _stream: InferenceStream

    async def events(self) -> AsyncGenerator[InferenceEvent, None]:
        """Every event of the answer, first one included; closing early cancels the work."""
        try:
            yield self._first
            if isinstance(self._first, Finished):
                return
            async for event in self._stream:
                yield event
        finally:
            await self._stream.aclose()

    async def aclose(self) -> None:
        await self._stream.aclose()


class Dispatcher:
    def __init__(self, *, node_id: str, backends: Sequence[Backend]) -> None:
        self._node_id = node_id
        self._backends = list(backends)
        self._by_name: dict[str, Backend] = {}
        for backend in self._backends:
            for name in (backend.info.name, *backend.info.aliases):
                self._by_name[name] = backend

    def models(self) -> list[ModelInfo]:
        return [backend.info for backend in self._backends]

    def counters(self) -> dict[str, dict[str, int]]:
        return {backend.info.name: dict(backend.counters) for backend in self._backends}

    def load(self) -> Load:
        loads = [backend.load() for backend in self._backends]
        return Load(
            active_streams=sum(x.active_streams for x in loads),
            queued=sum(x.queued for x in loads),
            slots=sum(x.slots for x in loads),
            draining=any(x.draining for x in loads),
        )

    def resolve(self, model: str) -> Backend:
        backend = self._by_name.get(model)
        if backend is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ModelNotFound(
                f"model {model!r} is not served here; available: {known}", param="model"
            )
        return backend

    async def open(self, request: InferenceRequest) -> Answer:
        backend = self.resolve(request.model)
        stream = await backend.open(request)
        try:
            first = await anext(aiter(stream))
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.aclose()
            raise
        served_by = ServedBy(node_id=self._node_id, route=Route.LOCAL, model=backend.info.name)
        return Answer(served_by, first, stream)
