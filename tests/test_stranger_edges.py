"""What a stranger on the network can do to a running node before proving anything
(issue 11, findings 3, 5 and 7): forged goodbyes, ping and invite floods, and a sealed
request captured on the wire and replayed after the node restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh import PROTOCOL_VERSION
from mesh.errors import InviteError, MeshError, Overloaded, PermissionDenied
from mesh.inference import ChatMessage, InferenceRequest, Sampling
from mesh.trust.invites import decode_invite, make_join_request
from mesh.wire import codec
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.serving.accounting import Accountant
from node.serving.models import LocalModels
from node.serving.node_service import JOIN_RATE, PING_RATE, NodeService
from node.serving.serving_side import ServingSide
from node.transport import node_pb2_grpc as pb_grpc
from node.transport.peer_client import PeerClient
from tests.members import invite_code, join_as_member, new_trust
from tests.nodeproc import NodeProcess
from tests.test_lan_mesh import peer_states, start_mesh, wait_until
from tests.test_mesh_trust import grpc_address


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(tmp_path, {"a": "", "b": ""})
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


async def test_forged_goodbyes_do_not_take_a_peer_out(pair: dict[str, NodeProcess]) -> None:
    a, b = pair["a"], pair["b"]
    seen: set[str] = set()
    async with grpc.aio.insecure_channel(grpc_address(a)) as channel:
        stub = pb_grpc.NodeServiceStub(channel)  # type: ignore[no-untyped-call]
        forged = pb.PingRequest(
            nonce=b"x", sent_at_unix_ms=int(time.time() * 1000), leaving_node_id=b.node_id
        )
        ends = time.monotonic() + 3.0
        while time.monotonic() < ends:  # 20 a second, as in the report
            await stub.Ping(forged, timeout=5)
            forged.goodbye_signature = bytes(64)  # and signed by nobody
            forged.recipient_node_id = a.node_id
            seen.add(peer_states(a)[b.node_id])
            await asyncio.sleep(0.05)
    assert seen == {"up"}
    # B's own goodbye still counts at once (not after the 6 s a crash takes).
    b.stop()
    took = wait_until(lambda: peer_states(a).get(b.node_id) == "down", 3, "B's goodbye")
    assert took < 2.0


def _calls(tmp_path: Path) -> NodeService:
    trust = new_trust(tmp_path / "node")
    models = LocalModels(trust.identity.node_id, [])  # serves nothing: pings ask only its load
    return NodeService(
        trust=trust,
        serving=ServingSide(models=models, accountant=Accountant(node_id="", ledger=None)),
        models=models,
        public_card=pb.SignedCard,
        full_card=pb.SignedCard,
    )


def test_pings_and_joins_are_rate_limited_per_address(tmp_path: Path) -> None:
    calls = _calls(tmp_path)
    flooder, neighbour = "ipv4:198.18.0.9:40000", "ipv4:198.18.0.2:40000"
    answered = 0
    for _ in range(1000):
        try:
            calls.ping(pb.PingRequest(nonce=b"n"), flooder)
            answered += 1
        except Overloaded:
            pass
    assert answered <= PING_RATE.burst + 2  # the burst, and what refilled meanwhile
    calls.ping(pb.PingRequest(nonce=b"n"), neighbour)  # another box is not slowed down
    refused = 0
    for _ in range(100):
        try:
            calls.join(tpb.JoinRequest(), flooder)
        except Overloaded:
            refused += 1
        except MeshError:
            pass  # what got through is refused as junk
    assert refused >= 100 - JOIN_RATE.burst - 2


async def test_wrong_invites_cannot_be_tried_fast(tmp_path: Path) -> None:
    admin = NodeProcess(tmp_path / "admin").start()
    try:
        stranger = new_trust(tmp_path / "stranger")
        code = invite_code(admin)
        invite = decode_invite(code, now_ms=int(time.time() * 1000))
        wrong = make_join_request(invite, stranger.identity, now_ms=int(time.time() * 1000))
        wrong.proof = bytes(32)
        outcomes: dict[str, int] = {}
        started = time.monotonic()
        async with PeerClient(grpc_address(admin), trust=stranger) as client:
            for _ in range(200):
                try:
                    await client.join(wrong)
                except (InviteError, PermissionDenied, Overloaded) as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        elapsed = time.monotonic() - started
        checked = 200 - outcomes.get("Overloaded", 0)
        assert checked <= JOIN_RATE.burst + JOIN_RATE.per_s * elapsed + 1, outcomes
        assert outcomes.get("Overloaded", 0) > 150
    finally:
        admin.kill()


def _question() -> InferenceRequest:
    return InferenceRequest(
        model="default",
        messages=(ChatMessage(role="user", content="Say hi."),),
        sampling=Sampling(temperature=0, max_tokens=3),
    )


async def _send(address: str, client: PeerClient, request: pb.InferRequest) -> list[Any]:
    events = client.transport.stream("Infer", request, pb.InferEvent, 60)
    async with contextlib.aclosing(events):
        return [event async for event in events]


async def test_a_captured_request_does_not_replay_after_a_restart(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node").start()
    try:
        member = await join_as_member(node, tmp_path / "member")
        async with PeerClient(grpc_address(node), trust=member) as client:
            card = await client.public_card()
            sealed = client._seal(card, pb.SealedCall(infer=codec.request_to_pb(_question())))
            captured = pb.InferRequest(protocol_version=PROTOCOL_VERSION, sealed=sealed.envelope)
            assert await _send(grpc_address(node), client, captured)  # answered once
            with pytest.raises(PermissionDenied, match="replayed"):
                await _send(grpc_address(node), client, captured)  # refused while it runs
        node.stop()
        node = NodeProcess(tmp_path / "node").start()
        async with PeerClient(grpc_address(node), trust=member) as client:
            with pytest.raises(PermissionDenied, match="before this node started"):
                await _send(grpc_address(node), client, captured)
            # A fresh request from the same member is served as usual.
            async with contextlib.aclosing(client.infer(card, _question())) as events:
                assert [event async for event in events]
    finally:
        node.kill()
