from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess

# Every node the suite starts decodes with one thread unless its config says otherwise: the
# suite's workers share the machine's cores, and llama.cpp's threads wait for each other
# spinning, so a thread per core in every worker makes decoding many times slower.
os.environ.setdefault("ALLERAC_THREADS", "1")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One real node on the embedded model, shared by a test module."""
    proc = NodeProcess(tmp_path_factory.mktemp("home")).start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


# The test files that take longest (real processes and network namespaces), the longest
# first. The test workers take whole files (`--dist loadfile`) in collection order: a long
# file taken last would keep one worker busy alone at the end of the run.
LONGEST_FIRST = (
    "test_member_edges.py",
    "test_netns_failover.py",
    "test_netns_mesh.py",
    "test_netns_relay.py",
    "test_netns_mdns_flood.py",
    "test_lifecycle.py",
    "test_ledger_truncation.py",
    "test_console_browser.py",
    "test_api_keys.py",
    "test_admission.py",
    "test_http_api.py",
    "test_agents.py",
    "test_mesh_trust.py",
    "test_console_api.py",
    "test_quotas.py",
    "test_lan_mesh.py",
    "test_stranger_edges.py",
    "test_quota_leases.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_collection_finish(session: pytest.Session) -> None:
    # What imports and collection made lives until the end: out of the collector's sight
    # (a full collection walked all of it: ~60 ms each time the harness asks for one).
    gc.freeze()
