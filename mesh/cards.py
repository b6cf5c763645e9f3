"""Node cards: a node's signed capability advertisement (DESIGN.md "Node card").

The card is serialized once and signed over exactly those bytes with the
node's Ed25519 identity key, with a domain-separation prefix so a card
signature can never be replayed as a signature over anything else. A receiver
verifies the bytes, then parses them (`open_card`); nothing is re-encoded.
Load is not in the card: it travels in pings.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION, __version__
from mesh.errors import RemoteProtocolError
from mesh.identity import Identity, node_id_from_public_key, verify_signature
from mesh.inference import ModelInfo
from mesh.wire.codec import model_to_pb
from mesh.wire.v1 import node_pb2 as pb

CARD_SIGNATURE_CONTEXT = b"allerac-mesh/v1/node-card\x00"
MAX_CARD_BYTES = 64 * 1024


def hardware_summary() -> pb.Hardware:
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return pb.Hardware(cpu_count=os.cpu_count() or 0, cpu_model=cpu_model, memory_bytes=memory)


def sign_card(
    identity: Identity,
    *,
    models: Iterable[ModelInfo],
    grpc_addresses: Iterable[str],
    display_name: str,
    now_ms: int,
    tier: int = pb.TIER_HOME,
) -> pb.SignedCard:
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=identity.node_id,
        identity_public_key=identity.public_key_raw,
        software_version=__version__,
        tier=tier,  # type: ignore[arg-type]
        hardware=hardware_summary(),
        models=[model_to_pb(m) for m in models],
        grpc_addresses=list(grpc_addresses),
        issued_at_unix_ms=now_ms,
        display_name=display_name,
    )
    data = card.SerializeToString(deterministic=True)
    return pb.SignedCard(card=data, signature=identity.sign(CARD_SIGNATURE_CONTEXT + data))


def open_card(signed: pb.SignedCard) -> pb.NodeCard:
    """Verify a signed card and return its contents; raises RemoteProtocolError."""
    if len(signed.card) > MAX_CARD_BYTES:
        raise RemoteProtocolError(
            f"card is {len(signed.card)} bytes; the limit is {MAX_CARD_BYTES}"
        )
    card = pb.NodeCard()
    try:
        card.ParseFromString(signed.card)
    except (DecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"card does not parse: {exc}") from exc
    if len(card.identity_public_key) != 32:
        raise RemoteProtocolError("card has no valid identity key")
    if not verify_signature(
        card.identity_public_key, signed.signature, CARD_SIGNATURE_CONTEXT + signed.card
    ):
        raise RemoteProtocolError("card signature does not verify")
    if node_id_from_public_key(card.identity_public_key) != card.node_id:
        raise RemoteProtocolError("card node ID does not match its identity key")
    return card
