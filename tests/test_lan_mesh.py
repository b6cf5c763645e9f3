"""Boxes pooled into one service: real node processes on loopback, found through one
static peer and the mesh's own gossip (the mDNS and network-namespace tests come with
LAN discovery)."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.config import embedded_model_path
from mesh.ledger.records import open_record, record_hash, verify
from mesh.wire.v1 import ledger_pb2 as lpb
from tests.members import models_config, read_ledger, read_ledger_holding
from tests.nodeproc import NodeProcess, run_cli

MODEL_FILE = embedded_model_path()


def status(node: NodeProcess) -> dict[str, Any]:
    with urllib.request.urlopen(node.url + "/allerac/status", timeout=10) as response:
        return dict(json.loads(response.read()))


def wait_until(check: Any, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def peer_states(node: NodeProcess) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in status(node)["peers"]}


def post(
    node: NodeProcess, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        node.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def start_mesh(root: Path, configs: dict[str, str]) -> dict[str, NodeProcess]:
    """The first node is the admin; the others know only its address and join by invite."""
    nodes: dict[str, NodeProcess] = {}
    names = list(configs)
    try:
        admin = NodeProcess(root / names[0], config=configs[names[0]]).start()
        nodes[names[0]] = admin
        for name in names[1:]:
            node = NodeProcess(
                root / name, "--peer", admin.info["grpc_address"], config=configs[name]
            ).start()
            nodes[name] = node
            code = run_cli(admin.home, "mesh", "invite").stdout.strip()
            joined = run_cli(node.home, "mesh", "join", code)
            assert joined.returncode == 0, joined.stderr
        others = {n.node_id for n in nodes.values()}
        for node in nodes.values():
            wait_until(
                lambda node=node: (
                    {k for k, v in peer_states(node).items() if v == "up"}
                    == others - {node.node_id}
                ),
                10,
                f"{node.home.name} sees every other box up",
            )
    except BaseException:
        for node in nodes.values():
            node.kill()
        raise
    return nodes


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(
        tmp_path_factory.mktemp("mesh3"),
        {
            "a": models_config("smollm2-135m-instruct"),
            "b": models_config("smollm2-135m-instruct"),
            "c": models_config("smollm2-135m-instruct", "c-only"),
        },
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_model_only_one_box_serves_is_answered_by_that_box(
    mesh3: dict[str, NodeProcess],
) -> None:
    a, c = mesh3["a"], mesh3["c"]
    code, headers, body = post(
        a, "/v1/chat/completions", {"model": "c-only", "messages": CAPITAL, "max_tokens": 30}
    )
    assert code == 200, body
    assert headers["x-allerac-node"] == c.node_id
    assert headers["x-allerac-route"] == "lan"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    with urllib.request.urlopen(a.url + "/v1/models", timeout=10) as response:
        listed = {m["id"]: m["served_by"] for m in json.loads(response.read())["data"]}
    assert listed["c-only"] == [c.node_id]
    assert len(listed["smollm2-135m-instruct"]) == 3
    explained = run_cli(a.home, "route", "--explain", "c-only")
    assert c.node_id in explained.stdout
    assert "chosen" in explained.stdout


def test_local_only_never_leaves_the_box(mesh3: dict[str, NodeProcess]) -> None:
    code, _, body = post(
        mesh3["a"],
        "/v1/chat/completions",
        {"model": "c-only", "messages": CAPITAL},
        headers={"x-allerac-privacy": "local-only"},
    )
    assert code == 503
    assert "privacy local-only" in body["error"]["message"]


def test_a_busy_box_hands_the_next_request_to_an_idle_peer(
    mesh3: dict[str, NodeProcess],
) -> None:
    a = mesh3["a"]
    long = {
        "model": "smollm2-135m-instruct",
        "prompt": "1, 2, 3, 4,",
        "max_tokens": 600,
        "stream": True,
    }
    request = urllib.request.Request(
        a.url + "/v1/completions",
        data=json.dumps(long).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as busy:
        assert busy.headers["x-allerac-route"] == "local"
        busy.readline()  # A is generating
        code, headers, body = post(
            a,
            "/v1/completions",
            {"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 4},
        )
        assert code == 200, body
        assert headers["x-allerac-route"] == "lan"
        assert headers["x-allerac-node"] in {mesh3["b"].node_id, mesh3["c"].node_id}


def test_a_box_of_another_mesh_is_never_used(mesh3: dict[str, NodeProcess], tmp_path: Path) -> None:
    a = mesh3["a"]
    stranger = NodeProcess(
        tmp_path / "d", "--peer", a.info["grpc_address"], config=models_config("d-only")
    ).start()
    try:
        time.sleep(2.5)  # two heartbeats' time for a (wrong) connection to happen
        assert stranger.node_id not in peer_states(a)
        assert peer_states(stranger) == {}
        code, _, _ = post(a, "/v1/chat/completions", {"model": "d-only", "messages": CAPITAL})
        assert code == 404
    finally:
        stranger.kill()


@pytest.fixture
def shared_mesh(tmp_path: Path) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(
        tmp_path,
        {
            "a": models_config("smollm2-135m-instruct"),
            "b": models_config("shared"),
            "c": models_config("shared"),
        },
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def test_killing_the_serving_box_mid_stream_costs_the_client_nothing(
    shared_mesh: dict[str, NodeProcess],
) -> None:
    a = shared_mesh["a"]
    body = {
        "model": "shared",
        "prompt": "1, 2, 3, 4,",
        "temperature": 0,
        "max_tokens": 120,
        "stream": True,
    }
    request = urllib.request.Request(
        a.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    pieces: list[str] = []
    usage: dict[str, int] = {}
    killed: list[NodeProcess] = []
    with urllib.request.urlopen(request, timeout=120) as response:
        serving = response.headers["x-allerac-node"]
        victim = next(n for n in shared_mesh.values() if n.node_id == serving)
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                pieces.append(chunk["choices"][0]["text"])
                if len(pieces) == 20 and not killed:
                    victim.stop(signal.SIGKILL)
                    killed.append(victim)
    assert killed, "the stream ended before the kill"
    text = "".join(pieces)
    survivor = next(n for n in (shared_mesh["b"], shared_mesh["c"]) if n is not victim)
    code, _, reference = post(
        survivor,
        "/v1/completions",
        {"model": "shared", "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 120},
    )
    assert code == 200
    expected = reference["choices"][0]["text"]
    # One coherent answer: what the killed box sent, then the survivor's continuation.
    assert text == expected
    assert usage["completion_tokens"] >= 100
    # ...and the dead box leaves the rotation within 6 s of the kill.
    took = wait_until(
        lambda: peer_states(a).get(victim.node_id) == "down", 6, "the killed box is down"
    )
    assert took < 6
    # The ledger holds both parts: the entry node signed for what the dead box delivered
    # (it cannot sign any more), the survivor for its continuation; together, the usage.
    records, receipts = read_ledger(a.home)
    opened = [open_record(r) for r in records]
    partial = [r for r in opened if r.kind == lpb.RECORD_KIND_PARTIAL]
    assert len(partial) == 1
    assert (partial[0].node_id, partial[0].served_by) == (a.node_id, victim.node_id)
    assert partial[0].route == "lan"
    assert partial[0].completion_tokens >= 20
    rest = [r for r in opened if r.node_id == survivor.node_id and r.entry_node_id == a.node_id]
    assert len(rest) == 1
    assert rest[0].kind == lpb.RECORD_KIND_COMPLETE
    assert partial[0].completion_tokens + rest[0].completion_tokens == usage["completion_tokens"]
    assert verify(records, receipts).ok


def test_a_client_that_goes_away_mid_stream_is_still_counted(
    mesh3: dict[str, NodeProcess],
) -> None:
    a = mesh3["a"]
    before = {r.request_id for r in map(open_record, read_ledger(a.home)[0])}
    request = urllib.request.Request(
        a.url + "/v1/completions",
        data=json.dumps(
            {"model": "c-only", "prompt": "1, 2, 3,", "max_tokens": 200, "stream": True}
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    seen = 0
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            if raw.startswith(b"data: {") and b'"text":""' not in raw:
                seen += 1
            if seen == 5:
                break  # hang up mid-answer

    def partial() -> list[Any]:
        return [
            r
            for r in map(open_record, read_ledger(a.home)[0])
            if r.request_id not in before
            and r.kind == lpb.RECORD_KIND_PARTIAL
            and r.node_id == a.node_id
        ]

    wait_until(lambda: bool(partial()), 10, "the abandoned answer is recorded")
    (record,) = partial()
    assert record.served_by == mesh3["c"].node_id
    assert record.user == ""
    assert 5 <= record.completion_tokens < 200


def test_a_graceful_shutdown_tells_peers_at_once(shared_mesh: dict[str, NodeProcess]) -> None:
    a, b = shared_mesh["a"], shared_mesh["b"]
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    took = wait_until(lambda: peer_states(a).get(b.node_id) == "down", 3, "b is down at a")
    stopper.join(30)
    assert took < 1.5


def test_every_answer_leaves_a_signed_countersigned_record_with_the_apis_counts(
    mesh3: dict[str, NodeProcess],
) -> None:
    a, c = mesh3["a"], mesh3["c"]
    answers = {}
    for model in ("c-only", "smollm2-135m-instruct"):
        code, headers, body = post(
            a,
            "/v1/completions",
            {"model": model, "prompt": "One, two,", "max_tokens": 5},
            {"x-allerac-privacy": "local-only" if model != "c-only" else "mesh"},
        )
        assert code == 200, body
        answers[model] = (headers["x-allerac-node"], body["usage"], body["id"].split("-", 1)[1])
    assert answers["c-only"][0] == c.node_id
    assert answers["smollm2-135m-instruct"][0] == a.node_id
    records, receipts = read_ledger_holding(a.home, answers["c-only"][2])
    by_request = {open_record(r).request_id: open_record(r) for r in records}
    served_by_c = by_request[answers["c-only"][2]]  # the answer's id names its request
    served_here = by_request[answers["smollm2-135m-instruct"][2]]
    # c signed its record, a (the entry node) checked and countersigned it, and kept both.
    assert (served_by_c.node_id, served_by_c.route) == (c.node_id, "lan")
    assert (served_here.node_id, served_here.route) == (a.node_id, "local")
    for record, (_, usage, _) in (
        (served_by_c, answers["c-only"]),
        (served_here, answers["smollm2-135m-instruct"]),
    ):
        assert record.entry_node_id == a.node_id
        assert record.completion_tokens == usage["completion_tokens"]
        assert record.prompt_tokens == usage["prompt_tokens"]
    report = verify([r for r in records if open_record(r).node_id == a.node_id], receipts)
    assert report.ok, report.problems
    assert any(
        r.record_hash == record_hash(s)
        for r in receipts
        for s in records
        if open_record(s).node_id == c.node_id
    )
    # c's own log holds the record it signed, one chain, verified.
    c_records, _ = read_ledger(c.home)
    assert verify(c_records, require_receipts=False).ok
    assert served_by_c.request_id in {open_record(r).request_id for r in c_records}


def test_ledger_verify_and_usage_commands(mesh3: dict[str, NodeProcess]) -> None:
    a, c = mesh3["a"], mesh3["c"]
    code, _, body = post(a, "/v1/completions", {"model": "c-only", "prompt": "Hi", "max_tokens": 3})
    assert code == 200, body
    checked = run_cli(a.home, "ledger", "verify", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    # c served it for a: a countersigned it, and ledger sync brings the receipt to c.
    def verified_at_c() -> bool:
        at_c = run_cli(c.home, "ledger", "verify", "--json")
        assert at_c.returncode == 0, at_c.stdout + at_c.stderr
        return bool(json.loads(at_c.stdout)["awaiting_receipts"] == 0)

    wait_until(verified_at_c, 10, "c holds a's countersignature of its record")
    used = run_cli(a.home, "usage", "--by", "tier", "--period", "day", "--json")
    assert used.returncode == 0, used.stderr
    tiers = {row["tier"]: row for row in json.loads(used.stdout)["rows"]}
    assert tiers["lan"]["requests"] >= 1
    assert tiers["lan"]["completion_tokens"] >= body["usage"]["completion_tokens"]
    bad = run_cli(a.home, "usage", "--period", "yesterday")
    assert bad.returncode != 0
    assert "not a period" in bad.stderr


def test_ledger_verify_names_an_edited_record(
    mesh3: dict[str, NodeProcess], tmp_path: Path
) -> None:
    a = mesh3["a"]
    code, _, _ = post(
        a,
        "/v1/completions",
        {"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2},
        {"x-allerac-privacy": "local-only"},
    )
    assert code == 200
    copy = tmp_path / "copy"
    copy.mkdir()
    source = sqlite3.connect(a.home / "ledger.db")
    target = sqlite3.connect(copy / "ledger.db")
    with target:
        source.backup(target)  # a consistent copy of the live ledger
    row = target.execute(
        "SELECT seq, record FROM records WHERE node_id = ? ORDER BY seq DESC LIMIT 1",
        (a.node_id,),
    ).fetchone()
    edited = row[1].replace(b"smollm2", b"smollm3")  # a cheaper model, say
    assert edited != row[1]
    with target:
        target.execute(
            "UPDATE records SET record = ? WHERE node_id = ? AND seq = ?",
            (edited, a.node_id, row[0]),
        )
    source.close()
    target.close()
    checked = run_cli(copy, "ledger", "verify", "--json")
    assert checked.returncode == 1
    problems = json.loads(checked.stdout)["problems"]
    assert {"kind": "bad_signature", "node_id": a.node_id, "seq": row[0]}.items() <= next(
        p for p in problems if p["kind"] == "bad_signature"
    ).items()
