"""LAN discovery hints (mDNS, `_allerac._tcp.local.`), sans I/O.

What a node announces is only a hint: its node ID, mesh ID, protocol version
and gRPC port in TXT. Nothing is trusted because it answered mDNS: a hint only
tells the peering layer where to try, and a peer is used after its signed card
and membership verify. Bad hints (junk, oversized, other versions, other
meshes, ourselves) are dropped here with a reason, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh import PROTOCOL_VERSION
from mesh.errors import MeshError
from mesh.identity import parse_node_id

SERVICE_TYPE = "_allerac._tcp.local."
MAX_TXT_VALUE_BYTES = 128
MAX_TXT_KEYS = 16


@dataclass(frozen=True, slots=True)
class Hint:
    node_id: str
    mesh_id: str
    port: int


def hint_properties(*, node_id: str, mesh_id: str, port: int) -> dict[str, str]:
    return {"id": node_id, "mesh": mesh_id, "v": str(PROTOCOL_VERSION), "port": str(port)}


def parse_hint(properties: dict[bytes, bytes | None]) -> tuple[Hint | None, str]:
    """TXT properties -> (hint, "") or (None, why it was dropped)."""
    if not isinstance(properties, dict) or len(properties) > MAX_TXT_KEYS:
        return None, "too many TXT entries"
    values: dict[str, str] = {}
    for key, value in properties.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes | None):
            return None, "malformed TXT entry"
        if value is not None and len(value) > MAX_TXT_VALUE_BYTES:
            return None, "oversized TXT entry"
        try:
            values[key.decode("ascii")] = (value or b"").decode("ascii")
        except UnicodeDecodeError:
            return None, "non-ASCII TXT entry"
    if values.get("v") != str(PROTOCOL_VERSION):
        return None, f"protocol version {values.get('v')!r} is not spoken here"
    try:
        node_id = parse_node_id(values.get("id", ""))
        mesh_id = parse_node_id(values.get("mesh", ""))
    except MeshError:
        return None, "malformed node or mesh ID"
    port_text = values.get("port", "")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None, "malformed port"
    return Hint(node_id=node_id, mesh_id=mesh_id, port=int(port_text)), ""
