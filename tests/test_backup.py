"""Backup and recovery: the sealed file format (in process), and a real node backed up
while it answers, restored into a new home and started as the same node with the same
ledger."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import BackupError
from node.cli import cli
from node.store.backup_file import ScryptCost, SealingWriter, unseal
from tests.nodeproc import NodeProcess

CHEAP = ScryptCost(log2_n=10)  # the format's rules do not depend on the cost
PASS = "correct horse battery staple"


def sealed(data: bytes, *, chunk_bytes: int = 64, passphrase: str = PASS) -> bytes:
    out = io.BytesIO()
    writer = SealingWriter(out, passphrase, cost=CHEAP, chunk_bytes=chunk_bytes)
    writer.write(data[: len(data) // 2])
    writer.write(data[len(data) // 2 :])
    writer.close()
    return out.getvalue()


def opened(data: bytes, passphrase: str = PASS) -> bytes:
    out = io.BytesIO()
    unseal(io.BytesIO(data), out, passphrase)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    assert opened(sealed(data)) == data


def test_wrong_passphrase_is_said_before_anything_is_returned() -> None:
    out = io.BytesIO()
    with pytest.raises(BackupError, match="wrong passphrase"):
        unseal(io.BytesIO(sealed(b"secret" * 50)), out, "another passphrase")
    assert out.getvalue() == b""


def test_every_changed_byte_is_detected() -> None:
    data = sealed(os.urandom(300))
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(BackupError):
            opened(bytes(damaged))


def test_cut_short_reordered_or_extended_files_are_refused() -> None:
    data = sealed(os.urandom(300), chunk_bytes=64)
    header = len(data) - (4 * (64 + 16) + (300 - 256 + 16))
    chunk = 64 + 16
    for cut in (header + chunk, header + 2 * chunk, len(data) - 1, header - 1, 10):
        with pytest.raises(BackupError):
            opened(data[:cut])
    with pytest.raises(BackupError, match="cut short"):
        opened(data[: header + 2 * chunk])  # whole chunks, but not the last one
    first, second = data[header : header + chunk], data[header + chunk : header + 2 * chunk]
    swapped = data[:header] + second + first + data[header + 2 * chunk :]
    with pytest.raises(BackupError, match="damaged"):
        opened(swapped)
    with pytest.raises(BackupError):
        opened(data + b"\x00")


def test_foreign_and_future_files_are_named() -> None:
    with pytest.raises(BackupError, match="not an Allerac backup"):
        opened(b"SQLite format 3\x00" + bytes(100))
    future = bytearray(sealed(b"x"))
    future[len(b"ALLERAC-BACKUP")] = 2
    with pytest.raises(BackupError, match="format 2"):
        opened(bytes(future))
    with pytest.raises(BackupError, match="at least 8"):
        SealingWriter(io.BytesIO(), "short", cost=CHEAP)


# --- a real node ----------------------------------------------------------------------------


def allerac(*args: str, passphrase: str | None = PASS) -> Result:
    """The command in process (a CLI process costs a second of start-up on two cores)."""
    env = {"ALLERAC_BACKUP_PASSPHRASE": passphrase}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def records(home: Path) -> int:
    result = allerac("ledger", "verify", "--json", "--home", str(home))
    assert result.exit_code == 0, result.output
    return int(json.loads(result.stdout)["records"])


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("box") / "home").start()
    try:
        yield node
    finally:
        node.kill()


def test_backup_while_answering_then_restore_as_the_same_node(
    box: NodeProcess, tmp_path: Path
) -> None:
    home = str(box.home)
    assert allerac("chat", "--home", home, "--max-tokens", "4", "Hi").exit_code == 0
    before = records(box.home)
    answering = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "chat",
            "--home",
            home,
            "--max-tokens",
            "48",
            "Tell me a story.",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert answering.stdout is not None
        first = answering.stdout.read(1)  # the answer is streaming now
        made = allerac("backup", "create", str(tmp_path / "box.backup"), "--home", home)
    finally:
        out, err = answering.communicate(timeout=120)
    assert made.exit_code == 0, made.output
    assert answering.returncode == 0, err
    assert len(first + out) > 20
    assert box.node_id in made.stdout
    backup = tmp_path / "box.backup"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in backup.read_bytes()  # sealed: no key in the clear

    restored = tmp_path / "new-box"
    done = allerac("backup", "restore", str(backup), "--home", str(restored))
    assert done.exit_code == 0, done.output
    assert box.node_id in done.stdout
    for path in [restored, *restored.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert (restored / "mesh" / "mesh.key").is_file()  # this box is its mesh's admin
    held = records(restored)
    assert before <= held <= records(box.home)

    copy = NodeProcess(restored).start()
    try:
        assert copy.node_id == box.node_id
        assert copy.info["mesh_id"] == box.info["mesh_id"]
        assert records(restored) == held
        busy = allerac("backup", "restore", str(backup), "--home", str(restored), "--force")
        assert busy.exit_code == 1
        assert "is running" in busy.output
        assert copy.stop() == 0
    finally:
        copy.kill()

    again = allerac("backup", "restore", str(backup), "--home", str(restored))
    assert again.exit_code == 1
    assert "--force" in again.output
    forced = allerac("backup", "restore", str(backup), "--home", str(restored), "--force")
    assert forced.exit_code == 0, forced.output
    (aside,) = restored.glob("replaced-*")
    assert (aside / "identity.key").read_bytes() == (restored / "identity.key").read_bytes()


def test_a_wrong_passphrase_or_a_damaged_file_restores_nothing(
    box: NodeProcess, tmp_path: Path
) -> None:
    backup = tmp_path / "box.backup"
    assert allerac("backup", "create", str(backup), "--home", str(box.home)).exit_code == 0
    target = tmp_path / "target"
    wrong = allerac("backup", "restore", str(backup), "--home", str(target), passphrase="x" * 12)
    assert wrong.exit_code == 1
    assert "wrong passphrase" in wrong.output
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(bytes(data))
    broken = allerac("backup", "restore", str(damaged), "--home", str(target))
    assert broken.exit_code == 1
    assert "damaged" in broken.output
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.backup", "damaged.backup"]
    none = allerac("backup", "create", str(tmp_path / "x"), "--home", str(tmp_path / "nobody"))
    assert none.exit_code == 1
    assert "no node identity" in none.output
    unasked = allerac(
        "backup", "create", str(tmp_path / "y"), "--home", str(box.home), passphrase=None
    )
    assert unasked.exit_code == 1
    assert "ALLERAC_BACKUP_PASSPHRASE" in unasked.output


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_opening_any_bytes_returns_nothing_or_says_why(data: bytes) -> None:
    out = io.BytesIO()
    with pytest.raises(BackupError):
        unseal(io.BytesIO(data), out, PASS)
    assert out.getvalue() == b""
