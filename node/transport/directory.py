"""Who can be reached now: the one thing the rest of the node asks of peering.

Quotas, ledger sync and scheduling call other nodes, but they need none of what
peering does to keep in touch (discovery, heartbeats, the relay directory): only a
handle to a verified peer, or None when it cannot be reached. They depend on this
protocol, so that peering depends on them and not the other way round.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from mesh.trust.cards import PeerCard
from node.transport.peer_client import PeerClient


class PeerHandle(NamedTuple):
    """A verified peer: how to call it, and its card (its keys)."""

    client: PeerClient
    card: PeerCard


class PeerDirectory(Protocol):
    def client(self, node_id: str) -> PeerHandle | None:
        """The peer `node_id` as it can be called now, or None when it cannot."""
