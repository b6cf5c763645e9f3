"""Damaged mesh files (issue 12, finding 5): a node whose membership certificate, member
list or invites were garbled stops at once with a clear error naming the file (never a
traceback, never a half-started node), and leaves the file as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nodeproc import NodeProcess, run_cli

DAMAGE = [
    ("membership.cert", b"\xff\xfe garbled \x00\x01", "membership certificate"),
    ("membership.cert", b"", "membership certificate"),
    ("members.json", b"{not json", "member list"),
    ("members.json", b"[1, 2]", "member list"),
    ("invites.json", b"\xff\xff", "open invites"),
]


@pytest.fixture(scope="module")
def used_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home a node has run in (it created its mesh of one and an invite)."""
    home = tmp_path_factory.mktemp("home")
    node = NodeProcess(home).start()
    try:
        assert run_cli(home, "mesh", "invite").returncode == 0
        assert node.stop() == 0
    finally:
        node.kill()
    return home


@pytest.mark.parametrize(
    ("name", "data", "what"), DAMAGE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DAMAGE)]
)
def test_a_damaged_mesh_file_stops_the_node_clearly(
    used_home: Path, name: str, data: bytes, what: str
) -> None:
    path = used_home / "mesh" / name
    before = path.read_bytes() if path.exists() else None
    path.write_bytes(data)
    try:
        result = run_cli(
            used_home, "up", "--http-port", "0", "--grpc-port", "0", "--no-mdns", timeout=60
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert what in result.stderr
        assert str(path) in result.stderr
        assert path.read_bytes() == data  # left untouched
        assert not (used_home / "run" / "node.json").exists()
    finally:
        if before is not None:
            path.write_bytes(before)
        else:
            path.unlink()
