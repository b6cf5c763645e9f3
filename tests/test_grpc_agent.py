"""The gRPC agent of one real node, used the way a peer uses it: sealed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from mesh import PROTOCOL_VERSION
from mesh.errors import InvalidRequest, ModelNotFound, NotAMember
from mesh.inference import ChatMessage, Finished, InferenceRequest, Sampling, TextDelta
from mesh.trust.cards import PeerCard, open_card
from mesh.wire import grpc_options
from mesh.wire.v1 import node_pb2 as pb
from node.store.trust_store import TrustStore
from node.transport import node_pb2_grpc as pb_grpc
from node.transport import peer_client
from node.transport.peer_client import GrpcTransport, M, PeerClient
from tests.members import join_as_member, new_trust
from tests.nodeproc import NodeProcess

DEADLINE_S = 60.0
CAPITAL = InferenceRequest(
    model="smollm2-135m-instruct",
    messages=(ChatMessage(role="user", content="What is the capital of France?"),),
    sampling=Sampling(temperature=0, max_tokens=40),
)


@pytest.fixture
async def member(node: NodeProcess, tmp_path: Path) -> TrustStore:
    return await join_as_member(node, tmp_path / "member")


@pytest.fixture
async def client(node: NodeProcess, member: TrustStore) -> AsyncIterator[PeerClient]:
    async with PeerClient(node.info["grpc_address"], trust=member) as peer_client:
        yield peer_client


@pytest.fixture
async def peer(client: PeerClient) -> PeerCard:
    return await client.public_card()


@pytest.fixture
async def raw_stub(node: NodeProcess) -> AsyncIterator[pb_grpc.NodeServiceStub]:
    async with grpc.aio.insecure_channel(
        node.info["grpc_address"], options=grpc_options.channel_options()
    ) as channel:
        yield pb_grpc.NodeServiceStub(channel)


async def test_public_card_shows_identity_and_keys_but_not_models(
    peer: PeerCard, node: NodeProcess, member: TrustStore
) -> None:
    assert peer.node_id == node.node_id
    assert peer.membership.role.value == "admin"
    assert peer.membership.mesh_id == member.mesh_id == node.info["mesh_id"]
    assert peer.keys.offers_hybrid
    assert list(peer.card.models) == []
    assert not peer.card.HasField("hardware")


async def test_full_card_comes_sealed_with_models(client: PeerClient, peer: PeerCard) -> None:
    card = await client.full_card(peer)
    assert card.node_id == peer.node_id
    assert [m.name for m in card.models] == ["smollm2-135m-instruct"]
    assert card.models[0].context_length == 2048
    assert card.models[0].quantization == "Q4_1"
    assert card.hardware.cpu_count >= 1


async def test_sealed_infer_streams_tokens_then_one_finish(
    client: PeerClient, peer: PeerCard
) -> None:
    events = [event async for event in client.infer(peer, CAPITAL)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 2  # streamed (tokens after the first may travel grouped)
    assert sum(d.tokens for d in deltas) == events[-1].completion_tokens
    assert "Paris" in "".join(d.text for d in deltas)
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    assert 0 < events[-1].completion_tokens <= 40


async def test_errors_after_opening_come_back_sealed_and_typed(
    client: PeerClient, peer: PeerCard
) -> None:
    with pytest.raises(ModelNotFound, match="gpt-17"):
        async for _ in client.infer(peer, InferenceRequest(model="gpt-17", prompt="hi")):
            pass
    too_long = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=9999))
    with pytest.raises(InvalidRequest, match="context"):
        async for _ in client.infer(peer, too_long):
            pass
    events = [e async for e in client.infer(peer, CAPITAL)]
    assert isinstance(events[-1], Finished)


async def test_unsealed_and_unknown_version_requests_are_refused(
    raw_stub: pb_grpc.NodeServiceStub,
) -> None:
    for message, code, words in [
        (
            pb.InferRequest(protocol_version=PROTOCOL_VERSION),
            grpc.StatusCode.INVALID_ARGUMENT,
            "only sealed",
        ),
        (
            pb.InferRequest(protocol_version=99),
            grpc.StatusCode.FAILED_PRECONDITION,
            "protocol version 99",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in raw_stub.Infer(message, timeout=DEADLINE_S):
                pass
        assert info.value.code() == code
        assert words in (info.value.details() or "")


async def test_describe_and_ping_answer_anyone(
    raw_stub: pb_grpc.NodeServiceStub, node: NodeProcess
) -> None:
    card = open_card(await raw_stub.Describe(pb.DescribeRequest(), timeout=DEADLINE_S))
    assert card.node_id == node.node_id
    reply = await raw_stub.Ping(pb.PingRequest(nonce=b"n0nce"), timeout=DEADLINE_S)
    assert reply.nonce == b"n0nce"
    assert reply.load.parallel >= 1  # slots decoding at once (the box's cores decide)
    assert reply.load.slots == reply.load.parallel + 8  # and the default queue of 8


async def test_a_node_of_another_mesh_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    stranger = new_trust(tmp_path / "stranger")  # valid keys, its own mesh, no invite
    async with PeerClient(node.info["grpc_address"], trust=stranger) as client:
        with pytest.raises(NotAMember):
            await client.public_card()  # the node is not in *our* mesh either
        raw = await client.transport.unary(
            "Describe", pb.DescribeRequest(), pb.SignedCard, DEADLINE_S
        )
        peer = PeerCard(
            card=open_card(raw),
            membership=_admin_membership_as_seen_by(stranger, raw),
            keys=_keys(raw),
        )
        with pytest.raises(NotAMember, match="not to this mesh"):
            async for _ in client.infer(peer, CAPITAL):
                pass


def _admin_membership_as_seen_by(trust: TrustStore, signed: pb.SignedCard):  # type: ignore[no-untyped-def]
    from mesh.trust.membership import read_cert, verify_cert

    card = open_card(signed)
    cert, _ = read_cert(card.membership)
    return verify_cert(card.membership, mesh_public_key=cert.mesh_public_key, now_ms=_now())


def _keys(signed: pb.SignedCard):  # type: ignore[no-untyped-def]
    from mesh.trust.enckeys import verify_encryption_keys

    card = open_card(signed)
    return verify_encryption_keys(
        card.encryption_keys,
        identity_public_key=card.identity_public_key,
        node_id=card.node_id,
        now_ms=_now(),
    )


def _now() -> int:
    import time

    return int(time.time() * 1000)


async def test_a_cancelled_sealed_stream_frees_the_model(
    client: PeerClient, peer: PeerCard
) -> None:
    long = InferenceRequest(
        model="default", prompt="1, 2, 3, 4,", sampling=Sampling(temperature=0, max_tokens=1500)
    )
    stream = client.infer(peer, long)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.aclose()
    short = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    events = await asyncio.wait_for(_collect(client, peer, short), timeout=10)
    assert isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == 2


class _Watched:
    """A gRPC transport that notes how each of its streams ended."""

    def __init__(self, address: str) -> None:
        self._inner = GrpcTransport(address)
        self.label = address
        self.ends: list[str] = []
        self.ended = asyncio.Event()

    async def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]:
        replies = self._inner.stream(method, request, reply_type, timeout_s)
        async with contextlib.aclosing(replies):
            try:
                async for reply in replies:
                    yield reply
            except GeneratorExit:
                self.ends.append("closed before its end")
                self.ended.set()
                raise
        self.ends.append("read to its end")
        self.ended.set()

    async def unary(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> M:
        return await self._inner.unary(method, request, reply_type, timeout_s)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_finished_answer_is_read_to_its_end_not_cancelled(
    node: NodeProcess, member: TrustStore
) -> None:
    """The entry stops reading at the Finished event; the call is still read to its
    status (in the background), not cancelled: a reset costs both sides work."""
    transport = _Watched(node.info["grpc_address"])
    short = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    async with PeerClient(transport.label, trust=member, transport=transport) as client:
        peer = await client.public_card()
        stream = client.infer(peer, short)
        async for event in stream:
            if isinstance(event, Finished):
                break
        await stream.aclose()  # what the entry does once it has the Finished event
        await asyncio.wait_for(transport.ended.wait(), 10)
        # Stopped early, it is closed (the peer's work stops at once).
        stream = client.infer(peer, short)
        await anext(stream)
        await stream.aclose()
    assert transport.ends == ["read to its end", "closed before its end"]


class _HeldOpen(_Watched):
    """A peer that keeps the call open after its final frame."""

    async def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]:
        async for reply in super().stream(method, request, reply_type, timeout_s):
            yield reply
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.ends.append("cancelled")
            raise


async def test_a_call_held_open_after_its_final_frame_is_cancelled(
    node: NodeProcess, member: TrustStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer_client, "END_WAIT_S", 0.2)
    transport = _HeldOpen(node.info["grpc_address"])
    short = InferenceRequest(model="default", prompt="hi", sampling=Sampling(max_tokens=2))
    async with PeerClient(transport.label, trust=member, transport=transport) as client:
        peer = await client.public_card()
        events = [event async for event in client.infer(peer, short)]
        assert isinstance(events[-1], Finished)
        async with asyncio.timeout(10):
            while len(client._ends):  # noqa: ASYNC110 (a task of the client's)
                await asyncio.sleep(0.01)
    assert transport.ends == ["read to its end", "cancelled"]


async def _collect(client: PeerClient, peer: PeerCard, request: InferenceRequest) -> list:  # type: ignore[type-arg]
    return [e async for e in client.infer(peer, request)]


async def test_a_call_on_a_closed_channel_fails_cleanly_as_unavailable() -> None:
    """A peer's client replaced while a caller still holds it (a direct path given up for
    the relay, say): its calls fail as Unavailable, never with gRPC's UsageError."""
    from mesh.errors import Unavailable
    from node.transport.peer_client import GrpcTransport

    transport = GrpcTransport("127.0.0.1:9")
    await transport.aclose()
    with pytest.raises(Unavailable, match="closed"):
        await transport.unary("Ping", pb.PingRequest(), pb.PingResponse, 1.0)
    with pytest.raises(Unavailable, match="closed"):
        async for _ in transport.stream("Infer", pb.InferRequest(), pb.InferEvent, 1.0):
            pass
