"""Boxes on a LAN of their own (network namespaces on a bridge): a static-peer mesh, a box
unplugged, mDNS discovery and mDNS junk. Every test builds its own lab and leaves nothing
behind (namespaces, links, processes), also when it fails."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.store.config_file import embedded_model_path
from tests import launch
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
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True, scope="module")
def _need_netns() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(f"network namespaces unavailable: {why}")


def _mdns_missing() -> str | None:
    if importlib.util.find_spec("node.transport.discovery") is None:
        return "mDNS discovery is not built yet (no node/discovery.py)"
    return None


@pytest.fixture
def need_mdns() -> None:
    why = _mdns_missing()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def lab3(tmp_path: Path) -> Iterator[NetnsLab]:
    with NetnsLab(3, tmp_path) as lab:
        yield lab


def _sees_up(lab: NetnsLab, node: LabNode, peer: LabNode) -> bool:
    return lab.peer_states(node).get(peer.node_id) == "up"


def static_mesh(lab: NetnsLab) -> list[LabNode]:
    """A admin; B and C know only A's address (--peer), no mDNS, and join by invite."""
    a = lab.start(0, "--no-mdns", config=models_config("smollm2-135m-instruct"))
    b, c = start_all(
        lab,
        [
            (1, ["--no-mdns", "--peer", a.grpc_address], models_config("smollm2-135m-instruct")),
            (
                2,
                ["--no-mdns", "--peer", a.grpc_address],
                models_config("smollm2-135m-instruct", "c-only"),
            ),
        ],
    )
    for node in (b, c):
        lab.join(node, lab.invite(a))
    took = all_see_each_other_up(lab, [a, b, c], 10)
    print(f"static mesh: all three see each other up {took:.2f} s after the joins")
    return [a, b, c]


def test_static_peers_route_over_the_lan_and_an_unplugged_box_leaves_within_6_s(
    lab3: NetnsLab,
) -> None:
    a, b, c = static_mesh(lab3)
    # A request for the model only C serves goes to C, over the bridge (not loopback).
    peers = {p["node_id"]: p for p in lab3.status(a)["peers"]}
    assert peers[c.node_id]["address"].split(":")[0] == c.ip
    code, headers, body = lab3.http(
        a,
        "POST",
        "/v1/chat/completions",
        {"model": "c-only", "messages": CAPITAL, "max_tokens": 30},
    )
    assert code == 200, body
    assert headers["x-allerac-node"] == c.node_id
    assert headers["x-allerac-route"] == "lan"
    assert "Paris" in body["choices"][0]["message"]["content"]
    # Unplugged, C leaves A's rotation within 6 s.
    lab3.link_down(c)
    unplugged = time.monotonic()
    wait_until(lambda: lab3.peer_states(a).get(c.node_id) == "down", 6, "C is down at A")
    took = time.monotonic() - unplugged
    print(f"unplugged box down at A after {took:.2f} s")
    assert took < 6
    # The others stay in rotation while A keeps trying to reach C: never down, and up
    # (a heartbeat late on a busy machine may make one suspect for a moment).
    for x, y in ((a, b), (b, a)):
        assert lab3.peer_states(x).get(y.node_id) in ("up", "suspect")
        up = functools.partial(_sees_up, lab3, x, y)
        wait_until(up, 3, f"{y.name} up at {x.name}")
    # The mesh still answers through the surviving boxes.
    code, headers, body = lab3.http(
        a,
        "POST",
        "/v1/chat/completions",
        {"model": "smollm2-135m-instruct", "messages": CAPITAL, "max_tokens": 8},
    )
    assert code == 200, body
    assert headers["x-allerac-node"] in {a.node_id, b.node_id}


# --- mDNS ------------------------------------------------------------------------------------

BROWSE_SCRIPT = """
import json, sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf
TYPE = "_allerac._tcp.local."
zc = Zeroconf(ip_version=IPVersion.V4Only)
names = set()
ServiceBrowser(zc, TYPE, handlers=[lambda zeroconf, service_type, name, state_change:
                                  names.add(name)])
want, deadline, found = int(sys.argv[1]), time.monotonic() + float(sys.argv[2]), {}
while time.monotonic() < deadline and len(found) < want:
    for name in list(names):
        if name not in found:
            info = ServiceInfo(TYPE, name)
            if info.request(zc, 1000):
                found[name] = {
                    "addresses": info.parsed_addresses(IPVersion.V4Only),
                    "port": info.port,
                    "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
                }
    time.sleep(0.05)
zc.close()
print(json.dumps(found))
"""


