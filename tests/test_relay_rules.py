"""The relay's rules without sockets: the session handshake, packet checks, and the
switchboard's isolation, bounds and fairness (mesh/relay.py, cloud_relay/switchboard.py)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_relay.switchboard import Session, SessionClosed, Switchboard
from mesh.errors import (
    BadSignature,
    MeshError,
    NotAMember,
    Overloaded,
    PermissionDenied,
    Unavailable,
)
from mesh.routing.relay import (
    Claim,
    Refused,
    RelayLimits,
    SessionIdentity,
    check_packet,
    new_challenge,
    read_claim,
    sign_hello,
    source_address,
    verify_hello,
)
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.transport import node_pb2_grpc as pb_grpc
from node.transport.peer_client import GrpcTransport

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
    with contextlib.suppress(MeshError):
        read_claim(hello)  # the early screen parses it or refuses it, nothing else
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


def _hello(mesh: MeshAuthority) -> rpb.RelayHello:
    """A signed Hello of a new node of `mesh`."""
    node = Identity.generate()
    return sign_hello(new_challenge(NOW), identity=node, cert=_cert(mesh, node))


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


def _to_nobody(stream_id: int) -> rpb.RelayPacket:
    return rpb.RelayPacket(
        peer=f"nobody-{stream_id}", stream_id=stream_id, kind=rpb.PACKET_KIND_CALL, method="Ping"
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


# --- strangers: every mesh is self-made, so shares are per address and per mesh -------------


def test_one_source_address_gets_a_bounded_share_of_the_sessions() -> None:
    board = Switchboard(RelayLimits(max_sessions=100, max_sessions_per_address=3), clock=Clock())
    held = [board.admit("203.0.113.7") for _ in range(3)]  # counted from the first byte
    with pytest.raises(Overloaded, match=r"203\.0\.113\.7"):
        board.admit("203.0.113.7")
    board.admit("198.51.100.1")  # another address is not affected
    held[0].release()
    held[0].release()  # releasing twice frees one place, not two
    board.admit("203.0.113.7")
    with pytest.raises(Overloaded):
        board.admit("203.0.113.7")


def test_the_whole_relay_is_bounded_counting_sessions_still_in_their_handshake() -> None:
    board = Switchboard(RelayLimits(max_sessions=4, max_sessions_per_address=100), clock=Clock())
    for i in range(4):
        board.admit(f"192.0.2.{i}")
    with pytest.raises(Overloaded, match="full"):
        board.admit("192.0.2.200")


def test_one_mesh_gets_a_bounded_share_and_its_nodes_may_reconnect() -> None:
    board = Switchboard(RelayLimits(max_sessions_per_mesh=2), clock=Clock())
    stranger = MeshAuthority.generate()
    a, b = _who(stranger), _who(stranger)
    board.open(a)
    board.open(b)
    # Refused on what the Hello claims, before any signature is checked...
    with pytest.raises(Overloaded, match="mesh"):
        board.screen(read_claim(_hello(stranger)))
    # ... and again, authoritatively, when a verified node would be filed.
    with pytest.raises(Overloaded, match="mesh"):
        board.open(_who(stranger))
    board.screen(Claim(node_id=a.node_id, mesh_id=a.mesh_id))  # a's reconnection is fine
    board.open(a)
    assert board.sessions == 2
    board.open(_who(MeshAuthority.generate()))  # another mesh is not affected
    assert board.sessions == 3


def test_a_relay_with_an_allowlist_serves_only_the_meshes_on_it() -> None:
    ours, stranger = MeshAuthority.generate(), MeshAuthority.generate()
    board = Switchboard(clock=Clock(), allowed_meshes=frozenset({ours.mesh_id}))
    board.open(_who(ours))
    with pytest.raises(PermissionDenied, match="not on"):
        board.screen(read_claim(_hello(stranger)))
    with pytest.raises(PermissionDenied, match="not on"):
        board.open(_who(stranger))
    assert board.sessions == 1


async def test_packets_to_nobody_cost_only_their_sender() -> None:
    limits = RelayLimits(global_packets_per_s=100, node_refusals_per_s=10)
    board = Switchboard(limits, clock=Clock())
    ours, stranger = MeshAuthority.generate(), MeshAuthority.generate()
    a, b, x = _who(ours), _who(ours), _who(stranger)
    sa, sb, sx = board.open(a), board.open(b), board.open(x)
    for session in (sa, sb, sx):
        await _drain(session)
    for i in range(5000):  # 50 times the relay's global rate, to node IDs nobody has
        board.forward(sx, _to_nobody(stream_id=i))
    for i in range(20):
        board.forward(sa, _to(b, stream_id=i))
    delivered = [f.packet.stream_id for f in await _drain(sb) if f.HasField("packet")]
    assert delivered == list(range(20))
    assert board.refused["UNKNOWN_PEER"] == 5000
    assert "RELAY_FULL" not in board.refused
    # The sender hears of its refusals at its refusal rate, not at the rate it sends.
    assert len(await _drain(sx)) == 10
    assert await _drain(sa) == []


async def test_refusals_come_back_at_a_bounded_rate() -> None:
    clock = Clock()
    board = Switchboard(RelayLimits(node_refusals_per_s=5), clock=clock)
    mesh = MeshAuthority.generate()
    sx = board.open(_who(mesh))
    for second in range(3):
        clock.now += 1
        for i in range(100):
            board.forward(sx, _to_nobody(stream_id=second * 1000 + i))
    refusals = [f for f in await _drain(sx) if f.HasField("refusal")]
    assert len(refusals) == 5 + 5 + 5  # the burst, then the refill of each second
    assert board.refused["UNKNOWN_PEER"] == 300


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:203.0.113.7:51234", "203.0.113.7"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("ipv6:%5B2001:db8:1:2::9%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:[::ffff:198.51.100.4]:80", "198.51.100.4"),
        ("ipv6:[::1]:80", "::/64"),
        ("unix:/run/relay.sock", "unix"),
        ("", "unknown"),
        ("ipv4:not-an-address:1", "unknown"),
    ],
)
def test_sessions_are_counted_by_source_address_and_ipv6_by_its_64(peer: str, address: str) -> None:
    assert source_address(peer) == address


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_peer_string_maps_to_a_short_address(peer: str) -> None:
    assert 0 < len(source_address(peer)) <= 64


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
