"""Make a test client a real member of a running node's mesh, through a real invite."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from mesh.ledger.records import open_record
from mesh.wire.v1 import ledger_pb2 as lpb
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from node.store.ledger_store import read_ledger as read_ledger_file
from node.store.trust_store import TrustStore
from node.transport.peer_client import join_mesh
from tests.nodeproc import NodeProcess


def invite_code(node: NodeProcess, role: str = "member", ttl_s: float = 600) -> str:
    request = urllib.request.Request(
        node.url + "/allerac/mesh/invites",
        data=json.dumps({"role": role, "ttl_s": ttl_s}).encode(),
        headers={"Content-Type": "application/json", **node.owner},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["code"])


def new_trust(home: Path) -> TrustStore:
    """A fresh identity with its own mesh of one (not a member of anyone else's)."""
    resolved = Home.resolve(home)
    resolved.ensure()
    identity, _ = load_or_create_identity(resolved.identity_key)
    return TrustStore.open(resolved, identity)


async def join_as_member(node: NodeProcess, home: Path, role: str = "member") -> TrustStore:
    trust = new_trust(home)
    await join_mesh(invite_code(node, role), trust, display_name="test-client", addresses=())
    return trust


def models_config(*names: str) -> str:
    """[[models]] entries serving the embedded model under these names, greedy, with the
    system prompt the embedded model needs to answer plain questions. Slots of 1,024
    tokens, not the box's default 2,048: these tests never send longer prompts, and
    llama.cpp clears each slot's whole KV cache when the model loads (~0.1 s of CPU less
    per start, over the suite's many starts)."""
    from node.store.config_file import embedded_model_path

    path = embedded_model_path()
    return "".join(
        f'[[models]]\nname = "{name}"\npath = "{path}"\nsystem_prompt = "You are a '
        f'helpful assistant."\ntemperature = 0.0\ncontext_length = 1024\n'
        for name in names
    )


def read_ledger(home: Path) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    """What a node's ledger holds, read-only (a running node is its only writer)."""
    return read_ledger_file(home / "ledger.db")


def read_ledger_holding(
    home: Path, request_id: str, timeout_s: float = 10.0
) -> tuple[list[lpb.SignedRecord], list[lpb.Receipt]]:
    """A node's ledger once it holds a record of `request_id`: an entry node keeps a peer's
    record, with its receipt, just after the answer left (node/store/ledger_store.py)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records, receipts = read_ledger(home)
        if any(open_record(r).request_id == request_id for r in records):
            return records, receipts
        if time.monotonic() > deadline:
            raise AssertionError(f"{home.name} holds no record of request {request_id}")
        time.sleep(0.01)
