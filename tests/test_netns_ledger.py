"""The ledger across a LAN of its own (network namespaces): three boxes each record what
they serve while one of them is cut off, and once the link is back their ledgers converge
to the same verified history, with every receipt, by anti-entropy alone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.ledger.records import record_hash, verify
from tests.members import read_ledger
from tests.netns import LabNode, NetnsLab, netns_unavailable, wait_until
from tests.test_netns_mesh import static_mesh

ASK = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(autouse=True, scope="module")
def _need_netns() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")


@pytest.fixture
def lab3(tmp_path: Path) -> Iterator[NetnsLab]:
    with NetnsLab(3, tmp_path) as lab:
        yield lab


def _ask(lab: NetnsLab, node: LabNode, model: str, privacy: str) -> dict[str, int]:
    code, _, body = lab.http(
        node,
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": ASK, "max_tokens": 4},
        {"x-allerac-privacy": privacy},
    )
    assert code == 200, body
    return dict(body["usage"])


def _held(node: LabNode) -> tuple[frozenset[bytes], frozenset[bytes]]:
    records, receipts = read_ledger(node.home)
    return (
        frozenset(record_hash(r) for r in records),
        frozenset(r.SerializeToString() for r in receipts),
    )


def test_three_ledgers_converge_after_a_partition_heals(lab3: NetnsLab) -> None:
    a, b, c = static_mesh(lab3)
    _ask(lab3, a, "c-only", "mesh")  # served by c for a: c signs, a countersigns
    lab3.link_down(c)
    wait_until(lambda: lab3.peer_states(a).get(c.node_id) == "down", 8, "c is cut off")
    for node in (a, b, c):  # each side keeps serving, and recording, on its own
        for _ in range(2):
            _ask(lab3, node, "smollm2-135m-instruct", "local-only")
    _ask(lab3, a, "smollm2-135m-instruct", "mesh")
    assert _held(c) != _held(a)
    lab3.link_up(c)
    healed = time.monotonic()
    wait_until(
        lambda: _held(a) == _held(b) == _held(c), 30, "the three ledgers hold the same history"
    )
    print(f"ledgers converged {time.monotonic() - healed:.2f} s after the link came back")
    records, receipts = read_ledger(c.home)
    report = verify(records, receipts)  # every record, every node, every receipt
    assert report.ok, report.problems
    assert report.nodes == 3
    assert report.records >= 8
    # Every box now tells the same story of who used what, where.
    usage = []
    for node in (a, b, c):
        result = lab3.cli(node, "usage", "--by", "node", "--json")
        assert result.returncode == 0, result.stderr
        usage.append(json.loads(result.stdout)["rows"])
    assert usage[0] == usage[1] == usage[2]
    checked = lab3.cli(b, "ledger", "verify", "--json")
    assert checked.returncode == 0, checked.stdout
    assert json.loads(checked.stdout)["awaiting_receipts"] == 0
