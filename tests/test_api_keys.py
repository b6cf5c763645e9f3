"""Users and API keys on real nodes: `allerac user ...`, Bearer keys through the official
OpenAI client, each key's privacy policy as default and ceiling, keys required beyond
loopback (a network namespace gives the node a non-loopback client), and a bad users file
stopping the node without being touched."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from mesh.quota.users import hash_api_key
from tests.clients import openai_client
from tests.members import models_config
from tests.netns import NetnsLab, netns_unavailable
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import start_mesh

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    """A (the entry node, serving MODEL) and B (serving only "b-only"), one mesh."""
    nodes = start_mesh(
        tmp_path_factory.mktemp("keys"),
        {"a": models_config(MODEL), "b": models_config("b-only")},
    )
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def call(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def add_user(node: NodeProcess, name: str, *flags: str) -> str:
    result = run_cli(node.home, "user", "add", name, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(url: str, model: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": CAPITAL, "max_tokens": 12}
    return call(url, "POST", "/v1/chat/completions", body, headers)


def test_a_key_is_shown_once_and_only_its_hash_is_stored(pair: dict[str, NodeProcess]) -> None:
    a = pair["a"]
    added = run_cli(a.home, "user", "add", "alice")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("amk_")
    assert "\n" not in key
    assert "not stored" in added.stderr
    assert "privacy mesh" in added.stderr  # the node's default policy
    users_file = a.home / "users.json"
    assert users_file.stat().st_mode & 0o777 == 0o600
    saved = users_file.read_text()
    assert key not in saved
    assert hash_api_key(key) in saved
    listed = run_cli(a.home, "user", "list")
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout
    assert key not in listed.stdout
    as_json = json.loads(run_cli(a.home, "user", "list", "--json").stdout)
    alice = next(u for u in as_json["users"] if u["name"] == "alice")
    assert sorted(alice) == [
        "created_at_ms",
        "home_node_id",
        "name",
        "privacy",
        "quota",
        "quota_state",
    ]
    status, _, body = call(a.url, "GET", "/allerac/users", headers=a.owner)
    assert status == 200
    assert key not in json.dumps(body)
    assert hash_api_key(key) not in json.dumps(body)
    again = run_cli(a.home, "user", "add", "alice")
    assert again.returncode != 0
    assert "409: a user named 'alice' already exists" in again.stderr


def test_the_official_client_works_with_a_key_and_refuses_a_bad_one(
    pair: dict[str, NodeProcess],
) -> None:
    a = pair["a"]
    key = add_user(a, "carol")
    with openai_client(a.url + "/v1", key) as good:
        assert sorted(m.id for m in good.models.list()) == sorted([MODEL, "b-only"])
        answer = good.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=30)
    assert "Paris" in answer.choices[0].message.content
    for wrong in [key[:-1] + ("A" if key[-1] != "A" else "B"), "sk-not-ours", "unused"]:
        with openai_client(a.url + "/v1", wrong) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=3)
            assert "invalid API key" in str(info.value)
            assert "send no key at all to act as its owner" in str(info.value)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
    status, headers, body = chat(a.url, MODEL, {"Authorization": "Basic Y2Fyb2w6eA=="})
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert headers["WWW-Authenticate"] == "Bearer"
    assert "Bearer API_KEY" in body["error"]["message"]


def test_a_removed_key_is_refused_on_the_very_next_request(pair: dict[str, NodeProcess]) -> None:
    a = pair["a"]
    key = add_user(a, "dave")
    with openai_client(a.url + "/v1", key) as client:
        assert client.completions.create(model=MODEL, prompt="1, 2,", max_tokens=2).usage
        removed = run_cli(a.home, "user", "remove", "dave")
        assert removed.returncode == 0, removed.stderr
        assert "dave" in removed.stdout
        with pytest.raises(openai.AuthenticationError, match="removed"):
            client.completions.create(model=MODEL, prompt="1, 2,", max_tokens=2)
    # A tombstone stays, so that the removal reaches every member; the list hides it.
    saved = json.loads((a.home / "users.json").read_text())["users"]
    assert [u["removed"] for u in saved if u["name"] == "dave"] == [True]
    assert "dave" not in run_cli(a.home, "user", "list").stdout
    twice = run_cli(a.home, "user", "remove", "dave")
    assert twice.returncode != 0
    assert "404: no user named 'dave'" in twice.stderr


def test_a_keys_privacy_is_the_default_for_its_requests(pair: dict[str, NodeProcess]) -> None:
    a, b = pair["a"], pair["b"]
    homebody = add_user(a, "homebody", "--privacy", "local-only")
    roamer = add_user(a, "roamer", "--privacy", "mesh")
    query = "/allerac/route?" + urllib.parse.urlencode({"model": "b-only"})
    status, _, explained = call(a.url, "GET", query, headers=bearer(homebody))
    assert status == 200
    assert explained["privacy"] == "local-only"
    assert all(row["status"] != "chosen" for row in explained["candidates"])
    # The local-only key's requests stay on A: answered here, or not at all.
    status, headers, body = chat(a.url, MODEL, bearer(homebody))
    assert status == 200, body
    assert (headers["x-allerac-node"], headers["x-allerac-route"]) == (a.node_id, "local")
    status, _, body = chat(a.url, "b-only", bearer(homebody))
    assert status == 503
    assert "privacy local-only" in body["error"]["message"]
    # The mesh key's requests go to the other box.
    status, headers, body = chat(a.url, "b-only", bearer(roamer))
    assert status == 200, body
    assert (headers["x-allerac-node"], headers["x-allerac-route"]) == (b.node_id, "lan")
    listed = json.loads(run_cli(a.home, "user", "list", "--json").stdout)["users"]
    assert {u["name"]: u["privacy"] for u in listed}["homebody"] == "local-only"


def test_a_looser_override_is_refused_and_a_stricter_one_is_honoured(
    pair: dict[str, NodeProcess],
) -> None:
    a = pair["a"]
    homebody = add_user(a, "homebody2", "--privacy", "local-only")
    roamer = add_user(a, "roamer2", "--privacy", "mesh")
    with (
        openai_client(a.url + "/v1", homebody) as client,
        pytest.raises(openai.PermissionDeniedError) as info,
    ):
        client.chat.completions.create(
            model=MODEL,
            messages=CAPITAL,
            max_tokens=3,
            extra_headers={"x-allerac-privacy": "mesh"},
        )
    assert "privacy policy is local-only" in str(info.value)
    for key, looser in [(homebody, "any"), (roamer, "any")]:
        status, _, body = chat(a.url, MODEL, {**bearer(key), "x-allerac-privacy": looser})
        assert (status, body["error"]["code"]) == (403, "privacy_not_allowed")
    query = "/allerac/route?" + urllib.parse.urlencode({"model": MODEL, "privacy": "any"})
    status, _, body = call(a.url, "GET", query, headers=bearer(roamer))
    assert (status, body["error"]["code"]) == (403, "privacy_not_allowed")
    # Stricter than the key: the mesh key asks to stay on this box, and does.
    strict = {**bearer(roamer), "x-allerac-privacy": "local-only"}
    status, _, body = chat(a.url, "b-only", strict)
    assert status == 503
    assert "privacy local-only" in body["error"]["message"]
    status, headers, _ = chat(a.url, MODEL, strict)
    assert (status, headers["x-allerac-route"]) == (200, "local")
    # The owner (no key, loopback) may still choose any policy.
    status, _, _ = chat(a.url, MODEL, {"x-allerac-privacy": "any"})
    assert status == 200


def test_bad_user_requests_get_clear_errors(pair: dict[str, NodeProcess]) -> None:
    a = pair["a"]
    cases = [
        ({"name": "-x"}, 400, "1 to 64 letters"),
        ({"name": "x" * 65}, 400, "1 to 64 letters"),
        ({"name": "erin", "privacy": "public"}, 400, "privacy must be one of"),
        ({"privacy": "mesh"}, 400, "name must be a non-empty string"),
        ({"name": 7}, 400, "name must be a non-empty string"),
    ]
    for body, status, message in cases:
        got, _, reply = call(a.url, "POST", "/allerac/users", body, headers=a.owner)
        assert got == status, reply
        assert message in reply["error"]["message"]
    bad_name = run_cli(a.home, "user", "remove", "no/such")
    assert bad_name.returncode != 0
    assert "a user name is 1 to 64 letters" in bad_name.stderr


def test_users_survive_a_restart(fresh_home: Path) -> None:
    node = NodeProcess(fresh_home).start()
    try:
        key = add_user(node, "frank", "--privacy", "local-only")
        assert node.stop() == 0
    finally:
        node.kill()
    assert "no users yet" not in node.output()  # on loopback there is nothing to warn about
    again = NodeProcess(fresh_home).start()
    try:
        status, _, body = call(
            again.url,
            "GET",
            "/allerac/route?" + urllib.parse.urlencode({"model": MODEL}),
            headers=bearer(key),
        )
        assert (status, body["privacy"]) == (200, "local-only")
    finally:
        again.kill()


BAD_USERS_FILES = [
    ("truncated", b'{"version": 1, "users": [{"name": "alice", "key_ha', "not a valid users file"),
    ("newer format", b'{"version": 9, "users": []}\n', "format version 9"),
]


@pytest.mark.parametrize(
    ("data", "problem"), [b[1:] for b in BAD_USERS_FILES], ids=[b[0] for b in BAD_USERS_FILES]
)
def test_a_bad_users_file_stops_the_node_and_is_left_untouched(
    fresh_home: Path, data: bytes, problem: str
) -> None:
    fresh_home.mkdir(parents=True)
    users_file = fresh_home / "users.json"
    users_file.write_bytes(data)
    users_file.chmod(0o600)
    result = run_cli(fresh_home, "up", "--http-port", "0", "--grpc-port", "0", "--no-mdns")
    assert result.returncode != 0
    assert f"users file {users_file}" in result.stderr
    assert problem in result.stderr
    assert "left untouched" in result.stderr
    assert users_file.read_bytes() == data
    assert not (fresh_home / "run" / "node.json").exists()


def test_a_bad_user_entry_is_set_aside_and_the_node_starts(fresh_home: Path) -> None:
    fresh_home.mkdir(parents=True)
    users_file = fresh_home / "users.json"
    good = {"name": "alice", "key_hash": "ab" * 32, "privacy": "mesh", "created_at_ms": 1}
    data = json.dumps({"version": 1, "users": [{"name": "x", "key": "amk_1"}, good]}).encode()
    users_file.write_bytes(data)
    users_file.chmod(0o600)
    node = NodeProcess(fresh_home).start()
    try:
        log = node.output()
        assert f"users file {users_file}: users[0] ('x') was set aside" in log
        kept = list(fresh_home.glob("users.json.bad-*"))
        assert [k.read_bytes() for k in kept] == [data]  # the file as it was, kept
        assert kept[0].stat().st_mode & 0o777 == 0o600
        listed = json.loads(run_cli(fresh_home, "user", "list", "--json").stdout)["users"]
        assert [u["name"] for u in listed] == ["alice"]
    finally:
        node.kill()


def test_a_users_file_others_can_read_stops_the_node(fresh_home: Path) -> None:
    fresh_home.mkdir(parents=True)
    users_file = fresh_home / "users.json"
    users_file.write_bytes(b'{"version": 1, "users": []}\n')
    users_file.chmod(0o644)
    result = run_cli(fresh_home, "up", "--http-port", "0", "--grpc-port", "0", "--no-mdns")
    assert result.returncode != 0
    assert f"chmod 600 {users_file}" in result.stderr
    assert users_file.stat().st_mode & 0o777 == 0o644


def test_user_commands_without_a_running_node_say_how_to_start_one(fresh_home: Path) -> None:
    result = run_cli(fresh_home, "user", "list")
    assert result.returncode != 0
    assert "allerac up" in result.stderr


# --- beyond loopback: a client on another address ------------------------------------------

# Runs inside the node's namespace, talking to the node's non-loopback address: each
# request's status and body, then what the official client makes of a key and of no key.
_REMOTE_SCRIPT = """
import json, sys, urllib.error, urllib.request
import openai
base, key, requests = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"raw": []}
for method, path, headers, body in requests:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            code, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, raw = exc.code, exc.read()
    out["raw"].append([code, json.loads(raw)])
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
answer = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=30)
out["answer"] = answer.choices[0].message.content
try:
    client.models.list(extra_headers={"Authorization": openai.Omit()})
    out["no_key"] = "served"