def mdns_mesh(lab: NetnsLab, boxes: int) -> list[LabNode]:
    """No --peer anywhere: B, C... join A by invite, then find each other by mDNS."""
    config = models_config("smollm2-135m-instruct")
    nodes = start_all(lab, [(box, [], config) for box in range(boxes)])
    admin = nodes[0]
    for node in nodes[1:]:
        lab.join(node, lab.invite(admin))
    took = all_see_each_other_up(lab, nodes, 10)
    print(f"mDNS mesh of {boxes}: all see each other up {took:.2f} s after the joins")
    return nodes


@pytest.mark.usefixtures("need_mdns")
def test_boxes_find_each_other_by_mdns(tmp_path: Path) -> None:
    with NetnsLab(5, tmp_path) as lab:
        a, b, c = mdns_mesh(lab, 3)
        mesh_id = lab.status(a)["mesh_id"]
        # What goes over the bridge: every box announces itself with the hint of the mesh.
        browsed = lab.python(4, BROWSE_SCRIPT, "3", "8", timeout_s=20)
        assert browsed.returncode == 0, browsed.stderr
        seen = {s["txt"].get("id"): s for s in json.loads(browsed.stdout).values()}
        for node in (a, b, c):
            assert node.node_id in seen, f"{node.name} is not announced: {seen}"
            assert seen[node.node_id]["txt"]["mesh"] == mesh_id
            assert seen[node.node_id]["addresses"] == [node.ip]
            assert f"{node.ip}:{seen[node.node_id]['port']}" == node.grpc_address
        # A fourth box: usable at every other box soon after its join.
        d = lab.start(3, config=models_config("smollm2-135m-instruct"))
        lab.join(d, lab.invite(a))
        joined = time.monotonic()
        wait_until(lambda: d.node_id in lab.up_peers(a), 5, "A sees D up")
        at_a = time.monotonic() - joined
        wait_until(lambda: d.node_id in lab.up_peers(b), 5, "B sees D up")
        at_b = time.monotonic() - joined
        print(f"new box up at A {at_a:.2f} s, at B {at_b:.2f} s after its join")
        assert at_a < 2
        assert at_b < 2
        # A crashed box restarted on a new gRPC port: only mDNS tells the others where.
        kill9(c)
        wait_until(lambda: lab.peer_states(a).get(c.node_id) == "down", 6, "C is down at A")
        c2 = lab.start(2, config=models_config("smollm2-135m-instruct"))
        assert c2.node_id == c.node_id
        assert c2.grpc_address != c.grpc_address
        restarted = time.monotonic()
        wait_until(lambda: c.node_id in lab.up_peers(a), 5, "A sees the restarted C up")
        at_a = time.monotonic() - restarted
        wait_until(lambda: c.node_id in lab.up_peers(d), 5, "D sees the restarted C up")
        at_d = time.monotonic() - restarted
        print(f"restarted box up at A {at_a:.2f} s, at D {at_d:.2f} s after it was ready")
        assert at_a < 2
        assert at_d < 2


JUNK_SCRIPT = """
import os, socket, sys, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
from mesh import PROTOCOL_VERSION
from mesh.trust.identity import Identity
TYPE = "_allerac._tcp.local."
ip, mesh_id, blackhole = sys.argv[1], sys.argv[2], sys.argv[3]
good = {"id": Identity.generate().node_id, "mesh": mesh_id, "v": str(PROTOCOL_VERSION),
        "port": "7000"}
junk = {
    "junk-garbage": os.urandom(300),  # raw TXT bytes, length prefixes and all
    "junk-nonascii": {**good, "id": b"\\xff\\xfe" * 20},
    "junk-oversized": {**good, **{f"k{i}": "x" * 240 for i in range(6)}},  # > 1000 bytes
    "junk-longvalue": {**good, "mesh": "m" * 250},
    "junk-version": {**good, "v": "999"},
    "junk-badid": {**good, "id": "not-a-node-id"},
    "junk-badport": {**good, "port": "99999"},
    "junk-nokeys": {},
    "junk-manykeys": {f"k{i}": "v" for i in range(40)},
}
zc = Zeroconf(ip_version=IPVersion.V4Only)
for name, props in junk.items():
    info = ServiceInfo(TYPE, f"{name}.{TYPE}", addresses=[socket.inet_aton(ip)], port=7000,
                       properties=props, server=f"{name}.local.")
    zc.register_service(info, cooperating_responders=True)  # no probing: faster
# A well-formed hint of *our* mesh for a box that does not exist, at an address where
# nothing answers: a hint is not a peer.
ghost = {**good, "id": Identity.generate().node_id}
info = ServiceInfo(TYPE, f"junk-ghost.{TYPE}", addresses=[socket.inet_aton(blackhole)],
                   port=7000, properties=ghost, server="junk-ghost.local.")
zc.register_service(info, cooperating_responders=True)
print("registered", flush=True)
while True:
    time.sleep(1)
"""
JUNK_NAMES = [
    "junk-garbage",
    "junk-nonascii",
    "junk-oversized",
    "junk-longvalue",
    "junk-version",
    "junk-badid",
    "junk-badport",
    "junk-nokeys",
    "junk-manykeys",
]


