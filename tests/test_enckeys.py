"""Signed, rotating encryption keys (DESIGN.md "Identity and membership")."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import BadSignature, MeshError
from mesh.trust.enckeys import (
    GRACE_MS,
    HOUR_MS,
    KEYS_CONTEXT,
    MLKEM768_PUBLIC_BYTES,
    OVERLAP_MS,
    ROTATE_EVERY_MS,
    KeyPair,
    KeyRing,
    PeerKeys,
    hybrid_available,
    verify_encryption_keys,
)
from mesh.trust.identity import Identity
from mesh.trust.membership import CERT_CONTEXT
from mesh.wire.v1 import trust_pb2 as tpb

NOW = 1_700_000_000_000
LIFETIME = ROTATE_EVERY_MS + OVERLAP_MS
NODE = Identity.generate()
PAIR = KeyPair.generate(NODE, now_ms=NOW, lifetime_ms=LIFETIME, hybrid=True)


def _verify(signed: tpb.SignedEncryptionKeys, **kwargs: object) -> PeerKeys:
    options: dict[str, object] = {
        "identity_public_key": NODE.public_key_raw,
        "node_id": NODE.node_id,
        "now_ms": NOW,
    }
    options.update(kwargs)
    return verify_encryption_keys(signed, **options)  # type: ignore[arg-type]


def _body(signed: tpb.SignedEncryptionKeys) -> tpb.EncryptionKeys:
    body = tpb.EncryptionKeys()
    body.ParseFromString(signed.keys)
    return body


def _sign(body: tpb.EncryptionKeys, identity: Identity = NODE) -> tpb.SignedEncryptionKeys:
    data = body.SerializeToString(deterministic=True)
    return tpb.SignedEncryptionKeys(keys=data, signature=identity.sign(KEYS_CONTEXT + data))


def _x25519_raw(peer: PeerKeys) -> bytes:
    return peer.x25519.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_hybrid_is_available_here() -> None:
    assert hybrid_available()


def test_hybrid_keys_round_trip() -> None:
    peer = _verify(PAIR.signed)
    assert peer.node_id == NODE.node_id
    assert peer.key_id == PAIR.key_id
    assert len(PAIR.key_id) == 16
    assert peer.offers_hybrid
    assert peer.mlkem768 is not None
    assert PAIR.mlkem768 is not None
    assert peer.mlkem768.public_bytes_raw() == PAIR.mlkem768.public_key().public_bytes_raw()
    assert len(peer.mlkem768.public_bytes_raw()) == MLKEM768_PUBLIC_BYTES
    assert _x25519_raw(peer) == PAIR.x25519.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert peer.expires_at_ms == NOW + LIFETIME == PAIR.expires_at_ms
    assert PAIR.not_before_ms == NOW


def test_x25519_only_keys_round_trip() -> None:
    pair = KeyPair.generate(NODE, now_ms=NOW, lifetime_ms=LIFETIME, hybrid=False)
    assert pair.mlkem768 is None
    peer = _verify(pair.signed)
    assert not peer.offers_hybrid
    assert peer.mlkem768 is None
    assert peer.key_id == pair.key_id
    assert _body(pair.signed).mlkem768_public_key == b""


def test_from_private_rebuilds_the_same_signed_keys() -> None:
    assert PAIR.mlkem768 is not None
    again = KeyPair.from_private(
        NODE,
        key_id=PAIR.key_id,
        x25519_raw=PAIR.x25519.private_bytes_raw(),
        mlkem_seed=PAIR.mlkem768.private_bytes_raw(),
        not_before_ms=PAIR.not_before_ms,
        expires_at_ms=PAIR.expires_at_ms,
    )
    assert again.signed.keys == PAIR.signed.keys
    assert _verify(again.signed).key_id == PAIR.key_id


def test_stripping_the_mlkem_key_breaks_the_signature() -> None:
    body = _body(PAIR.signed)
    assert body.mlkem768_public_key
    body.mlkem768_public_key = b""
    stripped = tpb.SignedEncryptionKeys(
        keys=body.SerializeToString(deterministic=True), signature=PAIR.signed.signature
    )
    with pytest.raises(BadSignature, match="not signed"):
        _verify(stripped)


def test_keys_of_another_node_are_rejected() -> None:
    other = Identity.generate()
    other_pair = KeyPair.generate(other, now_ms=NOW, lifetime_ms=LIFETIME, hybrid=False)
    # Another node's keys presented as ours: they are not signed by our identity key.
    with pytest.raises(BadSignature, match="not signed"):
        _verify(other_pair.signed)
    # Our keys presented for another node ID (with our identity key): the node ID is wrong.
    with pytest.raises(BadSignature, match="another node"):
        _verify(PAIR.signed, node_id=other.node_id)
    # Our keys checked against another identity key.
    with pytest.raises(BadSignature, match="not signed"):
        _verify(PAIR.signed, identity_public_key=other.public_key_raw)
    # Another node's identity signing a body that names us.
    body = _body(PAIR.signed)
    with pytest.raises(BadSignature):
        _verify(_sign(body, other))


def test_expired_keys_are_rejected() -> None:
    assert _verify(PAIR.signed, now_ms=NOW + LIFETIME - 1)
    with pytest.raises(BadSignature, match="expired"):
        _verify(PAIR.signed, now_ms=NOW + LIFETIME)
    with pytest.raises(BadSignature, match="expired"):
        _verify(PAIR.signed, now_ms=NOW + 100 * LIFETIME)


def test_signature_of_another_context_is_rejected() -> None:
    data = PAIR.signed.keys
    for signature in (NODE.sign(data), NODE.sign(CERT_CONTEXT + data)):
        with pytest.raises(BadSignature):
            _verify(tpb.SignedEncryptionKeys(keys=data, signature=signature))


def test_malformed_keys_are_rejected_even_when_signed() -> None:
    body = _body(PAIR.signed)
    body.x25519_public_key = b"\x01" * 31
    with pytest.raises(BadSignature, match="X25519"):
        _verify(_sign(body))
    body = _body(PAIR.signed)
    body.mlkem768_public_key = body.mlkem768_public_key[:-1]
    with pytest.raises(BadSignature, match="ML-KEM"):
        _verify(_sign(body))
    body = _body(PAIR.signed)
    body.mlkem768_public_key = b"\xff" * MLKEM768_PUBLIC_BYTES  # coefficients out of range
    with pytest.raises(BadSignature, match="unusable"):
        _verify(_sign(body))
    with pytest.raises(BadSignature, match="malformed"):
        _verify(tpb.SignedEncryptionKeys(keys=PAIR.signed.keys, signature=b"\x00" * 63))
    with pytest.raises(BadSignature, match="malformed"):
        _verify(tpb.SignedEncryptionKeys(keys=b"\x00" * 4097, signature=b"\x00" * 64))


def test_flipping_any_byte_of_the_signed_keys_fails() -> None:
    keys, signature = PAIR.signed.keys, PAIR.signed.signature
    for index in range(0, len(keys), 5):
        flipped = keys[:index] + bytes([keys[index] ^ 0x01]) + keys[index + 1 :]
        with pytest.raises(BadSignature):
            _verify(tpb.SignedEncryptionKeys(keys=flipped, signature=signature))
    for index in range(len(signature)):
        flipped = signature[:index] + bytes([signature[index] ^ 0x01]) + signature[index + 1 :]
        with pytest.raises(BadSignature):
            _verify(tpb.SignedEncryptionKeys(keys=keys, signature=flipped))


# --- rotation -------------------------------------------------------------------------------


def test_keyring_rotation_lifecycle() -> None:
    ring = KeyRing(NODE)
    created, dropped = ring.rotate(NOW)
    assert created is not None
    assert dropped == []
    assert ring.current is created
    assert created.mlkem768 is not None  # hybrid by default
    assert created.expires_at_ms == NOW + ROTATE_EVERY_MS + OVERLAP_MS
    first = created

    # Before rotate_every nothing happens.
    for now in (NOW, NOW + 1, NOW + ROTATE_EVERY_MS - 1):
        assert ring.rotate(now) == (None, [])
        assert ring.current is first
        assert len(ring.pairs) == 1

    # At rotate_every a new pair appears; the old one stays findable.
    t1 = NOW + ROTATE_EVERY_MS
    second, dropped = ring.rotate(t1)
    assert second is not None
    assert dropped == []
    assert second.key_id != first.key_id
    assert ring.current is second
    assert [p.key_id for p in ring.pairs] == [first.key_id, second.key_id]
    assert ring.find(second.key_id, t1) is second
    assert ring.find(first.key_id, t1) is first

    # The old key keeps opening envelopes until its expiry plus the grace period.
    last_ok = first.expires_at_ms + GRACE_MS
    assert last_ok == NOW + ROTATE_EVERY_MS + OVERLAP_MS + GRACE_MS
    assert ring.rotate(last_ok) == (None, [])
    assert ring.find(first.key_id, last_ok) is first

    # One millisecond later it is dropped (its private key is to be deleted).
    created, dropped = ring.rotate(last_ok + 1)
    assert created is None
    assert dropped == [first.key_id]
    assert ring.find(first.key_id, last_ok + 1) is None
    assert ring.find(first.key_id, NOW) is None  # gone for good, whatever the clock says
    assert ring.find(second.key_id, last_ok + 1) is second
    assert ring.pairs == [second]
    assert ring.rotate(last_ok + 2) == (None, [])


def test_keyring_find_unknown_key() -> None:
    ring = KeyRing(NODE, hybrid=False)
    ring.rotate(NOW)
    assert ring.current.mlkem768 is None
    assert ring.find("0" * 16, NOW) is None
    assert ring.find("", NOW) is None


def test_keyring_custom_period_and_long_outage() -> None:
    ring = KeyRing(NODE, hybrid=False, rotate_every_ms=HOUR_MS)
    first, _ = ring.rotate(NOW)
    assert first is not None
    assert first.expires_at_ms == NOW + HOUR_MS + OVERLAP_MS
    # Offline for a week: one rotation makes one new pair and drops the stale one at once.
    later = NOW + 7 * 24 * HOUR_MS
    created, dropped = ring.rotate(later)
    assert created is not None
    assert dropped == [first.key_id]
    assert ring.pairs == [created]
    assert ring.find(first.key_id, later) is None


def test_keyring_current_key_verifies_as_peer_keys() -> None:
    ring = KeyRing(NODE)
    ring.rotate(NOW)
    peer = _verify(ring.current.signed)
    assert peer.key_id == ring.current.key_id
    assert peer.offers_hybrid


# --- arbitrary bytes ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    keys=st.binary(max_size=4200),
    signature=st.binary(min_size=64, max_size=64) | st.binary(max_size=80),
    sign_it=st.booleans(),
    now_ms=st.integers(-(2**63), 2**63 - 1),
)
def test_verify_encryption_keys_on_arbitrary_bytes(
    keys: bytes, signature: bytes, sign_it: bool, now_ms: int
) -> None:
    if sign_it:  # validly signed garbage reaches the parser and the key checks
        signature = NODE.sign(KEYS_CONTEXT + keys)
    try:
        result = _verify(tpb.SignedEncryptionKeys(keys=keys, signature=signature), now_ms=now_ms)
    except MeshError:
        return
    assert isinstance(result, PeerKeys)


@settings(max_examples=200, deadline=None)
@given(
    key_id=st.text(max_size=20),
    x25519=st.binary(min_size=32, max_size=32) | st.binary(max_size=40),
    mlkem=st.just(b"")
    | st.binary(min_size=MLKEM768_PUBLIC_BYTES, max_size=MLKEM768_PUBLIC_BYTES)
    | st.binary(max_size=64),
    expires=st.integers(-(2**63), 2**63 - 1),
    now_ms=st.integers(-(2**63), 2**63 - 1),
)
def test_verify_encryption_keys_on_arbitrary_signed_fields(
    key_id: str, x25519: bytes, mlkem: bytes, expires: int, now_ms: int
) -> None:
    body = tpb.EncryptionKeys(
        node_id=NODE.node_id,
        key_id=key_id,
        x25519_public_key=x25519,
        mlkem768_public_key=mlkem,
        expires_at_unix_ms=expires,
    )
    try:
        result = _verify(_sign(body), now_ms=now_ms)
    except MeshError:
        return
    assert result.key_id == key_id
    assert now_ms < result.expires_at_ms
    assert result.offers_hybrid == bool(mlkem)