except openai.AuthenticationError as exc:
    out["no_key"] = str(exc)
try:
    openai.OpenAI(base_url=base + "/v1", api_key="amk_" + "x" * 43, max_retries=0).models.list()
    out["bad_key"] = "served"
except openai.AuthenticationError as exc:
    out["bad_key"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture
def lab1(tmp_path: Path) -> Iterator[NetnsLab]:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")
    with NetnsLab(1, tmp_path) as lab:
        yield lab


def test_beyond_loopback_only_keys_open_the_api(lab1: NetnsLab) -> None:
    node = lab1.start(0, "--no-mdns", http_host="0.0.0.0")
    assert "no users yet, so only this box can use the HTTP API" in node.output()
    # The owner's commands reach the node over the namespace's loopback.
    added = lab1.cli(node, "user", "add", "grace", "--privacy", "local-only")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    port = urllib.parse.urlsplit(node.url).port
    remote_base = f"http://{node.ip}:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    hello = {"model": "default", "messages": CAPITAL, "max_tokens": 3}
    requests = [
        ["POST", "/v1/chat/completions", {}, hello],
        ["GET", "/v1/models", {}, None],
        ["GET", "/allerac/status", {}, None],
        ["GET", "/v1/models", auth, None],
        ["GET", "/allerac/users", auth, None],
        ["POST", "/allerac/users", auth, {"name": "mallory"}],
        ["POST", "/allerac/mesh/invites", auth, {}],
        ["POST", "/v1/chat/completions", {**auth, "x-allerac-privacy": "mesh"}, hello],
    ]
    result = lab1.python(0, _REMOTE_SCRIPT, remote_base, key, json.dumps(requests))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    statuses = [code for code, _ in out["raw"]]
    assert statuses == [401, 401, 401, 200, 403, 403, 403, 403], out["raw"]
    assert "an API key is required" in out["raw"][0][1]["error"]["message"]
    assert out["raw"][3][1]["data"][0]["id"] == MODEL
    assert "an API key never opens it" in out["raw"][4][1]["error"]["message"]
    assert out["raw"][7][1]["error"]["code"] == "privacy_not_allowed"
    assert "Paris" in out["answer"]
    assert "an API key is required" in out["no_key"]
    assert "invalid API key" in out["bad_key"]
    assert "send no key at all" not in out["bad_key"]  # that hint is for the box's owner
    users = json.loads(lab1.cli(node, "user", "list", "--json").stdout)["users"]
    assert [u["name"] for u in users] == ["grace"]  # mallory was never added
