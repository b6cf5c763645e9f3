"""The models this box serves: its backends by name and alias, their load and counters, and
how long a request took here lately (what the scheduler's local candidate says).

The set changes while the node runs (`allerac models add/remove`, SIGHUP): `swap` puts new
backends in and takes old ones out in one step, so a request resolves either the old set
or the new one, never a mix. A backend taken out is drained (new requests never reach it:
they no longer resolve to it) and closed only once its answers in flight have finished
(`retire`); `aclose` closes whatever is still loaded when the node stops."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from mesh.inference import InferenceRequest, Load, ModelInfo
from mesh.routing.candidates import LocalOffer
from node.serving.backends.base import Backend, HoldsPrefixes, InferenceStream

logger = logging.getLogger(__name__)

SERVICE_SMOOTHING = 0.3
# Conversation prefixes the full card carries over all models (16 bytes each, so the card
# stays far below mesh.trust.cards.MAX_CARD_BYTES however many models a box serves).
MAX_CARD_PREFIXES = 256
MIN_PREFIXES_PER_MODEL = 8
RETIRE_POLL_S = 0.05


@functools.cache
def _holds_prefixes(kind: type) -> bool:
    """`isinstance(backend, HoldsPrefixes)`, asked once per backend class: a runtime
    protocol's check costs ~7 µs, and every request asks (its local offer)."""
    return issubclass(kind, HoldsPrefixes)


class LocalModels:
    def __init__(self, node_id: str, backends: Sequence[Backend]) -> None:
        self.node_id = node_id
        self._backends: list[Backend] = []
        self._by_name: dict[str, Backend] = {}
        self._retiring: list[Backend] = []  # taken out, still finishing their answers
        self._service_ms = 0.0
        self._rejected: dict[str, int] = {}  # turned away before reaching a backend
        # Asked before a request takes a place (raises to refuse it): users' plans keep a
        # full model's last places for higher plans (node.serving.plans.PlanGate.take_place).
        self.place_keeper: Callable[[InferenceRequest, Load], None] | None = None
        # Requests sent here for a conversation prefix (cache-aware routing), and how many
        # of them found it still held.
        self.cache_routed = {"asked": 0, "held": 0}
        self.swap(add=backends, remove=())

    async def open(self, backend: Backend, request: InferenceRequest) -> InferenceStream:
        """Start `request` on one of this box's backends (resolved by the caller)."""
        if self.place_keeper is not None:
            self.place_keeper(request, backend.load())
        if request.cache_prefix:
            self.cache_routed["asked"] += 1
            if request.cache_prefix in self._held(backend):
                self.cache_routed["held"] += 1
        return await backend.open(request)

    def _held(self, backend: Backend) -> frozenset[bytes]:
        if not _holds_prefixes(type(backend)):
            return frozenset()
        held = cast(HoldsPrefixes, backend).held_prefixes()
        share = max(MIN_PREFIXES_PER_MODEL, MAX_CARD_PREFIXES // max(1, len(self._backends)))
        return held if len(held) <= share else frozenset(sorted(held)[:share])

    def _info(self, backend: Backend) -> ModelInfo:
        """The backend's model, with the conversations its prompt cache holds."""
        held = self._held(backend)
        return dataclasses.replace(backend.info, prefixes=held) if held else backend.info

    def swap(self, *, add: Iterable[Backend], remove: Iterable[Backend]) -> None:
        """Take `remove` out and put `add` in, at once (callers then `retire` the removed)."""
        gone = {id(b) for b in remove}
        backends = [b for b in self._backends if id(b) not in gone] + list(add)
        by_name: dict[str, Backend] = {}
        for backend in backends:
            for name in (backend.info.name, *backend.info.aliases):
                by_name[name] = backend
        self._backends, self._by_name = backends, by_name

    def backends(self) -> list[Backend]:
        """Every backend loaded: those serving and those finishing before they unload."""
        return [*self._backends, *self._retiring]

    async def retire(self, backend: Backend, *, grace_s: float | None = None) -> None:
        """Unload a backend `swap` took out, once its answers in flight have finished
        (or after `grace_s`, when given, cancelling what is left)."""
        backend.drain()
        self._retiring.append(backend)
        loop = asyncio.get_running_loop()
        deadline = None if grace_s is None else loop.time() + grace_s
        try:
            while backend.busy() and (deadline is None or loop.time() < deadline):  # noqa: ASYNC110 (polls worker threads)
                await asyncio.sleep(RETIRE_POLL_S)
        finally:
            await backend.aclose()
            self._retiring.remove(backend)
            logger.info("model %s unloaded", backend.info.name)

    async def aclose(self) -> None:
        """Close every backend still loaded (the node is stopping)."""
        for backend in self.backends():
            await backend.aclose()

    def models(self) -> list[ModelInfo]:
        return [self._info(backend) for backend in self._backends]

    def held_prefixes(self) -> dict[str, frozenset[bytes]]:
        """Each model's conversation prefixes held now (what the full card advertises)."""
        return {backend.info.name: self._held(backend) for backend in self._backends}

    def resolve(self, model: str) -> Backend | None:
        return self._by_name.get(model)

    def offer(self, model: str) -> LocalOffer | None:
        """This box as a candidate for `model`, or None when it does not serve it."""
        backend = self.resolve(model)
        if backend is None:
            return None
        return LocalOffer(
            node_id=self.node_id,
            info=self._info(backend),
            load=backend.load(),
            service_ms=self._service_ms,
        )

    def load(self) -> Load:
        serving = [backend.load() for backend in self._backends]
        # A model being unloaded still runs its last answers, but offers no slot.
        finishing = [backend.load() for backend in self._retiring]
        return Load(
            active_streams=sum(x.active_streams for x in serving + finishing),
            queued=sum(x.queued for x in serving + finishing),
            slots=sum(x.slots for x in serving),
            draining=any(x.draining for x in serving),
            parallel=sum(x.parallel for x in serving),
        )

    def counters(self) -> dict[str, dict[str, int]]:
        out = {backend.info.name: dict(backend.counters) for backend in self._backends}
        for name, count in self._rejected.items():
            if name in out:
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
