"""The relay's state: open sessions by mesh, bounded queues, rates and counters.

No sockets here: `cloud_relay.server` reads frames off a session's stream and
hands them to `Switchboard.forward`, and writes what `Session.next_frame`
returns. Every queue is bounded twice (packets and bytes per recipient) and the
relay as a whole has a byte budget, so a node that floods, or one that stops
reading, costs the others nothing but the refusals it gets back.

Strangers (anyone can make a mesh): a stream holds an `Admission` on its
source address from its first byte to its end, so one address never holds
more than its share, handshakes included; a mesh holds at most its share of
sessions; a relay with an allowlist serves only the meshes on it. Packets are
charged to their sender's and the global rate only once the recipient is
known: packets to nobody cost their sender a refusal, and those come back at a
bounded rate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from mesh.clock import SYSTEM
from mesh.errors import BadSignature, Overloaded, PermissionDenied
from mesh.routing.relay import (
    Claim,
    Refused,
    RelayLimits,
    SessionIdentity,
    TokenBucket,
    check_packet,
    may_reach,
    sees_directory,
)
from mesh.trust.membership import (
    Revocations,
    Role,
    role_to_pb,
    supersedes,
    verify_revocations,
)
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb

logger = logging.getLogger(__name__)
REFUSAL_BYTES = 256  # what a refusal frame is charged against its reader's queue


class SessionClosed(Exception):
    """The session was replaced, revoked or shut down; its stream must end."""


class Session:
    def __init__(self, identity: SessionIdentity, board: Switchboard, now_s: float) -> None:
        self.identity = identity
        self._board = board
        limits = board.limits
        self.packets = TokenBucket(
            rate=limits.node_packets_per_s, burst=limits.node_packets_per_s, now_s=now_s
        )
        self.bytes = TokenBucket(
            rate=limits.node_bytes_per_s, burst=limits.node_bytes_per_s, now_s=now_s
        )
        self.refusals = TokenBucket(
            rate=limits.node_refusals_per_s, burst=limits.node_refusals_per_s, now_s=now_s
        )
        self._queue: collections.deque[tuple[rpb.RelayFrame, int]] = collections.deque()
        self.queued_bytes = 0
        self.directory_stale = sees_directory(identity.role)
        self.closed_reason = ""
        self._wake = asyncio.Event()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def role(self) -> Role:
        return self.identity.role

    def enqueue(self, frame: rpb.RelayFrame, size: int) -> bool:
        limits = self._board.limits
        if (
            len(self._queue) >= limits.queue_packets
            or self.queued_bytes + size > limits.queue_bytes
        ):
            return False
        self._queue.append((frame, size))
        self.queued_bytes += size
        self._board.queued_bytes += size
        self._wake.set()
        return True

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self._wake.set()

    def mark_directory_stale(self) -> None:
        if sees_directory(self.role):
            self.directory_stale = True
            self._wake.set()

    def drop_queue(self) -> None:
        self._board.queued_bytes -= self.queued_bytes
        self.queued_bytes = 0
        self._queue.clear()

    async def next_frame(self) -> rpb.RelayFrame:
        """The next frame for this node: the directory first when it changed, then packets."""
        while True:
            if self.closed_reason:
                raise SessionClosed(self.closed_reason)
            if self.directory_stale:
                self.directory_stale = False
                return rpb.RelayFrame(directory=self._board.directory_for(self))
            if self._queue:
                frame, size = self._queue.popleft()
                self.queued_bytes -= size
                self._board.queued_bytes -= size
                return frame
            self._wake.clear()
            await self._wake.wait()


class Admission:
    """One stream's place in its source address's share, from its first byte to its end."""

    __slots__ = ("_board", "_released", "address")

    def __init__(self, board: Switchboard, address: str) -> None:
        self._board = board
        self.address = address
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._board._release(self.address)


class Switchboard:
    def __init__(
        self,
        limits: RelayLimits | None = None,
        *,
        clock: Callable[[], float] = SYSTEM.monotonic,
        allowed_meshes: frozenset[str] | None = None,
    ) -> None:
        self.limits = limits or RelayLimits()
        self._clock = clock
        self._allowed_meshes = allowed_meshes
        self._streams_by_address: dict[str, int] = {}  # only addresses with a stream now
        self.streams = 0
        self._meshes: dict[str, dict[str, Session]] = {}
        self._revocations: dict[str, Revocations] = {}  # mesh ID -> newest seen
        self._global = TokenBucket(
            rate=self.limits.global_packets_per_s,
            burst=self.limits.global_packets_per_s,
            now_s=clock(),
        )
        self.started_s = clock()
        self.queued_bytes = 0
        self.sessions = 0
        self.sessions_opened = 0
        self.hellos_refused = 0
        self.packets_forwarded = 0
        self.bytes_forwarded = 0
        self.refused: collections.Counter[str] = collections.Counter()

    # --- sessions -------------------------------------------------------------------------

    def admit(self, address: str) -> Admission:
        """A new stream from `address` (see `mesh.routing.relay.source_address`), before anything is
        read from it: refused at once if that address, or the relay, has no place left."""
        held = self._streams_by_address.get(address, 0)
        if held >= self.limits.max_sessions_per_address:
            raise Overloaded(
                f"{address} has {held} sessions on this relay already (the most one address "
                "may hold)"
            )
        if self.streams >= self.limits.max_sessions:
            raise Overloaded(f"the relay is full ({self.limits.max_sessions} sessions)")
        self._streams_by_address[address] = held + 1
        self.streams += 1
        return Admission(self, address)

    def _release(self, address: str) -> None:
        self.streams -= 1
        held = self._streams_by_address.pop(address) - 1
        if held:
            self._streams_by_address[address] = held

    def screen(self, claim: Claim) -> None:
        """Refuse a Hello on what it claims, before its signatures are checked: a mesh this
        relay does not serve, or a new node of a mesh that holds its share already."""
        if self._allowed_meshes is not None and claim.mesh_id not in self._allowed_meshes:
            raise PermissionDenied(
                f"mesh {claim.mesh_id[:7]} is not on this relay's list of meshes it serves"
            )
        mesh = self._meshes.get(claim.mesh_id, {})
        if claim.node_id not in mesh and len(mesh) >= self.limits.max_sessions_per_mesh:
            raise Overloaded(
                f"mesh {claim.mesh_id[:7]} has {len(mesh)} sessions on this relay already "
                "(the most one mesh may hold)"
            )

    def open(self, identity: SessionIdentity) -> Session:
        """A verified Hello: file the node under its mesh (replacing an older session of
        the same node) and tell the mesh's members."""
        self.screen(Claim(node_id=identity.node_id, mesh_id=identity.mesh_id))
        if identity.revocations is not None:
            self._adopt_revocations(identity.mesh_id, identity.revocations)
        revoked = self._revocations.get(identity.mesh_id)
        if revoked is not None and identity.node_id in revoked.revoked:
            raise Refused(rpb.REFUSAL_REASON_NOT_ALLOWED, "this node is revoked from its mesh")
        mesh = self._meshes.setdefault(identity.mesh_id, {})
        old = mesh.get(identity.node_id)
        if old is None and self.sessions >= self.limits.max_sessions:
            raise Overloaded(f"the relay is full ({self.limits.max_sessions} sessions)")
        if old is not None:
            self._close(old, "replaced by a newer session of the same node")
        session = Session(identity, self, self._clock())
        # Closing the old session may have dropped the mesh's (then empty) entry.
        self._meshes.setdefault(identity.mesh_id, {})[identity.node_id] = session
        self.sessions += 1
        self.sessions_opened += 1
        self._directory_changed(identity.mesh_id)
        return session

    def _close(self, session: Session, reason: str) -> None:
        mesh = self._meshes.get(session.identity.mesh_id, {})
        if mesh.get(session.node_id) is session:
            del mesh[session.node_id]
            self.sessions -= 1
            if not mesh:
                self._meshes.pop(session.identity.mesh_id, None)
            self._directory_changed(session.identity.mesh_id)
        session.drop_queue()
        session.close(reason)

    def closed(self, session: Session) -> None:
        """The node's stream ended."""
        self._close(session, "stream ended")

    def _directory_changed(self, mesh_id: str) -> None:
        for other in self._meshes.get(mesh_id, {}).values():
            other.mark_directory_stale()

    def directory_for(self, session: Session) -> rpb.RelayDirectory:
        members = self._meshes.get(session.identity.mesh_id, {})
        return rpb.RelayDirectory(
            members=[
                rpb.RelayMember(node_id=other.node_id, role=role_to_pb(other.role))
                for other in members.values()
                if other is not session
            ]
        )

    # --- revocations --------------------------------------------------------------------------

    def revocations(self, sender: Session, signed: tpb.SignedRevocations) -> None:
        """A node hands on its mesh's newer revocation list: drop revoked sessions at once."""
        revocations = verify_revocations(signed, mesh_public_key=sender.identity.mesh_public_key)
        self._adopt_revocations(sender.identity.mesh_id, revocations)

    def _adopt_revocations(self, mesh_id: str, revocations: Revocations) -> None:
        try:
            if not supersedes(revocations, self._revocations.get(mesh_id)):
                return
        except BadSignature as exc:  # drops revoked nodes, or signed by a revoked admin
            logger.info("ignored a revocation list for mesh %s: %s", mesh_id[:7], exc.message)
            return
        self._revocations[mesh_id] = revocations
        for node_id in revocations.revoked:
            session = self._meshes.get(mesh_id, {}).get(node_id)
            if session is not None:
                logger.info("closing the session of revoked node %s", node_id[:7])
                self._close(session, "revoked from its mesh")

    # --- forwarding ------------------------------------------------------------------------------

    def forward(self, sender: Session, packet: rpb.RelayPacket) -> None:
        """Deliver one packet or refuse it (the refusal goes back to the sender)."""
        size = packet.ByteSize()
        recipient_id = packet.peer[:64]
        try:
            self._deliver(sender, packet, size)
        except Refused as refused:
            name = rpb.RefusalReason.Name(refused.reason)
            self.refused[name.removeprefix("REFUSAL_REASON_")] += 1
            # A node that keeps sending what cannot be delivered hears of it at a bounded
            # rate (the rest are counted only); one that does not read its refusals loses
            # them, not the relay's memory.
            if not sender.refusals.take(1, self._clock()):
                return
            refusal = rpb.RelayRefusal(
                peer=recipient_id,
                stream_id=packet.stream_id,
                kind=packet.kind,
                reason=name,
                message=refused.message,
            )
            sender.enqueue(rpb.RelayFrame(refusal=refusal), REFUSAL_BYTES)
            return
        self.packets_forwarded += 1
        self.bytes_forwarded += size

    def _deliver(self, sender: Session, packet: rpb.RelayPacket, size: int) -> None:
        check_packet(packet, sender_role=sender.role)
        recipient = self._meshes.get(sender.identity.mesh_id, {}).get(packet.peer)
        if recipient is None:
            raise Refused(rpb.REFUSAL_REASON_UNKNOWN_PEER, "the recipient is not connected")
        if not may_reach(sender.role, recipient.role):
            raise Refused(rpb.REFUSAL_REASON_NOT_ALLOWED, "overflow nodes do not reach each other")
        # Only a packet that can be delivered spends the rates: the sender's first, so a node
        # over its own rate never spends the relay's.
        now = self._clock()
        if not sender.packets.take(1, now) or not sender.bytes.take(size, now):
            raise Refused(rpb.REFUSAL_REASON_RATE_LIMITED, "this node is over its relay rate")
        if not self._global.take(1, now):
            raise Refused(rpb.REFUSAL_REASON_RELAY_FULL, "the relay is over its global rate")
        if self.queued_bytes + size > self.limits.global_queue_bytes:
            raise Refused(rpb.REFUSAL_REASON_RELAY_FULL, "the relay's queues are full")
        packet.peer = sender.node_id  # the relay, not the sender, says who sent it
        if not recipient.enqueue(rpb.RelayFrame(packet=packet), size):
            raise Refused(rpb.REFUSAL_REASON_PEER_FULL, "the recipient's queue is full")

    def stats(self) -> rpb.RelayStats:
        return rpb.RelayStats(
            sessions=self.sessions,
            meshes=len(self._meshes),
            sessions_opened=self.sessions_opened,
            hellos_refused=self.hellos_refused,
            packets_forwarded=self.packets_forwarded,
            bytes_forwarded=self.bytes_forwarded,
            packets_refused=dict(self.refused),
            queued_bytes=self.queued_bytes,
            uptime_s=int(self._clock() - self.started_s),
        )
