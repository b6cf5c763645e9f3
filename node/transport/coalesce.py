"""Batching of an answer stream for the wire.

The first event always goes out at once, straight from the source (no hand-over
through the queue: it is what the time to first token waits for). From then on a
pump reads the source into a bounded queue; text deltas that piled up while the
previous message was being sent are merged into one message, and with a
`window_s` at most one message goes out per window: tokens that come sooner
travel together, a token that comes later goes at once. gRPC's cost is per
message (most of a relaying box's CPU), and a reader does not notice 30 ms of
grouping in a stream of text; a slow model sees no added latency.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from mesh.clock import SYSTEM, Clock
from mesh.inference import InferenceEvent, TextDelta

MAX_BATCH_CHARS = 16 * 1024
QUEUE_EVENTS = 4096  # bounded: the pump waits when the sender is this far behind


class _End:
    pass


_Item = InferenceEvent | BaseException | _End


async def coalesce(
    source: AsyncIterator[InferenceEvent], *, window_s: float = 0.0, clock: Clock = SYSTEM
) -> AsyncGenerator[InferenceEvent, None]:
    try:
        first = await anext(source)
    except StopAsyncIteration:
        return
    queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_EVENTS)

    async def pump() -> None:
        try:
            async for event in source:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        else:
            await queue.put(_End())

    def settle(item: _Item) -> InferenceEvent | None:
        if isinstance(item, _End):
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    # The pump reads on while the first event is being sent (the rest of a short answer,
    # and whatever its end sets off, such as the usage record's commit, overlap with it).
    task = asyncio.create_task(pump())
    try:
        # None: no text sent yet, the first token goes at once.
        last_sent = clock.monotonic() if isinstance(first, TextDelta) else None
        yield first
        while True:
            event = settle(await queue.get())
            if event is None:
                return
            if not isinstance(event, TextDelta) or event.tool_calls:
                yield event  # tool-call pieces go as they are (each names its call)
                continue
            parts = [event.text]
            logprobs = list(event.logprobs)
            tokens = event.tokens
            size = len(event.text)
            held: _Item | None = None
            # At most one message per window: a token that comes later than that after the
            # previous message goes at once (slow models see no added latency); sooner ones
            # wait for the window to close and travel together.
            deadline = clock.monotonic() if last_sent is None else last_sent + window_s
            while size < MAX_BATCH_CHARS:
                if not queue.empty():
                    following = queue.get_nowait()
                else:
                    remaining = deadline - clock.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        following = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                if isinstance(following, TextDelta) and not following.tool_calls:
                    parts.append(following.text)
                    logprobs.extend(following.logprobs)
                    tokens += following.tokens
                    size += len(following.text)
                else:
                    held = following
                    break
            last_sent = clock.monotonic()
            yield TextDelta("".join(parts), tokens, tuple(logprobs)) if len(parts) > 1 else event
            if held is not None:
                settled = settle(held)
                if settled is None:
                    return
                yield settled
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
