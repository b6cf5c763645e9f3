"""Two offices and a relay in the cloud, as network namespaces: offices reach each other
only through the relay, the relay never sees a prompt or an answer, a relay restart costs
seconds, and a node of another mesh on the same relay neither sees nor reaches ours.

Topology: office A (a1 admin, a2) and office B (b1 ours, b2 of another mesh) are LANs of
their own; the cloud namespace has a leg on each and does not forward, like two offices
behind NAT. It runs the relay behind a recording proxy. Office B joins the mesh while the
cloud forwards (as if set up at the main office), then forwarding stops for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mesh.ledger.records import open_record, record_hash, verify
from tests.members import models_config, read_ledger, read_ledger_holding
from tests.netns import LabNode, NetnsLab, netns_unavailable, wait_until
from tests.nodeproc import RelayProcess

PROXY_PORT = 7443
CANARY = "Quetzalcoatl-Marmalade-4417"
B_MODEL = "office-b-model"


@pytest.fixture(autouse=True, scope="module")
def _need_netns() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")


def _rss_bytes(relay: RelayProcess) -> int:
    assert relay.proc is not None
    return int(psutil.Process(relay.proc.pid).memory_info().rss)


def _stats(world: World) -> dict[str, object]:
    result = world.cloud.run(
        0,
        sys.executable,
        "-m",
        "node",
        "relay",
        "stats",
        world.relay.address,
        "--json",
        "--home",
        str(world.relay.home),
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@dataclass
class World:
    office_a: NetnsLab
    office_b: NetnsLab
    cloud: NetnsLab
    relay: RelayProcess
    recording: Path
    a1: LabNode
    a2: LabNode
    b1: LabNode
    b2: LabNode
    upstream: LabNode
    overflow: LabNode


def _relay_address(office: NetnsLab) -> str:
    return f"{office.subnet}.254:{PROXY_PORT}"


def _route_of(lab: NetnsLab, node: LabNode, peer: LabNode) -> str | None:
    for entry in lab.status(node)["peers"]:
        if entry["node_id"] == peer.node_id and entry["state"] == "up":
            return str(entry["route"])
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("offices")
    with (
        NetnsLab(1, root / "cloud", subnet="198.18.203") as cloud,
        NetnsLab(2, root / "a", subnet="198.18.201") as office_a,
        NetnsLab(2, root / "b", subnet="198.18.202") as office_b,
    ):
        office_a.attach_router(cloud)
        office_b.attach_router(cloud)
        relay = RelayProcess(root / "relay", prefix=("ip", "netns", "exec", cloud.namespaces[0]))
        relay.start()
        recording = root / "relay-wire.bin"
        proxy = cloud.popen(
            0,
            *(sys.executable, "-m", "tests.recording_proxy", str(PROXY_PORT)),
            *(relay.address, str(recording)),
            log=root / "proxy.log",
        )
        wait_until(
            lambda: "listening" in (root / "proxy.log").read_text() or proxy.poll() is not None,
            30,
            "recording proxy up",
        )
        common = ("--no-mdns",)
        a_flags = (*common, "--relay", _relay_address(office_a))
        b_flags = (*common, "--relay", _relay_address(office_b))
        a1 = office_a.start(0, *a_flags, config=models_config("smollm2-135m-instruct"))
        a2 = office_a.start(1, *a_flags, "--peer", a1.grpc_address, config=models_config("a2"))
        # One request at a time on b1 (no queue), so one long answer saturates it.
        b1 = office_b.start(
            0, *b_flags, config=models_config(B_MODEL) + "queue_size = 0\nparallel = 1\n"
        )
        # b2 is another mesh's box in office B, on the same relay, serving the same name.
        b2 = office_b.start(1, *b_flags, config=models_config(B_MODEL, "smollm2-other"))
        # The cloud: a real OpenAI-compatible server (an Allerac node on the embedded model,
        # standing in for vLLM) and in front of it an overflow node of our mesh.
        upstream = cloud.start(0, "--no-mdns", config=models_config("upstream-model"))
        overflow = cloud.start(
            0,
            "--no-mdns",
            "--relay",
            f"127.0.0.1:{PROXY_PORT}",
            config=(
                f'[[models]]\nname = "{B_MODEL}"\nbackend = "openai"\n'
                f'url = "{upstream.url}/v1"\nupstream_model = "upstream-model"\n'
            ),
            home_name="overflow",
        )
        # Office B's box joins while the cloud forwards, as if set up at the main office.
        cloud.forwarding(0, on=True)
        office_a.join(a2, office_a.invite(a1))
        office_b.join(b1, office_a.invite(a1))
        cloud.forwarding(0, on=False)
        cloud.join(overflow, office_a.invite(a1, "--role", "overflow"))
        try:
            yield World(
                office_a, office_b, cloud, relay, recording, a1, a2, b1, b2, upstream, overflow
            )
        finally:
            proxy.kill()
            proxy.wait(10)
            relay.kill()


def test_office_a_reaches_office_b_through_the_relay_and_the_relay_reads_nothing(
    world: World,
) -> None:
    lab_a, a1, b1 = world.office_a, world.a1, world.b1
    wait_until(lambda: _route_of(lab_a, a1, b1) == "relay", 30, "a1 sees b1 through the relay")
    wait_until(lambda: _route_of(world.office_b, b1, a1) == "relay", 30, "b1 sees a1 too")
    status, headers, body = lab_a.http(
        a1,
        "POST",
        "/v1/chat/completions",
        {
            "model": B_MODEL,
            "messages": [{"role": "user", "content": f"Repeat this word: {CANARY}"}],
            "max_tokens": 24,
        },
    )
    assert status == 200, body
    assert headers["x-allerac-node"] == b1.node_id
    assert headers["x-allerac-route"] == "relay"
    answer = body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    recording = world.recording.read_bytes()
    assert len(recording) > 5000  # the sessions really go through the recorder
    assert CANARY.encode() not in recording
    assert B_MODEL.encode() not in recording  # not even the model's name
    if len(answer) >= 12:
        assert answer.encode() not in recording
    # b1 signed the record (route relay), a1 checked it against the answer and countersigned.
    request_id = body["id"].split("-", 1)[1]  # the answer's id names its request
    records, receipts = read_ledger_holding(a1.home, request_id)
    [record] = [open_record(r) for r in records if open_record(r).request_id == request_id]
    assert record.node_id == b1.node_id
    assert (record.route, record.entry_node_id) == ("relay", a1.node_id)
    assert record.completion_tokens == body["usage"]["completion_tokens"]
    assert [
        p for p in verify(records, receipts).problems if p.kind != "gap"
    ] == []  # gaps: other entry nodes' parts
    # Ledger sync through the relay brings a1's receipt to b1 (offices share no network).
    digest = record_hash(next(r for r in records if open_record(r).request_id == request_id))
    wait_until(
        lambda: any(r.record_hash == digest for r in read_ledger(b1.home)[1]),
        15,
        "b1 holds a1's countersignature, synced through the relay",
    )


def test_another_mesh_on_the_same_relay_neither_sees_nor_reaches_ours(world: World) -> None:
    lab_b, b2 = world.office_b, world.b2
    ours = {world.a1.node_id, world.a2.node_id, world.b1.node_id}
    wait_until(lambda: _route_of(world.office_a, world.a1, world.b1) == "relay", 30, "mesh up")
    assert not ours & set(lab_b.peer_states(b2))
    assert b2.node_id not in world.office_a.peer_states(world.a1)
    assert b2.node_id not in lab_b.peer_states(world.b1)
    # b2 serves B_MODEL too, but our requests never go there ...
    for _ in range(3):
        status, headers, _ = world.office_a.http(
            world.a1,
            "POST",
            "/v1/completions",
            {"model": B_MODEL, "prompt": "One, two,", "max_tokens": 4},
        )
        assert status == 200
        assert headers["x-allerac-node"] == world.b1.node_id
    # ... and b2 cannot use our models.
    status, _, body = lab_b.http(
        b2,
        "POST",
        "/v1/completions",
        {"model": "smollm2-135m-instruct", "prompt": "One, two,", "max_tokens": 4},
    )
    assert status == 404, body
    assert int(str(_stats(world)["meshes"])) >= 2


FLOOD_MIB = 300  # well over the relay's queue budget for one recipient (16 MiB)
FLOOD_SCRIPT = r"""
import asyncio, sys, grpc
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from mesh.routing.relay import sign_hello
from cloud_relay import relay_pb2_grpc as rpb_grpc
from mesh.wire.v1 import relay_pb2 as rpb
from node.transport.peer_client import join_mesh
from node.store.trust_store import TrustStore

