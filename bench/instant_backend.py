"""BENCHMARK-ONLY backend: streams N tokens without computing anything.

It exists to measure what the mesh itself costs (routing, sealing, forwarding)
without a model in the way. It is registered only by `bench/instant_node.py`, a
launcher used by the benchmarks; `allerac up` never knows it. Never use it to
serve anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mesh.config import ModelConfig
from mesh.inference import (
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    TextDelta,
)

DEFAULT_TOKENS = 256
YIELD_EVERY = 64  # let the event loop breathe, as a real backend's thread hand-off would


class _InstantStream:
    def __init__(self, backend: InstantBackend, tokens: int) -> None:
        self._backend = backend
        self._left = tokens
        self._made = 0
        self._done = False

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self

    async def __anext__(self) -> InferenceEvent:
        if self._done:
            raise StopAsyncIteration
        if self._left == 0:
            self._done = True
            self._backend.active -= 1
            return Finished(
                reason=FinishReason.LENGTH, prompt_tokens=1, completion_tokens=self._made
            )
        self._left -= 1
        self._made += 1
        if self._made % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        return TextDelta("tok ")

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._backend.active -= 1


class InstantBackend:
    def __init__(self, config: ModelConfig) -> None:
        self._info = ModelInfo(
            name=config.name,
            aliases=config.aliases,
            context_length=1 << 20,
            backend="bench_instant",
            tokens_per_second=1e6,
        )
        self.active = 0
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> Load:
        return Load(active_streams=self.active, queued=0, slots=1 << 16)

    async def start(self) -> None:
        return None

    async def open(self, request: InferenceRequest) -> _InstantStream:
        self.active += 1
        return _InstantStream(self, request.sampling.max_tokens or DEFAULT_TOKENS)

    def drain(self) -> None:
        return None

    def busy(self) -> bool:
        return self.active > 0

    def cancel_all(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
