"""Node identity: a long-term Ed25519 key and the node ID derived from it.

Node ID = SHA-256 of the raw 32-byte public key, written like a Syncthing
device ID: base32 (RFC 4648, no padding) gives 52 characters, cut into four
groups of 13, each followed by one Luhn mod 32 check character, then shown in
eight dash-separated groups of seven. A mistyped ID is caught by the check
characters instead of silently naming another node.

The private key is kept as unencrypted PKCS#8 PEM (`Identity.to_pem` and
`from_pem`); the node keeps it in `$ALLERAC_HOME/identity.key`
(`node.store.identity_key`). PEM that does not parse is reported, never replaced:
replacing it would silently give the box a new identity and orphan its memberships.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mesh.errors import IdentityError, InvalidRequest

_B32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_GROUP = 13
_PUBLIC_KEY_BYTES = 32


def _luhn32_check_char(group: str) -> str:
    """Luhn mod N check character over base32 digits (as Syncthing computes it)."""
    factor = 1
    total = 0
    n = len(_B32_ALPHABET)
    for char in group:
        addend = factor * _B32_ALPHABET.index(char)
        factor = 1 if factor == 2 else 2
        addend = (addend // n) + (addend % n)
        total += addend
    remainder = total % n
    return _B32_ALPHABET[(n - remainder) % n]


@functools.lru_cache(maxsize=4096)  # a ledger names the same few keys a million times
def node_id_from_public_key(public_key_raw: bytes) -> str:
    if len(public_key_raw) != _PUBLIC_KEY_BYTES:
        raise InvalidRequest(
            f"an Ed25519 public key is {_PUBLIC_KEY_BYTES} bytes, got {len(public_key_raw)}"
        )
    digest = hashlib.sha256(public_key_raw).digest()
    plain = base64.b32encode(digest).decode("ascii").rstrip("=")
    checked = "".join(
        group + _luhn32_check_char(group)
        for group in (plain[i : i + _GROUP] for i in range(0, len(plain), _GROUP))
    )
    return "-".join(checked[i : i + 7] for i in range(0, len(checked), 7))


def parse_node_id(text: str) -> str:
    """Validate a node ID typed or received from outside; returns its canonical form."""
    if not isinstance(text, str) or len(text) > 128:
        raise InvalidRequest("a node ID is 56 base32 characters in groups of seven")
    compact = text.strip().upper().replace("-", "").replace(" ", "")
    if len(compact) != 56 or any(c not in _B32_ALPHABET for c in compact):
        raise InvalidRequest(f"not a node ID: {text[:80]!r}")
    groups = [compact[i : i + _GROUP + 1] for i in range(0, 56, _GROUP + 1)]
    for group in groups:
        if _luhn32_check_char(group[:-1]) != group[-1]:
            raise InvalidRequest(f"node ID has a wrong check character: {text[:80]!r}")
    return "-".join(compact[i : i + 7] for i in range(0, 56, 7))


def short_node_id(node_id: str) -> str:
    """The first group: enough for a human to tell boxes apart in logs."""
    return node_id.split("-", 1)[0]


@functools.lru_cache(maxsize=4096)
def _public_key(public_key_raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(public_key_raw)


def verify_signature(public_key_raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        _public_key(public_key_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A node's long-term signing identity."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @functools.cached_property  # derived from the private key anew each time otherwise
    def public_key_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key_raw)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "key") -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(
                f"{source} is not a readable identity key ({exc}); "
                "it was left untouched: restore it from a backup, or move it away "
                "to give this node a new identity"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(
                f"{source} holds a {type(key).__name__}, not an Ed25519 identity key; "
                "it was left untouched"
            )
        return cls(key)
