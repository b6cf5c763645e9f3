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


# The test files that take longest, in the order the test workers start them: the longest
# first, and those that mostly wait on real timers (network namespaces, heartbeats, mDNS)
# beside those that compute (real inference, the browser), so that the cores stay busy.
# The workers take whole files (`--dist loadfile`) in collection order
# (`--no-loadscope-reorder`: xdist would otherwise put the files with most tests first),
# each worker two at the start (with 4 workers, the first four files here start at once
# and the next four follow them, one to a worker: in either order the files that wait
# meet files that compute). A long file taken last would keep one worker busy alone at
# the end of the run.
LONGEST_FIRST = (
    "test_netns_mesh.py",  # waits
    "test_slots.py",
    "test_http_api.py",
    "test_agents.py",
    "test_netns_failover.py",
    "test_console_browser.py",
    "test_netns_mdns_flood.py",  # waits
    "test_netns_relay.py",
    "test_lan_mesh.py",
    "test_ledger_truncation.py",  # waits
    "test_api_keys.py",
    "test_member_edges.py",  # waits
    "test_mesh_trust.py",
    "test_lifecycle.py",
    "test_ledger_sync.py",  # waits
    "test_openai_api.py",
    "test_models_admin.py",
    "test_admission.py",
    "test_stranger_edges.py",  # waits
    "test_quota_restarts.py",
    "test_quotas.py",
    "test_backup.py",
    "test_openai_backend.py",
    "test_refusals.py",
    "test_console_api.py",
    "test_quota_leases.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_collection_finish(session: pytest.Session) -> None:
    # What imports and collection made lives until the end: out of the collector's sight
    # (a full collection walked all of it: ~60 ms each time the harness asks for one).
    gc.freeze()
