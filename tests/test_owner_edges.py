"""The HTTP API's edges against a web page the owner opens (issue 11, finding 1 and the
smaller findings): a page cannot administer the box, rebind a name onto it, read its
answers from another origin, or re-home it into a stranger's mesh; files are private and
bad input gets a clear error. Real node processes on loopback."""

from __future__ import annotations

import http.client
import json
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodeproc import NodeProcess, owner_headers, run_cli

CORS_APP = "http://localhost:3000"
CONFIG = f"""
[http]
allowed_hosts = ["kitchen-box.local"]
cors_origins = ["{CORS_APP}"]
"""
HELLO = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path_factory.mktemp("box"), config=CONFIG).start()
    try:
        yield proc
    finally:
        proc.kill()


def raw(
    node: NodeProcess,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers (Host too, when given)."""
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in sent, skip_accept_encoding=True)
        for name, value in sent.items():
            conn.putheader(name, value)
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        payload = response.read()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        conn.close()


def user_names(node: NodeProcess) -> list[str]:
    status, _, body = raw(node, "GET", "/allerac/users", headers=node.owner)
    assert status == 200, body
    return [u["name"] for u in body["users"]]


def test_a_page_cannot_add_a_user(box: NodeProcess) -> None:
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    # The "simple" cross-origin POST that needed no preflight: refused, nothing added.
    status, _, body = raw(box, "POST", "/allerac/users", {"name": "mallory"}, evil)
    assert status == 403, body
    assert body["error"]["code"] == "forbidden_origin"
    # Without Origin (a tool on the box, not a page) but not JSON: 415.
    status, _, body = raw(box, "POST", "/allerac/users", {"name": "mallory"}, {})
    assert status == 415, body
    # JSON from loopback with no token: being on loopback is not being the owner.
    json_type = {"Content-Type": "application/json"}
    status, _, body = raw(box, "POST", "/allerac/users", {"name": "mallory"}, json_type)
    assert status == 401, body
    assert body["error"]["code"] == "owner_token_required"
    assert "owner.token" in body["error"]["message"]
    # A wrong token is no better.
    wrong = {**json_type, "Authorization": "Bearer aot_not-the-token"}
    assert raw(box, "POST", "/allerac/users", {"name": "mallory"}, wrong)[0] == 401
    for path in ("/allerac/mesh", "/allerac/mesh/members", "/allerac/users"):
        assert raw(box, "GET", path)[0] == 401, path
    assert "mallory" not in user_names(box)
    # The owner's CLI needs no extra step.
    added = run_cli(box.home, "user", "add", "olivia")
    assert added.returncode == 0, added.stderr
    assert "olivia" in user_names(box)


def test_a_rebound_host_name_is_refused(box: NodeProcess) -> None:
    port = urllib.parse.urlsplit(box.url).port
    rebound = {"Host": f"rebind.evil.example:{port}", "Content-Type": "application/json"}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", HELLO),
        ("GET", "/allerac/status", None),
        ("POST", "/allerac/users", {"name": "mallory"}),
    ):
        status, _, reply = raw(box, method, path, body, {**rebound, **box.owner})
        assert status == 403, (path, reply)
        assert "allowed_hosts" in reply["error"]["message"]
    # Loopback names and addresses, and the names the owner allowed, are served.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"kitchen-box.local:{port}"):
        assert raw(box, "GET", "/v1/models", headers={"Host": host, **box.owner})[0] == 200
    # No key is the owner only under a loopback name: an allowed name needs a key.
    assert raw(box, "GET", "/v1/models", headers={"Host": f"localhost:{port}"})[0] == 200
    assert raw(box, "GET", "/v1/models", headers={"Host": f"kitchen-box.local:{port}"})[0] == 401
    assert raw(box, "GET", "/v1/models", headers={"Host": ""})[0] == 403
    status, _, reply = raw(box, "GET", "/v1/models", headers={"Host": "[::1]"})
    assert status == 200, reply


def test_cors_is_opt_in_and_never_makes_a_page_the_owner(box: NodeProcess) -> None:
    preflight = {
        "Origin": CORS_APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = raw(box, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 204
    assert headers["access-control-allow-origin"] == CORS_APP
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "POST" in headers["access-control-allow-methods"]
    # Another origin's preflight and request: refused, with no CORS header.
    other = {**preflight, "Origin": "http://evil.example"}
    status, headers, _ = raw(box, "OPTIONS", "/v1/chat/completions", headers=other)
    assert status == 403
    assert "access-control-allow-origin" not in headers
    # The allowed origin without a key is not the owner, even from loopback.
    json_from_app = {"Origin": CORS_APP, "Content-Type": "application/json"}
    status, headers, body = raw(box, "POST", "/v1/chat/completions", HELLO, json_from_app)
    assert status == 401, body
    assert headers["access-control-allow-origin"] == CORS_APP  # so the app can read why
    key = run_cli(box.home, "user", "add", "webui").stdout.strip()
    with_key = {**json_from_app, "Authorization": f"Bearer {key}"}
    status, headers, body = raw(box, "POST", "/v1/chat/completions", HELLO, with_key)
    assert status == 200, body
    assert headers["access-control-allow-origin"] == CORS_APP
    assert "x-allerac-node" in headers["access-control-expose-headers"]
    # CORS is for the OpenAI API only: administration refuses every page.
    admin = {**json_from_app, **box.owner}
    assert raw(box, "POST", "/allerac/users", {"name": "mallory"}, admin)[0] == 403


def test_a_page_without_origin_is_not_the_owner(box: NodeProcess) -> None:
    # An <img> or <script> GET carries no Origin, but browsers mark it cross-site.
    status, _, body = raw(box, "GET", "/allerac/status", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 401, body
    assert raw(box, "GET", "/allerac/status")[0] == 200  # curl on the box: the owner
    # The node's own pages (same origin) are not foreign.
    own = {"Origin": box.url, "Sec-Fetch-Site": "same-origin"}
    assert raw(box, "GET", "/allerac/status", headers=own)[0] == 401  # no key, has Origin
    assert raw(box, "GET", "/allerac/status", headers={**own, **box.owner})[0] == 200


def test_bad_invite_ttl_is_a_400(box: NodeProcess) -> None:
    owner = {"Content-Type": "application/json", **box.owner}
    for ttl in ("1" + "0" * 400, "1e400", "-1", "0.5", '"1h"', "true"):
        body = f'{{"ttl_s": {ttl}}}'.encode()
        status, _, reply = raw(box, "POST", "/allerac/mesh/invites", body, owner)
        assert status == 400, (ttl, reply)
    assert raw(box, "GET", "/allerac/mesh", headers=box.owner)[0] == 200


def _private(home: Path) -> list[str]:
    """Every file in the home that is not 0600, or directory that is not 0700."""
    wrong = []
    for path in [home, *home.rglob("*")]:
        if path.name in ("node.log", "test-config.toml"):
            continue  # written by the test, not the node
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{path.relative_to(home)} {mode:o}")
    return wrong


def test_the_owner_token_is_private_and_new_at_every_start(fresh_home: Path) -> None:
    fresh_home.mkdir(mode=0o700)
    node = NodeProcess(fresh_home).start()
    try:
        first = owner_headers(fresh_home)
        assert run_cli(fresh_home, "chat", "--max-tokens", "2", "hi").returncode == 0
        assert (fresh_home / "ledger.db").exists()
        assert _private(fresh_home) == []
        node.stop()
        node = NodeProcess(fresh_home).start()
        assert owner_headers(fresh_home) != first
        assert raw(node, "GET", "/allerac/users", headers=first)[0] == 401
        assert raw(node, "GET", "/allerac/users", headers=node.owner)[0] == 200
        assert node.stop() == 0
    finally:
        node.kill()
    assert not (fresh_home / "run" / "owner.token").exists()  # removed at a clean stop


def test_ledger_commands_on_a_home_without_a_node_fail(tmp_path: Path) -> None:
    for args in (("ledger", "verify"), ("usage",)):
        missing = run_cli(tmp_path / "no-such-home", *args)
        assert missing.returncode != 0
        assert "no data dir" in missing.stderr
        empty = run_cli(tmp_path, *args)
        assert empty.returncode != 0
        assert "no ledger" in empty.stderr
    assert not (tmp_path / "ledger.db").exists()  # asking created nothing


def test_owner_token_file_is_refused_when_others_can_read_it(box: NodeProcess) -> None:
    token_file = box.home / "run" / "owner.token"
    os.chmod(token_file, 0o644)
    try:
        refused = run_cli(box.home, "user", "list")
        assert refused.returncode != 0  # the CLI sends no token it cannot trust
    finally:
        os.chmod(token_file, 0o600)
    assert run_cli(box.home, "user", "list").returncode == 0


def test_joining_another_mesh_needs_leave_current(tmp_path: Path) -> None:
    nodes = [NodeProcess(tmp_path / name).start() for name in ("home", "box", "stranger")]
    home, box, stranger = nodes
    try:
        code = run_cli(home.home, "mesh", "invite").stdout.strip()
        assert run_cli(box.home, "mesh", "join", code).returncode == 0
        their = run_cli(stranger.home, "mesh", "invite").stdout.strip()
        refused = run_cli(box.home, "mesh", "join", their)
        assert refused.returncode != 0
        assert "--leave-current" in refused.stderr
        status, _, body = raw(
            box,
            "POST",
            "/allerac/mesh/join",
            {"code": their},
            {"Content-Type": "application/json", **box.owner},
        )
        assert status == 409, body
        assert body["error"]["code"] == "mesh_not_empty"
        mesh = raw(box, "GET", "/allerac/mesh", headers=box.owner)[2]
        assert mesh["mesh_id"] == home.info["mesh_id"]  # still home: nothing was discarded
        moved = run_cli(box.home, "mesh", "join", their, "--leave-current")
        assert moved.returncode == 0, moved.stderr
        assert stranger.info["mesh_id"] in moved.stdout
    finally:
        for node in nodes:
            node.kill()
