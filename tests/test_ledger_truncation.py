"""A ledger that lost its newest records, or all of them (issue 12, findings 4 and 5),
with real node processes. A chain's head is evident outside the chain itself: the
receipts of the records, the heads this box held, and heads the node signed and its
peers countersigned as they synced. `ledger verify` names what is missing by node and
sequence and exits 1; `allerac usage` says its figures lack records. A box that lost
records, or its whole ledger, gets them back from its peers without forking its chain,
and leaves no false alarm anywhere."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.ledger.records import open_record, record_hash
from tests.members import models_config, read_ledger
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import peer_states, post, start_mesh, wait_until

MODEL = "smollm2-135m-instruct"


def _serve_locally(node: NodeProcess, n: int) -> None:
    for _ in range(n):
        code, _, body = post(
            node,
            "/v1/completions",
            {"model": MODEL, "prompt": "1, 2,", "max_tokens": 1},
            {"x-allerac-privacy": "local-only"},
        )
        assert code == 200, body


def _verify(home: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli(home, "ledger", "verify", "--json")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode, dict(json.loads(result.stdout))


def _own_seqs(node: NodeProcess) -> list[int]:
    records, _ = read_ledger(node.home)
    return sorted(r.seq for r in map(open_record, records) if r.node_id == node.node_id)


def _receipted(home: Path, node_id: str) -> set[int]:
    records, receipts = read_ledger(home)
    hashes = {r.record_hash for r in receipts}
    return {
        open_record(r).seq
        for r in records
        if open_record(r).node_id == node_id and record_hash(r) in hashes
    }


@pytest.fixture(scope="module")
def one_box(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The ledger of a box that answered four requests, and its node ID."""
    root = tmp_path_factory.mktemp("one-box")
    node = NodeProcess(root / "box", config=models_config(MODEL)).start()
    try:
        _serve_locally(node, 4)
        assert node.stop() == 0
    finally:
        node.kill()
    return node.home, node.node_id


DELETIONS = {
    "the newest records, receipts left": ["DELETE FROM records WHERE seq > 2"],
    "the newest records and their receipts": [
        "DELETE FROM receipts WHERE hash IN (SELECT hash FROM records WHERE seq > 2)",
        "DELETE FROM records WHERE seq > 2",
    ],
    "the whole chain and every receipt": ["DELETE FROM receipts", "DELETE FROM records"],
}


