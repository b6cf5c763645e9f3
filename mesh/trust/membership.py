"""Mesh membership: the mesh key, membership certificates and revocation lists.

A mesh is an Ed25519 key held by its first admin node; its ID is derived from the
public key exactly like a node ID. A membership certificate is the mesh key's
signature over (mesh key, node ID, identity key, role, validity); a revocation
list is the mesh key's signature over a version number and the revoked node
IDs (a higher version replaces a lower one, and must hold every node the lower one
revoked: a revocation is for good). Everything here is bytes and `now_ms` in,
values or `MeshError` out.

More admins (protocol 4): the mesh key (or an admin) signs an admin certificate for
another node; that node then signs certificates and revocation lists with its own
identity key and attaches its admin certificate as `issuer`. Every member checks the
chain up to the mesh key (at most `MAX_ADMIN_CHAIN` delegations), that each issuer is an
admin of this mesh and current, and that none is revoked: revoking an admin ends the
certificates and lists it signed. The mesh key itself is never copied, so which admin
made each member, and each revocation, stays on record in what it signed.

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

from mesh.errors import BadSignature, InvalidRequest, NotAMember, PermissionDenied
from mesh.trust.identity import Identity, node_id_from_public_key, parse_node_id, verify_signature
from mesh.wire.v1 import trust_pb2 as tpb

CERT_CONTEXT = b"allerac-mesh/v1/membership-cert\x00"
REVOCATIONS_CONTEXT = b"allerac-mesh/v1/revocations\x00"
MAX_CERT_BYTES = 1024
MAX_ADMIN_CHAIN = 4  # delegations between the mesh key and a certificate
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
    """The admin side: issues certificates and revocation lists, signed by the mesh key
    (the mesh's first admin) or, for a delegated admin, by its identity key with its admin
    certificate attached (`delegated`)."""

    def __init__(self, key: Identity, *, admin_cert: tpb.SignedCert | None = None) -> None:
        self._key = key
        self._admin_cert = admin_cert
        if admin_cert is None:
            self._mesh_public_key = key.public_key_raw
        else:
            cert, _ = read_cert(admin_cert)
            self._mesh_public_key = cert.mesh_public_key

    @classmethod
    def generate(cls) -> MeshAuthority:
        return cls(Identity.generate())

    @classmethod
    def delegated(cls, identity: Identity, admin_cert: tpb.SignedCert) -> MeshAuthority:
        """An admin that holds no mesh key: it signs with `identity`, whose admin
        certificate `admin_cert` is."""
        return cls(identity, admin_cert=admin_cert)

    @property
    def key(self) -> Identity:
        """The mesh key (only on the admin that holds it)."""
        if self._admin_cert is not None:
            raise PermissionDenied("a delegated admin holds no mesh key")
        return self._key

    @property
    def holds_mesh_key(self) -> bool:
        return self._admin_cert is None

    @property
    def public_key(self) -> bytes:
        """The mesh's public key."""
        return self._mesh_public_key

    @property
    def mesh_id(self) -> str:
        return mesh_id_from_public_key(self.public_key)

    def _issuer(self, signed: tpb.SignedCert | tpb.SignedRevocations) -> None:
        if self._admin_cert is not None:
            signed.issuer.CopyFrom(self._admin_cert)

    def issue(
        self, identity_public_key: bytes, *, role: Role, now_ms: int, ttl_ms: int
    ) -> tpb.SignedCert:
        if role is Role.ADMIN and self._admin_cert is not None:
            depth = len(issuer_chain(self._admin_cert)) + 1  # this admin's own delegation
            if depth + 1 > MAX_ADMIN_CHAIN:
                raise InvalidRequest(
                    f"this admin is {depth} delegations from the mesh key; an admin it made "
                    f"would be more than {MAX_ADMIN_CHAIN}: add admins from an admin nearer "
                    "the mesh key"
                )
        cert = tpb.MembershipCert(
            mesh_public_key=self.public_key,
            node_id=node_id_from_public_key(identity_public_key),
            identity_public_key=identity_public_key,
            role=role_to_pb(role),
            issued_at_unix_ms=now_ms,
            expires_at_unix_ms=now_ms + ttl_ms,
        )
        data = cert.SerializeToString(deterministic=True)
        signed = tpb.SignedCert(cert=data, signature=self._key.sign(CERT_CONTEXT + data))
        self._issuer(signed)
        return signed

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
        signed = tpb.SignedRevocations(
            revocations=data, signature=self._key.sign(REVOCATIONS_CONTEXT + data)
        )
        self._issuer(signed)
        return signed


def issuer_chain(signed: tpb.SignedCert) -> list[tpb.MembershipCert]:
    """The admin certificates between `signed` and the mesh key, nearest first (empty when
    the mesh key signed it). Parsed only: `read_cert` checks the signatures."""
    chain: list[tpb.MembershipCert] = []
    current = signed
    while current.HasField("issuer"):
        current = current.issuer
        if len(chain) >= MAX_ADMIN_CHAIN:
            raise BadSignature(f"more than {MAX_ADMIN_CHAIN} admin delegations in a certificate")
        chain.append(_parse_cert(current))
    return chain


def _parse_cert(signed: tpb.SignedCert) -> tpb.MembershipCert:
    if len(signed.cert) > MAX_CERT_BYTES or len(signed.signature) != 64:
        raise BadSignature("membership certificate is malformed")
    cert = tpb.MembershipCert()
    try:
        cert.ParseFromString(signed.cert)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("membership certificate does not parse") from exc
    if len(cert.mesh_public_key) != 32 or len(cert.identity_public_key) != 32:
        raise BadSignature("membership certificate has malformed keys")
    return cert


def _issued_by(
    signed: tpb.SignedCert | tpb.SignedRevocations, data: bytes, mesh_public_key: bytes
) -> bool:
    """Whether the mesh key signed `data` (`signed.signature`), or an admin whose chain of
    certificates leads to it. Revocation and expiry of the admins: `check_issuers`."""
    if not signed.HasField("issuer"):
        return _signature_valid(mesh_public_key, signed.signature, data)
    issuer = signed.issuer
    issuer_cert, issuer_valid = read_cert(issuer)
    return (
        issuer_valid
        and issuer_cert.mesh_public_key == mesh_public_key
        and issuer_cert.role == tpb.ROLE_ADMIN
        and node_id_from_public_key(issuer_cert.identity_public_key) == issuer_cert.node_id
        and _signature_valid(issuer_cert.identity_public_key, signed.signature, data)
    )


def check_issuers(
    chain: list[tpb.MembershipCert], *, now_ms: int | None, revoked: frozenset[str]
) -> None:
    """Every admin that vouched for a certificate or list must be current and unrevoked."""
    for admin in chain:
        if admin.node_id in revoked:
            raise NotAMember(
                f"admin {admin.node_id[:7]} has been revoked: what it signed no longer counts"
            )
        if now_ms is not None and now_ms >= admin.expires_at_unix_ms:
            raise NotAMember(f"the admin certificate of {admin.node_id[:7]} has expired")


def read_cert(signed: tpb.SignedCert) -> tuple[tpb.MembershipCert, bool]:
    """Parse a certificate and check its signature: by the mesh key it names, or by an
    admin whose certificates lead to that key (`issuer`)."""
    cert = _parse_cert(signed)
    issuer_chain(signed)  # bounded before anything is checked
    valid = _issued_by(signed, CERT_CONTEXT + signed.cert, cert.mesh_public_key)
    return cert, valid


@functools.lru_cache(maxsize=CHECKED_CERTS)
def _signature_valid(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `public_key` signed these exact bytes: a fact about bytes that never
    changes, so it is worked out once per certificate (the mesh, the expiry and the
    revocations are checked at every use)."""
    return verify_signature(public_key, signature, data)


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
    check_issuers(issuer_chain(signed), now_ms=now_ms, revoked=revoked)
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
    # The admins that signed it (empty: the mesh key).
    issuers: frozenset[str] = frozenset()


def verify_revocations(signed: tpb.SignedRevocations, *, mesh_public_key: bytes) -> Revocations:
    """A list signed by the mesh key or by an admin of this mesh that the list itself does
    not revoke (whether the list may replace the one held: `supersedes`)."""
    if len(signed.revocations) > MAX_REVOCATIONS_BYTES or len(signed.signature) != 64:
        raise BadSignature("revocation list is malformed")
    body = tpb.RevocationList()
    try:
        body.ParseFromString(signed.revocations)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("revocation list does not parse") from exc
    if body.mesh_public_key != mesh_public_key:
        raise BadSignature("revocation list is for another mesh")
    admins = (
        [_parse_cert(signed.issuer), *issuer_chain(signed.issuer)]
        if signed.HasField("issuer")
        else []
    )
    if len(admins) > MAX_ADMIN_CHAIN:
        raise BadSignature(f"more than {MAX_ADMIN_CHAIN} admin delegations in a list")
    if not _issued_by(signed, REVOCATIONS_CONTEXT + signed.revocations, mesh_public_key):
        raise BadSignature("revocation list signature does not verify")
    if len(body.revoked_node_ids) > MAX_REVOKED:
        raise BadSignature("revocation list is too long")
    revoked = frozenset(body.revoked_node_ids)
    try:
        check_issuers(admins, now_ms=None, revoked=revoked)
    except NotAMember as exc:
        raise BadSignature("revocation list is signed by an admin it revokes") from exc
    return Revocations(
        version=body.version,
        revoked=revoked,
        signed=signed,
        revoked_at={
            node_id: body.revoked_at_unix_ms.get(node_id, body.issued_at_unix_ms)
            for node_id in revoked
        },
        issuers=frozenset(admin.node_id for admin in admins),
    )


def supersedes(new: Revocations, held: Revocations | None) -> bool:
    """Whether `new` replaces the list `held`: a higher version that still revokes every
    node `held` revoked (a revocation is for good), signed by no admin `held` revoked."""
    if held is None:
        return True
    if new.version <= held.version:
        return False
    if not held.revoked <= new.revoked:
        raise BadSignature(
            f"revocation list v{new.version} drops nodes v{held.version} revoked; refused"
        )
    if new.issuers & held.revoked:
        raise BadSignature(f"revocation list v{new.version} is signed by a revoked admin")
    return True