async def main(home, code, relay, victim, count):
    h = Home.resolve(home)
    h.ensure()
    identity, _ = load_or_create_identity(h.identity_key)
    trust = TrustStore.open(h, identity)
    await join_mesh(code, trust, display_name="flooder", addresses=())
    opts = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(relay, options=opts) as ch:
        call = rpb_grpc.RelayServiceStub(ch).Session()
        challenge = await call.read()
        await call.write(rpb.RelayFrame(hello=sign_hello(
            challenge.challenge, identity=identity, cert=trust.cert)))
        await call.read()  # welcome
        blob = b"x" * (1 << 20)
        for i in range(count):
            await call.write(rpb.RelayFrame(packet=rpb.RelayPacket(
                peer=victim, stream_id=i + 1, kind=rpb.PACKET_KIND_CALL, method="Infer",
                payload=blob)))
        print("flooded", count, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
"""


def test_a_flooding_node_costs_the_others_nothing_and_the_relay_stays_bounded(
    world: World, tmp_path: Path
) -> None:
    """A member in office A (so its packets are really forwarded) sends b1 three hundred
    1 MiB calls as fast as it can and never reads its refusals; meanwhile a1 still gets
    answers from b1 through the relay, and the relay's memory stays bounded."""
    wait_until(lambda: _route_of(world.office_a, world.a1, world.b1) == "relay", 30, "mesh up")
    rss_before = _rss_bytes(world.relay)
    log = tmp_path / "flood.log"
    flooder = world.office_a.popen_python(
        1,
        FLOOD_SCRIPT,
        str(tmp_path / "flooder"),
        world.office_a.invite(world.a1),
        _relay_address(world.office_a),
        world.b1.node_id,
        str(FLOOD_MIB),
        log=log,
    )
    try:
        wait_until(lambda: "flooded" in log.read_text(), 120, "the flood was sent")
        status, headers, body = world.office_a.http(
            world.a1,
            "POST",
            "/v1/completions",
            {"model": B_MODEL, "prompt": "One, two,", "max_tokens": 8},
        )
        assert status == 200, body
        assert headers["x-allerac-route"] == "relay"
        stats = _stats(world)
        refused = stats["packets_refused"]
        assert isinstance(refused, dict)
        assert int(refused.get("RATE_LIMITED", 0)) + int(refused.get("PEER_FULL", 0)) > 0
        growth_mib = (_rss_bytes(world.relay) - rss_before) / 2**20
        # 300 MiB went in; the relay kept at most its queue budget for one recipient of it
        # (16 MiB), with its gRPC buffers: a relay that kept what it cannot pass on would
        # have grown by the whole flood.
        assert growth_mib < FLOOD_MIB / 3, f"relay grew {growth_mib:.0f} MiB"
    finally:
        flooder.kill()
        flooder.wait(10)


def _busy_until_done(
    lab: NetnsLab, node: LabNode, model: str, log: Path, tokens: int = 600
) -> subprocess.Popen[bytes]:
    """A long greedy answer streamed from `node`, in the background."""
    script = (
        "import json, sys, urllib.request\n"
        "body = json.dumps({'model': sys.argv[2], 'prompt': '1, 2, 3, 4, 5, 6,', "
        "'max_tokens': int(sys.argv[3]), 'stream': True}).encode()\n"
        "request = urllib.request.Request(sys.argv[1] + '/v1/completions', data=body, "
        "headers={'Content-Type': 'application/json'})\n"
        "with urllib.request.urlopen(request, timeout=300) as response:\n"
        "    for line in response:\n"
        "        sys.stdout.write(line.decode())\n"
        "        sys.stdout.flush()\n"
        "print('done', flush=True)\n"
    )
    return lab.popen_python(node.box, script, node.url, model, str(tokens), log=log)


def _status_at(lab: NetnsLab, node: LabNode, model: str, peer: LabNode) -> str:
    _, _, explained = lab.http(node, "GET", f"/allerac/route?model={model}&privacy=any")
    for row in explained["candidates"]:
        if row["node_id"] == peer.node_id:
            return str(row["status"])
    return "absent"


def test_cloud_overflow_only_when_the_mesh_is_saturated_and_the_policy_allows(
    world: World, tmp_path: Path
) -> None:
    lab_a, a1, b1, cloud_node = world.office_a, world.a1, world.b1, world.overflow
    wait_until(lambda: _route_of(lab_a, a1, b1) == "relay", 30, "b1 up at a1")
    wait_until(lambda: _route_of(lab_a, a1, cloud_node) == "cloud", 30, "overflow node up at a1")
    ask = {"model": B_MODEL, "prompt": "One, two,", "max_tokens": 4}
    # The mesh has the model and room: even `any` stays in the mesh.
    status, headers, _ = lab_a.http(
        a1, "POST", "/v1/completions", ask, {"x-allerac-privacy": "any"}
    )
    assert status == 200
    assert headers["x-allerac-node"] == b1.node_id
    # b1 busy with a long answer: now `any` goes to the cloud, `mesh` does not.
    log = tmp_path / "busy.log"
    # Longer than the requests below take; the client leaves once they are done (b1 stops
    # decoding it at once: it is not waited for).
    busy = _busy_until_done(lab_a, a1, B_MODEL, log)
    try:
        wait_until(
            lambda: _status_at(lab_a, a1, B_MODEL, b1).startswith("full"), 60, "b1 saturated"
        )
        wait_until(lambda: "data: {" in log.read_text(), 60, "b1 streams the busy answer")
        status, headers, body = lab_a.http(
            a1, "POST", "/v1/completions", ask, {"x-allerac-privacy": "any"}
        )
        assert status == 200, body
        assert headers["x-allerac-node"] == cloud_node.node_id
        assert headers["x-allerac-route"] == "cloud"
        assert body["usage"]["completion_tokens"] > 0  # the upstream's own count
        request_id = body["id"].split("-", 1)[1]
        records, receipts = read_ledger_holding(a1.home, request_id)
        cloud_records = [open_record(r) for r in records if open_record(r).request_id == request_id]
        assert [r.node_id for r in cloud_records] == [cloud_node.node_id]
        assert [r.route for r in cloud_records] == ["cloud"]
        assert cloud_records[0].completion_tokens == body["usage"]["completion_tokens"]
        assert [
            p for p in verify(records, receipts).problems if p.kind != "gap"
        ] == []  # gaps: other entry nodes' parts
        status, headers, body = lab_a.http(
            a1, "POST", "/v1/completions", ask, {"x-allerac-privacy": "mesh"}
        )
        assert status == 503, body
        assert "privacy" in body["error"]["message"]
        status, _, _ = lab_a.http(a1, "POST", "/v1/completions", ask)  # the default is mesh
        assert status == 503
        assert busy.poll() is None, log.read_text()  # b1 was busy all along
    finally:
        busy.kill()
        busy.wait(30)
    # The overflow node never learned who else is in the mesh.
    assert world.cloud.status(cloud_node)["peers"] == []


def test_relay_killed_and_restarted_nodes_are_back_within_seconds(
    world: World, tmp_path: Path
) -> None:
    lab_a, a1, b1 = world.office_a, world.a1, world.b1
    wait_until(lambda: _route_of(lab_a, a1, b1) == "relay", 30, "a1 sees b1 through the relay")
    log = tmp_path / "in-flight.log"
    in_flight = _busy_until_done(lab_a, a1, B_MODEL, log)
    wait_until(lambda: "data: {" in log.read_text(), 60, "the answer is streaming")
    world.relay.kill()  # SIGKILL
    in_flight.wait(60)
    # Nobody else may serve it (the cloud is not allowed by default): a clear error in the
    # stream, and the stream still ends properly.
    streamed = log.read_text()
    assert '"error"' in streamed
    assert "relay" in streamed
    assert "data: [DONE]" in streamed
    wait_until(lambda: _route_of(lab_a, a1, b1) is None, 15, "b1 out of rotation at a1")
    status, _, body = lab_a.http(
        a1, "POST", "/v1/completions", {"model": B_MODEL, "prompt": "One,", "max_tokens": 2}
    )
    assert status in (404, 503), body  # nobody else serves it: a clear error
    world.relay.start()
    started = time.monotonic()
    wait_until(lambda: _route_of(lab_a, a1, b1) == "relay", 15, "b1 back at a1")
    back_s = time.monotonic() - started
    status, headers, body = lab_a.http(
        a1, "POST", "/v1/completions", {"model": B_MODEL, "prompt": "One, two,", "max_tokens": 4}
    )
    assert status == 200, body
    assert headers["x-allerac-node"] == b1.node_id
    print(f"back through the relay {back_s:.2f} s after its restart")
    assert back_s < 5  # target 2 s; polling `allerac status` adds its own second or so
