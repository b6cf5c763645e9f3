"""The display names this box has seen, kept in HOME/node-names.json.

The ledger names nodes by ID only; `allerac usage --by node` reads the ledger with
no node running, so the running node keeps the names it knows (its own, its peers'
from their signed cards, the members it invited) in a small file the command reads.
The file is a hint for people, never a trust decision: a damaged or foreign file is
ignored (IDs are shown instead), and it is bounded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mesh.errors import ConfigError, MeshError
from mesh.trust.names import clean_name
from node.store.files import read_owner_only, write_private

logger = logging.getLogger(__name__)

FILE_NAME = "node-names.json"
OWN_NAME_FILE = "display-name"  # the name the owner gave this box in the console
MAX_NAMES = 1024
MAX_FILE_BYTES = 256 * 1024


def names_path(root: Path) -> Path:
    return root / FILE_NAME


def read_names(path: Path) -> dict[str, str]:
    """Node ID -> display name; {} when there is no usable file."""
    try:
        data = read_owner_only(path, what="node names", max_bytes=MAX_FILE_BYTES, error=ConfigError)
    except MeshError as exc:
        logger.warning("%s; node IDs are shown instead of names", exc.message)
        return {}
    if data is None:
        return {}
    try:
        raw = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    names: dict[str, str] = {}
    for node_id, name in list(raw.items())[:MAX_NAMES]:
        cleaned = clean_name(name)
        if isinstance(node_id, str) and len(node_id) <= 128 and cleaned is not None:
            names[node_id] = cleaned
    return names


def read_own_name(root: Path) -> str | None:
    """The display name set in the console, if any (a damaged file: none)."""
    try:
        data = read_owner_only(
            root / OWN_NAME_FILE, what="display name", max_bytes=1024, error=ConfigError
        )
    except MeshError as exc:
        logger.warning("%s; the default display name is used", exc.message)
        return None
    if data is None:
        return None
    return clean_name(data.decode("utf-8", "replace"))


def write_own_name(root: Path, name: str) -> None:
    write_private(root / OWN_NAME_FILE, (name + "\n").encode("utf-8"))


class NamesFile:
    """What the running node knows, written when it changes (a few times a day)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._names = read_names(path)

    @property
    def names(self) -> dict[str, str]:
        return dict(self._names)

    def observe(self, seen: dict[str, str]) -> None:
        """Merge names just seen (the newest wins); write the file when anything changed."""
        merged = dict(self._names)
        for node_id, name in seen.items():
            cleaned = clean_name(name)
            if cleaned is not None:
                merged[node_id] = cleaned
        if merged == self._names:
            return
        if len(merged) > MAX_NAMES:  # keep the newest: those just seen come last
            merged = dict(list(merged.items())[-MAX_NAMES:])
        self._names = merged
        try:
            write_private(self._path, json.dumps(merged, indent=1, sort_keys=True).encode())
        except OSError as exc:
            logger.warning("cannot write %s: %s", self._path, exc.strerror)
