"""More than one admin (issue 17, item 4), sans I/O: an admin the mesh key delegated to
signs certificates and revocation lists with its own key; every member checks the chain
up to the mesh key, and a revoked or expired admin's signatures stop counting."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import (
    BadSignature,
    InvalidRequest,
    InviteError,
    MeshError,
    NotAMember,
    PermissionDenied,
)
from mesh.trust.identity import Identity
from mesh.trust.membership import (
    ADMIN_CERT_TTL_MS,
    DAY_MS,
    MAX_ADMIN_CHAIN,
    MEMBER_CERT_TTL_MS,
    MeshAuthority,
    Role,
    issuer_chain,
    read_cert,
    supersedes,
    verify_cert,
    verify_revocations,
)
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.home import Home
from node.store.trust_store import TrustStore

NOW = 1_800_000_000_000
ROOT = MeshAuthority.generate()
MESH = ROOT.public_key


def delegate(parent: MeshAuthority, *, ttl_ms: int = ADMIN_CERT_TTL_MS) -> MeshAuthority:
    """A new node made an admin by `parent`."""
    node = Identity.generate()
    cert = parent.issue(node.public_key_raw, role=Role.ADMIN, now_ms=NOW, ttl_ms=ttl_ms)
    return MeshAuthority.delegated(node, cert)


def member_cert(issuer: MeshAuthority, role: Role = Role.MEMBER) -> tpb.SignedCert:
    return issuer.issue(
        Identity.generate().public_key_raw, role=role, now_ms=NOW, ttl_ms=MEMBER_CERT_TTL_MS
    )


def test_a_delegated_admins_certificates_verify_everywhere() -> None:
    second = delegate(ROOT)
    third = delegate(second)
    for issuer, depth in ((ROOT, 0), (second, 1), (third, 2)):
        cert = member_cert(issuer)
        assert len(issuer_chain(cert)) == depth
        membership = verify_cert(cert, mesh_public_key=MESH, now_ms=NOW + 1)
        assert membership.role is Role.MEMBER
        assert membership.mesh_public_key == MESH
    assert second.mesh_id == ROOT.mesh_id
    assert not second.holds_mesh_key
    with pytest.raises(PermissionDenied):
        second.key  # noqa: B018 - the mesh key is never copied


def test_only_an_admin_of_this_mesh_can_delegate() -> None:
    # A member (not an admin) signs a certificate and shows its own member cert as issuer.
    member = Identity.generate()
    as_issuer = MeshAuthority.delegated(member, member_cert_for(member, Role.MEMBER))
    forged = member_cert(as_issuer)
    assert read_cert(forged)[1] is False
    with pytest.raises(BadSignature):
        verify_cert(forged, mesh_public_key=MESH, now_ms=NOW + 1)
    # An admin of another mesh.
    other = delegate(MeshAuthority.generate())
    with pytest.raises(NotAMember):  # it names the other mesh
        verify_cert(member_cert(other), mesh_public_key=MESH, now_ms=NOW + 1)
    # A certificate claiming our mesh, signed by the other mesh's admin.
    cert = tpb.MembershipCert()
    claimed = member_cert(other)
    cert.ParseFromString(claimed.cert)
    cert.mesh_public_key = MESH
    data = cert.SerializeToString(deterministic=True)
    spliced = tpb.SignedCert(cert=data, signature=claimed.signature, issuer=claimed.issuer)
    with pytest.raises(BadSignature):
        verify_cert(spliced, mesh_public_key=MESH, now_ms=NOW + 1)


def member_cert_for(node: Identity, role: Role) -> tpb.SignedCert:
    return ROOT.issue(node.public_key_raw, role=role, now_ms=NOW, ttl_ms=MEMBER_CERT_TTL_MS)


def test_a_revoked_or_expired_admins_certificates_stop_counting() -> None:
    second = delegate(ROOT)
    third = delegate(second)
    made_by_third = member_cert(third)
    chain = issuer_chain(made_by_third)  # nearest first: third's admin cert, then second's
    assert [c.role for c in chain] == [tpb.ROLE_ADMIN, tpb.ROLE_ADMIN]
    second_node = chain[1].node_id
    with pytest.raises(NotAMember, match="revoked"):  # revoking `second` ends its whole branch
        verify_cert(
            made_by_third, mesh_public_key=MESH, now_ms=NOW + 1, revoked=frozenset({second_node})
        )
    short = delegate(ROOT, ttl_ms=DAY_MS)
    cert = member_cert(short)
    verify_cert(cert, mesh_public_key=MESH, now_ms=NOW + 1)
    with pytest.raises(NotAMember, match="expired"):
        verify_cert(cert, mesh_public_key=MESH, now_ms=NOW + 2 * DAY_MS)


def test_delegation_chains_are_bounded() -> None:
    admin = ROOT
    for _ in range(MAX_ADMIN_CHAIN):
        admin = delegate(admin)
    with pytest.raises(InvalidRequest, match="delegations"):
        admin.issue(Identity.generate().public_key_raw, role=Role.ADMIN, now_ms=NOW, ttl_ms=1)
    verify_cert(member_cert(admin), mesh_public_key=MESH, now_ms=NOW + 1)  # members: fine
    # A hand-made chain one deeper is refused when read.
    deeper = member_cert(admin)
    outer = tpb.SignedCert(cert=deeper.cert, signature=deeper.signature)
    outer.issuer.CopyFrom(deeper)
    with pytest.raises(BadSignature, match="delegations"):
        read_cert(outer)


def test_revocation_lists_from_a_delegated_admin() -> None:
    second = delegate(ROOT)
    second_id = read_cert(second._admin_cert)[0].node_id  # type: ignore[arg-type]
    victim = Identity.generate().node_id
    first = verify_revocations(
        ROOT.revocations(version=1, revoked=[victim], now_ms=NOW), mesh_public_key=MESH
    )
    newer = verify_revocations(
        second.revocations(version=2, revoked=[victim, Identity.generate().node_id], now_ms=NOW),
        mesh_public_key=MESH,
    )
    assert newer.issuers == {second_id}
    assert supersedes(newer, first)
    assert not supersedes(first, newer)
    dropping = verify_revocations(
        second.revocations(version=3, revoked=[], now_ms=NOW), mesh_public_key=MESH
    )
    with pytest.raises(BadSignature, match="drops"):  # a revocation is for good
        supersedes(dropping, first)
    # An admin revoked by the list held cannot sign the next one (it would un-revoke itself).
    revoking_second = verify_revocations(
        ROOT.revocations(version=5, revoked=[second_id], now_ms=NOW), mesh_public_key=MESH
    )
    with pytest.raises(BadSignature, match="admin it revokes"):
        verify_revocations(
            second.revocations(version=6, revoked=[second_id], now_ms=NOW), mesh_public_key=MESH
        )
    later = verify_revocations(
        second.revocations(version=6, revoked=[victim], now_ms=NOW), mesh_public_key=MESH
    )
    with pytest.raises(BadSignature):
        supersedes(later, revoking_second)
    # A member's signature with a member cert as issuer is no admin's.
    member = Identity.generate()
    fake = MeshAuthority.delegated(member, member_cert_for(member, Role.MEMBER))
    with pytest.raises(BadSignature):
        verify_revocations(
            fake.revocations(version=9, revoked=[], now_ms=NOW), mesh_public_key=MESH
        )


def store(tmp_path: Path, name: str) -> TrustStore:
    home = Home.resolve(tmp_path / name)
    home.ensure()
    identity = Identity.generate()
    return TrustStore.open(home, identity, now=NOW)


def joined(admin: TrustStore, node: TrustStore, role: Role = Role.MEMBER) -> None:
    """`node` becomes a member of `admin`'s mesh (what an invite does)."""
    assert admin.authority is not None
    cert = admin.authority.issue(
        node.identity.public_key_raw, role=role, now_ms=NOW, ttl_ms=MEMBER_CERT_TTL_MS
    )
    from mesh.wire.v1 import trust_pb2

    node.adopt(trust_pb2.JoinResponse(cert=cert), mesh_public_key=admin.mesh_public_key, now=NOW)


