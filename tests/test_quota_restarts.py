"""Quotas across a restart of the user's home (issue 12, finding 3), on real nodes: the
reservations and leases the home held survive a kill -9. A lease given back while the
home is unreachable is tested in process (tests/test_mesh_quotas.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.members import models_config
from tests.nodeproc import NodeProcess
from tests.test_lan_mesh import start_mesh
from tests.test_quotas import MODEL, add_user, post, quota_state, works_everywhere


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(tmp_path, {name: models_config(MODEL) for name in ("home", "entry")})
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def reserved(node: NodeProcess, user: str) -> int:
    return int(quota_state(node, user)[0]["reserved"])


def settled_reservation(node: NodeProcess, user: str, quiet_s: float = 3.0) -> int:
    """What `node` holds for `user` once it stops changing: the entry node reports an
    answer's records against its lease within a second or two after the answer."""
    deadline = time.monotonic() + 30
    last, since = reserved(node, user), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the reservation never settled"
        time.sleep(0.25)
        now = reserved(node, user)
        if now != last:
            last, since = now, time.monotonic()
    return last


def restart_on_the_same_ports(node: NodeProcess) -> NodeProcess:
    port = node.info["grpc_address"].rsplit(":", 1)[1]
    return NodeProcess(node.home, "--grpc-port", port, config=node.config).start()


def test_a_homes_reservations_survive_a_crash(pair: dict[str, NodeProcess]) -> None:
    home, entry = pair["home"], pair["entry"]
    key = add_user(home, "ursula", "mesh=100k/day")
    works_everywhere([entry], key)  # her key works there; the entry node holds a lease now
    assert post(entry, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, key)[0] == 200
    held = settled_reservation(home, "ursula")  # the answer's report is in
    assert held > 0  # the entry node's lease, reserved at her home
    home.kill()  # kill -9: no chance to write anything on the way out
    home = pair["home"] = restart_on_the_same_ports(home)
    assert reserved(home, "ursula") == held  # taken back: nothing can be spent twice
    assert "took back" in home.output()
