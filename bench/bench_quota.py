"""The cost of holding a request to its user's quota.

1. In process, at the user's home node: `QuotaService.admit` + `settle` for a user with a
   limited quota, the book already counting R ledger records of U users (the check the
   home node makes for every request it keeps the quota of). Baseline, same run: the
   same calls for an unlimited user (what every request pays anyway).
2. Through the mesh, two real nodes (benchmark-only instant backend, loopback): a
   request entering at node B for a user whose home is node A (B admits from its lease,
   a standing reservation at A, and asks A again only when the lease runs out) against
   the same request for an unlimited user, interleaved. The difference is the quota's
   cost for a user whose home is elsewhere.

Target (issue "ledger"): a quota check per request in at most 0.5 ms.

    python bench/bench_quota.py [--records 100000] [--requests 300]
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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_routing import LAUNCHER, instant_config  # noqa: E402

from mesh.inference import InferenceRequest, Sampling  # noqa: E402
from mesh.ledger.records import ChainWriter, Usage, open_record  # noqa: E402
from mesh.quota.rules import parse_quota  # noqa: E402
from mesh.routing.scheduler import Privacy  # noqa: E402
from node.serving.quota_service import QuotaService  # noqa: E402
from node.store.home import Home  # noqa: E402
from node.store.users_admin import UsersAdmin  # noqa: E402
from tests.members import new_trust  # noqa: E402
from tests.nodeproc import NodeProcess, run_cli  # noqa: E402

TARGET_MS = 0.5


def in_process(records: int, users: int, rounds: int) -> tuple[float, float]:
    """Median µs of admit + settle: (limited user, unlimited user)."""
    with tempfile.TemporaryDirectory() as tmp:
        trust = new_trust(Path(tmp))  # a mesh of one: its users' home is this node
        me = trust.identity
        admin = UsersAdmin.open(Home(Path(tmp)), default_privacy=Privacy.MESH, trust=trust)

        async def add_users() -> None:
            for i in range(users):
                await admin.add(
                    name=f"user{i}",
                    privacy=None,
                    quota=parse_quota("mesh=1G/day,cloud=10G/month,cloud=1G/day"),
                )
            await admin.add(name="free", privacy=None)

        asyncio.run(add_users())
        service = QuotaService(node_id=me.node_id, users=admin, store=None)
        writer = ChainWriter(me)
        service.count(
            [
                open_record(
                    writer.append(
                        Usage(
                            request_id=f"{i:032x}",
                            entry_node_id=me.node_id,
                            user=f"user{i % users}",
                            model="m",
                            prompt_tokens=40,
                            completion_tokens=100,
                            route="cloud" if i % 3 else "lan",
                            started_at_ms=int(time.time() * 1000) - 10,
                            ended_at_ms=int(time.time() * 1000),
                        )
                    )
                )
                for i in range(records)
            ]
        )

        async def measure(user: str) -> float:
            samples = []
            for i in range(rounds):
                request = InferenceRequest(
                    model="m",
                    prompt="What is the capital of France?",
                    sampling=Sampling(max_tokens=64),
                    user=user,
                )
                started = time.perf_counter()
                admission = await service.admit(request, Privacy.ANY)
                await service.settle(admission, [])
                samples.append(time.perf_counter() - started)
                if i == 0:
                    assert admission.home == (me.node_id if user != "free" else "")
            return statistics.median(samples) * 1e6

        limited: list[float] = []
        free: list[float] = []
        for _ in range(5):  # interleaved
            limited.append(asyncio.run(measure("user7")))
            free.append(asyncio.run(measure("free")))
        return statistics.median(limited), statistics.median(free)


def request_ms(url: str, key: str) -> float:
    body = json.dumps({"model": "instant-b", "prompt": "x", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        url + "/v1/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        assert response.status == 200
    return (time.perf_counter() - started) * 1000


def through_the_mesh(requests: int) -> tuple[float, float]:
    """Median ms of a request at B: (user at home A, unlimited user)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = NodeProcess(root / "a", config=instant_config("instant-a"), command=LAUNCHER).start()
        b = NodeProcess(
            root / "b",
            "--peer",
            a.info["grpc_address"],
            "--http-host",
            "127.0.0.1",
            config=instant_config("instant-b"),
            command=LAUNCHER,
        ).start()
        try:
            code = run_cli(a.home, "mesh", "invite").stdout.strip()
            assert run_cli(b.home, "mesh", "join", code).returncode == 0
            limited = run_cli(a.home, "user", "add", "alice", "--quota", "mesh=1G/day")
            free = run_cli(a.home, "user", "add", "bob")
            keys = limited.stdout.strip(), free.stdout.strip()
            deadline = time.monotonic() + 30
            while True:  # the users reach b with the ledger sync
                try:
                    request_ms(b.url, keys[0])
                    request_ms(b.url, keys[1])
                    break
                except urllib.error.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            for _ in range(30):  # warm both paths
                request_ms(b.url, keys[0])
                request_ms(b.url, keys[1])
            timed: tuple[list[float], list[float]] = ([], [])
            for i in range(requests):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for which in order:
                    timed[which].append(request_ms(b.url, keys[which]))
        finally:
            a.stop()
            b.stop()
        return statistics.median(timed[0]), statistics.median(timed[1])


def main(records: int, requests: int) -> None:
    print(f"# quota bench — {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    limited_us, free_us = in_process(records, 50, 2000)
    home_ms, free_ms = through_the_mesh(requests)
    print()
    print("| What | Median | Baseline (same run) | Quota's cost |")
    print("|---|---|---|---|")
    print(
        f"| Check at the home node (admit + settle, {records:,} records of 50 users) | "
        f"{limited_us:.1f} µs | {free_us:.1f} µs (unlimited user) | "
        f"{(limited_us - free_us) / 1000:.3f} ms |"
    )
    print(
        f"| Request at B, quota kept at A (B's lease; a sealed call to A when it runs out) "
        f"| {home_ms:.2f} ms | {free_ms:.2f} ms (unlimited user) | {home_ms - free_ms:+.2f} ms |"
    )
    print()
    at_home = (limited_us - free_us) / 1000
    elsewhere = home_ms - free_ms
    print(f"target: quota check <= {TARGET_MS} ms per request: ", end="")
    met = at_home <= TARGET_MS and elsewhere <= TARGET_MS
    print(
        "met" if met else "NOT met",
        f"(at the home node {at_home:.3f} ms; at another box {elsewhere:+.2f} ms)",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    main(args.records, args.requests)
