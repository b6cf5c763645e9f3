"""Invite codes and joining, sans I/O.

`allerac mesh invite` makes a one-time code: 32 random secret bytes, the mesh
public key, the inviter's node ID and gRPC addresses, the role and an expiry,
as `allerac1-` + base64url. The joiner proves it holds the secret without
sending it: HMAC-SHA256(secret, transcript), where the transcript binds the
invite ID, the mesh key, the joiner's identity key and the time; the joiner
also signs the transcript with its identity key, so the certificate goes to
the key that asked for it. The inviter answers with a certificate signed by the
mesh key, which the joiner checks against the mesh key in the code: a fake
inviter cannot hand out certificates of the real mesh.

Invites are single-use and expire; the inviter's `InviteBook` is the only
place their secrets are kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from mesh.errors import InviteError, MalformedInvite, MeshError
from mesh.trust.identity import Identity, node_id_from_public_key, verify_signature
from mesh.trust.membership import Role, role_from_pb, role_to_pb
from mesh.wire.v1 import trust_pb2 as tpb

CODE_PREFIX = "allerac1-"
MAX_CODE_CHARS = 4096
SECRET_BYTES = 32
INVITE_ID_CONTEXT = b"allerac-mesh/v1/invite-id\x00"
TRANSCRIPT_CONTEXT = b"allerac-mesh/v1/join\x00"
JOIN_SKEW_MS = 120_000
MAX_OPEN_INVITES = 1000


def invite_id(secret: bytes) -> bytes:
    return hashlib.sha256(INVITE_ID_CONTEXT + secret).digest()[:16]


def encode_invite(invite: tpb.Invite) -> str:
    data = invite.SerializeToString(deterministic=True)
    return CODE_PREFIX + base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def decode_invite(code: str, *, now_ms: int) -> tpb.Invite:
    code = code.strip()
    if len(code) > MAX_CODE_CHARS or not code.startswith(CODE_PREFIX):
        raise MalformedInvite(f"not an Allerac invite code (they start with {CODE_PREFIX!r})")
    text = code[len(CODE_PREFIX) :]
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedInvite("invite code is damaged (not base64url)") from exc
    invite = tpb.Invite()
    try:
        invite.ParseFromString(data)
    except (DecodeError, ValueError) as exc:
        raise MalformedInvite("invite code is damaged") from exc
    if len(invite.secret) != SECRET_BYTES or len(invite.mesh_public_key) != 32:
        raise MalformedInvite("invite code is damaged (bad secret or mesh key)")
    if not invite.inviter_addresses:
        raise MalformedInvite("invite code names no address of the inviter")
    try:
        role_from_pb(invite.role)
    except MeshError as exc:
        raise MalformedInvite("invite code is damaged (unknown role)") from exc
    if invite.expires_at_unix_ms <= 0:  # an invite always carries its expiry
        raise MalformedInvite("invite code is damaged (no expiry)")
    if now_ms >= invite.expires_at_unix_ms:
        raise InviteError("this invite has expired; ask for a new one")
    return invite


def transcript(
    *,
    invite: bytes,
    mesh_public_key: bytes,
    identity_public_key: bytes,
    sent_at_ms: int,
    display_name: str = "",
    addresses: tuple[str, ...] = (),
) -> bytes:
    """Everything the join request says, so none of it can be changed on the way."""
    extras = "\n".join((display_name, *addresses)).encode("utf-8")
    return b"".join(
        (
            TRANSCRIPT_CONTEXT,
            invite,
            mesh_public_key,
            identity_public_key,
            sent_at_ms.to_bytes(8, "big", signed=True),
            len(extras).to_bytes(4, "big"),
            extras,
        )
    )


def make_join_request(
    invite: tpb.Invite,
    identity: Identity,
    *,
    now_ms: int,
    display_name: str = "",
    addresses: tuple[str, ...] = (),
) -> tpb.JoinRequest:
    ident = invite_id(invite.secret)
    display_name = display_name[:64]
    addresses = tuple(addresses)[:8]
    data = transcript(
        invite=ident,
        mesh_public_key=invite.mesh_public_key,
        identity_public_key=identity.public_key_raw,
        sent_at_ms=now_ms,
        display_name=display_name,
        addresses=addresses,
    )
    return tpb.JoinRequest(
        invite_id=ident,
        identity_public_key=identity.public_key_raw,
        sent_at_unix_ms=now_ms,
        proof=hmac.new(invite.secret, data, hashlib.sha256).digest(),
        signature=identity.sign(data),
        display_name=display_name,
        addresses=list(addresses),
    )


@dataclass
class OpenInvite:
    secret: bytes
    role: Role
    expires_at_ms: int
    used_by: str = ""


@dataclass
class InviteBook:
    """The inviter's open invites. `redeem` is all-or-nothing and marks the invite used."""

    invites: dict[bytes, OpenInvite] = field(default_factory=dict)

    def create(
        self,
        *,
        mesh_public_key: bytes,
        inviter_node_id: str,
        addresses: list[str],
        role: Role,
        now_ms: int,
        ttl_ms: int,
    ) -> str:
        self.prune(now_ms)
        if len(self.invites) >= MAX_OPEN_INVITES:
            raise InviteError(f"{MAX_OPEN_INVITES} invites are open already")
        secret = secrets.token_bytes(SECRET_BYTES)
        expires = now_ms + ttl_ms
        self.invites[invite_id(secret)] = OpenInvite(
            secret=secret, role=role, expires_at_ms=expires
        )
        return encode_invite(
            tpb.Invite(
                secret=secret,
                mesh_public_key=mesh_public_key,
                inviter_node_id=inviter_node_id,
                inviter_addresses=addresses,
                role=role_to_pb(role),
                expires_at_unix_ms=expires,
            )
        )

    def prune(self, now_ms: int) -> None:
        for key in [k for k, v in self.invites.items() if v.used_by or now_ms >= v.expires_at_ms]:
            del self.invites[key]

    def redeem(self, request: tpb.JoinRequest, *, mesh_public_key: bytes, now_ms: int) -> Role:
        """Check a join request; on success the invite is used up. Returns the role."""
        entry = self.invites.get(request.invite_id)
        if entry is None or entry.used_by:
            raise InviteError("unknown or already used invite")
        if now_ms >= entry.expires_at_ms:
            raise InviteError("this invite has expired")
        if abs(now_ms - request.sent_at_unix_ms) > JOIN_SKEW_MS:
            raise InviteError("join request is too old or from a clock far off ours")
        if len(request.identity_public_key) != 32:
            raise InviteError("join request has a malformed identity key")
        if len(request.display_name) > 64 or len(request.addresses) > 8:
            raise InviteError("join request carries too much")
        data = transcript(
            invite=request.invite_id,
            mesh_public_key=mesh_public_key,
            identity_public_key=request.identity_public_key,
            sent_at_ms=request.sent_at_unix_ms,
            display_name=request.display_name,
            addresses=tuple(request.addresses),
        )
        expected = hmac.new(entry.secret, data, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, request.proof):
            raise InviteError("join request does not prove the invite secret")
        if not verify_signature(request.identity_public_key, request.signature, data):
            raise InviteError("join request is not signed by the key it names")
        entry.used_by = node_id_from_public_key(request.identity_public_key)
        return entry.role

    def to_json(self) -> str:
        return json.dumps(
            [
                {
                    "secret": v.secret.hex(),
                    "role": v.role.value,
                    "expires_at_ms": v.expires_at_ms,
                    "used_by": v.used_by,
                }
                for v in self.invites.values()
            ]
        )

    @classmethod
    def from_json(cls, text: str) -> InviteBook:
        try:
            rows: list[dict[str, Any]] = json.loads(text)
            book = cls()
            for row in rows:
                secret = bytes.fromhex(row["secret"])
                book.invites[invite_id(secret)] = OpenInvite(
                    secret=secret,
                    role=Role(row["role"]),
                    expires_at_ms=int(row["expires_at_ms"]),
                    used_by=str(row.get("used_by", "")),
                )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise InviteError(f"the invite book is corrupt: {type(exc).__name__}") from exc
        return book
