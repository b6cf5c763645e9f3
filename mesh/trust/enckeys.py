"""Encryption keys: short-lived HPKE keys, signed by the node's identity key.

A node publishes an X25519 public key and, where ML-KEM is available, an
ML-KEM-768 public key for the hybrid ML-KEM-768+X25519 (X-Wing) KEM. Both are
in one `EncryptionKeys` message signed by the identity key, so nobody can strip
the hybrid key from a card without breaking the signature.

Keys rotate (default daily). After a rotation the previous private keys still
open envelopes for a grace period (senders may hold an older card), then they
are deleted: traffic recorded before that cannot be opened any more (forward
secrecy at rotation granularity, like Signal's signed pre-keys).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from google.protobuf.message import DecodeError

from mesh.errors import BadSignature
from mesh.trust.identity import Identity, verify_signature
from mesh.wire.v1 import trust_pb2 as tpb

KEYS_CONTEXT = b"allerac-mesh/v1/encryption-keys\x00"
MAX_KEYS_BYTES = 4096
HOUR_MS = 3600 * 1000
ROTATE_EVERY_MS = 24 * HOUR_MS
OVERLAP_MS = HOUR_MS  # a key stays advertised-valid this long after its successor appears
GRACE_MS = HOUR_MS  # ...and its private half opens envelopes this much longer
MLKEM768_PUBLIC_BYTES = 1184
CLOCK_TOLERANCE_MS = 60_000  # peers' clocks may differ this much (the replay window)


def hybrid_available() -> bool:
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, kw_only=True)
class KeyPair:
    """Our private encryption keys of one rotation period."""

    key_id: str
    x25519: X25519PrivateKey
    mlkem768: mlkem.MLKEM768PrivateKey | None
    not_before_ms: int
    expires_at_ms: int
    signed: tpb.SignedEncryptionKeys

    @classmethod
    def generate(
        cls, identity: Identity, *, now_ms: int, lifetime_ms: int, hybrid: bool = True
    ) -> KeyPair:
        x25519 = X25519PrivateKey.generate()
        mlkem768 = mlkem.MLKEM768PrivateKey.generate() if hybrid else None
        return cls.from_private(
            identity,
            key_id=secrets.token_hex(8),
            x25519_raw=x25519.private_bytes_raw(),
            mlkem_seed=mlkem768.private_bytes_raw() if mlkem768 is not None else None,
            not_before_ms=now_ms,
            expires_at_ms=now_ms + lifetime_ms,
        )

    @classmethod
    def from_private(
        cls,
        identity: Identity,
        *,
        key_id: str,
        x25519_raw: bytes,
        mlkem_seed: bytes | None,
        not_before_ms: int,
        expires_at_ms: int,
    ) -> KeyPair:
        x25519 = X25519PrivateKey.from_private_bytes(x25519_raw)
        mlkem768 = (
            mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed) if mlkem_seed is not None else None
        )
        body = tpb.EncryptionKeys(
            node_id=identity.node_id,
            key_id=key_id,
            x25519_public_key=_raw(x25519.public_key()),
            mlkem768_public_key=(
                mlkem768.public_key().public_bytes_raw() if mlkem768 is not None else b""
            ),
            not_before_unix_ms=not_before_ms,
            expires_at_unix_ms=expires_at_ms,
        )
        data = body.SerializeToString(deterministic=True)
        signed = tpb.SignedEncryptionKeys(keys=data, signature=identity.sign(KEYS_CONTEXT + data))
        return cls(
            key_id=key_id,
            x25519=x25519,
            mlkem768=mlkem768,
            not_before_ms=not_before_ms,
            expires_at_ms=expires_at_ms,
            signed=signed,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerKeys:
    """A peer's verified public encryption keys."""

    node_id: str
    key_id: str
    x25519: X25519PublicKey
    mlkem768: mlkem.MLKEM768PublicKey | None
    expires_at_ms: int

    @property
    def offers_hybrid(self) -> bool:
        return self.mlkem768 is not None


def verify_encryption_keys(
    signed: tpb.SignedEncryptionKeys, *, identity_public_key: bytes, node_id: str, now_ms: int
) -> PeerKeys:
    if len(signed.keys) > MAX_KEYS_BYTES or len(signed.signature) != 64:
        raise BadSignature("encryption keys are malformed")
    if not verify_signature(identity_public_key, signed.signature, KEYS_CONTEXT + signed.keys):
        raise BadSignature("encryption keys are not signed by the node's identity key")
    body = tpb.EncryptionKeys()
    try:
        body.ParseFromString(signed.keys)
    except (DecodeError, ValueError) as exc:
        raise BadSignature("encryption keys do not parse") from exc
    if body.node_id != node_id:
        raise BadSignature("encryption keys belong to another node")
    if now_ms >= body.expires_at_unix_ms:
        raise BadSignature(f"encryption keys of node {node_id[:7]} have expired")
    if now_ms < body.not_before_unix_ms - CLOCK_TOLERANCE_MS:
        raise BadSignature(f"encryption keys of node {node_id[:7]} are not valid yet")
    if len(body.x25519_public_key) != 32:
        raise BadSignature("encryption keys carry a malformed X25519 key")
    if body.mlkem768_public_key and len(body.mlkem768_public_key) != MLKEM768_PUBLIC_BYTES:
        raise BadSignature("encryption keys carry a malformed ML-KEM-768 key")
    try:
        mlkem768 = (
            mlkem.MLKEM768PublicKey.from_public_bytes(body.mlkem768_public_key)
            if body.mlkem768_public_key
            else None
        )
        x25519 = X25519PublicKey.from_public_bytes(body.x25519_public_key)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadSignature(f"encryption keys are unusable: {exc}") from exc
    return PeerKeys(
        node_id=node_id,
        key_id=body.key_id,
        x25519=x25519,
        mlkem768=mlkem768,
        expires_at_ms=body.expires_at_unix_ms,
    )


@dataclass
class KeyRing:
    """Our current keys plus those still inside their grace period. Sans I/O:
    `rotate(now)` says what to persist and which private keys to destroy."""

    identity: Identity
    hybrid: bool = True
    rotate_every_ms: int = ROTATE_EVERY_MS
    pairs: list[KeyPair] = field(default_factory=list)  # newest last

    @property
    def current(self) -> KeyPair:
        return self.pairs[-1]

    def rotate(self, now_ms: int) -> tuple[KeyPair | None, list[str]]:
        """Make a new pair when due; drop pairs past expiry + grace.
        Returns (the new pair or None, key IDs whose private keys must be deleted)."""
        created = None
        if not self.pairs or now_ms >= self.current.not_before_ms + self.rotate_every_ms:
            created = KeyPair.generate(
                self.identity,
                now_ms=now_ms,
                lifetime_ms=self.rotate_every_ms + OVERLAP_MS,
                hybrid=self.hybrid,
            )
            self.pairs.append(created)
        dropped = [p.key_id for p in self.pairs[:-1] if now_ms > p.expires_at_ms + GRACE_MS]
        self.pairs = [p for p in self.pairs if p.key_id not in dropped]
        return created, dropped

    def find(self, key_id: str, now_ms: int) -> KeyPair | None:
        for pair in self.pairs:
            if pair.key_id == key_id and now_ms <= pair.expires_at_ms + GRACE_MS:
                return pair
        return None
