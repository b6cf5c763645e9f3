from __future__ import annotations

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
