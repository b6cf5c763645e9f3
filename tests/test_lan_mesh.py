"""Boxes pooled into one service: real node processes on loopback, found through one
static peer and the mesh's own gossip (the mDNS and network-namespace tests come with
LAN discovery): a model one box serves, really answered there; a graceful stop heard at
once; the ledger commands over what real answers left. Failover, busy boxes, strangers
and the records of every answer are tested in process (tests/test_mesh_inprocess.py) and,
end to end, between network namespaces (tests/test_netns_failover.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from node.store.config_file import embedded_model_path
from tests.clients import WEATHER_TOOL, openai_client
from tests.members import models_config
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


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(
        tmp_path,
        {"a": models_config("smollm2-135m-instruct"), "b": models_config("shared")},
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def test_a_graceful_shutdown_tells_peers_at_once(pair: dict[str, NodeProcess]) -> None:
    a, b = pair["a"], pair["b"]
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    took = wait_until(lambda: peer_states(a).get(b.node_id) == "down", 3, "b is down at a")
    stopper.join(30)
    assert took < 1.5


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


def open_stream(node: NodeProcess, path: str, body: dict[str, Any], privacy: str = "mesh") -> Any:
    """A streamed answer, open (closing it early cancels the work)."""
    request = urllib.request.Request(
        node.url + path,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "x-allerac-privacy": privacy},
        method="POST",
    )
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()  # its first event: it runs
    return response


def served_by(node: NodeProcess, body: dict[str, Any]) -> str:
    """Which box starts answering `body` entering at `node` (the rest is not waited for)."""
    with open_stream(node, "/v1/chat/completions", body) as response:
        return str(response.headers["x-allerac-node"])


def explain_at(node: NodeProcess, body: dict[str, Any]) -> dict[str, Any]:
    code, _, shown = post(node, "/allerac/route?privacy=mesh", body)
    assert code == 200, shown
    return dict(shown)


def test_a_next_turn_goes_to_the_box_holding_its_start_unless_it_is_busy(
    mesh3: dict[str, NodeProcess], tmp_path: Path
) -> None:
    """Cache-aware routing with real boxes: b serves a conversation's first turn; a, idle,
    sends the next turn to b (b reads only what is new), and keeps it when b is busy beyond
    what its cache saves (the answer asked is longer than the prompt b would not read)."""
    a, b = mesh3["a"], mesh3["b"]
    model = "smollm2-135m-instruct"
    notes = " ".join(f"Note {i}: the shed roof leaks." for i in range(10))  # ~80 tokens
    said = [{"role": "user", "content": f"{notes} Which notes mention the roof?"}]
    code, _, body = post(
        b,
        "/v1/chat/completions",
        {"model": model, "messages": said, "max_tokens": 4},
        {"x-allerac-privacy": "local-only"},
    )
    assert code == 200, body
    said += [
        {"role": "assistant", "content": body["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And which mention the door?"},
    ]
    turn = {"model": model, "messages": said, "max_tokens": 256}
    # a hears of it at a heartbeat: b's new card (sealed) says which chats it holds.
    wait_until(lambda: explain_at(a, turn)["by_cache"], 10, "a plans the next turn for b")
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(said), encoding="utf-8")
    shown = run_cli(a.home, "route", "--explain", "--max-tokens", "256", "--messages",
                    str(conversation), model)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert f"{model} -> {b.node_id}" in shown.stdout
    assert "The cache decided" in shown.stdout
    assert served_by(a, turn) == b.node_id
    assert status(b)["cache_routed"] == {"asked": 1, "held": 1}
    # b's status says it holds it (what the slot is named for: from when it took the turn).
    wait_until(
        lambda: "conversations held" in run_cli(b.home, "status").stdout, 5, "b shows it holds"
    )
    shown_b = run_cli(b.home, "status").stdout
    assert "1 requests sent here for a conversation it held, 1 still held" in shown_b
    # ...and a knows it before b gets busy (b's cards say so from when it took the turn;
    # a card signed before that, fetched late on a busy host, would undo a's note a
    # heartbeat long).
    wait_until(lambda: explain_at(a, turn)["by_cache"], 10, "a knows b holds the turn")

    # b busy: one long answer running there costs the turn more than b's cache saves it.
    hog = open_stream(
        b, "/v1/completions", {"model": model, "prompt": "1, 2,", "max_tokens": 1000}, "local-only"
    )
    try:
        wait_until(lambda: not explain_at(a, turn)["by_cache"], 10, "a sees b busy")
        rows = {r["node_id"]: r for r in explain_at(a, turn)["candidates"]}
        assert rows[b.node_id]["cached_tokens"] > 0  # b still holds it; it is too busy
        assert served_by(a, turn) != b.node_id
    finally:
        hog.close()


class Capital(pydantic.BaseModel):
    city: str
    country: str


def test_the_official_client_gets_structured_answers_and_tool_calls_from_another_box(
    mesh3: dict[str, NodeProcess],
) -> None:
    """Across two real boxes: a asks for the model only c serves; the schema and the forced
    call travel sealed to c, whose grammar holds them, and come back in OpenAI's shapes."""
    a, c = mesh3["a"], mesh3["c"]
    with openai_client(a.url + "/v1") as client:
        raw = client.beta.chat.completions.with_raw_response.parse(
            model="c-only",
            messages=[{"role": "user", "content": "The capital of France, as JSON."}],
            response_format=Capital,
            temperature=0,
            max_tokens=60,
        )
        assert raw.headers["x-allerac-node"] == c.node_id
        assert isinstance(raw.parse().choices[0].message.parsed, Capital)
        answer = client.chat.completions.create(
            model="c-only",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=40,
        )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"}
    assert isinstance(arguments["city"], str)
