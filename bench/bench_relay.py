"""What the relay costs: requests and streams through the relay against the same through a
direct LAN hop, and the relay's memory per connected node.

Uses the BENCHMARK-ONLY instant backend (bench/instant_backend.py), which streams tokens
without computing, so the figures are the mesh's own cost. Four processes on this machine
(loopback), one run, interleaved: the entry box E, a server S1 that E reaches directly, a
server S2 that E reaches only through the relay (it came back on a new port and nobody
was told), and the relay.

Targets (issue "Across the internet"): at least 20,000 tokens/s per stream through the
relay, and at most +3 ms median per request against a direct LAN hop.

    python bench/bench_relay.py [--requests 300] [--streams 10] [--tokens 20000]
                                [--concurrent 8] [--sessions 60]

The idle sessions come from 127.0.0.1 like the nodes' own, and a relay gives one source
address at most `RelayLimits.max_sessions_per_address` (64) sessions: hence at most 62.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from bench_routing import LAUNCHER, instant_config  # noqa: E402

from cloud_relay import relay_pb2_grpc as rpb_grpc  # noqa: E402
from mesh.routing.relay import sign_hello  # noqa: E402
from mesh.trust.identity import Identity  # noqa: E402
from mesh.trust.membership import MeshAuthority, Role  # noqa: E402
from mesh.wire.v1 import relay_pb2 as rpb  # noqa: E402
from tests.nodeproc import NodeProcess, RelayProcess, run_cli  # noqa: E402

YEAR_MS = 365 * 86_400_000


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, tokens: int, stream: bool
) -> float:
    body = {"model": model, "prompt": "x", "max_tokens": tokens, "stream": stream}
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.perf_counter() - started


async def wait_for_routes(
    entry: NodeProcess, session: aiohttp.ClientSession, wanted: dict[str, str]
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(entry.url + "/allerac/status") as response:
            status = await response.json()
        routes = {p["node_id"]: p["route"] for p in status["peers"] if p["state"] == "up"}
        if all(routes.get(node) == route for node, route in wanted.items()):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"routes not as wanted: {wanted}")


async def idle_sessions(address: str, count: int) -> list[tuple[grpc.aio.Channel, Any]]:
    """`count` authenticated sessions of a throwaway mesh, kept open (nobody talks): each
    channel with its session call (held, so the session stays open)."""
    authority = MeshAuthority.generate()
    held = []
    for _ in range(count):
        node = Identity.generate()
        cert = authority.issue(
            node.public_key_raw, role=Role.MEMBER, now_ms=int(time.time() * 1000), ttl_ms=YEAR_MS
        )
        # Its own connection, as a node has (the relay allows few streams per connection).
        channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        call = rpb_grpc.RelayServiceStub(channel).Session()  # type: ignore[no-untyped-call]
        challenge = await call.read()
        await call.write(
            rpb.RelayFrame(hello=sign_hello(challenge.challenge, identity=node, cert=cert))
        )
        await call.read()  # welcome
        held.append((channel, call))
    return held


async def main(requests: int, streams: int, tokens: int, concurrent: int, sessions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        relay_proc = RelayProcess(root / "relay").start()
        relay = relay_proc.address
        entry = NodeProcess(
            root / "entry", "--relay", relay, config=instant_config("entry-only"), command=LAUNCHER
        ).start()
        s1 = NodeProcess(
            root / "s1",
            "--peer",
            entry.info["grpc_address"],
            config=instant_config("instant-direct"),
            command=LAUNCHER,
        ).start()
        s2 = NodeProcess(
            root / "s2", "--relay", relay, config=instant_config("instant-relay"), command=LAUNCHER
        ).start()
        nodes = [entry, s1, s2]
        try:
            for server in (s1, s2):
                code = run_cli(entry.home, "mesh", "invite").stdout.strip()
                assert run_cli(server.home, "mesh", "join", code).returncode == 0
            # S2 comes back on a new port that nobody is told: the relay is its only way.
            s2.stop()
            s2 = NodeProcess(
                root / "s2",
                "--relay",
                relay,
                config=instant_config("instant-relay"),
                command=LAUNCHER,
            ).start()
            nodes[2] = s2
            async with aiohttp.ClientSession() as session:
                await wait_for_routes(entry, session, {s1.node_id: "lan", s2.node_id: "relay"})
                paths = [("instant-direct", []), ("instant-relay", [])]
                for _ in range(20):  # warm both paths
                    for model, _into in paths:
                        await one_request(session, entry.url, model, 1, False)
                req: dict[str, list[float]] = {"instant-direct": [], "instant-relay": []}
                for i in range(requests):
                    order = list(req) if i % 2 == 0 else list(reversed(req))
                    for model in order:
                        req[model].append(await one_request(session, entry.url, model, 1, False))
                strm: dict[str, list[float]] = {"instant-direct": [], "instant-relay": []}
                for i in range(streams):
                    order = list(strm) if i % 2 == 0 else list(reversed(strm))
                    for model in order:
                        strm[model].append(
                            await one_request(session, entry.url, model, tokens, True)
                        )
                started = time.perf_counter()
                await asyncio.gather(
                    *(
                        one_request(session, entry.url, "instant-relay", tokens, True)
                        for _ in range(concurrent)
                    )
                )
                aggregate_tps = concurrent * tokens / (time.perf_counter() - started)
            assert relay_proc.proc is not None
            relay_ps = psutil.Process(relay_proc.proc.pid)
            rss_before = relay_ps.memory_info().rss
            held = await idle_sessions(relay, sessions)
            await asyncio.sleep(0.5)
            rss_after = relay_ps.memory_info().rss
            for channel, _call in held:
                await channel.close()  # ends its session too
        finally:
            for node in nodes:
                node.kill()
            relay_proc.kill()
    ms = 1000.0
    d_req = statistics.median(req["instant-direct"]) * ms
    r_req = statistics.median(req["instant-relay"]) * ms
    d_str = statistics.median(strm["instant-direct"]) * ms
    r_str = statistics.median(strm["instant-relay"]) * ms
    d_tps, r_tps = tokens / (d_str / ms), tokens / (r_str / ms)
    per_node_kib = (rss_after - rss_before) / sessions / 1024
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(
        f"instant backend (benchmark-only); {requests} requests and {streams} streams of "
        f"{tokens} tokens per path, interleaved; entry box, two servers and relay on loopback"
    )
    print(f"{'':30} {'LAN hop':>10} {'relay':>10} {'added':>10}")
    print(
        f"{'request, 1 token (ms, median)':30} {d_req:10.2f} {r_req:10.2f} {r_req - d_req:+10.2f}"
    )
    print(
        f"{'stream of ' + str(tokens) + ' (ms)':30} {d_str:10.1f} {r_str:10.1f} "
        f"{r_str - d_str:+10.1f}"
    )
    print(f"{'tokens/s per stream':30} {d_tps:10.0f} {r_tps:10.0f}")
    print(
        f"aggregate through the relay, {concurrent} streams at once: {aggregate_tps:,.0f} tokens/s"
    )
    print(
        f"relay memory per connected node: {per_node_kib:.0f} KiB "
        f"({sessions} idle sessions: {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB)"
    )
    ok = r_tps >= 20_000 and r_req - d_req <= 3.0
    print(
        "targets (>= 20,000 tokens/s per stream, <= +3 ms per request): "
        + ("met" if ok else "NOT met")
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=60, help="at most 62 (see above)")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.streams, args.tokens, args.concurrent, args.sessions))
