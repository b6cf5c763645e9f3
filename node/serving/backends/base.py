"""What the agent needs from an inference backend.

A backend admits a request or refuses it *at once* (`Overloaded` when every
slot is taken), then yields the answer as `TextDelta`s ending in exactly one
`Finished`. Closing the stream early cancels the work and frees the slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from mesh.inference import InferenceEvent, InferenceRequest, Load, ModelInfo


class InferenceStream(Protocol):
    def __aiter__(self) -> AsyncIterator[InferenceEvent]: ...

    async def aclose(self) -> None:
        """Stop generating (if still running) and free the slot; idempotent."""


class Backend(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    def load(self) -> Load: ...

    @property
    def counters(self) -> dict[str, int]:
        """Lifetime request counts: completed, cancelled, failed, rejected."""

    async def start(self) -> None:
        """Load the model (off the event loop) and start the worker."""

    async def open(self, request: InferenceRequest) -> InferenceStream:
        """Admit and prepare `request`; raises `MeshError` before any token is produced."""

    def drain(self) -> None:
        """Refuse new requests (503); admitted ones go on."""

    def busy(self) -> bool:
        """Anything running or waiting?"""

    def cancel_all(self) -> None:
        """End every admitted request now; running ones finish as cancelled."""

    async def aclose(self) -> None:
        """Cancel whatever still runs, stop the worker, release the model."""


@runtime_checkable
class HoldsPrefixes(Protocol):
    """A backend with a prompt cache says which conversations it holds (cache-aware
    routing, `mesh.routing.prefix`)."""

    def held_prefixes(self) -> frozenset[bytes]:
        """The keys of the chats whose prompts its slots and saved prefixes hold now (at
        most `mesh.inference.MAX_HELD_PREFIXES`, the most recently used)."""