def test_a_granted_admin_invites_and_revokes_and_survives_a_restart(tmp_path: Path) -> None:
    first, second, member = (store(tmp_path, n) for n in ("first", "second", "member"))
    joined(first, second)
    joined(first, member)
    assert second.membership is not None
    with pytest.raises(PermissionDenied):  # a member cannot make admins
        second.grant_admin(first.membership, addresses=[], now=NOW)  # type: ignore[arg-type]
    grant = first.grant_admin(second.membership, addresses=["127.0.0.1:1"], now=NOW)
    with pytest.raises(PermissionDenied):  # granted by a non-admin: refused
        second.accept_admin(grant, granted_by=member.membership, now=NOW)  # type: ignore[arg-type]
    second.accept_admin(grant, granted_by=first.membership, now=NOW)  # type: ignore[arg-type]
    assert second.role is Role.ADMIN
    assert first.identity.node_id in second.members  # it knows where the first admin is
    # The second admin's invitees and revocations count at every member.
    newcomer = store(tmp_path, "newcomer")
    joined(second, newcomer)
    assert newcomer.mesh_id == first.mesh_id
    signed = second.revoke(member.identity.node_id, now=NOW + 5)
    assert newcomer.apply_revocations(signed)
    assert member.identity.node_id in newcomer.revoked
    with pytest.raises(NotAMember):
        verify_cert(
            member.cert,
            mesh_public_key=first.mesh_public_key,
            now_ms=NOW + 6,
            revoked=newcomer.revoked,
        )
    # Restarted, it is still an admin (its certificate says so; there is no mesh key).
    again = TrustStore.open(second.home, second.identity, now=NOW + 10)
    assert again.authority is not None
    assert not again.authority.holds_mesh_key
    assert not (second.home.mesh_dir / "mesh.key").exists()
    # It can revoke the first admin's node (its box is gone) but not an admin in its chain.
    again.revoke(first.identity.node_id, now=NOW + 20)
    third = store(tmp_path, "third")
    joined(again, third)
    third.accept_admin(
        again.grant_admin(third.membership, addresses=[], now=NOW + 30),  # type: ignore[arg-type]
        granted_by=again.membership,  # type: ignore[arg-type]
        now=NOW + 30,
    )
    with pytest.raises(InviteError, match="made this node an admin"):
        third.revoke(again.identity.node_id, now=NOW + 40)


