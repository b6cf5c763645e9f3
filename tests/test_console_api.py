"""What the console stands on, over HTTP, on one real node: the request log (one line per
request, text or JSON, never a key, a prompt or an answer), `/metrics` (parsed with
prometheus-client's own parser; who may read it), `/allerac/usage` (the numbers of
`allerac usage --json`; an API key sees its own rows), the live status stream, display
names, and console sign-in (one-time login link, strict HttpOnly cookie, CSRF token on
every request, an API key's session never administers). The pages themselves are driven
in a browser in tests/test_console_browser.py."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from mesh.config import parse_config
from mesh.errors import ConfigError
from mesh.trust.names import clean_name, default_display_name, node_label
from node.api.console import _browser_host
from node.api.request_log import JsonFormatter, RequestFacts, format_text
from node.cli import cli
from node.store.config_file import embedded_model_path
from node.store.names_file import NamesFile, read_names
from tests.nodeproc import NodeProcess
from tests.test_config import FakeBox
from tests.test_owner_edges import raw

SCRAPER_TOKEN = "scraper-0123456789abcdef"


def one_thread_model(name: str = "smollm2-135m-instruct") -> str:
    """The embedded model as `default` serves it (greedy, with its system prompt), on one
    thread: two llama.cpp threads per test node on a loaded two-core machine spin against
    each other (a first answer took 0.3 s on one thread, 4 to 15 s on two, measured here)."""
    return (
        f'[[models]]\nname = "{name}"\npath = "{embedded_model_path()}"\n'
        'aliases = ["default"]\nsystem_prompt = "You are a helpful assistant."\n'
        "temperature = 0.0\nthreads = 1\n"
    )


def box_config() -> str:
    """A name other than loopback's, a scraper token, and the embedded model on one thread."""
    return f"""
[http]
allowed_hosts = ["box.test"]

[metrics]
token = "{SCRAPER_TOKEN}"

{one_thread_model()}"""


