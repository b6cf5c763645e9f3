"""Pooling: two boxes, each pinned to its own core, against one box on one core.

Whole requests go to whole models, so N boxes should serve N concurrent requests
at close to N x one box's throughput (layer-splitting systems get slower as boxes
are added). Same model (the embedded SmolLM2), same load, one run: CONCURRENCY
streaming requests at a time, all sent to the first box; the mesh spreads them.
Target (issue "LAN mesh"): at least 1.8x the aggregate tokens/s of one box.

    python bench/bench_pooling.py [--requests 32] [--concurrency 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.store.config_file import embedded_model_path  # noqa: E402
from tests.nodeproc import NodeProcess, run_cli  # noqa: E402

CONFIG = (
    f'[[models]]\nname = "smollm2-135m-instruct"\naliases = ["default"]\n'
    f'path = "{embedded_model_path()}"\nthreads = 1\nqueue_size = 32\n'
)
PROMPTS = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "a b c d e f g", "10 20 30 40"]


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core), sys.executable, "-m", "node"]


async def one(
    session: aiohttp.ClientSession, url: str, prompt: str, tokens: int
) -> tuple[int, str]:
    body = {
        "model": "default",
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    made = 0
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        node = response.headers["x-allerac-node"]
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    made = chunk["usage"]["completion_tokens"]
    return made, node


async def load(
    url: str, requests: int, concurrency: int, tokens: int
) -> tuple[float, Counter[str]]:
    gate = asyncio.Semaphore(concurrency)
    served: Counter[str] = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one(session, url, PROMPTS[0], 8)  # warm-up

        async def run(i: int) -> int:
            async with gate:
                made, node = await one(session, url, PROMPTS[i % len(PROMPTS)], tokens)
                served[node] += 1
                return made

        started = time.perf_counter()
        made = await asyncio.gather(*(run(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    return sum(made) / elapsed, served


async def wait_up(node: NodeProcess, peers: int) -> None:
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(node.url + "/allerac/status") as response:
                status = await response.json()
            if sum(p["state"] == "up" for p in status["peers"]) >= peers:
                return
            await asyncio.sleep(0.05)
    raise RuntimeError("the boxes did not see each other")


async def measure(tmp: Path, requests: int, concurrency: int, tokens: int):  # type: ignore[no-untyped-def]
    solo = NodeProcess(tmp / "solo", config=CONFIG, command=pinned(0)).start()
    try:
        one_box, _ = await load(solo.url, requests, concurrency, tokens)
    finally:
        solo.stop()
    # The machine's own ceiling: two separate boxes, each loaded directly with half the
    # requests (no mesh). On a shared-memory machine the two cores compete for memory
    # bandwidth, which a small model saturates.
    left = NodeProcess(tmp / "left", config=CONFIG, command=pinned(0)).start()
    right = NodeProcess(tmp / "right", config=CONFIG, command=pinned(1)).start()
    try:
        halves = await asyncio.gather(
            load(left.url, requests // 2, concurrency // 2, tokens),
            load(right.url, requests // 2, concurrency // 2, tokens),
        )
        ceiling = sum(rate for rate, _ in halves)
    finally:
        left.kill()
        right.kill()
    a = NodeProcess(tmp / "a", config=CONFIG, command=pinned(0)).start()
    b = NodeProcess(
        tmp / "b", "--peer", a.info["grpc_address"], config=CONFIG, command=pinned(1)
    ).start()
    try:
        code = run_cli(a.home, "mesh", "invite").stdout.strip()
        assert run_cli(b.home, "mesh", "join", code).returncode == 0
        await wait_up(a, 1)
        two_boxes, served = await load(a.url, requests, concurrency, tokens)
    finally:
        a.kill()
        b.kill()
    return one_box, ceiling, two_boxes, served


async def main(requests: int, concurrency: int, tokens: int, repeat: int) -> None:
    runs = []
    for index in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(await measure(Path(tmp), requests, concurrency, tokens))
        one_box, ceiling, two_boxes, served = runs[-1]
        print(
            f"run {index + 1}: one box {one_box:.1f}, two separate boxes {ceiling:.1f} "
            f"({ceiling / one_box:.2f}x), mesh of two {two_boxes:.1f} tokens/s "
            f"({two_boxes / one_box:.2f}x; served {sorted(served.values())})"
        )
    one_box = statistics.median(r[0] for r in runs)
    ceiling = statistics.median(r[1] for r in runs)
    two_boxes = statistics.median(r[2] for r in runs)
    ratio = statistics.median(r[2] / r[0] for r in runs)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    print(
        f"{requests} streaming requests of {tokens} greedy tokens, {concurrency} at a time, "
        "all sent to the first box; each box pinned to one core, 1 llama.cpp thread; "
        f"medians of {repeat} runs"
    )
    print(f"one box:   {one_box:8.1f} tokens/s aggregate")
    print(f"two boxes: {two_boxes:8.1f} tokens/s aggregate  ({ratio:.2f}x one box)")
    print(
        f"two separate boxes loaded directly (this machine's ceiling): {ceiling:8.1f} "
        f"tokens/s ({ceiling / one_box:.2f}x); the mesh reaches {two_boxes / ceiling:.0%} of it"
    )
    print(f"target (>= 1.8x one box): {'met' if ratio >= 1.8 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.tokens, args.repeat))