def test_two_admins_revoking_at_once_converge(tmp_path: Path) -> None:
    first, second, x, y = (store(tmp_path, n) for n in ("first", "second", "x", "y"))
    for node in (second, x, y):
        joined(first, node)
    second.accept_admin(
        first.grant_admin(second.membership, addresses=[], now=NOW),  # type: ignore[arg-type]
        granted_by=first.membership,  # type: ignore[arg-type]
        now=NOW,
    )
    from_first = first.revoke(x.identity.node_id, now=NOW + 1)  # both v1, different
    from_second = second.revoke(y.identity.node_id, now=NOW + 1)
    assert second.apply_revocations(from_first)  # merged into v2, holding both
    assert second.revoked == {x.identity.node_id, y.identity.node_id}
    assert second.revocations_version == 2
    assert first.apply_revocations(second.revocations.signed)  # type: ignore[union-attr]
    assert first.revoked == second.revoked
    assert not first.apply_revocations(from_second)  # nothing new


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_reading_any_certificate_bytes_verifies_or_refuses(data: bytes) -> None:
    try:
        signed = tpb.SignedCert.FromString(data)
    except DecodeError:
        return
    try:
        _cert, valid = read_cert(signed)
    except MeshError:
        return
    assert not valid  # random bytes never carry a valid signature


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0))
def test_a_damaged_delegated_certificate_never_verifies(cut: int, flip: int) -> None:
    raw = bytearray(member_cert(SECOND).SerializeToString())
    raw[flip % len(raw)] ^= 0x01
    try:
        signed = tpb.SignedCert.FromString(bytes(raw[: max(cut, len(raw) // 2)]))
        verify_cert(signed, mesh_public_key=MESH, now_ms=NOW + 1)
    except (MeshError, DecodeError):
        return
    raise AssertionError("a damaged certificate verified")


SECOND = delegate(ROOT)