def cli_in_process(home: Path, *args: str) -> str:
    """An `allerac` command run in this process (the same code, without starting another
    interpreter): its output, once it has succeeded."""
    result = CliRunner().invoke(cli, [*args, "--home", str(home)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


SECRET_PROMPT = "the-secret-prompt-words"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess(
        tmp_path_factory.mktemp("console"), "--log-format", "json", config=box_config()
    ).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def alice_key(box: NodeProcess) -> str:
    status, _, body = raw(
        box, "POST", "/allerac/users", {"name": "alice"}, {**box.owner, **JSON_TYPE}
    )
    assert status == 201, body
    return str(body["api_key"])


def chat(box: NodeProcess, key: str | None, prompt: str = "Say hi", stream: bool = False) -> Any:
    headers = {**JSON_TYPE, **({"Authorization": f"Bearer {key}"} if key else {})}
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "stream": stream,
    }
    status, _, answer = raw(box, "POST", "/v1/chat/completions", body, headers)
    assert status == 200, answer
    return answer


def request_lines(box: NodeProcess) -> list[dict[str, Any]]:
    lines = []
    for line in box.output().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "allerac.requests":
                lines.append(entry)
    return lines


def metrics(box: NodeProcess, headers: dict[str, str] | None = None) -> dict[str, float]:
    status, response_headers, body = raw(box, "GET", "/metrics", headers=headers)
    assert status == 200, body
    assert response_headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_the_request_log_has_one_line_per_request_and_no_secrets(
    box: NodeProcess, alice_key: str
) -> None:
    before = len(request_lines(box))
    answer = chat(box, alice_key, SECRET_PROMPT)
    text = answer["choices"][0]["message"]["content"]
    raw(box, "GET", "/v1/models?key=" + alice_key, headers={"Authorization": f"Bearer {alice_key}"})
    raw(box, "GET", "/allerac/users", headers={"Authorization": "Bearer aot_wrong"})
    lines = request_lines(box)[before:]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/v1/models", 200),  # no query string: it could carry a secret
        ("GET", "/allerac/users", 401),
    ]
    answered = lines[0]
    assert answered["user"] == "alice"
    assert answered["model"] == "smollm2-135m-instruct"
    assert answered["route"] == "local"
    assert answered["prompt_tokens"] > 0
    assert answered["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert answered["duration_s"] > 0
    log = box.output()
    assert alice_key not in log
    assert SECRET_PROMPT not in log
    assert text.strip() == "" or text not in log
    assert box.owner["Authorization"].split()[1] not in log


def test_text_request_lines_and_json_formatting() -> None:
    noted = RequestFacts(
        method="POST",
        path="/v1/chat/completions",
        status=200,
        user="alice",
        model="m",
        route="lan",
        prompt_tokens=3,
        completion_tokens=5,
        duration_s=0.25,
    )
    assert format_text(noted) == (
        "POST /v1/chat/completions 200 user=alice model=m route=lan tokens=3+5 250.0ms"
    )
    record = logging.LogRecord("allerac.requests", logging.INFO, "", 0, "%s", ("x",), None)
    record.request = RequestFacts(status=200, model="")
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "x"
    assert line["status"] == 200
    assert "model" not in line  # empty fields are left out


def test_metrics_parse_and_move_with_requests(box: NodeProcess, alice_key: str) -> None:
    key = (
        "allerac_http_requests_total{endpoint=/v1/chat/completions,"
        "model=smollm2-135m-instruct,route=local,status=200,user_class=user}"
    )
    ttft = "allerac_time_to_first_token_seconds_count{model=smollm2-135m-instruct,route=local}"
    tokens = "allerac_completion_tokens_total{model=smollm2-135m-instruct,route=local}"
    duration = "allerac_request_duration_seconds_count{endpoint=/v1/chat/completions}"
    before = metrics(box)
    chat(box, alice_key, stream=True)
    after = metrics(box)
    assert after[key] == before.get(key, 0) + 1
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after[duration] == before.get(duration, 0) + 1
    assert after[tokens] > before.get(tokens, 0)
    assert after["allerac_slots{}"] >= 1
    assert after["allerac_ledger_records{}"] >= 1
    assert "allerac_peers{state=up}" in after
    assert "allerac_relay_sessions{state=connected}" in after
    # A quota refusal is counted (and its user is not named).
    status, _, tiny = raw(
        box,
        "POST",
        "/allerac/users",
        {"name": "tiny", "quota": "mesh=1/day"},
        {**box.owner, **JSON_TYPE},
    )
    assert status == 201, tiny
    headers = {**JSON_TYPE, "Authorization": f"Bearer {tiny['api_key']}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    assert raw(box, "POST", "/v1/chat/completions", body, headers)[0] == 429
    refused = metrics(box)
    assert refused["allerac_quota_refusals_total{}"] == after["allerac_quota_refusals_total{}"] + 1
    # No user name, key or prompt anywhere in it.
    _, _, text = raw(box, "GET", "/metrics")
    assert "alice" not in text
    assert "tiny" not in text
    assert alice_key not in text


def test_metrics_from_beyond_the_box_need_a_credential(box: NodeProcess, alice_key: str) -> None:
    elsewhere = {"Host": "box.test"}  # an allowed name, not a loopback one
    assert raw(box, "GET", "/metrics", headers=elsewhere)[0] == 401
    key = {**elsewhere, "Authorization": f"Bearer {alice_key}"}
    assert raw(box, "GET", "/metrics", headers=key)[0] == 403
    scraper = {**elsewhere, "Authorization": f"Bearer {SCRAPER_TOKEN}"}
    assert raw(box, "GET", "/metrics", headers=scraper)[0] == 200
    assert raw(box, "GET", "/metrics", headers={**elsewhere, **box.owner})[0] == 200
    # A page of another origin cannot read it, even on this box.
    page = {"Origin": "http://evil.example"}
    assert raw(box, "GET", "/metrics", headers=page)[0] == 403


@pytest.fixture(scope="module")
def used(box: NodeProcess, alice_key: str) -> str:
    """Usage of two people in the ledger: alice's and the owner's."""
    chat(box, alice_key)
    chat(box, None)
    return alice_key


def test_usage_over_http_equals_the_command(box: NodeProcess, used: str) -> None:
    for by in ("node", "day"):  # by user: tests/test_console_browser.py
        status, _, body = raw(box, "GET", f"/allerac/usage?period=month&by={by}", headers=box.owner)
        assert status == 200, body
        command = json.loads(
            cli_in_process(box.home, "usage", "--period", "month", "--by", by, "--json")
        )
        verification = body.pop("verification")
        assert body == command
        assert verification["ok"] is True
        assert verification["records"] >= 2
    _, _, body = raw(box, "GET", "/allerac/usage?by=user", headers=box.owner)
    assert {"alice", "(owner)"} <= {r["user"] for r in body["rows"]}


def test_an_api_key_sees_only_its_own_usage(box: NodeProcess, used: str) -> None:
    key = {"Authorization": f"Bearer {used}"}
    status, _, body = raw(box, "GET", "/allerac/usage?by=user", headers=key)
    assert status == 200, body
    assert [r["user"] for r in body["rows"]] == ["alice"]
    assert "verification" not in body
    assert raw(box, "GET", "/allerac/usage?user=(owner)", headers=key)[0] == 403
    assert raw(box, "GET", "/allerac/usage")[0] == 401  # no credential: nobody's rows
    assert raw(box, "GET", "/allerac/usage?by=colour", headers=box.owner)[0] == 400
    assert raw(box, "GET", "/allerac/usage?period=yesterday", headers=box.owner)[0] == 400


def test_display_names_default_and_usage_by_node(box: NodeProcess, used: str) -> None:
    _, _, status = raw(box, "GET", "/allerac/status", headers=box.owner)
    expected = default_display_name(socket.gethostname(), box.node_id)
    assert status["display_name"] == expected
    assert expected.endswith("-" + box.node_id[:5])
    _, _, by_node = raw(box, "GET", "/allerac/usage?by=node", headers=box.owner)
    assert by_node["rows"][0]["display_name"] == expected
    text = cli_in_process(box.home, "usage", "--by", "node")
    assert f"{expected} ({box.node_id[:7]})" in text


def test_display_name_rules(tmp_path: Path) -> None:
    assert default_display_name("kitchen.local", "ABCDEFG-HIJ") == "kitchen-ABCDE"
    assert default_display_name("", "ABCDEFG") == "box-ABCDE"
    assert default_display_name("a b/c", "XYZ12AB") == "a-b-c-XYZ12"
    assert clean_name("x" * 65) is None
    assert clean_name("bad\nname") is None
    assert node_label("ABCDEFG-HIJKLMN-OPQ", {}) == "ABCDEFG-HIJKLMN"
    path = tmp_path / "node-names.json"
    book = NamesFile(path)
    book.observe({"N1": "one", "N2": "bad\x00name"})
    assert read_names(path) == {"N1": "one"}
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("not json")
    path.chmod(0o600)
    assert read_names(path) == {}  # a damaged file: IDs are shown instead


def test_the_scraper_token_must_be_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.token"):
        parse_config(b'[metrics]\ntoken = "short"\n', source="c", base_dir=tmp_path, box=FakeBox())
    with pytest.raises(ConfigError, match=r"metrics\.colour"):
        parse_config(b'[metrics]\ncolour = "x"\n', source="c", base_dir=tmp_path, box=FakeBox())
    settings = parse_config(
        f'[metrics]\ntoken = "{SCRAPER_TOKEN}"\n'.encode(),
        source="c",
        base_dir=tmp_path,
        box=FakeBox(),
    )
    assert settings["metrics_token"] == SCRAPER_TOKEN


def test_the_status_stream_sends_status_events(box: NodeProcess) -> None:
    url = urllib.parse.urlsplit(box.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(f"GET /allerac/status/stream HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
        data = b""
        while b"\n\n" not in data.partition(b"\r\n\r\n")[2]:
            chunk = conn.recv(65536)
            assert chunk, data
            data += chunk
    head, _, events = data.partition(b"\r\n\r\n")
    assert b"text/event-stream" in head
    first = re.search(rb"data: (\{.*?\})\n\n", events)
    assert first is not None
    assert json.loads(first.group(1))["node_id"] == box.node_id


# --- console sign-in ------------------------------------------------------------------------


def login_url(box: NodeProcess) -> str:
    """What `allerac console` asks the node for (with the owner token): a one-time link."""
    status, _, body = raw(box, "POST", "/console/login-tokens", {}, {**box.owner, **JSON_TYPE})
    assert status == 200, body
    assert body["expires_in_s"] == 120
    return str(body["url"])


def visit(box: NodeProcess, url: str) -> tuple[str, str]:
    """A browser's visit of a login link: where it is sent on, and the cookie it is given."""
    link = urllib.parse.urlsplit(url)
    assert f"{link.scheme}://{link.netloc}" == box.url  # a link to this very box
    status, headers, _ = raw(box, "GET", f"{link.path}?{link.query}")
    assert status == 303
    return headers["location"], headers.get("set-cookie", "")


def login(box: NodeProcess) -> str:
    """A login link visited: the session cookie it set (strict, HttpOnly), good once."""
    url = login_url(box)
    location, cookie = visit(box, url)
    assert location == "/"
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert visit(box, url) == ("/?login=expired", "")  # one time only
    return cookie.split(";")[0]


RECORDING_BROWSER = """#!/bin/sh
printf '%s\\n' "$1" >> "$(dirname "$0")/opened.txt"
"""


def test_allerac_console_opens_the_link_in_the_browser_and_it_signs_in_once(
    box: NodeProcess, tmp_path: Path
) -> None:
    """`allerac console` prints the link and opens it with Python's `webbrowser`, which
    honours $BROWSER (here a script that notes the URL it is given); `--print` only prints;
    with no browser to be found it says so and the printed link still works."""
    browser = tmp_path / "browser.sh"
    browser.write_text(RECORDING_BROWSER)
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    nowhere = tmp_path / "no-browsers-here"  # a PATH with no www-browser, lynx, w3m...
    nowhere.mkdir()
    runs = {
        "open": ((), {"BROWSER": str(browser)}),
        "print": (("--print",), {"BROWSER": str(browser)}),
        "none": ((), {"BROWSER": "/bin/false", "PATH": str(nowhere)}),
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "node", "console", *flags, "--home", str(box.home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        for name, (flags, env) in runs.items()
    }
    printed, complained = {}, {}
    for name, command in started.items():  # all at once: each mostly starts Python
        out, err = command.communicate(timeout=60)
        assert command.returncode == 0, err
        printed[name], complained[name] = out.strip(), err
    assert complained == {
        "open": "",
        "print": "",
        "none": "No browser found here: open the URL above in one.\n",
    }
    # The browser was given the printed link, once; --print's was never opened.
    assert (tmp_path / "opened.txt").read_text().splitlines() == [printed["open"]]
    location, cookie = visit(box, printed["open"])
    assert location == "/"
    assert "SameSite=Strict" in cookie
    assert visit(box, printed["open"]) == ("/?login=expired", "")  # good for one sign-in
    assert visit(box, printed["print"])[0] == "/"  # each command's link is its own
    assert visit(box, printed["none"])[0] == "/"


def test_a_console_session_needs_its_csrf_token_on_every_request(box: NodeProcess) -> None:
    cookie = {"Cookie": login(box)}
    status, _, session = raw(box, "GET", "/console/session", headers=cookie)
    assert status == 200
    assert session["role"] == "owner"
    csrf = {"X-Allerac-CSRF": session["csrf"]}
    # A stolen cookie alone opens nothing, reads included.
    assert raw(box, "GET", "/allerac/users", headers=cookie)[0] == 403
    stolen = raw(box, "POST", "/allerac/users", {"name": "mallory"}, {**cookie, **JSON_TYPE})
    assert stolen[0] == 403
    assert stolen[2]["error"]["code"] == "csrf_token_required"
    wrong = {**cookie, "X-Allerac-CSRF": "x" * 43}
    assert raw(box, "GET", "/allerac/users", headers=wrong)[0] == 403
    assert raw(box, "GET", "/allerac/users", headers={**cookie, **csrf})[0] == 200
    assert request_lines(box)[-1]["user"] == "owner"  # the session's request, as logged
    # With the token, from another origin's page: refused before the session counts.
    page = {**cookie, **csrf, **JSON_TYPE, "Origin": "http://evil.example"}
    assert raw(box, "POST", "/allerac/users", {"name": "mallory"}, page)[0] == 403
    # The session's token is not for other origins' pages, nor for cross-site reads.
    assert (
        raw(box, "GET", "/console/session", headers={**cookie, "Sec-Fetch-Site": "cross-site"})[0]
        == 403
    )
    assert (
        raw(box, "GET", "/console/session", headers={**cookie, "Origin": "http://evil.example"})[0]
        == 403
    )
    names = [u["name"] for u in raw(box, "GET", "/allerac/users", headers=box.owner)[2]["users"]]
    assert "mallory" not in names
    # Signing out ends it.
    assert raw(box, "POST", "/console/sign-out", {}, {**cookie, **csrf, **JSON_TYPE})[0] == 200
    assert raw(box, "GET", "/console/session", headers=cookie)[2] == {"signed_in": False}


def test_an_api_key_session_never_administers(box: NodeProcess, used: str) -> None:
    alice_key = used
    status, headers, session = raw(
        box, "POST", "/console/sign-in", {"api_key": alice_key}, JSON_TYPE
    )
    assert status == 200
    assert session["role"] == "user"
    assert session["user"] == "alice"
    assert "HttpOnly" in headers["set-cookie"]
    signed_in = {"Cookie": headers["set-cookie"].split(";")[0], "X-Allerac-CSRF": session["csrf"]}
    assert raw(box, "GET", "/allerac/users", headers=signed_in)[0] == 403
    assert raw(box, "GET", "/allerac/mesh/members", headers=signed_in)[0] == 403
    revoke = raw(
        box, "POST", "/allerac/mesh/revoke", {"node_id": box.node_id}, {**signed_in, **JSON_TYPE}
    )
    assert revoke[0] == 403  # the members list's Revoke is the owner's alone
    mine = raw(box, "GET", "/allerac/usage?by=user", headers=signed_in)
    assert mine[0] == 200
    assert {r["user"] for r in mine[2]["rows"]} == {"alice"}
    bad = raw(box, "POST", "/console/sign-in", {"api_key": "amk_wrong"}, JSON_TYPE)
    assert bad[0] == 401
    assert raw(box, "POST", "/console/sign-in", {"api_key": 5}, JSON_TYPE)[0] == 400
    assert raw(box, "POST", "/console/sign-in", b"{not json", JSON_TYPE)[0] == 400
    form = raw(
        box,
        "POST",
        "/console/sign-in",
        b"api_key=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form[0] == 415  # a page's form post cannot sign anyone in


def test_the_console_page_is_served_with_a_strict_policy(box: NodeProcess) -> None:
    status, headers, body = raw(box, "GET", "/")
    assert status == 200
    assert "<html" in body.lower()
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert raw(box, "GET", "/console/static/app.js")[0] == 200
    assert raw(box, "GET", "/console/static/..%2Fconsole.py")[0] == 404
    assert raw(box, "GET", "/console/static/nothing.js")[0] == 404


def test_the_owner_renames_the_box(box: NodeProcess, used: str) -> None:
    alice_key = used
    put = {**JSON_TYPE, **box.owner}
    assert raw(box, "PUT", "/allerac/display-name", {"display_name": "x\ny"}, put)[0] == 400
    key = {**JSON_TYPE, "Authorization": f"Bearer {alice_key}"}
    assert raw(box, "PUT", "/allerac/display-name", {"display_name": "mine"}, key)[0] == 403
    status, _, body = raw(box, "PUT", "/allerac/display-name", {"display_name": "attic"}, put)
    assert status == 200, body
    assert raw(box, "GET", "/allerac/status", headers=box.owner)[2]["display_name"] == "attic"
    assert (box.home / "display-name").read_text().strip() == "attic"  # kept for restarts
    members = raw(box, "GET", "/allerac/mesh/members", headers=box.owner)[2]["members"]
    assert members[0]["display_name"] == "attic"
    by_node = json.loads(cli_in_process(box.home, "usage", "--by", "node", "--json"))
    assert by_node["rows"][0]["display_name"] == "attic"


def test_a_login_link_names_a_host_a_browser_can_open() -> None:
    assert _browser_host("0.0.0.0:8470") == "127.0.0.1:8470"
    assert _browser_host("[::]:8470") == "127.0.0.1:8470"
    assert _browser_host("kitchen-box.local:8470") == "kitchen-box.local:8470"
