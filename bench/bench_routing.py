"""What one LAN hop costs: a request served by the box it reached (local) against
the same request reaching another box first and being forwarded, sealed, to it.

Uses the BENCHMARK-ONLY instant backend (bench/instant_backend.py), which
streams tokens without computing, so the figures are the mesh's own cost:
HTTP in, scheduling, sealing, gRPC to the peer, opening, and every token back.
Both boxes run on this machine (loopback), in one run, interleaved.

Targets (issue "LAN mesh"): at most +2 ms per request and +50 µs per token
(medians).

    python bench/bench_routing.py [--requests 300] [--streams 20] [--tokens 2000]
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

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.store.config_file import embedded_model_path  # noqa: E402
from tests.nodeproc import NodeProcess, run_cli  # noqa: E402

LAUNCHER = [sys.executable, str(ROOT / "bench" / "instant_node.py")]


def instant_config(name: str) -> str:
    path = embedded_model_path()  # any existing file: the instant backend never reads it
    return f'[[models]]\nname = "{name}"\npath = "{path}"\nbackend = "bench_instant"\n'


async def one_request(session: aiohttp.ClientSession, url: str, tokens: int, stream: bool) -> float:
    body = {"model": "instant", "prompt": "x", "max_tokens": tokens, "stream": stream}
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.perf_counter() - started


async def wait_for_peer(node: NodeProcess, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        async with session.get(node.url + "/allerac/status") as response:
            status = await response.json()
        if any(p["state"] == "up" for p in status["peers"]):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the two boxes did not see each other")


async def main(requests: int, streams: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        entry = NodeProcess(
            Path(tmp) / "entry", config=instant_config("entry-only"), command=LAUNCHER
        ).start()
        server = NodeProcess(
            Path(tmp) / "server",
            "--peer",
            entry.info["grpc_address"],
            config=instant_config("instant"),
            command=LAUNCHER,
        ).start()
        try:
            code = run_cli(entry.home, "mesh", "invite").stdout.strip()
            assert run_cli(server.home, "mesh", "join", code).returncode == 0
            async with aiohttp.ClientSession() as session:
                await wait_for_peer(entry, session)
                for _ in range(20):  # warm both paths
                    await one_request(session, server.url, 1, False)
                    await one_request(session, entry.url, 1, False)
                local_req, lan_req = [], []
                for i in range(requests):
                    pair = [(server.url, local_req), (entry.url, lan_req)]
                    for url, into in pair if i % 2 == 0 else reversed(pair):
                        into.append(await one_request(session, url, 1, False))
                local_stream, lan_stream = [], []
                for i in range(streams):
                    pair = [(server.url, local_stream), (entry.url, lan_stream)]
                    for url, into in pair if i % 2 == 0 else reversed(pair):
                        into.append(await one_request(session, url, tokens, True))
        finally:
            entry.kill()
            server.kill()
    ms = 1000.0
    local_r, lan_r = statistics.median(local_req) * ms, statistics.median(lan_req) * ms
    local_s, lan_s = statistics.median(local_stream) * ms, statistics.median(lan_stream) * ms
    per_token_us = (lan_s - local_s) / tokens * 1000
    local_tps, lan_tps = tokens / (local_s / ms), tokens / (lan_s / ms)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(
        f"instant backend (benchmark-only); {requests} requests and {streams} streams of "
        f"{tokens} tokens per path, interleaved"
    )
    print(f"{'':28} {'local':>10} {'LAN hop':>10} {'added':>10}")
    print(f"{'request, 1 token (ms)':28} {local_r:10.2f} {lan_r:10.2f} {lan_r - local_r:+10.2f}")
    print(
        f"{'stream of ' + str(tokens) + ' (ms)':28} {local_s:10.1f} {lan_s:10.1f} "
        f"{lan_s - local_s:+10.1f}"
    )
    print(f"{'tokens/s per stream':28} {local_tps:10.0f} {lan_tps:10.0f}")
    print(f"added per token: {per_token_us:.1f} µs")
    ok = lan_r - local_r <= 2.0 and per_token_us <= 50.0
    print(f"targets (<= +2 ms per request, <= +50 µs per token): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.streams, args.tokens))
