"""The gRPC agent of one real node: card, ping, streamed inference, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from mesh import PROTOCOL_VERSION
from mesh.cards import open_card
from mesh.inference import ChatMessage, Finished, InferenceRequest, Sampling, TextDelta
from mesh.wire import codec, grpc_options
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import node_pb2_grpc as pb_grpc
from tests.nodeproc import NodeProcess

DEADLINE_S = 60.0


@pytest.fixture
async def stub(node: NodeProcess) -> AsyncIterator[pb_grpc.NodeServiceStub]:
    async with grpc.aio.insecure_channel(
        node.info["grpc_address"], options=grpc_options.channel_options()
    ) as channel:
        yield pb_grpc.NodeServiceStub(channel)


async def test_describe_returns_a_card_signed_by_the_node(
    stub: pb_grpc.NodeServiceStub, node: NodeProcess
) -> None:
    signed = await stub.Describe(pb.DescribeRequest(), timeout=DEADLINE_S)
    card = open_card(signed)
    assert card.node_id == node.node_id
    assert card.protocol_version == PROTOCOL_VERSION
    assert [m.name for m in card.models] == ["smollm2-135m-instruct"]
    assert card.models[0].context_length == 2048
    assert card.models[0].quantization == "Q4_1"
    assert card.hardware.cpu_count >= 1
    assert node.info["grpc_address"] in card.grpc_addresses


async def test_ping_echoes_the_nonce_and_reports_load(stub: pb_grpc.NodeServiceStub) -> None:
    reply = await stub.Ping(pb.PingRequest(nonce=b"n0nce", sent_at_unix_ms=1), timeout=DEADLINE_S)
    assert reply.nonce == b"n0nce"
    assert reply.load.slots == 9
    assert reply.received_at_unix_ms > 1


async def test_infer_streams_tokens_then_one_finish(
    stub: pb_grpc.NodeServiceStub, node: NodeProcess
) -> None:
    request = InferenceRequest(
        model="smollm2-135m-instruct",
        messages=(ChatMessage(role="user", content="What is the capital of France?"),),
        sampling=Sampling(temperature=0, max_tokens=40),
    )
    call = stub.Infer(codec.request_to_pb(request), timeout=DEADLINE_S)
    events = [event async for event in call]
    metadata = dict(await call.trailing_metadata())
    assert metadata["x-allerac-route"] == "local"
    assert metadata["x-allerac-node"] == node.node_id
    decoded = [codec.event_from_pb(e) for e in events]
    deltas = [e for e in decoded if isinstance(e, TextDelta)]
    assert len(deltas) > 3
    assert "Paris" in "".join(d.text for d in deltas)
    assert isinstance(decoded[-1], Finished)
    assert sum(isinstance(e, Finished) for e in decoded) == 1
    finish = events[-1].finish
    assert finish.served_by == node.node_id
    assert finish.route == "local"
    assert 0 < finish.completion_tokens <= 40
    assert finish.prompt_tokens > 5


async def test_infer_errors_map_to_grpc_status(stub: pb_grpc.NodeServiceStub) -> None:
    good = codec.request_to_pb(
        InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    )
    unknown_model = pb.InferRequest()
    unknown_model.CopyFrom(good)
    unknown_model.body.model = "gpt-17"
    old_version = pb.InferRequest()
    old_version.CopyFrom(good)
    old_version.protocol_version = 99
    bad_id = pb.InferRequest()
    bad_id.CopyFrom(good)
    bad_id.body.request_id = "not-hex"
    empty = pb.InferRequest(protocol_version=PROTOCOL_VERSION)
    cases = [
        (unknown_model, grpc.StatusCode.NOT_FOUND, "gpt-17"),
        (old_version, grpc.StatusCode.FAILED_PRECONDITION, "protocol version 99"),
        (bad_id, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (empty, grpc.StatusCode.INVALID_ARGUMENT, "no body"),
    ]
    for message, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Infer(message, timeout=DEADLINE_S):
                pass
        assert info.value.code() == code
        assert words in (info.value.details() or "")
    # ...and the node goes on serving.
    events = [e async for e in stub.Infer(good, timeout=DEADLINE_S)]
    assert events[-1].finish.completion_tokens == 2


async def test_a_cancelled_grpc_stream_frees_the_model(stub: pb_grpc.NodeServiceStub) -> None:
    long = codec.request_to_pb(
        InferenceRequest(
            model="default", prompt="1, 2, 3, 4,", sampling=Sampling(temperature=0, max_tokens=1500)
        )
    )
    call = stub.Infer(long, timeout=DEADLINE_S)
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    call.cancel()
    # A new request is admitted and served at once: the worker did not keep counting.
    short = codec.request_to_pb(
        InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    )
    events = [e async for e in stub.Infer(short, timeout=10)]
    assert events[-1].finish.completion_tokens == 2
    reply = await stub.Ping(pb.PingRequest(), timeout=DEADLINE_S)
    assert reply.load.queued == 0
