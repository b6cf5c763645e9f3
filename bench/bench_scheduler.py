"""Scheduler decision time with 1,000 and 10,000 known peers that all serve the model.

Baseline (same run): the plan over every candidate in plain Python; measured: the
entry side's path (node/serving/entry.py), which pre-selects the most promising peers
from the per-model columns (mesh/routing/peer_index.py) and plans over those.
Target: <= 1 ms at 10,000.

    python bench/bench_scheduler.py
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.inference import InferenceRequest, Load, ModelInfo, Route, Sampling
from mesh.routing.candidates import candidates
from mesh.routing.peers import PeerTable
from mesh.routing.scheduler import Privacy, plan
from node.serving.accounting import Accountant
from node.serving.entry import EntrySide
from node.serving.models import LocalModels

ROUNDS = 50


def table_of(n: int, rng: random.Random) -> PeerTable:
    table = PeerTable()
    for i in range(n):
        node_id = f"N{i:06d}"
        info = ModelInfo(name="m", context_length=4096, tokens_per_second=40 + rng.random() * 60)
        table.verified(
            node_id=node_id,
            address=f"198.18.{i // 250}.{i % 250}:8471",
            route=Route.LAN,
            models=(info,),
            display_name="",
            now_ms=0,
        )
        table.heartbeat_ok(
            node_id,
            now_ms=0,
            rtt_ms=rng.random() * 5,
            load=Load(active_streams=rng.randint(0, 2), queued=0, slots=4),
        )
    return table


def median_ms(fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    rng = random.Random(7)
    request = InferenceRequest(model="m", prompt="hello", sampling=Sampling(max_tokens=100))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.platform()}"
    )
    header = f"{'known peers':>12} {'every candidate (ms)':>22} {'pre-selected (ms)':>18}"
    print(f"{header} {'same choice':>12}")
    ok = True
    for n in (1_000, 10_000):
        peers = table_of(n, rng)
        entry = EntrySide(
            models=LocalModels("me", []),
            peers=peers,
            accountant=Accountant(node_id="me", ledger=None),
        )
        every = candidates("m", local=None, peers=peers)
        naive = median_ms(
            lambda t=peers: plan(
                candidates("m", local=None, peers=t),
                privacy=Privacy.MESH,
                prompt_tokens=2,
                max_tokens=100,
            )
        )
        fast = median_ms(lambda e=entry: e.plan(request, Privacy.MESH))
        full_choice = plan(every, privacy=Privacy.MESH, prompt_tokens=2, max_tokens=100).chosen
        fast_choice = entry.plan(request, Privacy.MESH).chosen
        same = (
            full_choice is not None
            and fast_choice is not None
            and full_choice.candidate.node_id == fast_choice.candidate.node_id
        )
        print(f"{n:>12,} {naive:>22.3f} {fast:>18.3f} {same!s:>12}")
        ok = ok and same and (n < 10_000 or fast <= 1.0)
    print(
        f"target (<= 1 ms at 10,000 peers, same choice as the full plan): "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
