"""The models this box serves: its backends by name and alias, their load and counters, and
how long a request took here lately (what the scheduler's local candidate says)."""

from __future__ import annotations

from collections.abc import Sequence

from mesh.inference import Load, ModelInfo
from mesh.routing.candidates import LocalOffer
from node.serving.backends.base import Backend

SERVICE_SMOOTHING = 0.3


class LocalModels:
    def __init__(self, node_id: str, backends: Sequence[Backend]) -> None:
        self.node_id = node_id
        self._backends = list(backends)
        self._by_name: dict[str, Backend] = {}
        for backend in self._backends:
            for name in (backend.info.name, *backend.info.aliases):
                self._by_name[name] = backend
        self._service_ms = 0.0
        self._rejected: dict[str, int] = {}  # turned away before reaching a backend

    def models(self) -> list[ModelInfo]:
        return [backend.info for backend in self._backends]

    def resolve(self, model: str) -> Backend | None:
        return self._by_name.get(model)

    def offer(self, model: str) -> LocalOffer | None:
        """This box as a candidate for `model`, or None when it does not serve it."""
        backend = self.resolve(model)
        if backend is None:
            return None
        return LocalOffer(
            node_id=self.node_id,
            info=backend.info,
            load=backend.load(),
            service_ms=self._service_ms,
        )

    def load(self) -> Load:
        loads = [backend.load() for backend in self._backends]
        return Load(
            active_streams=sum(x.active_streams for x in loads),
            queued=sum(x.queued for x in loads),
            slots=sum(x.slots for x in loads),
            draining=any(x.draining for x in loads),
            parallel=sum(x.parallel for x in loads),
        )

    def counters(self) -> dict[str, dict[str, int]]:
        out = {backend.info.name: dict(backend.counters) for backend in self._backends}
        for name, count in self._rejected.items():
            out[name]["rejected"] = out[name].get("rejected", 0) + count
        return out

    def rejected(self, model: str) -> None:
        """A request for `model` was turned away as busy before reaching its backend."""
        backend = self.resolve(model)
        if backend is not None:
            name = backend.info.name
            self._rejected[name] = self._rejected.get(name, 0) + 1

    def served(self, elapsed_ms: float) -> None:
        """A request ran here for `elapsed_ms` (smoothed into the local candidate)."""
        self._service_ms = (
            elapsed_ms
            if self._service_ms == 0
            else (1 - SERVICE_SMOOTHING) * self._service_ms + SERVICE_SMOOTHING * elapsed_ms
        )
