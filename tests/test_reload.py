"""SIGHUP on a real node: it reloads its configuration and never stops serving (issue 17).

One node for the module; each test leaves its config file as the next one expects."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.store.config_file import embedded_model_path
from tests.nodeproc import NodeProcess, RelayProcess, run_cli

WAIT_S = 30.0

BASE = """\
# the kitchen box (a comment the node must keep)
[scheduler]
max_wait_ms = 0

[[models]]
name = "smollm2-135m-instruct"
path = "{path}"
aliases = ["default"]
temperature = 0.0
"""

SECOND = """
[[models]]
name = "second"
path = "{path}"
context_length = 1024
"""


@pytest.fixture(scope="module")
def reloading(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    home = tmp_path_factory.mktemp("reload-home")
    proc = NodeProcess(home, config=BASE.format(path=embedded_model_path())).start()
    try:
        yield proc
    finally:
        proc.kill()


def _config(proc: NodeProcess) -> Path:
    return proc.home / "test-config.toml"


def _get(proc: NodeProcess, path: str) -> Any:
    url = urllib.parse.urlsplit(proc.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def _model_ids(proc: NodeProcess) -> set[str]:
    return {m["id"] for m in _get(proc, "/v1/models")["data"]}


def _wait_for(predicate: Any, what: str, proc: NodeProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.proc is not None
        assert proc.proc.poll() is None, f"the node died:\n{proc.output()}"
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {WAIT_S} s:\n{proc.output()}")


def test_sighup_during_a_stream_finishes_it_and_serves_the_new_model(
    reloading: NodeProcess,
) -> None:
    proc = reloading
    assert proc.proc is not None
    url = urllib.parse.urlsplit(proc.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    body = {
        "model": "default",
        "prompt": "1, 2, 3, 4,",
        "max_tokens": 150,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    path = embedded_model_path()
    _config(proc).write_text(BASE.format(path=path) + SECOND.format(path=path), encoding="utf-8")
    os.kill(proc.proc.pid, signal.SIGHUP)
    rest = response.read().decode()
    conn.close()
    assert rest.rstrip().endswith("data: [DONE]")
    usage = [
        json.loads(x[6:]) for x in rest.splitlines() if x.startswith('data: {"') and "usage" in x
    ]
    assert usage[-1]["usage"]["completion_tokens"] == 150
    _wait_for(lambda: "second" in _model_ids(proc), "the new model is listed", proc)
    assert json.loads((proc.home / "run" / "node.json").read_text())["pid"] == proc.proc.pid
    log = proc.output()
    assert "configuration reloaded" in log
    assert "model second added" in log


def test_a_broken_config_on_sighup_is_reported_and_the_node_goes_on(
    reloading: NodeProcess,
) -> None:
    proc = reloading
    assert proc.proc is not None
    before = _model_ids(proc)
    _config(proc).write_text("[http]\nport = 70000\n", encoding="utf-8")
    os.kill(proc.proc.pid, signal.SIGHUP)
    _wait_for(
        lambda: "http.port = 70000" in proc.output(), "the bad value is named in the log", proc
    )
    assert _model_ids(proc) == before
    assert "configuration not reloaded" in proc.output()


def _post_size(proc: NodeProcess, size: int) -> int:
    url = urllib.parse.urlsplit(proc.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    body = json.dumps({"model": "nobody-serves-this", "prompt": "x" * size})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_http_limits_and_scheduler_settings_apply_at_once(reloading: NodeProcess) -> None:
    proc = reloading
    assert proc.proc is not None
    assert _post_size(proc, 3000) == 404  # read whole, then refused for its model
    tight = BASE.format(path=embedded_model_path()).replace("max_wait_ms = 0", "max_wait_ms = 250")
    peers = 'peers = ["127.0.0.1:9"]\n'  # nothing listens there: it is only tried
    _config(proc).write_text(peers + tight + "[http]\nmax_request_bytes = 2048\n", encoding="utf-8")
    os.kill(proc.proc.pid, signal.SIGHUP)
    _wait_for(lambda: _post_size(proc, 3000) == 413, "a body over the new limit gets 413", proc)
    log = proc.output()
    assert "http.max_request_bytes: 1048576 -> 2048" in log
    assert "scheduler.max_wait_ms: 0.0 -> 250.0" in log
    assert "model second removed" in log
    assert "peer 127.0.0.1:9 added" in log


def _relays(proc: NodeProcess) -> list[dict[str, Any]]:
    return list(_get(proc, "/allerac/status")["relays"])


def test_a_relay_added_by_sighup_connects_and_a_removed_one_is_left(
    reloading: NodeProcess, tmp_path: Path
) -> None:
    proc = reloading
    assert proc.proc is not None
    relay = RelayProcess(tmp_path / "relay").start()
    try:
        base = BASE.format(path=embedded_model_path())
        _config(proc).write_text(f'relays = ["{relay.address}"]\n' + base, encoding="utf-8")
        os.kill(proc.proc.pid, signal.SIGHUP)
        _wait_for(
            lambda: _relays(proc) == [{"address": relay.address, "connected": True}],
            "the node holds a session at the new relay",
            proc,
        )
        _config(proc).write_text(base, encoding="utf-8")
        os.kill(proc.proc.pid, signal.SIGHUP)
        _wait_for(
            lambda: f"relay {relay.address} removed" in proc.output(), "the reload is done", proc
        )
        assert _relays(proc) == []
    finally:
        relay.kill()


def test_status_says_the_profile_and_the_card_carries_it(reloading: NodeProcess) -> None:
    result = run_cli(reloading.home, "status", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["profile"]["name"] in ("lite", "home", "pro")
    assert info["hardware"]["profile"] == info["profile"]["name"]  # what the card says
    assert info["models"][0]["context_length"] == 2048  # the embedded model's own
    text = run_cli(reloading.home, "status").stdout
    assert f"profile   {info['profile']['name']} (detected: " in text
