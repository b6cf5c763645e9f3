"""Adaptive batching of an answer stream for the wire.

When the sender keeps up, every token goes out on its own, at once. When it
falls behind (a fast backend, a slow link), the text deltas that piled up are
merged into one, so the per-message cost of gRPC is paid per batch instead of
per token. Latency never grows: nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from mesh.inference import InferenceEvent, TextDelta

MAX_BATCH_CHARS = 16 * 1024
QUEUE_EVENTS = 4096  # bounded: the pump waits when the sender is this far behind


class _End:
    pass


async def coalesce(source: AsyncIterator[InferenceEvent]) -> AsyncGenerator[InferenceEvent, None]:
    queue: asyncio.Queue[InferenceEvent | BaseException | _End] = asyncio.Queue(QUEUE_EVENTS)

    async def pump() -> None:
        try:
            async for event in source:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        else:
            await queue.put(_End())

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, TextDelta):
                yield item
                continue
            parts = [item.text]
            size = len(item.text)
            held: InferenceEvent | BaseException | _End | None = None
            while size < MAX_BATCH_CHARS and not queue.empty():
                following = queue.get_nowait()
                if isinstance(following, TextDelta):
                    parts.append(following.text)
                    size += len(following.text)
                else:
                    held = following
                    break
            yield TextDelta("".join(parts)) if len(parts) > 1 else item
            if held is not None:
                if isinstance(held, _End):
                    return
                if isinstance(held, BaseException):
                    raise held
                yield held
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
