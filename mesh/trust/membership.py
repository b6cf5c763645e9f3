"""Mesh membership: the mesh key, membership certificates and revocation lists.

A mesh is an Ed25519 key held by its admin node(s); its ID is derived from the
public key exactly like a node ID. A membership certificate is the mesh key's
signature over (mesh key, node ID, identity key, role, validity); a revocation
list is the mesh key's signature over a version number and the revoked node
IDs (a higher version replaces a lower one). Everything here is bytes and
`now_ms` in, values or `MeshError` out.

Signatures are made over `CONTEXT || bytes` with a context string per kind of
object, so a certificate signature can never pass for a revocation list or an
envelope signature (cross-protocol replay).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from mesh.errors import BadSignature, InvalidRequest, NotAMember
from mesh.trust.identity import Identity, node_id_from_public_key, parse_node_id, verify_signature
from mesh.wire.v1 import trust_pb2 as tpb

CERT_CONTEXT = b"allerac-mesh/v1/membership-cert\x00"
REVOCATIONS_CONTEXT = b"allerac-mesh/v1/revocations\x00"
MAX_CERT_BYTES = 1024
MAX_REVOCATIONS_BYTES = 1024 * 1024
MAX_REVOKED = 10_000
DAY_MS = 24 * 3600 * 1000
MEMBER_CERT_TTL_MS = 365 * DAY_MS
ADMIN_CERT_TTL_MS = 10 * 365 * DAY_MS
# Certificates whose signature was checked, remembered: every sealed request carries its
# sender's, and a member sends the same one thousands of times.
CHECKED_CERTS = 1024


class Role(enum.StrEnum):
    MEMBER = "member"
    OVERFLOW = "overflow"
    ADMIN = "admin"


_ROLE_TO_PB = {
    Role.MEMBER: tpb.ROLE_MEMBER,
    Role.OVERFLOW: tpb.ROLE_OVERFLOW,
    Role.ADMIN: tpb.ROLE_ADMIN,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}


def role_to_pb(role: Role) -> tpb.Role:
    return _ROLE_TO_PB[role]


def role_from_pb(value: int) -> Role:
    for pb_value, role in _ROLE_FROM_PB.items():
        if pb_value == value:
            return role
    raise BadSignature(f"unknown membership role {value}")


def mesh_id_from_public_key(public_key_raw: bytes) -> str:
    return node_id_from_public_key(public_key_raw)


@dataclass(frozen=True, kw_only=True, slots=True)
class Membership:
    """A verified certificate."""

    mesh_public_key: bytes
    node_id: str
    identity_public_key: bytes
    role: Role
    issued_at_ms: int
    expires_at_ms: int

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_public_key(self.mesh_public_key)


class MeshAuthority:
    """The admin side: holds the mesh key, issues certificates and revocation lists."""

    def __init__(self, key: Identity) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> MeshAuthority:
        return cls(Identity.generate())

    @property
    def key(self) -> Identity:
        return self._key

    @property
    def public_key(self) -> bytes:
        return self._key.public_key_raw

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_public_key(self.public_key)

    def issue(
        self, identity_public_key: bytes, *, role: Role, now_ms: int, ttl_ms: int
    ) -> tpb.SignedCert:
        cert = tpb.MembershipCert(
            mesh_public_key=self.public_key,
            node_id=node_id_from_public_key(identity_public_key),
            identity_public_key=identity_public_key,
            role=role_to_pb(role),
            issued_at_unix_ms=now_ms,
            expires_at_unix_ms=now_ms + ttl_ms,
        )
        data = cert.SerializeToString(deterministic=True)
        return tpb.SignedCert(cert=data, signature=self._key.sign(CERT_CONTEXT + data))

    def revocations(
        self,
        *,
        version: int,
        revoked: Iterable[str],
        now_ms: int,
        revoked_at: Mapping[str, int] | None = None,
    ) -> tpb.SignedRevocations:
        """A signed list of every revoked node; `revoked_at` keeps the times of the nodes
        revoked earlier, and a node new to the list is revoked at `now_ms`."""
        ids = sorted({parse_node_id(node_id) for node_id in revoked})
        if len(ids) > MAX_REVOKED:
            raise InvalidRequest(f"at most {MAX_REVOKED} revoked nodes per list")
        earlier = revoked_at or {}
        body = tpb.RevocationList(
            mesh_public_key=self.public_key,
            version=version,
            revoked_node_ids=ids,
            issued_at_unix_ms=now_ms,
            revoked_at_unix_ms={node_id: earlier.get(node_id, now_ms) for node_id in ids},
        )
        data = body.SerializeToString(deterministic=True)
        return tpb.SignedRevocations(
            revocations=data, signature=self._key.sign(REVOCATIONS_CONTEXT + data)
        )


def read_cert(signed: tpb.SignedCert) -> tuple[tpb.MembershipCert, bool]:
    """Parse a certificate and check its own signature (against the key it names)."""
    if len(signed.cert) > MAX_CERT_BYTES or len(signed.signature) != 64:
        raise BadSignature("membership certificate is malformed")
    cert = tpb.MembershipCert()
    try:
        cert.ParseFromString(signed.cert)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("membership certificate does not parse") from exc
    if len(cert.mesh_public_key) != 32 or len(cert.identity_public_key) != 32:
        raise BadSignature("membership certificate has malformed keys")
    valid = _cert_signature_valid(cert.mesh_public_key, signed.signature, signed.cert)
    return cert, valid


@functools.lru_cache(maxsize=CHECKED_CERTS)
def _cert_signature_valid(mesh_public_key: bytes, signature: bytes, cert: bytes) -> bool:
    """Whether the mesh key signed these exact certificate bytes: a fact about bytes that
    never changes, so it is worked out once per certificate (the mesh, the expiry and the
    revocations are checked at every use)."""
    return verify_signature(mesh_public_key, signature, CERT_CONTEXT + cert)


def verify_cert(
    signed: tpb.SignedCert,
    *,
    mesh_public_key: bytes,
    now_ms: int,
    revoked: frozenset[str] = frozenset(),
) -> Membership:
    """A certificate of *our* mesh, signed by its key, current and not revoked."""
    cert, valid = read_cert(signed)
    if cert.mesh_public_key != mesh_public_key:
        raise NotAMember(
            f"node {cert.node_id[:7]} belongs to mesh "
            f"{mesh_id_from_public_key(cert.mesh_public_key)[:7]}, not to this mesh"
        )
    if not valid:
        raise BadSignature("membership certificate signature does not verify (forged?)")
    if node_id_from_public_key(cert.identity_public_key) != cert.node_id:
        raise BadSignature("membership certificate names a node ID that is not its key's")
    role = role_from_pb(cert.role)
    if now_ms >= cert.expires_at_unix_ms:
        raise NotAMember(f"membership of node {cert.node_id[:7]} has expired")
    if now_ms < cert.issued_at_unix_ms - 60_000:
        raise NotAMember(f"membership of node {cert.node_id[:7]} is not valid yet")
    if cert.node_id in revoked:
        raise NotAMember(f"node {cert.node_id[:7]} has been revoked from this mesh")
    return Membership(
        mesh_public_key=cert.mesh_public_key,
        node_id=cert.node_id,
        identity_public_key=cert.identity_public_key,
        role=role,
        issued_at_ms=cert.issued_at_unix_ms,
        expires_at_ms=cert.expires_at_unix_ms,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Revocations:
    version: int
    revoked: frozenset[str]
    signed: tpb.SignedRevocations
    # When each node was revoked (a list from before these times says: when it was issued).
    revoked_at: Mapping[str, int] = field(default_factory=dict)


def verify_revocations(signed: tpb.SignedRevocations, *, mesh_public_key: bytes) -> Revocations:
    if len(signed.revocations) > MAX_REVOCATIONS_BYTES or len(signed.signature) != 64:
        raise BadSignature("revocation list is malformed")
    body = tpb.RevocationList()
    try:
        body.ParseFromString(signed.revocations)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("revocation list does not parse") from exc
    if body.mesh_public_key != mesh_public_key:
        raise BadSignature("revocation list is for another mesh")
    if not verify_signature(
        mesh_public_key, signed.signature, REVOCATIONS_CONTEXT + signed.revocations
    ):
        raise BadSignature("revocation list signature does not verify")
    if len(body.revoked_node_ids) > MAX_REVOKED:
        raise BadSignature("revocation list is too long")
    revoked = frozenset(body.revoked_node_ids)
    return Revocations(
        version=body.version,
        revoked=revoked,
        signed=signed,
        revoked_at={
            node_id: body.revoked_at_unix_ms.get(node_id, body.issued_at_unix_ms)
            for node_id in revoked
        },
    )
