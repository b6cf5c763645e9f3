"""Failover between boxes on a LAN of their own (network namespaces on a bridge): a box
killed mid-stream costs the client nothing, and a box of another mesh is never used, with
one box per namespace and every client inside a namespace too. These are the end-to-end
proofs; failover's cases (a busy box handing over, errors before and during the stream,
nobody left to continue) are tested in process: tests/test_mesh_inprocess.py.

The mesh of the first test uses static peers (`--peer`, `--no-mdns`); the second runs
with mDNS on (when it is built) *and* gives the stranger the admin's address, so both ways a
wrong connection could happen are open. Every test builds its own lab and leaves nothing
behind (namespaces, links, processes), also when it fails."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from node.store.config_file import embedded_model_path
from tests.members import models_config
from tests.netns import (
    LabNode,
    NetnsLab,
    all_see_each_other_up,
    kill9,
    netns_unavailable,
    start_all,
    wait_until,
)

MODEL_FILE = embedded_model_path()
SMOLLM = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True, scope="module")
def _need_netns() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")


def static_mesh(lab: NetnsLab, configs: list[str]) -> list[LabNode]:
    """Box 0 is the admin; the others know only its address (--peer), no mDNS, and join by
    invite. The others start all at once, once the admin is up (they need its address)."""
    started = time.monotonic()
    admin = lab.start(0, "--no-mdns", config=configs[0])
    others = start_all(
        lab,
        [
            (box, ["--no-mdns", "--peer", admin.grpc_address], cfg)
            for box, cfg in enumerate(configs[1:], start=1)
        ],
    )
    for node in others:
        lab.join(node, lab.invite(admin))
    nodes = [admin, *others]
    took = all_see_each_other_up(lab, nodes, 10)
    print(
        f"static mesh of {len(nodes)}: ready after {time.monotonic() - started:.2f} s, "
        f"all up {took:.2f} s after the joins"
    )
    return nodes


# --- a client streaming from inside a namespace ----------------------------------------------

# Streams one completion and prints one JSON line per event: the response head, every text
# piece, the usage, errors, and the end. With a pause_at > 0 it stops reading after that many
# pieces (printing {"paused": n}) until the file `go` exists: the test acts meanwhile. Every
# line carries its wall-clock time "t" (one kernel, one clock in every namespace).
STREAM_SCRIPT = """
import json, os, sys, time, urllib.error, urllib.request
url, body, pause_at, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def emit(**record):
    print(json.dumps({**record, "t": time.time()}), flush=True)
request = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
pieces = 0
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        emit(status=response.status,
             headers={k.lower(): v for k, v in response.headers.items()})
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if line == "data: [DONE]":
                emit(done=True)
                continue
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                emit(error=chunk["error"])
            elif chunk.get("usage"):
                emit(usage=chunk["usage"])
            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                pieces += 1
                emit(text=chunk["choices"][0]["text"])
                if pieces == pause_at:
                    emit(paused=pieces)
                    deadline = time.monotonic() + 30
                    while not os.path.exists(go) and time.monotonic() < deadline:
                        time.sleep(0.005)
except urllib.error.HTTPError as exc:
    emit(status=exc.code, body=exc.read().decode("utf-8", "replace"))
