"""Quotas on real nodes (three boxes on loopback, real inference): a user added on one
box works on every box; several entry nodes spending one user's quota at once never pass
it (the bound the README states: zero, without mid-answer failovers), and the refusal is
an OpenAI-style 429 naming the quota and its reset. The rest of the quota rules across
nodes (a client that hangs up, changes and removals, a home that is away, the cloud plan,
races with leases) are tested in process: tests/test_mesh_quotas.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.inference import InferenceRequest, Sampling
from mesh.ledger.records import open_record
from mesh.quota.rules import prompt_bound
from node.serving.quota_service import LEASE_IDLE_S
from tests.members import models_config, read_ledger
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import start_mesh, wait_until

MODEL = "smollm2-135m-instruct"
PROMPT = "1, 2, 3,"
LIMIT = 400


@pytest.fixture(scope="module")
def mesh3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    nodes = start_mesh(
        tmp_path_factory.mktemp("quotas"), {name: models_config(MODEL) for name in "abc"}
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def post(
    node: NodeProcess, body: dict[str, Any], key: str, path: str = "/v1/completions"
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        node.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def add_user(node: NodeProcess, name: str, quota: str) -> str:
    added = run_cli(node.home, "user", "add", name, "--quota", quota)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def quota_state(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    """What `allerac user list --json` says of the user's quota (its endpoint, asked
    directly: tests poll it, and the CLI's start-up would take CPU from the nodes)."""
    request = urllib.request.Request(node.url + "/allerac/users", headers=node.owner)
    with urllib.request.urlopen(request, timeout=30) as response:
        listed = json.loads(response.read())
    [entry] = [u for u in listed["users"] if u["name"] == name]
    return list(entry["quota_state"])


def works_everywhere(nodes: list[NodeProcess], key: str) -> None:
    for node in nodes:
        wait_until(
            lambda node=node: (
                post(node, {"model": MODEL, "prompt": "Hi", "max_tokens": 1}, key)[0] == 200
            ),
            10,
            f"the key works at {node.home.name}",
        )


def spent(nodes: list[NodeProcess], user: str) -> int:
    """Tokens the user's records count, across every ledger, each record once."""
    seen: dict[tuple[str, int], int] = {}
    for node in nodes:
        for signed in read_ledger(node.home)[0]:
            record = open_record(signed)
            if record.user == user:
                seen[(record.node_id, record.seq)] = record.prompt_tokens + record.completion_tokens
    return sum(seen.values())


def test_several_entry_nodes_never_spend_more_than_the_quota(
    mesh3: dict[str, NodeProcess],
) -> None:
    a, b, c = mesh3["a"], mesh3["b"], mesh3["c"]
    key = add_user(a, "alice", f"mesh={LIMIT}/day")  # a is alice's home: it keeps her quota
    works_everywhere([a, b, c], key)  # the user reached b and c with the ledger sync
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    refusals: list[tuple[dict[str, str], Any]] = []
    answered: list[Any] = []
    lock = threading.Lock()

    def spend(node: NodeProcess) -> None:
        while True:
            code, headers, reply = post(node, body, key)
            with lock:
                if code == 429:
                    refusals.append((headers, reply))
                    return
                assert code == 200, reply
                answered.append(reply)

    threads = [threading.Thread(target=spend, args=(n,)) for n in (a, b, c) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    # Then one entry node spends what the racing ones left, until it is refused too, each
    # time once the boxes' idle leases (and their reports) are back at alice's home.
    for _ in range(2):
        wait_until(
            lambda: quota_state(a, "alice")[0]["reserved"] == 0,
            LEASE_IDLE_S + 10,
            "the idle leases are back at alice's home",
        )
        while (last := post(b, body, key))[0] == 200:
            pass
        assert last[0] == 429, last
    used = spent([a, b, c], "alice")
    # The bound: zero. Reservations hold each request's most until its records count.
    assert used <= LIMIT
    request = InferenceRequest(model=MODEL, prompt=PROMPT, sampling=Sampling(max_tokens=8))
    assert used > LIMIT - (prompt_bound(request) + 8)  # and the quota really was spent
    assert len(answered) >= 10
    for reply in answered:  # the reservation's prompt bound holds for the real tokenizer
        assert reply["usage"]["prompt_tokens"] <= prompt_bound(request)
    headers, reply = refusals[0]
    error = reply["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "quota_exceeded")
    assert f"user 'alice' is over quota: mesh={LIMIT}/day" in error["message"]
    assert "resets at " in error["message"]
    assert 0 < int(headers["Retry-After"]) <= 86_400
    # The owner's requests on the same boxes are not counted against alice.
    owner = urllib.request.Request(
        b.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(owner, timeout=60) as response:
        assert response.status == 200
    wait_until(  # releases go out as the answers leave; idle leases come back
        lambda: quota_state(a, "alice")[0]["reserved"] == 0,
        LEASE_IDLE_S + 5,
        "every hold given back",
    )
    [state] = quota_state(a, "alice")
    assert state["used"] == used  # the home counts every entry node's records
