"""Membership certificates and revocation lists (DESIGN.md "Identity and membership")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import BadSignature, InvalidRequest, MeshError, NotAMember
from mesh.trust.identity import Identity
from mesh.trust.membership import (
    CERT_CONTEXT,
    DAY_MS,
    REVOCATIONS_CONTEXT,
    Membership,
    MeshAuthority,
    Revocations,
    Role,
    mesh_id_from_public_key,
    role_from_pb,
    role_to_pb,
    verify_cert,
    verify_revocations,
)
from mesh.wire.v1 import trust_pb2 as tpb

NOW = 1_700_000_000_000
TTL = 30 * DAY_MS

AUTHORITY = MeshAuthority.generate()
OTHER_AUTHORITY = MeshAuthority.generate()
NODE = Identity.generate()
CERT = AUTHORITY.issue(NODE.public_key_raw, role=Role.MEMBER, now_ms=NOW, ttl_ms=TTL)


def _verify(signed: tpb.SignedCert, **kwargs: object) -> Membership:
    options: dict[str, object] = {"mesh_public_key": AUTHORITY.public_key, "now_ms": NOW}
    options.update(kwargs)
    return verify_cert(signed, **options)  # type: ignore[arg-type]


def _flip(data: bytes, index: int, mask: int) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _signed_cert(cert: tpb.MembershipCert, key: Identity) -> tpb.SignedCert:
    data = cert.SerializeToString(deterministic=True)
    return tpb.SignedCert(cert=data, signature=key.sign(CERT_CONTEXT + data))


def _cert_body(signed: tpb.SignedCert = CERT) -> tpb.MembershipCert:
    cert = tpb.MembershipCert()
    cert.ParseFromString(signed.cert)
    return cert


# --- certificates -----------------------------------------------------------------------------


def test_issue_and_verify_round_trip() -> None:
    membership = _verify(CERT)
    assert membership.node_id == NODE.node_id
    assert membership.identity_public_key == NODE.public_key_raw
    assert membership.mesh_public_key == AUTHORITY.public_key
    assert membership.mesh_id == AUTHORITY.mesh_id
    assert membership.mesh_id == mesh_id_from_public_key(AUTHORITY.public_key)
    assert membership.role is Role.MEMBER
    assert membership.issued_at_ms == NOW
    assert membership.expires_at_ms == NOW + TTL


def test_cert_survives_the_wire() -> None:
    wire = CERT.SerializeToString()
    again = tpb.SignedCert()
    again.ParseFromString(wire)
    assert _verify(again).node_id == NODE.node_id


@pytest.mark.parametrize("role", list(Role))
def test_every_role_round_trips(role: Role) -> None:
    signed = AUTHORITY.issue(NODE.public_key_raw, role=role, now_ms=NOW, ttl_ms=TTL)
    assert _verify(signed).role is role
    assert role_from_pb(role_to_pb(role)) is role


def test_unknown_role_is_rejected_even_when_signed() -> None:
    cert = _cert_body()
    cert.role = tpb.ROLE_UNSPECIFIED
    with pytest.raises(BadSignature):
        _verify(_signed_cert(cert, AUTHORITY.key))
    cert.role = 99  # type: ignore[assignment]
    with pytest.raises(BadSignature):
        _verify(_signed_cert(cert, AUTHORITY.key))


def test_cert_of_another_mesh_is_not_a_member() -> None:
    other = OTHER_AUTHORITY.issue(NODE.public_key_raw, role=Role.ADMIN, now_ms=NOW, ttl_ms=TTL)
    assert verify_cert(other, mesh_public_key=OTHER_AUTHORITY.public_key, now_ms=NOW)
    with pytest.raises(NotAMember, match="not to this mesh"):
        _verify(other)


def test_expired_cert_is_not_a_member() -> None:
    assert _verify(CERT, now_ms=NOW + TTL - 1)
    with pytest.raises(NotAMember, match="expired"):
        _verify(CERT, now_ms=NOW + TTL)
    with pytest.raises(NotAMember, match="expired"):
        _verify(CERT, now_ms=NOW + 10 * TTL)


def test_cert_not_yet_valid() -> None:
    assert _verify(CERT, now_ms=NOW - 60_000)  # a minute of clock skew is tolerated
    with pytest.raises(NotAMember, match="not valid yet"):
        _verify(CERT, now_ms=NOW - 60_001)
    with pytest.raises(NotAMember, match="not valid yet"):
        _verify(CERT, now_ms=NOW - DAY_MS)


def test_revoked_cert_is_not_a_member() -> None:
    other = Identity.generate().node_id
    assert _verify(CERT, revoked=frozenset({other}))
    with pytest.raises(NotAMember, match="revoked"):
        _verify(CERT, revoked=frozenset({other, NODE.node_id}))


def test_a_checked_certificate_is_remembered_by_its_signature_only() -> None:
    """Every sealed request carries its sender's certificate, so its signature is checked
    once; the signature is part of what is remembered, and the rest is checked each time."""
    assert _verify(CERT)
    with pytest.raises(BadSignature, match="forged"):
        _verify(tpb.SignedCert(cert=CERT.cert, signature=bytes(64)))
    with pytest.raises(NotAMember, match="revoked"):
        _verify(CERT, revoked=frozenset({NODE.node_id}))
    with pytest.raises(NotAMember, match="expired"):
        _verify(CERT, now_ms=NOW + TTL)
    with pytest.raises(NotAMember, match="not to this mesh"):
        _verify(CERT, mesh_public_key=OTHER_AUTHORITY.public_key)


def test_forged_cert_claiming_our_mesh_key_is_a_bad_signature() -> None:
    forger = Identity.generate()
    forged = _signed_cert(_cert_body(), forger)  # names our mesh key, signed by another key
    assert _cert_body(forged).mesh_public_key == AUTHORITY.public_key
    with pytest.raises(BadSignature, match="forged"):
        _verify(forged)
    # A forger issuing itself an admin cert of our mesh fares no better.
    cert = _cert_body()
    cert.role = tpb.ROLE_ADMIN
    with pytest.raises(BadSignature):
        _verify(_signed_cert(cert, forger))


def test_cert_signature_is_not_valid_for_another_context() -> None:
    data = CERT.cert
    wrong = tpb.SignedCert(cert=data, signature=AUTHORITY.key.sign(REVOCATIONS_CONTEXT + data))
    with pytest.raises(BadSignature):
        _verify(wrong)
    bare = tpb.SignedCert(cert=data, signature=AUTHORITY.key.sign(data))
    with pytest.raises(BadSignature):
        _verify(bare)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_byte_of_the_signature_fails(mask: int) -> None:
    for index in range(len(CERT.signature)):
        tampered = tpb.SignedCert(cert=CERT.cert, signature=_flip(CERT.signature, index, mask))
        with pytest.raises(BadSignature):
            _verify(tampered)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_byte_of_the_cert_fails(mask: int) -> None:
    assert len(CERT.cert) > 100
    for index in range(len(CERT.cert)):
        tampered = tpb.SignedCert(cert=_flip(CERT.cert, index, mask), signature=CERT.signature)
        with pytest.raises((BadSignature, NotAMember)):
            _verify(tampered)


def test_truncated_or_padded_cert_and_signature_fail() -> None:
    for cut in range(len(CERT.cert)):
        with pytest.raises((BadSignature, NotAMember)):
            _verify(tpb.SignedCert(cert=CERT.cert[:cut], signature=CERT.signature))
    with pytest.raises(BadSignature):
        _verify(tpb.SignedCert(cert=CERT.cert + b"\x00", signature=CERT.signature))
    with pytest.raises(BadSignature):
        _verify(tpb.SignedCert(cert=CERT.cert, signature=CERT.signature[:63]))
    with pytest.raises(BadSignature):
        _verify(tpb.SignedCert(cert=CERT.cert, signature=CERT.signature + b"\x00"))
    with pytest.raises(BadSignature):
        _verify(tpb.SignedCert())


def test_node_id_not_matching_identity_key_is_a_bad_signature() -> None:
    cert = _cert_body()
    cert.node_id = Identity.generate().node_id
    with pytest.raises(BadSignature, match="node ID"):
        _verify(_signed_cert(cert, AUTHORITY.key))


def test_identity_key_swapped_under_same_node_id_is_a_bad_signature() -> None:
    cert = _cert_body()
    cert.identity_public_key = Identity.generate().public_key_raw
    with pytest.raises(BadSignature, match="node ID"):
        _verify(_signed_cert(cert, AUTHORITY.key))


def test_malformed_keys_in_a_cert_are_rejected() -> None:
    cert = _cert_body()
    cert.identity_public_key = b"\x01" * 31
    with pytest.raises(BadSignature, match="malformed keys"):
        _verify(_signed_cert(cert, AUTHORITY.key))
    cert = _cert_body()
    cert.mesh_public_key = b""
    with pytest.raises(BadSignature, match="malformed keys"):
        _verify(_signed_cert(cert, AUTHORITY.key))


def test_issue_rejects_a_malformed_identity_key() -> None:
    with pytest.raises(InvalidRequest):
        AUTHORITY.issue(b"\x00" * 31, role=Role.MEMBER, now_ms=NOW, ttl_ms=TTL)


# --- revocation lists -------------------------------------------------------------------------


def test_revocations_round_trip() -> None:
    ids = {Identity.generate().node_id for _ in range(3)}
    signed = AUTHORITY.revocations(version=7, revoked=[*ids, *ids], now_ms=NOW)
    wire = tpb.SignedRevocations()
    wire.ParseFromString(signed.SerializeToString())
    result = verify_revocations(wire, mesh_public_key=AUTHORITY.public_key)
    assert isinstance(result, Revocations)
    assert result.version == 7
    assert result.revoked == frozenset(ids)
    assert result.signed == signed
    with pytest.raises(NotAMember):
        _verify(
            CERT,
            revoked=verify_revocations(
                AUTHORITY.revocations(version=8, revoked=[NODE.node_id], now_ms=NOW),
                mesh_public_key=AUTHORITY.public_key,
            ).revoked,
        )


def test_revocations_accept_lowercase_ids_and_canonicalize() -> None:
    signed = AUTHORITY.revocations(version=1, revoked=[NODE.node_id.lower()], now_ms=NOW)
    result = verify_revocations(signed, mesh_public_key=AUTHORITY.public_key)
    assert result.revoked == frozenset({NODE.node_id})


def test_revocations_reject_malformed_node_ids_at_issue() -> None:
    with pytest.raises(InvalidRequest):
        AUTHORITY.revocations(version=1, revoked=["not-a-node-id"], now_ms=NOW)


def test_empty_revocation_list() -> None:
    signed = AUTHORITY.revocations(version=0, revoked=[], now_ms=NOW)
    result = verify_revocations(signed, mesh_public_key=AUTHORITY.public_key)
    assert result.version == 0
    assert result.revoked == frozenset()


def test_revocations_of_another_mesh_are_rejected() -> None:
    signed = OTHER_AUTHORITY.revocations(version=1, revoked=[NODE.node_id], now_ms=NOW)
    assert verify_revocations(signed, mesh_public_key=OTHER_AUTHORITY.public_key)
    with pytest.raises(BadSignature, match="another mesh"):
        verify_revocations(signed, mesh_public_key=AUTHORITY.public_key)


def test_revocations_naming_our_mesh_but_signed_by_another_key_are_rejected() -> None:
    body = tpb.RevocationList(
        mesh_public_key=AUTHORITY.public_key, version=99, revoked_node_ids=[NODE.node_id]
    )
    data = body.SerializeToString(deterministic=True)
    forged = tpb.SignedRevocations(
        revocations=data, signature=OTHER_AUTHORITY.key.sign(REVOCATIONS_CONTEXT + data)
    )
    with pytest.raises(BadSignature, match="does not verify"):
        verify_revocations(forged, mesh_public_key=AUTHORITY.public_key)


def test_cert_signature_does_not_pass_for_a_revocation_list() -> None:
    data = tpb.RevocationList(mesh_public_key=AUTHORITY.public_key, version=5).SerializeToString()
    crossed = tpb.SignedRevocations(
        revocations=data, signature=AUTHORITY.key.sign(CERT_CONTEXT + data)
    )
    with pytest.raises(BadSignature):
        verify_revocations(crossed, mesh_public_key=AUTHORITY.public_key)


def test_tampered_revocations_are_rejected() -> None:
    signed = AUTHORITY.revocations(
        version=3, revoked=[NODE.node_id, Identity.generate().node_id], now_ms=NOW
    )
    for index in range(len(signed.revocations)):
        tampered = tpb.SignedRevocations(
            revocations=_flip(signed.revocations, index, 0x01), signature=signed.signature
        )
        with pytest.raises(BadSignature):
            verify_revocations(tampered, mesh_public_key=AUTHORITY.public_key)
    for index in range(len(signed.signature)):
        tampered = tpb.SignedRevocations(
            revocations=signed.revocations, signature=_flip(signed.signature, index, 0x01)
        )
        with pytest.raises(BadSignature):
            verify_revocations(tampered, mesh_public_key=AUTHORITY.public_key)
    # Dropping a revoked node from the list (re-serialized, old signature) is caught too.
    body = tpb.RevocationList()
    body.ParseFromString(signed.revocations)
    del body.revoked_node_ids[0]
    shortened = tpb.SignedRevocations(
        revocations=body.SerializeToString(deterministic=True), signature=signed.signature
    )
    with pytest.raises(BadSignature):
        verify_revocations(shortened, mesh_public_key=AUTHORITY.public_key)


def test_revocation_versions_order_lists() -> None:
    old = verify_revocations(
        AUTHORITY.revocations(version=1, revoked=[NODE.node_id], now_ms=NOW),
        mesh_public_key=AUTHORITY.public_key,
    )
    new = verify_revocations(
        AUTHORITY.revocations(version=2, revoked=[], now_ms=NOW + 1),
        mesh_public_key=AUTHORITY.public_key,
    )
    big = verify_revocations(
        AUTHORITY.revocations(version=2**64 - 1, revoked=[], now_ms=NOW + 2),
        mesh_public_key=AUTHORITY.public_key,
    )
    latest = max([new, big, old], key=lambda r: r.version)
    assert latest is big
    assert old.version < new.version < big.version
    assert NODE.node_id in old.revoked
    assert NODE.node_id not in new.revoked


# --- arbitrary bytes ---------------------------------------------------------------------------

_GENUINE_CERT_BYTES = CERT.cert


@settings(max_examples=300, deadline=None)
@given(
    cert=st.binary(max_size=1100)
    | st.builds(
        lambda data, i, b: data[:i] + bytes([b]) + data[i + 1 :],
        st.just(_GENUINE_CERT_BYTES),
        st.integers(0, len(_GENUINE_CERT_BYTES) - 1),
        st.integers(0, 255),
    ),
    signature=st.binary(min_size=64, max_size=64) | st.binary(max_size=80),
    now_ms=st.integers(-(2**63), 2**63 - 1),
)
def test_verify_cert_on_arbitrary_bytes(cert: bytes, signature: bytes, now_ms: int) -> None:
    try:
        result = verify_cert(
            tpb.SignedCert(cert=cert, signature=signature),
            mesh_public_key=AUTHORITY.public_key,
            now_ms=now_ms,
        )
    except MeshError:
        return
    assert isinstance(result, Membership)


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=2048)
    | st.builds(
        lambda version, ids, extra: (
            tpb.RevocationList(
                mesh_public_key=AUTHORITY.public_key, version=version, revoked_node_ids=ids
            ).SerializeToString()
            + extra
        ),
        st.integers(0, 2**64 - 1),
        st.lists(st.text(max_size=70), max_size=5),
        st.binary(max_size=16),
    ),
    signature=st.binary(min_size=64, max_size=64) | st.binary(max_size=80),
    sign_it=st.booleans(),
)
def test_verify_revocations_on_arbitrary_bytes(
    body: bytes, signature: bytes, sign_it: bool
) -> None:
    if sign_it:  # a validly signed body of arbitrary bytes: exercises the parsing after the check
        signature = AUTHORITY.key.sign(REVOCATIONS_CONTEXT + body)
    try:
        result = verify_revocations(
            tpb.SignedRevocations(revocations=body, signature=signature),
            mesh_public_key=AUTHORITY.public_key,
        )
    except MeshError:
        return
    assert isinstance(result, Revocations)
    assert all(isinstance(node_id, str) for node_id in result.revoked)


@settings(max_examples=200, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {
            "node_id": st.text(max_size=70),
            "role": st.integers(-(2**31), 2**31 - 1),
            "issued_at_unix_ms": st.integers(-(2**63), 2**63 - 1),
            "expires_at_unix_ms": st.integers(-(2**63), 2**63 - 1),
            "identity_public_key": st.binary(min_size=32, max_size=32) | st.binary(max_size=40),
        }
    ),
    now_ms=st.integers(-(2**63), 2**63 - 1),
)
def test_verify_cert_on_arbitrary_fields_signed_by_the_mesh_key(
    fields: dict[str, object], now_ms: int
) -> None:
    cert = tpb.MembershipCert(mesh_public_key=AUTHORITY.public_key, **fields)  # type: ignore[arg-type]
    try:
        result = verify_cert(
            _signed_cert(cert, AUTHORITY.key), mesh_public_key=AUTHORITY.public_key, now_ms=now_ms
        )
    except MeshError:
        return
    assert isinstance(result, Membership)
    assert result.role in set(Role)
    assert result.issued_at_ms - 60_000 <= now_ms < result.expires_at_ms
