"""A real relay process against bad input: raw garbage, sessions that do not start with a
valid Hello, oversized frames and malformed packets are refused, each with a clear status,
and the relay goes on serving a proper node; its totals answer only its operator
(cloud_relay/server.py)."""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from cloud_relay import relay_pb2_grpc as rpb_grpc
from cloud_relay.client import fetch_stats
from cloud_relay.operator_token import bearer_metadata, read_operator_token
from mesh import PROTOCOL_VERSION
from mesh.errors import PermissionDenied
from mesh.routing.relay import MAX_FRAME_BYTES, sign_hello
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb
from tests.nodeproc import RelayProcess

DEADLINE_S = 10.0
YEAR_MS = 365 * 86_400_000


@pytest.fixture(scope="module")
def relay_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path_factory.mktemp("relay")).start()
    try:
        yield process
        assert process.proc is not None
        assert process.proc.poll() is None, "the relay died: " + process.output()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def relay(relay_process: RelayProcess) -> str:
    return relay_process.address


@pytest.fixture
async def stub(relay: str) -> AsyncIterator[rpb_grpc.RelayServiceStub]:
    options = [("grpc.max_send_message_length", 3 * MAX_FRAME_BYTES)]
    async with grpc.aio.insecure_channel(relay, options=options) as channel:
        yield rpb_grpc.RelayServiceStub(channel)  # type: ignore[no-untyped-call]


def _member(mesh: MeshAuthority) -> tuple[Identity, tpb.SignedCert]:
    node = Identity.generate()
    cert = mesh.issue(
        node.public_key_raw, role=Role.MEMBER, now_ms=int(time.time() * 1000), ttl_ms=YEAR_MS
    )
    return node, cert


async def _open(stub: rpb_grpc.RelayServiceStub, node: Identity, cert: tpb.SignedCert) -> Any:
    call = stub.Session(timeout=DEADLINE_S)
    challenge = await call.read()
    await call.write(
        rpb.RelayFrame(hello=sign_hello(challenge.challenge, identity=node, cert=cert))
    )
    welcome = await call.read()
    assert welcome.welcome.node_id == node.node_id
    return call