@pytest.mark.parametrize("deleted", list(DELETIONS))
def test_deleted_records_are_named_by_node_and_sequence(
    one_box: tuple[Path, str], tmp_path: Path, deleted: str
) -> None:
    original, node_id = one_box
    home = tmp_path / "copy"
    home.mkdir(mode=0o700)
    shutil.copy(original / "ledger.db", home / "ledger.db")
    with sqlite3.connect(home / "ledger.db") as db:
        for statement in DELETIONS[deleted]:
            db.execute(statement)
    db.close()
    code, report = _verify(home)
    assert code == 1, report
    first = 1 if "whole" in deleted else 3
    truncated = [p for p in report["problems"] if p["kind"] == "truncated"]
    assert [(p["node_id"], p["seq"]) for p in truncated] == [(node_id, first)], report
    assert f"{first} to 4" in truncated[0]["detail"]
    # usage shows what it holds, and says plainly that records are missing.
    usage = run_cli(home, "usage", "--by", "node", "--json")
    assert usage.returncode == 1, usage.stdout + usage.stderr
    assert json.loads(usage.stdout)["missing"] == [
        {"node_id": node_id, "from_seq": first, "to_seq": 4}
    ]
    text = run_cli(home, "usage")
    assert text.returncode == 1
    assert "missing" in text.stderr
    assert f"#{first}" in text.stderr


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(
        tmp_path_factory.mktemp("pair"), {"a": models_config(MODEL), "b": models_config(MODEL)}
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def _restart(node: NodeProcess, peer: NodeProcess) -> None:
    """Start a stopped box again where it was (its peers know its address)."""
    grpc_port = str(node.info["grpc_address"]).rsplit(":", 1)[1]
    http_port = node.url.rsplit(":", 1)[1]
    node.args = ["--peer", peer.info["grpc_address"], "--grpc-port", grpc_port]
    node.args += ["--http-port", http_port]
    node.start()
    wait_until(
        lambda: (
            peer_states(node).get(peer.node_id) == "up"
            and peer_states(peer).get(node.node_id) == "up"
        ),
        15,
        "each is up at the other",
    )


def test_a_truncated_box_is_found_out_and_healed_by_its_peer(pair: dict[str, NodeProcess]) -> None:
    a, b = pair["a"], pair["b"]
    _serve_locally(a, 4)
    top = _own_seqs(a)[-1]
    wait_until(lambda: _receipted(b.home, a.node_id) >= set(range(1, top + 1)), 20, "b holds a's")

    # a's head is signed by a and countersigned by b as b syncs, and a holds it too.
    def countersigned_at(home: Path) -> bool:
        chains = {c["node_id"]: c for c in _verify(home)[1]["chains"]}
        head = chains.get(a.node_id, {})
        return head.get("signed_seq") == top and b.node_id in head.get("countersigned_by", [])

    wait_until(lambda: countersigned_at(b.home) and countersigned_at(a.home), 20, "a's head")
    assert a.stop() == 0
    with sqlite3.connect(a.home / "ledger.db") as db:  # someone deletes a's newest records
        db.execute("DELETE FROM records WHERE node_id = ? AND seq > ?", (a.node_id, top - 2))
    db.close()
    code, report = _verify(a.home)
    assert code == 1
    assert ("truncated", a.node_id, top - 1) in {
        (p["kind"], p["node_id"], p["seq"]) for p in report["problems"]
    }
    # Back up, a goes on after the head it knows it had: no second history for top-1...
    _restart(a, b)
    _serve_locally(a, 1)
    assert _own_seqs(a)[-1] == top + 1
    # ...and its peer gives the deleted records back: every box verifies again.
    wait_until(lambda: _own_seqs(a) == list(range(1, top + 2)), 20, "a's records restored")
    wait_until(lambda: top + 1 in _receipted(b.home, a.node_id), 20, "b holds a's new record")
    for node in (a, b):
        code, report = _verify(node.home)
        assert code == 0, report


def test_a_box_that_lost_its_ledger_recovers_it_from_its_peer(
    pair: dict[str, NodeProcess],
) -> None:
    a, b = pair["a"], pair["b"]
    _serve_locally(a, 2)
    top = _own_seqs(a)[-1]
    wait_until(lambda: _receipted(b.home, a.node_id) >= set(range(1, top + 1)), 20, "b holds a's")
    assert a.stop() == 0
    for suffix in ("", "-wal", "-shm"):  # the disk is replaced; the identity was backed up
        (a.home / f"ledger.db{suffix}").unlink(missing_ok=True)
    _restart(a, b)
    # Recovered from b: every record of a's chain and every countersignature, a's own
    # included (they were fetched by record, not by b's row numbers).
    wait_until(
        lambda: _receipted(a.home, a.node_id) == set(range(1, top + 1)), 20, "a's chain is back"
    )
    _serve_locally(a, 1)
    assert _own_seqs(a)[-1] == top + 1
    wait_until(lambda: top + 1 in _receipted(b.home, a.node_id), 20, "b holds a's new record")
    for node in (a, b):
        code, report = _verify(node.home)
        assert code == 0, report
        assert report["awaiting_receipts"] == 0


def test_a_box_that_lost_its_ledger_and_serves_at_once_does_not_fork(
    pair: dict[str, NodeProcess],
) -> None:
    """Without a trace of its own chain, a rebuilt box that answers before its first sync
    would sign a second #1 (a fork). Its records wait until a member told it its chain."""
    a, b = pair["a"], pair["b"]
    _serve_locally(b, 2)
    top = _own_seqs(b)[-1]
    wait_until(lambda: _receipted(a.home, b.node_id) >= set(range(1, top + 1)), 20, "a holds b's")
    assert b.stop() == 0
    for suffix in ("", "-wal", "-shm"):
        (b.home / f"ledger.db{suffix}").unlink(missing_ok=True)
    grpc_port = str(b.info["grpc_address"]).rsplit(":", 1)[1]
    b.args = ["--peer", a.info["grpc_address"], "--grpc-port", grpc_port]
    b.start()
    _serve_locally(b, 1)  # at once, before any sync: its record waits for its chain
    assert _own_seqs(b)[-1] == top + 1
    assert "its next records wait" in b.output()
    wait_until(lambda: top + 1 in _receipted(a.home, b.node_id), 20, "a holds b's new record")
    for node in (a, b):
        code, report = _verify(node.home)
        assert code == 0, report
