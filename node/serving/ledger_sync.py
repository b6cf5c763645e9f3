"""Keeping this node's ledger, and its list of the mesh's users, in step with the mesh's
(anti-entropy, DESIGN.md "Usage ledger and quotas").

Every SYNC_INTERVAL_S this node pulls from a few peers that are up (all of them in a
small mesh), over the same sealed calls as inference, directly or through the relay:
`node.store.ledger_store.pull` asks for what follows its per-node heads and verifies
everything before keeping it. A peer that cannot answer is simply asked again next
round; a fork is logged once and kept as proof. `kick()` asks for a round now (after
this node recorded something, so others learn of it sooner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh.clock import SYSTEM, Clock
from mesh.errors import MeshError, Unavailable
from mesh.inference import Route
from mesh.routing.peers import PeerState, PeerTable
from mesh.trust.membership import read_cert, verify_cert
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.ledger_checker import Checker
from node.store.ledger_store import LedgerStore, pull
from node.store.trust_store import TrustStore
from node.store.users_admin import UsersAdmin
from node.tasks import Tasks
from node.transport.peering import Peering

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 2.0
PEERS_PER_ROUND = 4
# A peer that goes quiet mid-answer (its relay session replaced under a call, say) is
# given up on after this long without a frame, and asked again next round.
FRAME_TIMEOUT_S = 5.0
NEW_PEER_CHECK_S = 0.25


@dataclass(kw_only=True)
class PeerSync:
    """What the last pull from one peer did."""

    at_ms: int = 0
    records: int = 0
    receipts: int = 0
    error: str = ""


class LedgerSync:
    def __init__(
        self,
        *,
        store: LedgerStore,
        table: PeerTable,
        links: Peering,
        users: UsersAdmin | None = None,
        trust: TrustStore | None = None,
        interval_s: float = SYNC_INTERVAL_S,
        workers: int = 2,
        active: Callable[[], bool] = lambda: True,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._active = active
        self._store = store
        self._table = table
        self._links = links
        self._users = users
        self._trust = trust
        self._certs: dict[str, bytes] = {}  # the membership certificates already kept
        self._interval_s = interval_s
        self._checker = Checker(workers)
        self._wake = asyncio.Event()
        self._tasks = Tasks("ledger sync")
        self.peers: dict[str, PeerSync] = {}
        self._logged: set[str] = set()
        self._own_chain_due: float | None = None

    async def start(self, *, own_chain_wait_s: float | None = None) -> None:
        """`own_chain_wait_s`: the store holds this node's own records until a member has
        answered a pull (or that long at most): see `LedgerStore.hold_own_records`."""
        if own_chain_wait_s is not None:
            self._own_chain_due = self._clock.monotonic() + own_chain_wait_s
        self._tasks.start(self._run(), "rounds")

    def _own_chain_known(self, outcome: PeerSync | None) -> None:
        """Release this node's own records once a member answered, or when waiting longer
        would only hold answers up."""
        if self._own_chain_due is None:
            return
        if outcome is not None and not outcome.error:
            logger.info("this node's own chain is known again; its records go on from it")
        elif self._clock.monotonic() >= self._own_chain_due:
            logger.warning(
                "no member answered for this node's own chain in time; its records go on "
                "from what this box holds (a second history is possible: ledger verify "
                "will show it as a fork)"
            )
        else:
            return
        self._own_chain_due = None
        self._store.release_own_records()

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self._checker.close()

    def kick(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        last_round = self._clock.monotonic()
        was_up: set[str] = set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), NEW_PEER_CHECK_S)
            if not self._active():
                continue
            up = [peer.node_id for peer in self._table if peer.state is PeerState.UP]
            if self._wake.is_set() or self._clock.monotonic() - last_round >= self._interval_s:
                self._wake.clear()
                last_round = self._clock.monotonic()
                chosen = random.sample(up, min(len(up), PEERS_PER_ROUND))
            else:  # a peer just up (a new member, or back after a partition): now
                chosen = [node_id for node_id in up if node_id not in was_up]
            was_up = set(up)
            # Each peer on its own: one slow or silent peer holds up nobody else.
            await asyncio.gather(*(self._pull_safely(node_id) for node_id in chosen))
            self._own_chain_known(None)

    async def _pull_safely(self, node_id: str) -> None:
        """A pull whatever happens: a bug met with one peer must not end the syncing."""
        try:
            await self.pull_from(node_id)
        except Exception as exc:
            logger.exception("ledger sync with %s failed", node_id[:7])
            self.peers[node_id] = PeerSync(at_ms=self._clock.now_ms(), error=repr(exc))

    async def _remember(self, certs: dict[str, bytes]) -> None:
        """Keep members' certificates, to send with their records (written when new)."""
        if self._trust is not None:
            certs[self._trust.identity.node_id] = self._trust.cert.SerializeToString()
        new = {k: v for k, v in certs.items() if v and self._certs.get(k) != v}
        if new:
            await self._store.remember_members(new)
            self._certs.update(new)

    def _vouch(self, raw: bytes) -> str | None:
        """The node a certificate proves a member of this mesh, or None. Expiry and
        revocation do not matter here: what a member signed while it was one stays true."""
        assert self._trust is not None
        try:
            signed = tpb.SignedCert.FromString(raw)
            cert, _ = read_cert(signed)
            member = verify_cert(
                signed,
                mesh_public_key=self._trust.mesh_public_key,
                now_ms=cert.issued_at_unix_ms,
            )
        except (MeshError, DecodeError, ValueError):
            return None
        return member.node_id

    async def pull_from(self, node_id: str) -> PeerSync:
        """One pull from one peer, until it has nothing more for us."""
        outcome = PeerSync(at_ms=self._clock.now_ms())
        link = self._links.client(node_id)
        if link is None:
            outcome.error = "no connection"
            self.peers[node_id] = outcome
            return outcome
        client, card = link
        await self._remember({node_id: card.card.membership.SerializeToString()})
        peer = self._table.get(node_id)
        if self._users is not None and peer is not None and peer.route is not Route.CLOUD:
            # Users travel between members only: a cloud node never adds one.
            try:
                listed = await client.users(card, self._users.digest(), timeout_s=FRAME_TIMEOUT_S)
                if listed.users:
                    await self._users.merge(listed)
            except MeshError as exc:
                logger.debug("users sync with %s failed: %s", node_id[:7], exc.message)

        async def ask(request: lpb.SyncRequest) -> AsyncIterator[lpb.SyncBatch]:
            frames = client.sync(card, request)
            async with contextlib.aclosing(frames):
                while True:
                    try:
                        batch = await asyncio.wait_for(anext(frames), FRAME_TIMEOUT_S)
                    except StopAsyncIteration:
                        return
                    except TimeoutError as exc:
                        raise Unavailable(
                            f"no ledger answer from {node_id[:7]} in {FRAME_TIMEOUT_S:g} s"
                        ) from exc
                    yield batch

        try:
            cloud = peer is not None and peer.route is Route.CLOUD
            done = await pull(
                self._store,
                node_id,
                ask,
                self._checker,
                own_only=cloud,
                vouch=self._vouch if self._trust is not None else None,
                revoked_at=self._trust.revoked_at if self._trust is not None else None,
            )
        except MeshError as exc:
            outcome.error = exc.message
            logger.debug("ledger sync with %s failed: %s", node_id[:7], exc.message)
        else:
            outcome.records, outcome.receipts = done.records, done.receipts
            for problem in done.problems:
                if problem not in self._logged:  # once: a fork stays a fork
                    self._logged.add(problem)
                    logger.warning("ledger sync with %s: %s", node_id[:7], problem)
        self.peers[node_id] = outcome
        self._own_chain_known(outcome)
        return outcome
