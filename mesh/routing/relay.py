"""The blind relay's rules, without I/O (DESIGN.md "Relay"; wire in relay.proto).

Session opening: the relay sends a fresh 32-byte nonce; the node answers with a
Hello carrying its membership certificate and an Ed25519 signature, by the
identity key that certificate names, over a context string, the nonce and the
certificate's hash. The relay cannot check the certificate against a mesh it
was told about (it is told about none): it checks that the certificate is
signed by the mesh key it names, and files the node under that key's mesh ID.
Someone who makes their own mesh key only ever reaches their own mesh.

Forwarding: packets go by recipient node ID and only inside one mesh.
Overflow nodes (cloud) answer calls but never start them and never see the
directory. Every packet is checked for size and shape before it is forwarded,
rates are token buckets (per node and global), and the relay sets the sender
of every packet it delivers, so nobody can speak for another node.

Strangers: since anyone can make a mesh, the relay shares itself out by what
a stranger cannot make for free. Sessions are capped per source address (an
IPv4 address, or an IPv6 /64: one subscriber's usual allocation) counting
those still in their handshake, and per mesh; the cap is checked on what a
Hello claims before its signatures are checked, and again once they are. A
packet is charged to the rates only once its recipient is known, so packets
to nobody cost their sender alone (its refusals come back at a bounded rate).
An operator can also list the meshes its relay serves.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import urllib.parse
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION
from mesh.errors import BadSignature, InvalidRequest, MeshError, NotAMember
from mesh.trust.identity import Identity, node_id_from_public_key, verify_signature
from mesh.trust.membership import (
    MAX_CERT_BYTES,
    Revocations,
    Role,
    check_issuers,
    issuer_chain,
    mesh_id_from_public_key,
    read_cert,
    role_from_pb,
    verify_revocations,
)
from mesh.wire.codec import MAX_MESSAGE_BYTES
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb

HELLO_CONTEXT = b"allerac-relay-hello-v1\x00"
NONCE_BYTES = 32
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES  # a sealed request or answer frame fits
MAX_FRAME_BYTES = MAX_PACKET_BYTES + 64 * 1024  # the packet plus its envelope fields
MAX_NODE_ID_CHARS = 64
CALL_METHODS = frozenset({"Describe", "Ping", "Infer", "PushRevocations"})
MAX_TIMEOUT_S = 1800.0

Kind = rpb.PacketKind
CALLER_KINDS = frozenset({rpb.PACKET_KIND_CALL, rpb.PACKET_KIND_CANCEL})
CALLEE_KINDS = frozenset({rpb.PACKET_KIND_REPLY, rpb.PACKET_KIND_END})


def new_challenge(now_ms: int) -> rpb.RelayChallenge:
    return rpb.RelayChallenge(
        protocol_version=PROTOCOL_VERSION,
        nonce=os.urandom(NONCE_BYTES),
        relay_time_unix_ms=now_ms,
    )


def _hello_message(nonce: bytes, cert: bytes) -> bytes:
    return HELLO_CONTEXT + nonce + hashlib.sha256(cert).digest()


def sign_hello(
    challenge: rpb.RelayChallenge,
    *,
    identity: Identity,
    cert: tpb.SignedCert,
    revocations: tpb.SignedRevocations | None = None,
) -> rpb.RelayHello:
    """The node's answer to a relay's challenge."""
    if challenge.protocol_version != PROTOCOL_VERSION:
        raise InvalidRequest(
            f"the relay speaks protocol {challenge.protocol_version}, this node {PROTOCOL_VERSION}"
        )
    if len(challenge.nonce) != NONCE_BYTES:
        raise InvalidRequest("the relay sent a malformed challenge")
    hello = rpb.RelayHello(
        protocol_version=PROTOCOL_VERSION,
        membership=cert,
        signature=identity.sign(_hello_message(challenge.nonce, cert.cert)),
    )
    if revocations is not None:
        hello.revocations.CopyFrom(revocations)
    return hello


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionIdentity:
    """Who opened a relay session, as far as the relay can tell."""

    node_id: str
    mesh_id: str
    mesh_public_key: bytes
    role: Role
    expires_at_ms: int
    revocations: Revocations | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """Who a Hello says it is, before any signature is checked: enough to refuse it early
    (a mesh not served here, or one at its share), never enough to let it in."""

    node_id: str
    mesh_id: str


def _check_version(hello: rpb.RelayHello) -> None:
    if hello.protocol_version != PROTOCOL_VERSION:
        raise InvalidRequest(
            f"protocol version {hello.protocol_version} is not spoken here "
            f"(this relay speaks {PROTOCOL_VERSION})"
        )


def read_claim(hello: rpb.RelayHello) -> Claim:
    """Parse the Hello's certificate without checking it (a protobuf parse, no crypto)."""
    _check_version(hello)
    if len(hello.membership.cert) > MAX_CERT_BYTES or len(hello.membership.signature) != 64:
        raise BadSignature("membership certificate is malformed")
    cert = tpb.MembershipCert()
    try:
        cert.ParseFromString(hello.membership.cert)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("membership certificate does not parse") from exc
    if len(cert.mesh_public_key) != 32:
        raise BadSignature("membership certificate has malformed keys")
    return Claim(node_id=cert.node_id, mesh_id=mesh_id_from_public_key(cert.mesh_public_key))


