"""The relay's rules without sockets: the session handshake, packet checks, and the
switchboard's isolation, bounds and fairness (mesh/relay.py, cloud_relay/switchboard.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_relay.switchboard import Session, SessionClosed, Switchboard
from mesh.errors import BadSignature, MeshError, NotAMember, Overloaded, Unavailable
from mesh.identity import Identity
from mesh.membership import MeshAuthority, Role
from mesh.relay import (
    Refused,
    RelayLimits,
    SessionIdentity,
    check_packet,
    new_challenge,
    sign_hello,
    verify_hello,
)
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import node_pb2_grpc as pb_grpc
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.peer_client import GrpcTransport

NOW = 1_800_000_000_000
YEAR_MS = 365 * 86_400_000


def _cert(authority: MeshAuthority, node: Identity, role: Role = Role.MEMBER) -> tpb.SignedCert:
    return authority.issue(node.public_key_raw, role=role, now_ms=NOW, ttl_ms=YEAR_MS)


# --- the handshake ------------------------------------------------------------------------


def test_a_signed_hello_opens_a_session_in_the_mesh_its_certificate_names() -> None:
    authority, node = MeshAuthority.generate(), Identity.generate()
    challenge = new_challenge(NOW)
    hello = sign_hello(challenge, identity=node, cert=_cert(authority, node))
    who = verify_hello(hello, nonce=challenge.nonce, now_ms=NOW)
    assert who.node_id == node.node_id
    assert who.mesh_id == authority.mesh_id
    assert who.role is Role.MEMBER


def test_a_hello_for_another_challenge_is_refused() -> None:
    authority, node = MeshAuthority.generate(), Identity.generate()
    hello = sign_hello(new_challenge(NOW), identity=node, cert=_cert(authority, node))
    with pytest.raises(BadSignature, match="replayed"):
        verify_hello(hello, nonce=new_challenge(NOW).nonce, now_ms=NOW)


def test_someone_elses_certificate_does_not_open_a_session() -> None:
    authority, node, thief = MeshAuthority.generate(), Identity.generate(), Identity.generate()
    challenge = new_challenge(NOW)
    stolen = _cert(authority, node)
    hello = sign_hello(challenge, identity=thief, cert=stolen)
    with pytest.raises(BadSignature):
        verify_hello(hello, nonce=challenge.nonce, now_ms=NOW)


def test_a_forged_or_expired_certificate_is_refused() -> None:
    authority, node = MeshAuthority.generate(), Identity.generate()
    challenge = new_challenge(NOW)
    cert = _cert(authority, node)
    forged = tpb.SignedCert(cert=cert.cert, signature=bytes(64))
    with pytest.raises(BadSignature, match="forged"):
        verify_hello(
            sign_hello(challenge, identity=node, cert=forged), nonce=challenge.nonce, now_ms=NOW
        )
    hello = sign_hello(challenge, identity=node, cert=cert)
    with pytest.raises(NotAMember, match="expired"):
        verify_hello(hello, nonce=challenge.nonce, now_ms=NOW + 2 * YEAR_MS)


def test_a_node_revoked_by_its_mesh_cannot_open_a_session() -> None:
    authority, node = MeshAuthority.generate(), Identity.generate()
    challenge = new_challenge(NOW)
    revocations = authority.revocations(version=1, revoked={node.node_id}, now_ms=NOW)
    hello = sign_hello(
        challenge, identity=node, cert=_cert(authority, node), revocations=revocations
    )
    with pytest.raises(NotAMember, match="revoked"):
        verify_hello(hello, nonce=challenge.nonce, now_ms=NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_bytes_as_a_hello_are_refused_cleanly(data: bytes) -> None:
    hello = rpb.RelayHello()
    try:
        hello.ParseFromString(data)
    except Exception:
        return  # the gRPC layer refuses bytes that do not parse
    with pytest.raises(MeshError):
        verify_hello(hello, nonce=b"n" * 32, now_ms=NOW)


# --- packets --------------------------------------------------------------------------------


def _packet(kind: int = rpb.PACKET_KIND_CALL, **fields: object) -> rpb.RelayPacket:
    values: dict[str, object] = {"peer": "X" * 63, "stream_id": 1, "method": "Infer"}
    values.update(fields)
    return rpb.RelayPacket(kind=kind, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("packet", "role", "reason"),
    [
        (_packet(peer=""), Role.MEMBER, rpb.REFUSAL_REASON_MALFORMED),
        (_packet(kind=0), Role.MEMBER, rpb.REFUSAL_REASON_MALFORMED),
        (_packet(kind=99), Role.MEMBER, rpb.REFUSAL_REASON_MALFORMED),
        (_packet(method="DropTables"), Role.MEMBER, rpb.REFUSAL_REASON_MALFORMED),
        (_packet(payload=b"x" * (5 << 20)), Role.MEMBER, rpb.REFUSAL_REASON_MALFORMED),
        (_packet(), Role.OVERFLOW, rpb.REFUSAL_REASON_NOT_ALLOWED),
        (_packet(kind=rpb.PACKET_KIND_CANCEL), Role.OVERFLOW, rpb.REFUSAL_REASON_NOT_ALLOWED),
    ],
)
def test_bad_or_forbidden_packets_are_refused(
    packet: rpb.RelayPacket, role: Role, reason: int
) -> None:
    with pytest.raises(Refused) as refused:
        check_packet(packet, sender_role=role)
    assert refused.value.reason == reason


def test_overflow_nodes_may_answer() -> None:
    check_packet(_packet(kind=rpb.PACKET_KIND_REPLY, method=""), sender_role=Role.OVERFLOW)
    check_packet(_packet(kind=rpb.PACKET_KIND_END, method=""), sender_role=Role.OVERFLOW)


# --- the switchboard ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _who(mesh: MeshAuthority, role: Role = Role.MEMBER) -> SessionIdentity:
    node = Identity.generate()
    challenge = new_challenge(NOW)
    hello = sign_hello(challenge, identity=node, cert=_cert(mesh, node, role))
    return verify_hello(hello, nonce=challenge.nonce, now_ms=NOW)


async def _drain(session: Session) -> list[rpb.RelayFrame]:
    """Every frame the session has for its node now."""
    frames = []
    while True:
        try:
            frames.append(await asyncio.wait_for(session.next_frame(), 0.01))
        except TimeoutError:
            return frames


def _to(
    recipient: SessionIdentity, payload: bytes = b"sealed", stream_id: int = 1
) -> rpb.RelayPacket:
    return rpb.RelayPacket(
        peer=recipient.node_id,
        stream_id=stream_id,
        kind=rpb.PACKET_KIND_CALL,
        method="Infer",
        payload=payload,
    )


async def test_packets_go_only_inside_one_mesh_and_the_relay_names_the_sender() -> None:
    board = Switchboard(clock=Clock())
    ours, theirs = MeshAuthority.generate(), MeshAuthority.generate()
    a, b, stranger = _who(ours), _who(ours), _who(theirs)
    sa, sb, sx = board.open(a), board.open(b), board.open(stranger)
    for session in (sa, sb, sx):
        await _drain(session)  # the directories
    board.forward(sa, _to(b))
    [frame] = await _drain(sb)
    assert frame.packet.peer == a.node_id  # set by the relay
    assert frame.packet.payload == b"sealed"
    board.forward(sx, _to(b))  # another mesh: as if b were not there at all
    [refusal] = await _drain(sx)
    assert refusal.refusal.reason == rpb.REFUSAL_REASON_UNKNOWN_PEER
    assert await _drain(sb) == []


async def test_the_directory_lists_only_the_mesh_and_overflow_nodes_get_none() -> None:
    board = Switchboard(clock=Clock())
    ours, theirs = MeshAuthority.generate(), MeshAuthority.generate()
    a, b, cloud, stranger = _who(ours), _who(ours), _who(ours, Role.OVERFLOW), _who(theirs)
    sa = board.open(a)
    board.open(b)
    scloud = board.open(cloud)
    board.open(stranger)
    [directory] = await _drain(sa)
    listed = {m.node_id for m in directory.directory.members}
    assert listed == {b.node_id, cloud.node_id}
    assert await _drain(scloud) == []


async def test_overflow_nodes_answer_but_never_call() -> None:
    board = Switchboard(clock=Clock())
    mesh = MeshAuthority.generate()
    member, cloud = _who(mesh), _who(mesh, Role.OVERFLOW)
    smember, scloud = board.open(member), board.open(cloud)
    await _drain(smember)
    board.forward(scloud, _to(member))
    [refusal] = await _drain(scloud)
    assert refusal.refusal.reason == rpb.REFUSAL_REASON_NOT_ALLOWED
    reply = rpb.RelayPacket(peer=member.node_id, stream_id=7, kind=rpb.PACKET_KIND_REPLY)
    board.forward(scloud, reply)
    [delivered] = await _drain(smember)
    assert delivered.packet.stream_id == 7


async def test_a_flood_is_bounded_and_the_others_keep_their_share() -> None:
    limits = RelayLimits(
        node_packets_per_s=100, queue_packets=50, queue_bytes=1 << 20, global_queue_bytes=4 << 20
    )
    clock = Clock()
    board = Switchboard(limits, clock=clock)
    mesh = MeshAuthority.generate()
    flooder, victim, alice, bob = _who(mesh), _who(mesh), _who(mesh), _who(mesh)
    sf, sv, sa, sb = (board.open(x) for x in (flooder, victim, alice, bob))
    for session in (sf, sv, sa, sb):
        await _drain(session)
    for second in range(5):
        clock.now += 1
        for i in range(2000):  # 20x its rate, 64 KiB each, and the victim never reads
            board.forward(sf, _to(victim, b"x" * 65536, stream_id=second * 10_000 + i))
        board.forward(sa, _to(bob, stream_id=second))  # alice's one call a second
        assert board.queued_bytes <= limits.global_queue_bytes
        assert sv.queued_bytes <= limits.queue_bytes
    delivered = [f for f in await _drain(sb) if f.HasField("packet")]
    assert [f.packet.stream_id for f in delivered] == [0, 1, 2, 3, 4]
    assert board.refused["RATE_LIMITED"] > 9000
    assert board.refused["PEER_FULL"] > 0


async def test_a_newer_session_replaces_the_old_and_revocation_closes_it() -> None:
    board = Switchboard(clock=Clock())
    mesh = MeshAuthority.generate()
    member = _who(mesh)
    first = board.open(member)
    second = board.open(member)
    with pytest.raises(SessionClosed, match="replaced"):
        await first.next_frame()
    assert board.sessions == 1
    revocations = mesh.revocations(version=1, revoked={member.node_id}, now_ms=NOW)
    admin = board.open(_who(mesh, Role.ADMIN))
    board.revocations(admin, revocations)
    with pytest.raises(SessionClosed, match="revoked"):
        await second.next_frame()
    with pytest.raises(Refused):
        board.open(member)  # and it cannot come back


async def test_the_session_limit_answers_full() -> None:
    board = Switchboard(RelayLimits(max_sessions=2), clock=Clock())
    mesh = MeshAuthority.generate()
    board.open(_who(mesh))
    board.open(_who(mesh))
    with pytest.raises(Overloaded, match="full"):
        board.open(_who(mesh))


# --- a peer's connection replaced under an in-flight call -------------------------------------


class _SlowNode(pb_grpc.NodeServiceServicer):
    async def Ping(self, request: pb.PingRequest, context: object) -> pb.PingResponse:
        await asyncio.sleep(30)
        return pb.PingResponse()


async def test_a_call_on_a_closed_connection_fails_instead_of_cancelling_the_caller() -> None:
    """Closing a peer's channel under a heartbeat (its client was replaced) must fail that
    call with Unavailable: a CancelledError would end the peering loop that made it."""
    server = grpc.aio.server()
    pb_grpc.add_NodeServiceServicer_to_server(_SlowNode(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        transport = GrpcTransport(f"127.0.0.1:{port}")
        call = asyncio.ensure_future(
            transport.unary("Ping", pb.PingRequest(), pb.PingResponse, 10.0)
        )
        await asyncio.sleep(0.2)
        await transport.aclose()
        with pytest.raises(Unavailable, match="closed"):
            await call
    finally:
        await server.stop(None)
