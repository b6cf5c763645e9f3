"""Node cards: a node's signed capability advertisement (DESIGN.md "Node card").

The card is serialized once and signed over exactly those bytes with the
node's Ed25519 identity key, with a domain-separation prefix so a card
signature can never be replayed as a signature over anything else. A receiver
verifies the bytes, then parses them (`open_card`); nothing is re-encoded.
Load is not in the card: it travels in pings. The hardware summary is the caller's
(the node probes its box once, at start: `node.store.hardware`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION, __version__
from mesh.errors import BadSignature, RemoteProtocolError
from mesh.inference import ModelInfo
from mesh.trust.enckeys import PeerKeys, verify_encryption_keys
from mesh.trust.identity import Identity, node_id_from_public_key, verify_signature
from mesh.trust.membership import Membership, verify_cert
from mesh.wire.codec import model_to_pb
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb

CARD_SIGNATURE_CONTEXT = b"allerac-mesh/v1/node-card\x00"
MAX_CARD_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class HardwareSummary:
    """What a full card says about the box (0 or "" where it is not known)."""

    cpu_count: int = 0
    cpu_model: str = ""
    memory_bytes: int = 0
    gpu: str = ""
    gpu_memory_bytes: int = 0
    profile: str = ""  # the box profile (mesh.profiles): lite, home or pro

    def to_pb(self) -> pb.Hardware:
        return pb.Hardware(
            cpu_count=self.cpu_count,
            cpu_model=self.cpu_model,
            memory_bytes=self.memory_bytes,
            gpu=self.gpu,
            gpu_memory_bytes=self.gpu_memory_bytes,
            profile=self.profile,
        )


def sign_card(
    identity: Identity,
    *,
    membership: tpb.SignedCert,
    encryption_keys: tpb.SignedEncryptionKeys,
    mesh_id: str,
    models: Iterable[ModelInfo] = (),
    grpc_addresses: Iterable[str] = (),
    display_name: str = "",
    peer_addresses: Iterable[str] = (),
    now_ms: int,
    hardware: HardwareSummary | None = None,
    tier: int = pb.TIER_HOME,
    public: bool = False,
) -> pb.SignedCard:
    """The full card, or with `public=True` only what may travel in clear: who the
    node is, its membership and its encryption keys (DESIGN.md "Sealing"). The full card
    carries `hardware` when it is given."""
    card = pb.NodeCard(
        protocol_version=PROTOCOL_VERSION,
        node_id=identity.node_id,
        identity_public_key=identity.public_key_raw,
        software_version=__version__,
        issued_at_unix_ms=now_ms,
        membership=membership,
        encryption_keys=encryption_keys,
        mesh_id=mesh_id,
    )
    if not public:
        card.tier = tier  # type: ignore[assignment]
        if hardware is not None:
            card.hardware.CopyFrom(hardware.to_pb())
        card.models.extend(model_to_pb(m) for m in models)
        card.grpc_addresses.extend(grpc_addresses)
        card.display_name = display_name
        card.peer_addresses.extend(peer_addresses)
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


@dataclass(frozen=True, kw_only=True)
class PeerCard:
    """A card whose signature, membership and encryption keys all verified."""

    card: pb.NodeCard
    membership: Membership
    keys: PeerKeys

    @property
    def node_id(self) -> str:
        return self.card.node_id


def verify_peer_card(
    signed: pb.SignedCard,
    *,
    mesh_public_key: bytes,
    now_ms: int,
    revoked: frozenset[str] = frozenset(),
) -> PeerCard:
    """A peer is used only after this passes (answering mDNS proves nothing)."""
    card = open_card(signed)
    membership = verify_cert(
        card.membership, mesh_public_key=mesh_public_key, now_ms=now_ms, revoked=revoked
    )
    if membership.identity_public_key != card.identity_public_key:
        raise BadSignature("card's membership certificate is for another identity key")
    keys = verify_encryption_keys(
        card.encryption_keys,
        identity_public_key=card.identity_public_key,
        node_id=card.node_id,
        now_ms=now_ms,
    )
    return PeerCard(card=card, membership=membership, keys=keys)
