"""TEST-ONLY launcher: a real `allerac` node whose model overstates what it used.

    python tests/inflating_node.py up --home DIR --config CONFIG ...

A config model with `backend = "test_inflating"` answers with a short text and claims,
in its deltas and its Finish event, many times the tokens that text can be: the node
then signs usage records that bill for tokens it never delivered, exactly as a member
running modified software (or a cloud node overbilling a customer) would. Everything
else is the unmodified node: sealing, ledger, sync. `allerac up` never knows this
backend; tests start it through this file only.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
from node.cli import main
from node.serving.backends import FACTORIES

WORDS = ("Hello", " from", " a", " greedy", " box.")
CLAIMED_TOKENS_PER_DELTA = 400  # each word "took" 400 tokens
CLAIMED_PROMPT_TOKENS = 50_000


class _Answer:
    def __init__(self, backend: InflatingBackend) -> None:
        self._backend = backend
        self._events: list[InferenceEvent] = [
            TextDelta(word, CLAIMED_TOKENS_PER_DELTA) for word in WORDS
        ]
        self._events.append(
            Finished(
                reason=FinishReason.STOP,
                prompt_tokens=CLAIMED_PROMPT_TOKENS,
                completion_tokens=CLAIMED_TOKENS_PER_DELTA * len(WORDS),
            )
        )

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self

    async def __anext__(self) -> InferenceEvent:
        if not self._events:
            raise StopAsyncIteration
        event = self._events.pop(0)
        if not self._events:
            self._backend.active -= 1
        return event

    async def aclose(self) -> None:
        if self._events:
            self._events = []
            self._backend.active -= 1


class InflatingBackend:
    def __init__(self, config: ModelConfig) -> None:
        self._info = ModelInfo(
            name=config.name,
            aliases=config.aliases,
            context_length=8192,
            backend="test_inflating",
            tokens_per_second=1000.0,
        )
        self.active = 0
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> Load:
        return Load(active_streams=self.active, queued=0, slots=4)

    async def start(self) -> None:
        return None

    async def open(self, request: InferenceRequest) -> _Answer:
        self.active += 1
        return _Answer(self)

    def drain(self) -> None:
        return None

    def busy(self) -> bool:
        return self.active > 0

    def cancel_all(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


FACTORIES["test_inflating"] = InflatingBackend  # type: ignore[assignment]

if __name__ == "__main__":
    main()
