"""A node's signed goodbye: "I am shutting down", which only that node can say.

A peer that hears a goodbye takes the node out of rotation at once, so an unsigned
one would let anybody who can send a ping keep a healthy peer out of rotation (20
forged pings a second did). The goodbye rides on a Ping: the leaving node signs,
with its identity key,

    GOODBYE_CONTEXT || leaving node ID || 0 || recipient node ID || 0
                    || sent-at (ms, u64 BE) || the leaving node's card issued-at (u64 BE)

The recipient checks it with the identity key of the card it holds for that node:
- the recipient ID binds it to one peer (it cannot be replayed at another);
- sent-at must be within ±60 s of the recipient's clock (as sealed requests are);
- the card issued-at must be no older than the one the node announced in its last
  heartbeat answer (it may be newer: a node re-signs its card when its speed or its
  peers change, and may leave before its next heartbeat says so). Every start re-signs
  the card with a later issued-at, so a goodbye recorded before a restart stops holding
  at the restarted node's first heartbeat answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.trust.identity import Identity, verify_signature

GOODBYE_CONTEXT = b"allerac-mesh/v1/goodbye\x00"
GOODBYE_WINDOW_MS = 60_000
MAX_NODE_ID_CHARS = 128


@dataclass(frozen=True, kw_only=True, slots=True)
class Goodbye:
    leaving_node_id: str
    recipient_node_id: str
    sent_at_ms: int
    card_issued_at_ms: int
    signature: bytes


def _message(
    leaving_node_id: str, recipient_node_id: str, sent_at_ms: int, card_issued_at_ms: int
) -> bytes:
    return (
        GOODBYE_CONTEXT
        + leaving_node_id.encode("utf-8")
        + b"\x00"
        + recipient_node_id.encode("utf-8")
        + b"\x00"
        + (sent_at_ms & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
        + (card_issued_at_ms & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    )


def sign_goodbye(
    identity: Identity, *, recipient_node_id: str, now_ms: int, card_issued_at_ms: int
) -> Goodbye:
    message = _message(identity.node_id, recipient_node_id, now_ms, card_issued_at_ms)
    return Goodbye(
        leaving_node_id=identity.node_id,
        recipient_node_id=recipient_node_id,
        sent_at_ms=now_ms,
        card_issued_at_ms=card_issued_at_ms,
        signature=identity.sign(message),
    )


def goodbye_holds(
    goodbye: Goodbye,
    *,
    identity_public_key: bytes,
    me: str,
    card_issued_at_ms: int | None,
    now_ms: int,
) -> bool:
    """True when `goodbye` is the leaving node's own, for this node, fresh, and about a
    card no older than the one it last announced; anything else is to be ignored."""
    if goodbye.recipient_node_id != me or len(goodbye.signature) != 64:
        return False
    if abs(goodbye.sent_at_ms - now_ms) > GOODBYE_WINDOW_MS:
        return False
    if card_issued_at_ms is None or goodbye.card_issued_at_ms < card_issued_at_ms:
        return False
    message = _message(goodbye.leaving_node_id, me, goodbye.sent_at_ms, goodbye.card_issued_at_ms)
    return verify_signature(identity_public_key, goodbye.signature, message)
