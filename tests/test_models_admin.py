"""Models without restarts on a real node (issue 17): `allerac models add`, `remove` and
`pull` while it serves; the config file records them and keeps the owner's comments; bad
files are clear errors and the node goes on. One node for the module, tests in order."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.store.config_file import embedded_model_path
from tests.model_server import model_server
from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import start_mesh, wait_until

# Both boxes cap the starter plan below the embedded model's 135M parameters, so a plan
# refusal can be shown with the one real model the tests have.
PLANS = """
[plans.starter]
max_parameters = "100M"
"""
CONFIG = """\
# the study box: a comment the node must keep
display_name = "study"

[[models]]
name = "smollm2-135m-instruct"   # the embedded model
"""


MESH_SEES_S = 10.0  # a peer lists a model added or removed here within this


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    """This box ("study", where models change) and a peer of its mesh ("kitchen")."""
    nodes = start_mesh(
        tmp_path_factory.mktemp("models-mesh"),
        {"study": CONFIG + PLANS, "kitchen": 'display_name = "kitchen"\n' + PLANS},
    )
    try:
        yield nodes
    finally:
        for proc in nodes.values():
            proc.kill()


@pytest.fixture(scope="module")
def node(mesh: dict[str, NodeProcess]) -> NodeProcess:
    return mesh["study"]


def _peer_sees(mesh: dict[str, NodeProcess], model: str, present: bool) -> None:
    study, kitchen = mesh["study"], mesh["kitchen"]

    def sees() -> bool:
        entry = _served(kitchen).get(model)
        return (entry is not None and study.node_id in entry["served_by"]) == present

    wait_until(sees, MESH_SEES_S, f"the peer {'lists' if present else 'drops'} {model}")


def _config(node: NodeProcess) -> str:
    return (node.home / "test-config.toml").read_text(encoding="utf-8")


def _served(node: NodeProcess) -> dict[str, Any]:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    conn.request("GET", "/v1/models")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return {m["id"]: m for m in data["data"]}


def _complete(node: NodeProcess, model: str, max_tokens: int = 8) -> dict[str, Any]:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    body = {"model": model, "prompt": "1, 2, 3,", "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    assert response.status == 200, data
    return dict(data)


def test_add_serves_the_file_now_and_records_it(
    node: NodeProcess, mesh: dict[str, NodeProcess]
) -> None:
    path = embedded_model_path()
    result = run_cli(node.home, "models", "add", str(path), "--name", "second", "--alias", "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "second"
    assert "model second added" in result.stderr
    served = _served(node)
    assert served["second"]["aliases"] == ["two"]
    assert "smollm2-135m-instruct" in served
    assert _complete(node, "two")["usage"]["completion_tokens"] == 8
    _peer_sees(mesh, "second", present=True)
    text = _config(node)
    assert text.startswith("# the study box: a comment the node must keep\n")
    assert "[plans.starter]" in text
    assert "# the embedded model" in text
    assert 'name = "second"' in text
    assert f'path = "{path}"' in text
    listed = run_cli(node.home, "models")  # with no subcommand: the list, as before
    assert listed.returncode == 0
    assert "two" in listed.stdout
    again = run_cli(node.home, "models", "add", str(path), "--name", "two")
    assert again.returncode != 0
    assert "409: this node already serves a model called 'two'" in again.stderr


def test_bad_files_are_clear_errors_and_the_node_goes_on(node: NodeProcess, tmp_path: Path) -> None:
    before, config = set(_served(node)), _config(node)
    page = tmp_path / "page.gguf"
    page.write_text("<html>404</html>", encoding="utf-8")
    result = run_cli(node.home, "models", "add", str(page))
    assert result.returncode != 0
    assert "is not a GGUF model file" in result.stderr
    # --home before the subcommand names the same node.
    before_subcommand = subprocess.run(
        [sys.executable, "-m", "node", "models", "--home", str(node.home), "add", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ALLERAC_HOME": str(tmp_path / "not-a-home")},
    )
    assert "is not a GGUF model file" in before_subcommand.stderr
    broken = tmp_path / "broken.gguf"
    with embedded_model_path().open("rb") as handle:
        broken.write_bytes(handle.read(2 << 20))  # the header, then cut short
    result = run_cli(node.home, "models", "add", str(broken), "--name", "broken")
    assert result.returncode != 0
    assert "cannot load model 'broken'" in result.stderr
    missing = run_cli(node.home, "models", "add", str(tmp_path / "nothing.gguf"))
    assert missing.returncode != 0
    assert "no model file at" in missing.stderr
    assert set(_served(node)) == before
    assert _config(node) == config
    assert _complete(node, "default")["usage"]["completion_tokens"] == 8


def test_remove_lets_the_answer_in_flight_finish(
    node: NodeProcess, mesh: dict[str, NodeProcess]
) -> None:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    body = {
        "model": "second",
        "prompt": "1, 2, 3, 4,",
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    removed: list[Any] = []
    remover = threading.Thread(
        target=lambda: removed.append(run_cli(node.home, "models", "remove", "second"))
    )
    remover.start()
    rest = response.read().decode()
    conn.close()
    remover.join(60)
    assert removed[0].returncode == 0, removed[0].stderr
    assert rest.rstrip().endswith("data: [DONE]")
    usage = [
        json.loads(x[6:]) for x in rest.splitlines() if x.startswith("data: {") and "usage" in x
    ]
    assert usage[-1]["usage"]["completion_tokens"] == 100
    assert "second" not in _served(node)
    _peer_sees(mesh, "second", present=False)
    assert 'name = "second"' not in _config(node)
    last = run_cli(node.home, "models", "remove", "smollm2-135m-instruct")
    assert last.returncode != 0
    assert "the only model" in last.stderr
    unknown = run_cli(node.home, "models", "remove", "nobody")
    assert unknown.returncode != 0
    assert "404: this node serves no model called 'nobody'" in unknown.stderr


def test_pull_resumes_checks_and_serves(node: NodeProcess) -> None:
    data = embedded_model_path().read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    files = {"/tiny.gguf": data, "/other.gguf": data}
    with model_server(files, cut_after={"/tiny.gguf": 10 << 20}) as server:
        cut = run_cli(node.home, "models", "pull", f"{server.url}/tiny.gguf", "--sha256", sha)
        assert cut.returncode != 0
        assert "run the same command again to resume" in cut.stderr
        wrong = run_cli(
            node.home, "models", "pull", f"{server.url}/other.gguf", "--sha256", "0" * 64
        )
        assert wrong.returncode != 0
        assert f"expected SHA-256 {'0' * 64}, got {sha}" in wrong.stderr
        done = run_cli(node.home, "models", "pull", f"{server.url}/tiny.gguf", "--sha256", sha)
        assert done.returncode == 0, done.stderr
    assert server.ranges == [None, None, f"bytes={10 << 20}-"]
    assert f"resumed after {10 << 20:,}" in done.stderr
    assert done.stdout.strip() == "tiny"
    models_dir = node.home / "models"
    assert sorted(p.name for p in models_dir.iterdir()) == ["tiny.gguf"]
    assert "tiny" in _served(node)
    assert _complete(node, "tiny")["usage"]["completion_tokens"] == 8
    assert f'path = "{models_dir / "tiny.gguf"}"' in _config(node)


def _status_with_key(node: NodeProcess, key: str, model: str) -> tuple[int, dict[str, Any]]:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    body = {"model": model, "prompt": "1, 2,", "max_tokens": 4, "temperature": 0}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def test_plans_hold_on_every_box(mesh: dict[str, NodeProcess]) -> None:
    study, kitchen = mesh["study"], mesh["kitchen"]
    sam = run_cli(study.home, "user", "add", "sam", "--plan", "starter")
    assert sam.returncode == 0, sam.stderr
    assert "quota plan=starter,cloud=1M/month" in sam.stderr
    pat = run_cli(study.home, "user", "add", "pat", "--plan", "pro")
    assert pat.returncode == 0, pat.stderr
    sam_key, pat_key = sam.stdout.strip(), pat.stdout.strip()
    # The users reach the kitchen with the ledger sync; then each box holds them to their plan.
    wait_until(
        lambda: _status_with_key(kitchen, pat_key, "default")[0] == 200, 10, "pat's key works"
    )
    for box in (kitchen, study):
        status, body = _status_with_key(box, sam_key, "default")
        assert status == 403
        assert body["error"]["code"] == "model_not_in_plan"
        assert "the starter plan allows models up to 100M parameters" in body["error"]["message"]
        assert _status_with_key(box, pat_key, "default")[0] == 200
    unknown = run_cli(study.home, "user", "add", "lee", "--plan", "platinum")
    assert unknown.returncode != 0
    assert "no plan called 'platinum'" in unknown.stderr


def test_usage_cost_prices_each_route(mesh: dict[str, NodeProcess]) -> None:
    kitchen = mesh["kitchen"]
    (kitchen.home / "config.toml").write_text(
        '[prices]\nlocal = 0.5\nhosted = 2.0\ncurrency = "EUR"\n', encoding="utf-8"
    )
    result = run_cli(kitchen.home, "usage", "--cost", "--json")
    assert result.returncode == 0, result.stderr
    priced = json.loads(result.stdout)
    local = next(row for row in priced["rows"] if row["route"] == "local")
    assert local["tokens"] > 0
    assert local["cost"] == local["tokens"] * 0.5 / 1000
    assert local["hosted_cost"] == local["tokens"] * 2.0 / 1000
    assert priced["currency"] == "EUR"
    text = run_cli(kitchen.home, "usage", "--cost").stdout
    assert "total EUR: " in text
    assert "(the same tokens on the hosted API: " in text
    unpriced = run_cli(mesh["study"].home, "usage", "--cost")
    assert unpriced.returncode != 0
    assert "[prices]" in unpriced.stderr