def verify_hello(hello: rpb.RelayHello, *, nonce: bytes, now_ms: int) -> SessionIdentity:
    """Relay side: the Hello answers our nonce, by the key its certificate names, and the
    certificate is signed by the mesh key it names, current, for that very key."""
    _check_version(hello)
    cert, valid = read_cert(hello.membership)
    if not valid:
        raise BadSignature("membership certificate signature does not verify (forged?)")
    if node_id_from_public_key(cert.identity_public_key) != cert.node_id:
        raise BadSignature("membership certificate names a node ID that is not its key's")
    if now_ms >= cert.expires_at_unix_ms:
        raise NotAMember(f"membership of node {cert.node_id[:7]} has expired")
    if now_ms < cert.issued_at_unix_ms - 60_000:
        raise NotAMember(f"membership of node {cert.node_id[:7]} is not valid yet")
    if len(hello.signature) != 64 or not verify_signature(
        cert.identity_public_key, hello.signature, _hello_message(nonce, hello.membership.cert)
    ):
        raise BadSignature("the hello is not signed by the certificate's node (replayed?)")
    revocations = None
    if hello.HasField("revocations"):
        revocations = verify_revocations(hello.revocations, mesh_public_key=cert.mesh_public_key)
        if cert.node_id in revocations.revoked:
            raise NotAMember(f"node {cert.node_id[:7]} has been revoked from its mesh")
    check_issuers(
        issuer_chain(hello.membership),
        now_ms=now_ms,
        revoked=revocations.revoked if revocations is not None else frozenset(),
    )
    return SessionIdentity(
        node_id=cert.node_id,
        mesh_id=mesh_id_from_public_key(cert.mesh_public_key),
        mesh_public_key=cert.mesh_public_key,
        role=role_from_pb(cert.role),
        expires_at_ms=cert.expires_at_unix_ms,
        revocations=revocations,
    )


class Refused(MeshError):
    """A packet the relay will not forward; `reason` travels back in a RelayRefusal."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_packet(packet: rpb.RelayPacket, *, sender_role: Role) -> None:
    """Shape and role rules for a packet a node hands the relay (raises Refused)."""
    malformed = rpb.REFUSAL_REASON_MALFORMED
    if not packet.peer or len(packet.peer) > MAX_NODE_ID_CHARS:
        raise Refused(malformed, "a packet must name its recipient")
    if packet.kind not in CALLER_KINDS and packet.kind not in CALLEE_KINDS:
        raise Refused(malformed, f"unknown packet kind {packet.kind}")
    if len(packet.payload) > MAX_PACKET_BYTES:
        raise Refused(
            malformed, f"payload is {len(packet.payload)} bytes; the limit is {MAX_PACKET_BYTES}"
        )
    if packet.kind == rpb.PACKET_KIND_CALL and packet.method not in CALL_METHODS:
        raise Refused(malformed, f"unknown method {packet.method[:40]!r}")
    if sender_role is Role.OVERFLOW and packet.kind in CALLER_KINDS:
        raise Refused(
            rpb.REFUSAL_REASON_NOT_ALLOWED, "overflow nodes answer calls; they do not make them"
        )


def may_reach(sender_role: Role, recipient_role: Role) -> bool:
    """Inside one mesh: anyone reaches members; overflow nodes never reach each other."""
    return not (sender_role is Role.OVERFLOW and recipient_role is Role.OVERFLOW)


def sees_directory(role: Role) -> bool:
    """Overflow nodes serve what they are sent; they never learn who else is in the mesh."""
    return role is not Role.OVERFLOW


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `now_s` is injected."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, *, rate: float, burst: float, now_s: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now_s

    def take(self, amount: float, now_s: float) -> bool:
        elapsed = max(0.0, now_s - self._last)
        self._last = now_s
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if amount > self._tokens:
            return False
        self._tokens -= amount
        return True


MAX_ADDRESS_CHARS = 64
IPV6_SHARE_PREFIX = 64  # one subscriber's usual allocation (RFC 6177): one address's share


def source_address(peer: str) -> str:
    """Whose share a connection counts against, from gRPC's `context.peer()`:
    "ipv4:203.0.113.7:51234" -> "203.0.113.7"; "ipv6:[2001:db8:1:2::9]:443" (also
    percent-encoded) -> "2001:db8:1:2::/64"; an IPv4-mapped IPv6 address -> the IPv4 one.
    Anything else is one share ("unix", "unknown")."""
    scheme, _, rest = urllib.parse.unquote(peer[:200]).partition(":")
    if scheme == "unix":
        return "unix"
    host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_SHARE_PREFIX), strict=False)
        return str(network)[:MAX_ADDRESS_CHARS]
    return str(address)


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayLimits:
    """What one relay gives out. Anyone can make a mesh and open sessions in it, so the
    shares that matter against strangers are per source address and per mesh:

    - `max_sessions_per_address` 64: an office behind one NAT address rarely has more boxes
      than that on one relay, and it takes 157 addresses to fill `max_sessions`.
    - `max_sessions_per_mesh` 256: a mesh is one company's boxes and overflow nodes; the
      cap also bounds the directory every member is sent on each change (O(n^2) per mesh).
    - `node_refusals_per_s`: refusals sent back to one node; beyond it they are counted
      and dropped, so a node sending to nobody costs the relay no more than parsing.
    """

    max_sessions: int = 10_000
    max_sessions_per_address: int = 64
    max_sessions_per_mesh: int = 256
    node_packets_per_s: float = 2_000.0
    node_refusals_per_s: float = 200.0
    node_bytes_per_s: float = 32 * 1024 * 1024
    global_packets_per_s: float = 50_000.0
    queue_packets: int = 1024  # per recipient
    queue_bytes: int = 16 * 1024 * 1024  # per recipient
    global_queue_bytes: int = 256 * 1024 * 1024
    hello_timeout_s: float = 5.0
