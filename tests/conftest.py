from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess


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
