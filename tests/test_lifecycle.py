"""Start, restart and stop a real node; the CLI a user types."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from node.store.hardware import default_threads
from tests.nodeproc import NodeProcess, run_cli


def test_restart_reuses_the_identity(fresh_home: Path) -> None:
    first = NodeProcess(fresh_home).start()
    try:
        node_id = first.node_id
        assert first.stop() == 0
        assert "(new identity)" in first.output()
    finally:
        first.kill()
    key = fresh_home / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600
    key_bytes = key.read_bytes()
    second = NodeProcess(fresh_home).start()
    try:
        assert second.node_id == node_id
        assert second.stop() == 0
    finally:
        second.kill()
    assert key.read_bytes() == key_bytes
    assert not (fresh_home / "run" / "node.json").exists()


def test_a_corrupt_key_is_reported_and_never_replaced(fresh_home: Path) -> None:
    fresh_home.mkdir(parents=True)
    key = fresh_home / "identity.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nthis is not a key\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    before = key.read_bytes()
    result = run_cli(fresh_home, "up", "--http-port", "0", "--grpc-port", "0")
    assert result.returncode != 0
    assert "identity key" in result.stderr
    assert "left untouched" in result.stderr
    assert key.read_bytes() == before


def test_a_missing_model_file_fails_at_start(fresh_home: Path) -> None:
    result = run_cli(fresh_home, "up", "--model", str(fresh_home / "nope.gguf"))
    assert result.returncode != 0
    assert "nope.gguf" in result.stderr
    config = fresh_home / "allerac.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[[models]]\nname = "big"\npath = "/models/missing.gguf"\n')
    result = run_cli(fresh_home, "up", "--config", str(config))
    assert result.returncode != 0
    assert "models[0].path = '/models/missing.gguf'" in result.stderr


def test_a_bad_config_value_names_key_and_value(fresh_home: Path) -> None:
    config = fresh_home / "allerac.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[http]\nport = 70000\n")
    result = run_cli(fresh_home, "up", "--config", str(config))
    assert result.returncode != 0
    assert "http.port = 70000" in result.stderr


def test_binding_the_api_beyond_loopback_says_keys_are_needed(fresh_home: Path) -> None:
    # Allowed now that other machines must present an API key (tests/test_api_keys.py);
    # with no users yet, the node warns that only this box can use it.
    proc = NodeProcess(fresh_home, "--http-host", "0.0.0.0").start()
    try:
        status = run_cli(fresh_home, "status", "--json")  # the owner, over loopback
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["node_id"] == proc.node_id
        assert proc.stop() == 0
    finally:
        proc.kill()
    log = proc.output()
    assert "HTTP API on 0.0.0.0, beyond loopback: other machines need an API key" in log
    assert "no users yet, so only this box can use the HTTP API" in log


def test_cli_chat_status_and_models(node: NodeProcess) -> None:
    # No sampling flags: the embedded model's own defaults must give the right answer.
    chat = run_cli(node.home, "chat", "What is the capital of France?")
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
    status = run_cli(node.home, "status", "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["node_id"] == node.node_id
    assert info["models"][0]["name"] == "smollm2-135m-instruct"
    human = run_cli(node.home, "status")
    assert node.node_id in human.stdout
    # Decoding uses the threads the box gives it ($ALLERAC_THREADS in the suite, else every
    # physical core; llama-cpp-python's own default is half of them).
    model = info["models"][0]
    assert model["threads"] == default_threads()
    assert f"{model['parallel']} slots, {default_threads()} threads" in human.stdout
    models = run_cli(node.home, "models")
    assert "smollm2-135m-instruct" in models.stdout
    unknown = run_cli(node.home, "chat", "-m", "gpt-17", "hi")
    assert unknown.returncode != 0
    assert "404" in unknown.stderr


def test_cli_without_a_running_node_says_how_to_start_one(fresh_home: Path) -> None:
    result = run_cli(fresh_home, "status")
    assert result.returncode != 0
    assert "allerac up" in result.stderr


def test_sigterm_lets_the_stream_in_flight_finish_and_exits_0(fresh_home: Path) -> None:
    proc = NodeProcess(fresh_home).start()
    try:
        url = urllib.parse.urlsplit(proc.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = {
            "model": "default",
            "prompt": "1, 2, 3, 4,",
            "temperature": 0,
            "max_tokens": 80,  # still streaming when SIGTERM comes, right after the first
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: ")
        stopper = threading.Thread(target=proc.stop, args=(signal.SIGTERM,))
        stopper.start()
        rest = response.read().decode()
        conn.close()
        stopper.join(60)
        assert proc.proc is not None
        assert proc.proc.returncode == 0, proc.output()
    finally:
        proc.kill()
    assert rest.rstrip().endswith("data: [DONE]")
    usage = [
        json.loads(line[6:])
        for line in rest.splitlines()
        if line.startswith("data: {") and '"usage"' in line
    ]
    assert usage[-1]["usage"]["completion_tokens"] == 80
    assert not (fresh_home / "run" / "node.json").exists()


def test_ctrl_c_stops_an_idle_node_with_exit_0(fresh_home: Path) -> None:
    proc = NodeProcess(fresh_home).start()
    try:
        assert proc.stop(signal.SIGINT) == 0
        assert "Ready" in proc.output()
    finally:
        proc.kill()


def test_a_stream_longer_than_the_grace_period_still_ends_cleanly(fresh_home: Path) -> None:
    proc = NodeProcess(fresh_home, config="shutdown_grace_s = 1\n").start()
    try:
        url = urllib.parse.urlsplit(proc.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = {
            "model": "default",
            "prompt": "1, 2, 3, 4,",
            "temperature": 0,
            "max_tokens": 1500,  # ~15 s of counting: far beyond the 1 s grace
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        started = time.monotonic()
        stopper = threading.Thread(target=proc.stop, args=(signal.SIGTERM,))
        stopper.start()
        rest = response.read().decode()
        conn.close()
        stopper.join(60)
        assert proc.proc is not None
        assert proc.proc.returncode == 0, proc.output()
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
    chunks = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < 1500


def test_piped_chat_is_one_question_and_prints_only_the_answer(node: NodeProcess) -> None:
    # Piped input is one message, however many lines (`cat notes.txt | allerac chat`); the
    # interactive session at a terminal is tested through a pty in tests/test_cli_edges.py.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node",
            "chat",
            "--home",
            str(node.home),
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ],
        input="Answer in one word.\n\nWhat is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "you> " not in result.stdout
    assert "Paris" in result.stdout


def test_an_unknown_backend_fails_at_start_naming_it(fresh_home: Path) -> None:
    from node.store.config_file import embedded_model_path

    config = fresh_home / "allerac.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        f'[[models]]\nname = "x"\npath = "{embedded_model_path()}"\nbackend = "vllm"\n'
    )
    result = run_cli(fresh_home, "up", "--config", str(config), "--no-mdns")
    assert result.returncode != 0
    assert "backend = 'vllm' is unknown; known: llama_cpp" in result.stderr
