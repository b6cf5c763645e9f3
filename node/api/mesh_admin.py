"""Mesh administration for the box's owner: invite, join, list members, revoke.

Reached through the loopback-only `/allerac/mesh/...` HTTP endpoints that the
`allerac mesh` commands call; the running node is the only writer of its trust
state, so there is no race between a command and the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.clock import SYSTEM, Clock
from mesh.errors import InvalidRequest, MeshError, MeshNotEmpty, RemoteProtocolError, Unavailable
from mesh.trust.cards import verify_peer_card
from mesh.trust.identity import parse_node_id
from mesh.trust.invites import decode_invite
from mesh.trust.membership import Role, read_cert
from node.store.trust_store import TrustStore
from node.transport.directory import PeerHandle
from node.transport.peer_client import PeerClient, join_mesh

logger = logging.getLogger(__name__)

MAX_INVITE_TTL_S = 30 * 24 * 3600
DEFAULT_INVITE_TTL_S = 3600
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d' -> seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise InvalidRequest(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d)", param="ttl")
    return float(match.group(1)) * _UNITS[match.group(2)]


class MeshAdmin:
    def __init__(
        self,
        *,
        trust: TrustStore,
        addresses: Callable[[], list[str]],
        display_name: str,
        on_change: Callable[[], None],
        on_joined: Callable[[list[str]], Awaitable[None]] | None = None,
        peer: Callable[[str], PeerHandle | None] = lambda node_id: None,
        peer_addresses: Callable[[], list[str]] = list,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._peer = peer  # a verified peer, by node ID, as it can be called now
        self._peer_addresses = peer_addresses  # where the peers up on a direct path listen
        self._trust = trust
        self._addresses = addresses
        self.display_name = display_name or socket.gethostname()
        self._on_change = on_change
        self._on_joined = on_joined

    def describe(self) -> dict[str, Any]:
        trust = self._trust
        return {
            "mesh_id": trust.mesh_id,
            "role": trust.role.value,
            "admin": trust.authority is not None,
            "holds_mesh_key": trust.authority is not None and trust.authority.holds_mesh_key,
            "revocations_version": trust.revocations_version,
            "hybrid_encryption": trust.keyring.hybrid,
            "encryption_key_id": trust.keyring.current.key_id,
            "encryption_key_expires_at_ms": trust.keyring.current.expires_at_ms,
            "membership_expires_at_ms": read_cert(trust.cert)[0].expires_at_unix_ms,
        }

    def invite(self, *, role: str, ttl_s: float) -> dict[str, Any]:
        try:
            chosen = Role(role)
        except ValueError as exc:
            raise InvalidRequest("role must be member or overflow", param="role") from exc
        if not 1 <= ttl_s <= MAX_INVITE_TTL_S:
            raise InvalidRequest(
                f"ttl must be from 1 s to {MAX_INVITE_TTL_S // 86400} days", param="ttl"
            )
        code = self._trust.create_invite(
            role=chosen,
            ttl_ms=int(ttl_s * 1000),
            addresses=self._addresses(),
            now=self._clock.now_ms(),
        )
        return {
            "code": code,
            "role": chosen.value,
            "expires_in_s": ttl_s,
            "mesh_id": self._trust.mesh_id,
        }

    def _others(self) -> list[str]:
        """Members this node would leave behind: those it invited (unrevoked), or, when it
        joined somebody else's mesh, that mesh's admin at least."""
        trust = self._trust
        invited = [n for n in trust.members if n not in trust.revoked]
        if trust.authority is None:
            return [*invited, "the mesh's admin"]
        return invited

    async def join(self, code: str, *, leave_current: bool = False) -> dict[str, Any]:
        # A code that is not one is a 400 before anything else is asked (leaving included).
        decode_invite(code, now_ms=self._clock.now_ms())
        others = self._others()
        if others and not leave_current:
            raise MeshNotEmpty(
                f"this box is in mesh {self._trust.mesh_id} with {len(others)} other "
                "member(s); joining another mesh leaves it (its mesh key is set aside, "
                "not deleted): confirm with --leave-current"
            )
        inviter = await join_mesh(
            code,
            self._trust,
            display_name=self.display_name,
            addresses=tuple(self._addresses()),
        )
        if self._on_joined is not None:
            await self._on_joined(inviter)
        else:
            self._on_change()
        logger.info("joined mesh %s as %s", self._trust.mesh_id, self._trust.role.value)
        return self.describe()

    def members(self) -> dict[str, Any]:
        trust = self._trust
        me = {
            "node_id": trust.identity.node_id,
            "role": trust.role.value,
            "display_name": self.display_name,
            "addresses": self._addresses(),
            "this_node": True,
            "revoked": False,
        }
        others = [
            {**m, "this_node": False, "revoked": m["node_id"] in trust.revoked}
            for m in trust.members.values()
        ]
        return {
            "mesh_id": trust.mesh_id,
            "members": [me, *others],
            "revocations_version": trust.revocations_version,
        }

    async def add_admin(self, node_id: str) -> dict[str, Any]:
        """Make the member NODE_ID an admin too: it is sent an admin certificate signed by
        this admin (a delegation every member checks; the mesh key is never copied)."""
        node_id = parse_node_id(node_id)
        handle = self._peer(node_id)
        if handle is None:
            raise Unavailable(
                f"node {node_id[:7]} is not a peer this box reaches now: it must be a running "
                "member of the mesh (allerac status lists it among the peers)"
            )
        now = self._clock.now_ms()
        grant = self._trust.grant_admin(
            handle.card.membership, addresses=self._addresses(), now=now
        )
        card = await handle.client.grant_admin(handle.card, grant)
        trust = self._trust
        promoted = verify_peer_card(
            card, mesh_public_key=trust.mesh_public_key, now_ms=now, revoked=trust.revoked
        )
        if promoted.node_id != node_id or promoted.membership.role is not Role.ADMIN:
            raise RemoteProtocolError(f"node {node_id[:7]} did not take its admin certificate")
        self._on_change()
        logger.info("node %s is now an admin of mesh %s", node_id[:7], trust.mesh_id)
        return {"node_id": node_id, "role": Role.ADMIN.value, "mesh_id": trust.mesh_id}

    async def revoke(self, node_id: str) -> dict[str, Any]:
        signed = self._trust.revoke(node_id, now=self._clock.now_ms())
        self._on_change()
        # Tell every member we know of at once, and every peer up on a direct path (another
        # admin's members among them); the list is self-authenticating (signed by an admin
        # of the mesh), so it can be passed on by anyone.
        targets = [
            (m["node_id"], address)
            for m in self._trust.members.values()
            for address in m.get("addresses", [])[:1]
        ]
        known = {address for _, address in targets}
        targets += [(a, a) for a in self._peer_addresses() if a not in known]

        async def push(node: str, address: str) -> tuple[str, str | None]:
            try:
                async with PeerClient(address, trust=self._trust) as client:
                    await client.push_revocations(signed)
            except MeshError as exc:
                return node, exc.message
            return node, None

        results = await asyncio.gather(*(push(n, a) for n, a in targets))
        body = {
            "version": self._trust.revocations_version,
            "revoked": sorted(self._trust.revoked),
            "told": [n for n, err in results if err is None],
            "unreachable": {n: err for n, err in results if err is not None},
        }
        return body