async def _read_to_end(call: Any) -> None:
    while True:
        await call.read()


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    """How the relay ended the session (it must end it with a status)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(_read_to_end(call), DEADLINE_S)
    return info.value


def test_raw_garbage_on_the_port_does_not_hurt(relay: str) -> None:
    host, port = relay.rsplit(":", 1)
    for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 64):
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as sock:
            sock.sendall(junk)


async def test_a_session_must_start_with_a_valid_hello(stub: rpb_grpc.RelayServiceStub) -> None:
    call = stub.Session(timeout=DEADLINE_S)
    await call.read()  # the challenge
    await call.write(rpb.RelayFrame(packet=rpb.RelayPacket(peer="x", stream_id=1, kind=1)))
    assert (await _refused(call)).code() == grpc.StatusCode.INVALID_ARGUMENT

    call = stub.Session(timeout=DEADLINE_S)
    await call.read()
    junk = rpb.RelayHello(
        protocol_version=PROTOCOL_VERSION, membership=tpb.SignedCert(cert=b"junk")
    )
    await call.write(rpb.RelayFrame(hello=junk))
    error = await _refused(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "malformed" in (error.details() or "")

    # A hello signed for another relay's challenge is a replay.
    node, cert = _member(MeshAuthority.generate())
    call = stub.Session(timeout=DEADLINE_S)
    await call.read()
    other = rpb.RelayChallenge(protocol_version=PROTOCOL_VERSION, nonce=b"n" * 32)
    await call.write(rpb.RelayFrame(hello=sign_hello(other, identity=node, cert=cert)))
    assert (await _refused(call)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_oversized_frame_ends_only_its_own_session(
    stub: rpb_grpc.RelayServiceStub,
) -> None:
    mesh = MeshAuthority.generate()
    (a, a_cert), (b, b_cert) = _member(mesh), _member(mesh)
    call_a = await _open(stub, a, a_cert)
    call_b = await _open(stub, b, b_cert)
    huge = rpb.RelayPacket(
        peer=b.node_id,
        stream_id=1,
        kind=rpb.PACKET_KIND_CALL,
        method="Infer",
        payload=b"x" * (MAX_FRAME_BYTES + 1),
    )
    await call_a.write(rpb.RelayFrame(packet=huge))
    assert (await _refused(call_a)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # b's session is unharmed: a newcomer's packets still reach it.
    c, c_cert = _member(mesh)
    call_c = await _open(stub, c, c_cert)
    ok = rpb.RelayPacket(peer=b.node_id, stream_id=9, kind=rpb.PACKET_KIND_CALL, method="Ping")
    await call_c.write(rpb.RelayFrame(packet=ok))
    while True:
        frame = await asyncio.wait_for(call_b.read(), DEADLINE_S)
        if frame.WhichOneof("frame") == "packet":
            break
    assert frame.packet.peer == c.node_id
    assert frame.packet.stream_id == 9
    call_b.cancel()
    call_c.cancel()


async def test_malformed_packets_are_refused_back_to_their_sender(
    stub: rpb_grpc.RelayServiceStub,
) -> None:
    node, cert = _member(MeshAuthority.generate())
    call = await _open(stub, node, cert)
    bad = [
        rpb.RelayPacket(peer="", stream_id=1, kind=rpb.PACKET_KIND_CALL, method="Infer"),
        rpb.RelayPacket(peer="nobody", stream_id=2, kind=rpb.PACKET_KIND_CALL, method="Rm"),
        rpb.RelayPacket(peer="nobody", stream_id=3, kind=77),
        rpb.RelayPacket(peer="nobody", stream_id=4, kind=rpb.PACKET_KIND_CALL, method="Ping"),
    ]
    for packet in bad:
        await call.write(rpb.RelayFrame(packet=packet))
    reasons = []
    while len(reasons) < len(bad):
        frame = await asyncio.wait_for(call.read(), DEADLINE_S)
        if frame.WhichOneof("frame") == "refusal":
            reasons.append((frame.refusal.stream_id, frame.refusal.reason))
    assert reasons == [
        (1, rpb.REFUSAL_REASON_MALFORMED),
        (2, rpb.REFUSAL_REASON_MALFORMED),
        (3, rpb.REFUSAL_REASON_MALFORMED),
        (4, rpb.REFUSAL_REASON_UNKNOWN_PEER),
    ]
    call.cancel()


async def test_stats_answer_only_the_relays_operator(
    relay_process: RelayProcess, stub: rpb_grpc.RelayServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.Stats(rpb.RelayStatsRequest(), timeout=DEADLINE_S)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "relay.token" in (anonymous.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as guessed:
        await stub.Stats(
            rpb.RelayStatsRequest(), timeout=DEADLINE_S, metadata=bearer_metadata("guess")
        )
    assert guessed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDenied, match="token"):
        await fetch_stats(relay_process.address, token="guess")

    node, cert = _member(MeshAuthority.generate())
    call = await _open(stub, node, cert)
    await call.write(rpb.RelayFrame(packet=rpb.RelayPacket(peer="nobody", stream_id=1, kind=77)))
    while (await asyncio.wait_for(call.read(), DEADLINE_S)).WhichOneof("frame") != "refusal":
        pass
    call.cancel()
    # `relay up` wrote the token where only its operator can read it.
    run_dir = relay_process.home / "run"
    assert stat.S_IMODE((run_dir / "relay.token").stat().st_mode) == 0o600
    stats = await fetch_stats(relay_process.address, token=read_operator_token(run_dir))
    assert int(stats["packets_refused"]["MALFORMED"]) >= 1
