"""A full model says so at once (429), and a client that leaves frees the model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.store.config_file import embedded_model_path
from tests.nodeproc import NodeProcess

# Greedy counting never meets an end-of-sequence: a long, predictable stream.
COUNTING = {"model": "default", "prompt": "1, 2, 3, 4, 5,", "temperature": 0}


def queue_node(tmp_path_factory: pytest.TempPathFactory, queue_size: int) -> NodeProcess:
    config = f"""
[[models]]
name = "smollm2-135m-instruct"
aliases = ["default"]
path = "{embedded_model_path()}"
queue_size = {queue_size}
parallel = 1  # one request decodes at a time: these tests are about the queue behind it
threads = 1  # a long stream must finish within the client's timeout on a shared 2-core box
"""
    return NodeProcess(tmp_path_factory.mktemp("home"), config=config).start()


@pytest.fixture(scope="module")
def small_queue_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = queue_node(tmp_path_factory, 1)
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def status(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, Any]:
    async with session.get(node.url + "/allerac/status") as response:
        return dict(await response.json())


async def wait_for(
    session: aiohttp.ClientSession, node: NodeProcess, check: Any, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await status(session, node)
        if check(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {info}")
        await asyncio.sleep(0.02)


async def test_excess_requests_get_429_at_once_and_the_rest_complete(
    small_queue_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    node = small_queue_node
    # Long enough to outlast six requests sent at its first token (refused within ms).
    long_body = {**COUNTING, "max_tokens": 200, "stream": True}
    async with session.post(node.url + "/v1/completions", json=long_body) as running:
        assert running.status == 200
        await running.content.readline()  # the first token is out: the model is busy

        async def one() -> tuple[int, dict[str, Any], float]:
            body = {**COUNTING, "max_tokens": 5}
            async with session.post(node.url + "/v1/completions", json=body) as response:
                return response.status, await response.json(), time.monotonic()

        tasks = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        rejected_by = time.monotonic()
        # While the long stream still runs, five answers are already back: refused.
        info = await status(session, node)
        assert info["load"]["active_streams"] == 1
        early = [t for t in tasks if t.done()]
        body_left = (await running.content.read()).decode()
        results = await asyncio.gather(*tasks)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 429, 429, 429, 429, 429]
    assert len(early) >= 5
    for status_code, payload, at in results:
        if status_code == 429:
            assert payload["error"]["code"] == "overloaded"
            assert payload["error"]["type"] == "rate_limit_error"
            assert "busy" in payload["error"]["message"]
            assert at <= rejected_by + 1.0
    assert "[DONE]" in body_left
    final = await wait_for(session, node, lambda i: i["load"]["active_streams"] == 0, 10)
    assert final["models"][0]["requests"]["rejected"] >= 5


async def test_a_cancelled_stream_frees_the_model_at_once(
    small_queue_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    node = small_queue_node
    before = (await status(session, node))["models"][0]["requests"]["cancelled"]
    body = {**COUNTING, "max_tokens": 1500, "stream": True}  # ~15 s if left running
    response = await session.post(node.url + "/v1/completions", json=body)
    lines = 0
    async for line in response.content:
        if line.startswith(b"data: "):
            lines += 1
        if lines == 5:
            break
    response.close()  # the client goes away mid-stream
    left_at = time.monotonic()
    info = await wait_for(
        session,
        node,
        lambda i: i["load"]["active_streams"] == 0 and i["load"]["queued"] == 0,
        5,
    )
    assert info["models"][0]["requests"]["cancelled"] == before + 1
    # The next request is served straight away, not after the abandoned 1,500 tokens.
    async with session.post(
        node.url + "/v1/completions", json={**COUNTING, "max_tokens": 3}
    ) as next_response:
        assert next_response.status == 200
        payload = json.loads(await next_response.read())
    assert payload["usage"]["completion_tokens"] == 3
    assert time.monotonic() - left_at < 10


async def test_a_queued_request_whose_client_leaves_frees_its_place(
    small_queue_node: NodeProcess, session: aiohttp.ClientSession
) -> None:
    node = small_queue_node
    async with session.post(
        node.url + "/v1/completions", json={**COUNTING, "max_tokens": 800, "stream": True}
    ) as running:
        await running.content.readline()
        waiting = asyncio.create_task(
            session.post(node.url + "/v1/completions", json={**COUNTING, "max_tokens": 5})
        )
        await wait_for(session, node, lambda i: i["load"]["queued"] == 1, 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await wait_for(session, node, lambda i: i["load"]["queued"] == 0, 5)
        # Its place is free again: a new request is admitted (not 429) while the long one runs.
        admitted = asyncio.create_task(
            session.post(node.url + "/v1/completions", json={**COUNTING, "max_tokens": 2})
        )
        await wait_for(session, node, lambda i: i["load"]["queued"] == 1, 5)
        running.close()
        response = await admitted
        assert response.status == 200
        response.release()


async def test_grpc_callers_get_resource_exhausted_when_full(
    small_queue_node: NodeProcess, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from mesh.errors import Overloaded
    from mesh.inference import InferenceRequest, Sampling
    from node.transport.peer_client import PeerClient
    from tests.members import join_as_member

    node = small_queue_node
    member = await join_as_member(node, tmp_path / "member")

    def request(max_tokens: int) -> InferenceRequest:
        return InferenceRequest(
            model="default",
            prompt="1, 2, 3, 4, 5,",
            sampling=Sampling(temperature=0, max_tokens=max_tokens),
        )

    async with PeerClient(node.info["grpc_address"], trust=member) as client:
        peer = await client.public_card()
        running = client.infer(peer, request(800))
        await anext(running)  # first token: busy
        queued = asyncio.create_task(_collect(client.infer(peer, request(2))))
        await wait_for(session, node, lambda i: i["load"]["queued"] == 1, 5)
        with pytest.raises(Overloaded, match="busy"):
            await anext(client.infer(peer, request(2)))
        await running.aclose()
        events = await queued
        assert events[-1].completion_tokens == 2


async def _collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


@pytest.fixture(scope="module")
def deep_queue_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = queue_node(tmp_path_factory, 30)
    try:
        yield proc
    finally:
        proc.kill()


async def test_one_peer_cannot_take_every_stream(
    deep_queue_node: NodeProcess, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from mesh.errors import Overloaded
    from mesh.inference import InferenceRequest, Sampling
    from mesh.wire.grpc_options import MAX_STREAMS_PER_PEER
    from node.transport.peer_client import PeerClient
    from tests.members import join_as_member

    node = deep_queue_node
    greedy = await join_as_member(node, tmp_path / "greedy")
    polite = await join_as_member(node, tmp_path / "polite")
    long = InferenceRequest(
        model="default", prompt="1, 2, 3, 4, 5,", sampling=Sampling(temperature=0, max_tokens=900)
    )
    async with (
        PeerClient(node.info["grpc_address"], trust=greedy) as client,
        PeerClient(node.info["grpc_address"], trust=polite) as other,
    ):
        peer = await client.public_card()
        streams = [client.infer(peer, long) for _ in range(MAX_STREAMS_PER_PEER)]
        first = asyncio.create_task(anext(streams[0]))
        waiting = [asyncio.create_task(anext(s)) for s in streams[1:]]
        await first
        await wait_for(session, node, lambda i: i["load"]["queued"] == MAX_STREAMS_PER_PEER - 1, 10)
        with pytest.raises(Overloaded, match="per node"):
            await anext(client.infer(peer, long))
        # Another member still gets in.
        short = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=1))
        queued_other = asyncio.create_task(_collect(other.infer(peer, short)))
        await wait_for(session, node, lambda i: i["load"]["queued"] == MAX_STREAMS_PER_PEER, 10)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        events = await queued_other
        assert events[-1].completion_tokens == 1
