"""Quotas on real nodes (three boxes on loopback, real inference): a user added on one
box works on every box; several entry nodes spending one user's quota at once never pass
it (the bound the README states: zero, without mid-answer failovers); the refusal is an
OpenAI-style 429 naming the quota and its reset; a request whose client hangs up gives
its reservation back; a cloud node holds the mesh to its cloud plan."""

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
    listed = run_cli(node.home, "user", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = [u for u in json.loads(listed.stdout)["users"] if u["name"] == name]
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


def test_a_client_that_hangs_up_gives_its_reservation_back(
    mesh3: dict[str, NodeProcess],
) -> None:
    a, b = mesh3["a"], mesh3["b"]
    key = add_user(a, "bob", "mesh=5000/day")
    works_everywhere([b], key)
    request = urllib.request.Request(
        b.url + "/v1/completions",
        data=json.dumps(
            {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True}
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        for _ in range(6):
            response.readline()
        [state] = quota_state(a, "bob")
        assert state["reserved"] >= 400  # held at bob's home while the answer runs
    # Hung up: b records what was delivered and releases at a, handing the record over.
    wait_until(
        lambda: quota_state(a, "bob")[0]["reserved"] == 0,
        LEASE_IDLE_S + 5,
        "the hold (and b's idle lease) is released",
    )
    [state] = quota_state(a, "bob")
    assert 0 < state["used"] < 400
    assert state["used"] == spent([b], "bob")  # the partial record b signed, counted at a


def test_a_quota_change_and_a_removal_reach_every_box(mesh3: dict[str, NodeProcess]) -> None:
    a, c = mesh3["a"], mesh3["c"]
    key = add_user(a, "carol", "mesh=1M/month")
    works_everywhere([c], key)
    changed = run_cli(a.home, "user", "set", "carol", "--quota", "mesh=10/day")
    assert changed.returncode == 0, changed.stderr
    assert "quota mesh=10/day" in changed.stdout
    wait_until(
        lambda: post(c, {"model": MODEL, "prompt": PROMPT, "max_tokens": 8}, key)[0] == 429,
        10,
        "the smaller quota holds at c",
    )
    assert run_cli(a.home, "user", "remove", "carol").returncode == 0
    wait_until(
        lambda: post(c, {"model": MODEL, "prompt": PROMPT, "max_tokens": 8}, key)[0] == 401,
        10,
        "the removed key is refused at c",
    )
    bad = run_cli(a.home, "user", "add", "dave", "--quota", "cloud=plenty")
    assert bad.returncode != 0
    assert "not a quota" in bad.stderr


def test_without_its_home_a_limited_user_is_refused_clearly(
    mesh3: dict[str, NodeProcess],
) -> None:
    a, b = mesh3["a"], mesh3["b"]
    key = add_user(a, "erin", "mesh=2000/month")
    works_everywhere([b], key)  # b now holds a lease: a quarter of what erin has left
    a.kill()  # last test of the module: a is gone for good
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    # What the lease holds (reserved at a before it went) is still erin's to use; then b
    # cannot reserve anything more and says why.
    served = 0
    while (code := post(b, body, key)[0]) == 200:
        served += 1
        assert served < 600, "the lease never ran out"
    assert code == 503
    assert served > 0
    assert spent([b], "erin") <= 2000 // 4 + 40  # the lease, plus the first request
    code, _, reply = post(b, body, key)
    assert code == 503
    assert "quota of user 'erin' is kept by node" in reply["error"]["message"]


def test_a_cloud_node_holds_the_mesh_to_its_cloud_plan(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("plan")
    a = NodeProcess(root / "a", config=models_config(MODEL)).start()
    cloud = NodeProcess(
        root / "cloud", config='cloud_plan = "150/day"\n' + models_config("cloud-only")
    ).start()
    try:
        code = run_cli(a.home, "mesh", "invite", "--role", "overflow").stdout.strip()
        joined = run_cli(cloud.home, "mesh", "join", code)
        assert joined.returncode == 0, joined.stderr
        body = {"model": "cloud-only", "prompt": PROMPT, "max_tokens": 8}

        def ask() -> tuple[int, dict[str, str], Any]:
            request = urllib.request.Request(
                a.url + "/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "x-allerac-privacy": "any"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, dict(response.headers), json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), json.loads(exc.read())

        wait_until(lambda: ask()[0] == 200, 15, "a reaches the cloud node")
        served = 1
        while True:
            status, headers, reply = ask()
            if status != 200:
                break
            assert headers["x-allerac-route"] == "cloud"
            served += 1
            assert served < 50, "the plan never ran out"
        assert status == 429, reply
        assert reply["error"]["code"] == "quota_exceeded"
        assert "this mesh's cloud plan is used up: cloud=150/day" in reply["error"]["message"]
        assert int(headers["Retry-After"]) > 0
        # Counted from the cloud node's own ledger: never past the plan.
        assert spent([cloud], "") <= 150
    finally:
        a.kill()
        cloud.kill()
