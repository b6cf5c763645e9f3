"""Display names: how people tell boxes apart.

A node ID is 56 characters nobody reads; a box is shown by its display name. The
owner may set one (`display_name` in the config); the default is the host name plus
a short node-ID suffix, so that two boxes whose host names are the same (two fresh
installs both called `allerac`) still read differently. Names learnt from other boxes
(their signed cards, the members list) are untrusted text: bounded and printable, or
left out.
"""

from __future__ import annotations

import re

MAX_NAME_CHARS = 64
SUFFIX_CHARS = 5  # 25 bits of the node ID: boxes of one mesh never share it in practice
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_display_name(hostname: str, node_id: str) -> str:
    """`kitchen-ABCDE`: the host name (its first label, made printable) plus the first
    characters of the node ID."""
    host = _UNSAFE.sub("-", hostname.split(".")[0]).strip("-") or "box"
    suffix = node_id.replace("-", "")[:SUFFIX_CHARS]
    return f"{host[: MAX_NAME_CHARS - SUFFIX_CHARS - 1]}-{suffix}"


def clean_name(name: object) -> str | None:
    """A display name from outside, or None when it is not one (too long, not printable,
    empty)."""
    if not isinstance(name, str):
        return None
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        return None
    return name


def node_label(node_id: str, names: dict[str, str]) -> str:
    """What a person reads for a node: its display name, or the start of its ID."""
    return names.get(node_id) or node_id[:15]
