"""Batching of an answer stream for the wire (node/transport/coalesce.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mesh.errors import Unavailable
from mesh.inference import Finished, FinishReason, InferenceEvent, TextDelta
from node.transport.coalesce import coalesce

DONE = Finished(reason=FinishReason.LENGTH, prompt_tokens=1, completion_tokens=5)


async def _source(
    events: list[InferenceEvent],
    fail: Exception | None = None,
    asked_for_more: asyncio.Event | None = None,
) -> AsyncIterator[InferenceEvent]:
    for index, event in enumerate(events):
        if index == 1 and asked_for_more is not None:
            asked_for_more.set()
        yield event
    if fail is not None:
        raise fail


async def test_the_first_event_goes_alone_and_the_rest_keeps_every_token_in_order() -> None:
    events: list[InferenceEvent] = [TextDelta(f"t{i} ") for i in range(5)]
    out = [e async for e in coalesce(_source([*events, DONE]), window_s=10.0)]
    assert out[0] == events[0]
    assert out[-1] == DONE
    texts = [e for e in out[1:-1] if isinstance(e, TextDelta)]
    assert "".join(e.text for e in texts) == "t1 t2 t3 t4 "
    assert sum(e.tokens for e in texts) == 4
    assert len(texts) < 4  # tokens that came together travel together


async def test_the_source_is_read_on_while_the_first_event_is_being_sent() -> None:
    """The rest of a short answer (and its usage record's commit) overlaps the sending of
    its first token."""
    asked_for_more = asyncio.Event()
    stream = coalesce(_source([TextDelta("a"), TextDelta("b"), DONE], None, asked_for_more))
    first = await anext(stream)  # held, as a transport busy sending it holds it
    assert first == TextDelta("a")
    async with asyncio.timeout(5):
        await asked_for_more.wait()
    assert [e async for e in stream] == [TextDelta("b"), DONE]


async def test_a_source_failure_reaches_the_consumer_after_what_came_before() -> None:
    stream = coalesce(_source([TextDelta("a"), TextDelta("b")], Unavailable("gone")))
    got = [await anext(stream)]

    async def the_rest() -> None:
        async for event in stream:
            got.append(event)

    with pytest.raises(Unavailable, match="gone"):
        await the_rest()
    assert "".join(e.text for e in got if isinstance(e, TextDelta)) == "ab"


async def test_an_empty_source_ends_at_once() -> None:
    assert [e async for e in coalesce(_source([]))] == []