def heard_the_junk(node: LabNode, ghost: str) -> bool:
    """The node logged (at debug) dropping every junk record, and a failed try of the ghost."""
    log = node.output()
    return all(name in log for name in JUNK_NAMES) and f"{ghost} not usable" in log


@pytest.mark.usefixtures("need_mdns")
def test_junk_on_mdns_is_ignored(tmp_path: Path) -> None:
    with NetnsLab(3, tmp_path) as lab:
        config = models_config("smollm2-135m-instruct")
        nodes = start_all(lab, [(box, ["--log-level", "debug"], config) for box in range(2)])
        a, b = nodes
        lab.join(b, lab.invite(a))
        all_see_each_other_up(lab, nodes, 10)
        mesh_id = lab.status(a)["mesh_id"]
        log = tmp_path / "junk.log"
        blackhole = f"{lab.subnet}.250"
        sender = lab.popen_python(2, JUNK_SCRIPT, lab.ips[2], mesh_id, blackhole, log=log)
        try:
            wait_until(
                lambda: (
                    "registered" in log.read_text(errors="replace") or sender.poll() is not None
                ),
                30,
                "the junk is on the air",
            )
            assert sender.poll() is None, log.read_text(errors="replace")
            # Wait until both boxes have heard (and dropped) the junk and tried the ghost.
            for node in nodes:
                wait_until(
                    functools.partial(heard_the_junk, node, f"{blackhole}:7000"),
                    20,
                    f"{node.name} has seen every junk record and tried the ghost",
                )
            for node in nodes:
                assert lab.peer_states(node) == {
                    other.node_id: "up" for other in nodes if other is not node
                }
                assert node.alive()
                assert "Traceback" not in node.output()
        finally:
            sender.kill()
            sender.wait(10)


async def _announcements_after_a_join(ip: str, seconds: float) -> list[str]:
    """A box starts announcing, joins another mesh at once; the mesh hints a listener on
    the LAN receives for `seconds` after the join, in order."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from mesh.trust.identity import Identity
    from node.transport.discovery import SERVICE_TYPE, Discovery

    heard: list[str] = []
    listener = AsyncZeroconf(ip_version=IPVersion.V4Only)

    def record(**change: object) -> None:
        if change["state_change"] is not ServiceStateChange.Removed:
            info = AsyncServiceInfo(SERVICE_TYPE, str(change["name"]))
            if info.load_from_cache(listener.zeroconf):
                heard.append((info.properties.get(b"mesh") or b"").decode())

    browser = AsyncServiceBrowser(listener.zeroconf, SERVICE_TYPE, handlers=[record])
    mesh = ["OLD-MESH"]
    discovery = Discovery(
        node_id=Identity.generate().node_id,
        mesh_id=lambda: mesh[0],
        ips=[ip],
        port=7000,
        on_sighting=lambda address, node_id: None,
    )
    try:
        await discovery.start()
        mesh[0] = "NEW-MESH"
        await discovery.update()
        heard.clear()
        await asyncio.sleep(seconds)
    finally:
        await discovery.aclose()
        await browser.async_cancel()
        await listener.async_close()
    return heard


@pytest.mark.usefixtures("need_mdns")
def test_a_box_that_joins_right_after_starting_never_announces_its_old_mesh_again(
    tmp_path: Path,
) -> None:
    # zeroconf repeats a registration's announcement twice, a second apart: a join inside
    # that window must not be followed by the old hint (a listener would keep it cached).
    with NetnsLab(1, tmp_path) as lab:
        heard = launch.in_namespace(
            lab.namespaces[0], lambda: asyncio.run(_announcements_after_a_join(lab.ips[0], 2.5))
        )
    assert heard, "the listener heard nothing"
    assert set(heard) == {"NEW-MESH"}, heard