emit(end=True)
"""


class Stream:
    """A streaming completion run by a background python inside a box's namespace."""

    def __init__(
        self, lab: NetnsLab, node: LabNode, body: dict[str, Any], log: Path, pause_at: int = 0
    ) -> None:
        self.log = log
        self.go = log.with_suffix(".go")
        self.proc: Popen[bytes] = lab.popen_python(
            node.box,
            STREAM_SCRIPT,
            node.url + "/v1/completions",
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            str(pause_at),
            str(self.go),
            log=log,
        )

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a traceback, or the line being written
            if isinstance(event, dict):
                events.append(event)
        return events

    def raw(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def pieces(self) -> list[str]:
        return [e["text"] for e in self.events() if "text" in e]

    def head(self) -> dict[str, Any]:
        return next((e for e in self.events() if "status" in e), {})

    def has(self, key: str) -> bool:
        return any(key in e for e in self.events())

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def wait_for(self, check: Any, timeout_s: float, what: str) -> float:
        """wait_until, failing at once (with the log) when the client died first."""

        def holds() -> bool:
            if check():
                return True
            if self.ended() and not check():
                raise AssertionError(f"stream client ended before {what}:\n{self.raw()}")
            return False

        return wait_until(holds, timeout_s, what)

    def resume(self) -> None:
        self.go.touch()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    """Background stream clients made by a test; killed afterwards, whatever happened."""
    made: list[Stream] = []
    try:
        yield made
    finally:
        for stream in made:
            stream.close()


# --- the scenarios -----------------------------------------------------------------------


def test_killing_the_serving_box_mid_stream_costs_the_client_nothing(
    tmp_path: Path, streams: list[Stream]
) -> None:
    with NetnsLab(3, tmp_path) as lab:
        a, b, c = static_mesh(
            lab, [models_config(SMOLLM), models_config("shared"), models_config("shared")]
        )
        body = {"model": "shared", "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 64}
        stream = Stream(lab, a, body, tmp_path / "stream.log", pause_at=20)
        streams.append(stream)
        stream.wait_for(lambda: stream.has("paused"), 30, "20 pieces have arrived")
        head = stream.head()
        assert head["status"] == 200, stream.raw()
        assert head["headers"]["x-allerac-route"] == "lan"
        serving = head["headers"]["x-allerac-node"]
        victim = next(n for n in (b, c) if n.node_id == serving)
        survivor = c if victim is b else b
        kill9(victim)
        killed = time.monotonic()
        killed_wall = time.time()
        stream.resume()
        assert not victim.alive()
        # The dead box leaves the rotation at A within 6 s of the kill...
        wait_until(
            lambda: lab.peer_states(a).get(victim.node_id) == "down",
            6,
            "the killed box is down at A",
        )
        down_after = time.monotonic() - killed
        print(f"killed box down at A {down_after:.2f} s after the kill")
        assert down_after < 6
        # ...and the client's stream goes on to the end, from the survivor.
        stream.wait_for(lambda: stream.has("end"), 60, "the stream ends")
        events = stream.events()
        ended = next(e["t"] for e in events if "end" in e) - killed_wall
        failed_over = "failed mid-stream" in a.output()
        print(
            f"stream ended {ended:.2f} s after the kill with {len(stream.pieces())} pieces; "
            f"A {'did' if failed_over else 'did not need to'} continue on the survivor"
        )
        assert not any("error" in e for e in events), stream.raw()
        assert any("done" in e for e in events), stream.raw()
        usage = next((e["usage"] for e in events if "usage" in e), {})
        text = "".join(stream.pieces())
        code, _, reference = lab.http(survivor, "POST", "/v1/completions", body)
        assert code == 200, reference
        expected = reference["choices"][0]["text"]
        # One coherent answer: what the killed box sent, then the survivor's continuation.
        assert text == expected
        assert usage.get("completion_tokens", 0) >= 50, usage
        assert lab.peer_states(a).get(survivor.node_id) == "up"
        assert a.alive()
        assert survivor.alive()


def _mdns_built() -> bool:
    return importlib.util.find_spec("node.transport.discovery") is not None


def test_a_box_of_another_mesh_is_never_used(tmp_path: Path) -> None:
    with NetnsLab(3, tmp_path) as lab:
        # mDNS on (when built): the stranger announces itself on the same bridge, and it
        # knows A's address from --peer too.
        mdns = [] if _mdns_built() else ["--no-mdns"]
        a, b = start_all(lab, [(0, mdns, models_config(SMOLLM)), (1, mdns, models_config(SMOLLM))])
        lab.join(b, lab.invite(a))
        took = all_see_each_other_up(lab, [a, b], 10)
        print(f"mesh of two ({'mDNS' if not mdns else 'static'}): all up {took:.2f} s")
        d = lab.start(2, *mdns, "--peer", a.grpc_address, config=models_config("d-only"))
        time.sleep(2.5)  # two heartbeats' time for a (wrong) connection to happen
        assert d.node_id not in lab.peer_states(a)
        assert d.node_id not in lab.peer_states(b)
        assert lab.peer_states(a) == {b.node_id: "up"}
        assert lab.peer_states(b) == {a.node_id: "up"}
        assert lab.peer_states(d) == {}
        assert lab.status(d)["mesh_id"] != lab.status(a)["mesh_id"]
        code, _, body = lab.http(
            a, "POST", "/v1/chat/completions", {"model": "d-only", "messages": CAPITAL}
        )
        assert code == 404, body
        for node in (a, b, d):
            assert node.alive()
            assert "Traceback" not in node.output()
