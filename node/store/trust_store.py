"""The node's trust state on disk and in memory: its mesh, certificate, revocation
list, encryption keys, and (on an admin) the mesh key, open invites and members.

Files live in `$ALLERAC_HOME/mesh/`, each written atomically with mode 0600:

    mesh.key          the mesh's Ed25519 key (admin nodes only)
    membership.cert   this node's SignedCert
    revocations.bin   the newest SignedRevocations seen
    enckeys.json      private encryption keys still inside their grace period
    invites.json      open invites (admin)
    members.json      who joined through this node (admin)

A node without a mesh creates a mesh of one on first start and is its admin,
so a single box just works; joining another mesh archives that key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from mesh.clock import SYSTEM, Clock
from mesh.errors import (
    BadSignature,
    IdentityError,
    InvalidRequest,
    InviteError,
    MeshError,
    NotAMember,
    PermissionDenied,
)
from mesh.trust.enckeys import KeyPair, KeyRing, hybrid_available
from mesh.trust.identity import Identity, node_id_from_public_key, parse_node_id
from mesh.trust.invites import InviteBook
from mesh.trust.membership import (
    ADMIN_CERT_TTL_MS,
    MEMBER_CERT_TTL_MS,
    Membership,
    MeshAuthority,
    Revocations,
    Role,
    issuer_chain,
    read_cert,
    supersedes,
    verify_cert,
    verify_revocations,
)
from mesh.trust.sealing import EnvelopeOpener, ReplayGuard
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.files import write_private
from node.store.home import Home

logger = logging.getLogger(__name__)
MAX_KNOWN_MEMBERS = 10_000


def _known(member: dict[str, Any]) -> pb.KnownMember:
    return pb.KnownMember(
        node_id=str(member.get("node_id", "")),
        role=str(member.get("role", "")),
        display_name=str(member.get("display_name", "")),
        addresses=[str(a) for a in member.get("addresses", [])][:8],
        joined_at_unix_ms=int(member.get("joined_at_ms", 0)),
    )


class TrustStore:
    def __init__(self, home: Home, identity: Identity, *, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.home = home
        self.identity = identity
        self.dir = home.mesh_dir
        self.authority: MeshAuthority | None = None
        self.cert = tpb.SignedCert()
        self.membership: Membership | None = None
        self.revocations: Revocations | None = None
        self.keyring = KeyRing(identity, hybrid=hybrid_available())
        self.invites = InviteBook()
        self.members: dict[str, dict[str, Any]] = {}
        self.opener = EnvelopeOpener(
            identity=identity,
            keyring=self.keyring,
            mesh_public_key=lambda: self.mesh_public_key,
            revoked=lambda: self.revoked,
            # Nothing issued before this start: the seen-IDs window did not survive it.
            replay=ReplayGuard(not_before_ms=clock.now_ms()),
        )

    # --- views -------------------------------------------------------------------------------

    @property
    def mesh_public_key(self) -> bytes:
        assert self.membership is not None
        return self.membership.mesh_public_key

    @property
    def mesh_id(self) -> str:
        assert self.membership is not None
        return self.membership.mesh_id

    @property
    def role(self) -> Role:
        assert self.membership is not None
        return self.membership.role

    @property
    def revoked(self) -> frozenset[str]:
        return self.revocations.revoked if self.revocations is not None else frozenset()

    def revoked_at(self, node_id: str) -> int | None:
        """When `node_id` was revoked (ms), or None while it is not."""
        if self.revocations is None:
            return None
        return self.revocations.revoked_at.get(node_id)

    @property
    def revocations_version(self) -> int:
        return self.revocations.version if self.revocations is not None else 0

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, home: Home, identity: Identity, *, now: int | None = None, clock: Clock = SYSTEM
    ) -> TrustStore:
        store = cls(home, identity, clock=clock)
        store._load(clock.now_ms() if now is None else now)
        return store

    def _path(self, name: str) -> Path:
        return self.dir / name

    def _read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IdentityError(f"cannot read {self._path(name)}: {exc.strerror}") from exc

    def _write(self, name: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self._path(name), data)

    def _load(self, now: int) -> None:
        cert_bytes = self._read("membership.cert")
        if cert_bytes is None:
            self._create_mesh_of_one(now)
        else:
            where = self._path("membership.cert")
            signed = tpb.SignedCert()
            try:
                signed.ParseFromString(cert_bytes)
                cert, _ = read_cert(signed)
            except (MeshError, ValueError, DecodeError) as exc:
                raise IdentityError(
                    f"the membership certificate {where} is corrupt (it does not parse); it "
                    "was left untouched: restore it from a backup, or move the mesh/ folder "
                    "aside to start as a mesh of one and join again"
                ) from exc
            try:
                self.membership = verify_cert(
                    signed, mesh_public_key=cert.mesh_public_key, now_ms=now
                )
            except MeshError as exc:
                raise IdentityError(
                    f"the membership certificate {where} is not usable: {exc.message}; it "
                    "was left untouched"
                ) from exc
            if self.membership.node_id != self.identity.node_id:
                raise IdentityError(
                    f"{self._path('membership.cert')} belongs to another node identity"
                )
            self.cert = signed
            key_pem = self._read("mesh.key")
            if key_pem is not None:
                authority = MeshAuthority(Identity.from_pem(key_pem, source="mesh key"))
                if authority.public_key != self.membership.mesh_public_key:
                    raise IdentityError(f"{self._path('mesh.key')} is not this mesh's key")
                self.authority = authority
            elif self.membership.role is Role.ADMIN:  # an admin by delegation
                self.authority = MeshAuthority.delegated(self.identity, signed)
        revocations = self._read("revocations.bin")
        if revocations is not None:
            signed_rev = tpb.SignedRevocations()
            try:
                signed_rev.ParseFromString(revocations)
                self.revocations = verify_revocations(
                    signed_rev, mesh_public_key=self.mesh_public_key
                )
            except (MeshError, ValueError):
                logger.warning("ignoring an unreadable revocation list in %s", self.dir)
        invites = self._read("invites.json")
        if invites is not None:
            try:
                self.invites = InviteBook.from_json(invites.decode("utf-8"))
            except (MeshError, ValueError, KeyError, TypeError) as exc:
                raise IdentityError(
                    f"the open invites {self._path('invites.json')} are corrupt; left untouched"
                ) from exc
        members = self._read("members.json")
        if members is not None:
            try:
                loaded = json.loads(members)
            except ValueError as exc:
                raise IdentityError(
                    f"the member list {self._path('members.json')} is corrupt; left untouched"
                ) from exc
            if not isinstance(loaded, dict) or not all(
                isinstance(v, dict) for v in loaded.values()
            ):
                raise IdentityError(
                    f"the member list {self._path('members.json')} is corrupt; left untouched"
                )
            self.members = loaded
        self._load_keys(now)

    def _create_mesh_of_one(self, now: int) -> None:
        authority = MeshAuthority.generate()
        self._write("mesh.key", authority.key.to_pem())
        self.authority = authority
        self._set_cert(
            authority.issue(
                self.identity.public_key_raw, role=Role.ADMIN, now_ms=now, ttl_ms=ADMIN_CERT_TTL_MS
            ),
            now,
        )
        logger.info("created mesh %s (a mesh of one; this node is its admin)", self.mesh_id)

    def _set_cert(self, signed: tpb.SignedCert, now: int) -> None:
        cert, _ = read_cert(signed)
        self.membership = verify_cert(signed, mesh_public_key=cert.mesh_public_key, now_ms=now)
        self.cert = signed
        self._write("membership.cert", signed.SerializeToString())

    def _load_keys(self, now: int) -> None:
        raw = self._read("enckeys.json")
        if raw is not None:
            try:
                for row in json.loads(raw):
                    self.keyring.pairs.append(
                        KeyPair.from_private(
                            self.identity,
                            key_id=row["key_id"],
                            x25519_raw=bytes.fromhex(row["x25519"]),
                            mlkem_seed=bytes.fromhex(row["mlkem"]) if row["mlkem"] else None,
                            not_before_ms=int(row["not_before_ms"]),
                            expires_at_ms=int(row["expires_at_ms"]),
                        )
                    )
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("encryption keys unreadable (%s); making new ones", exc)
                self.keyring.pairs.clear()
        self.rotate_keys(now, force_save=raw is None)

    def rotate_keys(self, now: int, *, force_save: bool = False) -> bool:
        """Rotate when due and destroy private keys past their grace period."""
        created, dropped = self.keyring.rotate(now)
        if created is not None or dropped or force_save:
            rows = [
                {
                    "key_id": p.key_id,
                    "x25519": p.x25519.private_bytes_raw().hex(),
                    "mlkem": p.mlkem768.private_bytes_raw().hex() if p.mlkem768 else "",
                    "not_before_ms": p.not_before_ms,
                    "expires_at_ms": p.expires_at_ms,
                }
                for p in self.keyring.pairs
            ]
            self._write("enckeys.json", json.dumps(rows).encode())
            if dropped:
                logger.info("deleted expired encryption keys %s", ", ".join(dropped))
        return created is not None

    # --- admin: invites, joins, revocation ---------------------------------------------------

    def _require_admin(self) -> MeshAuthority:
        if self.authority is None:
            raise PermissionDenied(
                "only an admin node of the mesh (one holding the mesh key) can do this"
            )
        return self.authority

    def create_invite(self, *, role: Role, ttl_ms: int, addresses: list[str], now: int) -> str:
        authority = self._require_admin()
        if role is Role.ADMIN:
            raise InviteError("invites are for members and overflow nodes; admin is not invitable")
        code = self.invites.create(
            mesh_public_key=authority.public_key,
            inviter_node_id=self.identity.node_id,
            addresses=addresses,
            role=role,
            now_ms=now,
            ttl_ms=ttl_ms,
        )
        self._write("invites.json", self.invites.to_json().encode())
        return code

    def redeem(self, request: tpb.JoinRequest, *, now: int) -> tpb.JoinResponse:
        authority = self._require_admin()
        # Checked before the invite is used up: a revoked node gets nothing and costs
        # the invite nothing.
        if len(request.identity_public_key) == 32:
            joining = node_id_from_public_key(request.identity_public_key)
            if joining in self.revoked:
                raise NotAMember(f"node {joining[:7]} is revoked from this mesh; it cannot rejoin")
        role = self.invites.redeem(request, mesh_public_key=authority.public_key, now_ms=now)
        self.invites.prune(now)
        self._write("invites.json", self.invites.to_json().encode())
        cert = authority.issue(
            request.identity_public_key, role=role, now_ms=now, ttl_ms=MEMBER_CERT_TTL_MS
        )
        membership, _ = read_cert(cert)
        self.members[membership.node_id] = {
            "node_id": membership.node_id,
            "role": role.value,
            "display_name": request.display_name[:64],
            "addresses": list(request.addresses)[:8],
            "joined_at_ms": now,
        }
        self._write("members.json", json.dumps(self.members).encode())
        response = tpb.JoinResponse(cert=cert)
        if self.revocations is not None:
            response.revocations.CopyFrom(self.revocations.signed)
        return response

    def revoke(self, node_id: str, *, now: int) -> tpb.SignedRevocations:
        authority = self._require_admin()
        node_id = parse_node_id(node_id)
        if node_id == self.identity.node_id:
            raise InviteError("an admin cannot revoke itself")
        if node_id in {admin.node_id for admin in issuer_chain(self.cert)}:
            raise InviteError(
                f"admin {node_id[:7]} made this node an admin: revoking it would end this "
                "node's own certificate; revoke it from an admin it did not make"
            )
        signed = authority.revocations(
            version=self.revocations_version + 1,
            revoked=self.revoked | {node_id},
            now_ms=now,
            revoked_at=self.revocations.revoked_at if self.revocations is not None else None,
        )
        self.apply_revocations(signed)
        return signed

    def apply_revocations(self, signed: tpb.SignedRevocations) -> bool:
        """Adopt a newer, valid revocation list; returns whether anything changed. An admin
        that receives another admin's list revoking nodes its own does not (both revoked
        at once) signs one list holding both, newer than either, so the mesh converges."""
        revocations = verify_revocations(signed, mesh_public_key=self.mesh_public_key)
        held = self.revocations
        try:
            if supersedes(revocations, held):
                self._adopt_revocations(revocations)
                return True
        except BadSignature:
            if self.authority is None or revocations.issuers & self.revoked:
                raise
        if held is None or self.authority is None or revocations.revoked <= held.revoked:
            return False
        merged = self.authority.revocations(
            version=max(revocations.version, held.version) + 1,
            revoked=held.revoked | revocations.revoked,
            now_ms=self.clock.now_ms(),
            revoked_at={**revocations.revoked_at, **held.revoked_at},
        )
        self._adopt_revocations(verify_revocations(merged, mesh_public_key=self.mesh_public_key))
        logger.info("merged another admin's revocation list into v%d", self.revocations_version)
        return True

    def _adopt_revocations(self, revocations: Revocations) -> None:
        self.revocations = revocations
        self._write("revocations.bin", revocations.signed.SerializeToString())

    # --- more admins -----------------------------------------------------------------------

    def grant_admin(self, member: Membership, *, addresses: list[str], now: int) -> pb.AdminGrant:
        """Make the member `member` (as its verified card shows it) an admin too: its admin
        certificate, signed by this admin, the revocation list, and the members known here."""
        authority = self._require_admin()
        if member.node_id in self.revoked:
            raise NotAMember(f"node {member.node_id[:7]} is revoked from this mesh")
        if member.mesh_public_key != authority.public_key:
            raise NotAMember(f"node {member.node_id[:7]} is not a member of this mesh")
        if member.node_id == self.identity.node_id:
            raise InvalidRequest("this node is an admin already")
        if member.role is Role.OVERFLOW:
            raise InvalidRequest("an overflow (cloud) node cannot be an admin of the mesh")
        cert = authority.issue(
            member.identity_public_key, role=Role.ADMIN, now_ms=now, ttl_ms=ADMIN_CERT_TTL_MS
        )
        grant = pb.AdminGrant(cert=cert, members=[_known(m) for m in self.members.values()])
        grant.members.append(
            pb.KnownMember(
                node_id=self.identity.node_id,
                role=Role.ADMIN.value,
                addresses=addresses[:8],
                joined_at_unix_ms=now,
            )
        )
        if self.revocations is not None:
            grant.revocations.CopyFrom(self.revocations.signed)
        entry = self.members.setdefault(
            member.node_id, {"node_id": member.node_id, "addresses": [], "joined_at_ms": now}
        )
        entry.update({"role": Role.ADMIN.value, "display_name": entry.get("display_name", "")})
        self._write("members.json", json.dumps(self.members).encode())
        return grant

    def accept_admin(self, grant: pb.AdminGrant, *, granted_by: Membership, now: int) -> None:
        """Become an admin of this mesh, as an admin of it granted (`allerac mesh admin
        add` there): from now on this node invites and revokes, signing with its identity
        key and showing the certificate it was given."""
        if granted_by.role is not Role.ADMIN:
            raise PermissionDenied("only an admin of the mesh can make another node an admin")
        if grant.HasField("revocations"):
            self.apply_revocations(grant.revocations)
        membership = verify_cert(
            grant.cert, mesh_public_key=self.mesh_public_key, now_ms=now, revoked=self.revoked
        )
        if membership.node_id != self.identity.node_id or membership.role is not Role.ADMIN:
            raise InvalidRequest("the admin grant is not an admin certificate for this node")
        if self.authority is not None and self.authority.holds_mesh_key:
            return  # the mesh key's holder needs no delegation
        self._set_cert(grant.cert, now)
        self.authority = MeshAuthority.delegated(self.identity, grant.cert)
        for known in grant.members[:MAX_KNOWN_MEMBERS]:
            if known.node_id != self.identity.node_id and known.node_id not in self.members:
                self.members[known.node_id] = {
                    "node_id": known.node_id[:64],
                    "role": known.role[:16],
                    "display_name": known.display_name[:64],
                    "addresses": list(known.addresses)[:8],
                    "joined_at_ms": known.joined_at_unix_ms,
                }
        self._write("members.json", json.dumps(self.members).encode())
        logger.info("this node is now an admin of mesh %s", self.mesh_id)

    # --- joining another mesh ----------------------------------------------------------------

    def adopt(self, response: tpb.JoinResponse, *, mesh_public_key: bytes, now: int) -> None:
        """Become a member of the mesh that answered our join request."""
        membership = verify_cert(response.cert, mesh_public_key=mesh_public_key, now_ms=now)
        if membership.node_id != self.identity.node_id:
            raise InviteError("the inviter returned a certificate for another node")
        old_key = self._path("mesh.key")
        if old_key.exists():
            old_key.rename(self._path(f"mesh.key.left-{now}"))
        for name in ("invites.json", "members.json", "revocations.bin"):
            self._path(name).unlink(missing_ok=True)
        self.authority = None
        self.invites = InviteBook()
        self.members = {}
        self.revocations = None
        self._set_cert(response.cert, now)
        if response.HasField("revocations"):
            self.apply_revocations(response.revocations)
