"""Backing up a node's data dir, and restoring it into a home (safe while the node runs).

What a backup holds: the identity key, `config.toml`, `users.json`, `quota-holds.json`,
everything in `mesh/` (the mesh key on an admin, the membership certificate, the revocation
list, encryption keys, invites, members, keys of meshes left), and the ledger, copied with
SQLite's online backup API (a consistent snapshot while the node writes; a `cp` of a live WAL
database is not one). The node writes every other file by atomic rename, so reading one
gives a whole version of it. Not in it: `run/` (what a running node bound, its owner token)
and model files (large, and fetched again from where they came).

The files go into a gzip'd tar with a manifest (`allerac-backup.json`: node ID, mesh ID,
ledger records, when), sealed with a passphrase (`backup_file.py`). A restore authenticates
the whole file before it writes anything, accepts only the names above (regular files, no
paths elsewhere), and writes files 0600 and directories 0700 like the node itself. It
never overwrites an identity unless forced, and then sets the files it replaces aside in
`replaced-TIME/` rather than deleting them; it refuses a home whose node is running.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from google.protobuf.message import DecodeError

from mesh.clock import SYSTEM, Clock
from mesh.errors import BackupError, IdentityError, MeshError
from mesh.trust.identity import Identity
from mesh.trust.membership import mesh_id_from_public_key, read_cert
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.backup_file import ScryptCost, SealingWriter, read_header, unseal
from node.store.files import read_owner_only
from node.store.home import Home

MANIFEST = "allerac-backup.json"
TOP_FILES = ("identity.key", "config.toml", "users.json", "quota-holds.json")
LEDGER = "ledger.db"
MESH_DIR = "mesh"
_MESH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MEMBER_BYTES = 64 << 30
MAX_SMALL_FILE_BYTES = 64 << 20


@dataclass(frozen=True, kw_only=True)
class BackupSummary:
    node_id: str
    mesh_id: str
    ledger_records: int
    files: tuple[str, ...]
    created_at_ms: int


def _read_small(path: Path, what: str) -> bytes | None:
    return read_owner_only(path, what=what, max_bytes=MAX_SMALL_FILE_BYTES, error=BackupError)


def _ledger_snapshot(source: Path, target: Path) -> int:
    """A consistent copy of the live ledger (SQLite's online backup API), checked; returns
    how many records it holds."""
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
                (check,) = dst.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise BackupError(f"the ledger {source} is damaged ({check}); not backed up")
                (records,) = dst.execute("SELECT COUNT(*) FROM records").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the ledger {source}: {exc}") from exc
    os.chmod(target, 0o600)
    return int(records)


def _mesh_id(home: Home) -> str:
    raw = _read_small(home.mesh_dir / "membership.cert", "membership certificate")
    if raw is None:
        return ""
    try:
        cert, _ = read_cert(tpb.SignedCert.FromString(raw))
    except (MeshError, DecodeError, ValueError):  # a damaged certificate is backed up as is
        return ""
    return mesh_id_from_public_key(cert.mesh_public_key)


def _add(tar: tarfile.TarFile, name: str, data: bytes | Path) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o600
    if isinstance(data, Path):
        info.size = data.stat().st_size
        with data.open("rb") as handle:
            tar.addfile(info, handle)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def create_backup(
    home: Home,
    target: Path,
    passphrase: str,
    *,
    clock: Clock = SYSTEM,
    cost: ScryptCost | None = None,
) -> BackupSummary:
    """Write a sealed backup of `home` to `target` (atomically, 0600)."""
    key = _read_small(home.identity_key, "identity key")
    if key is None:
        raise BackupError(
            f"no node identity in {home.root}: nothing to back up (check --home; a node "
            "creates its identity at its first start)"
        )
    try:
        node_id = Identity.from_pem(key, source="identity key").node_id
    except IdentityError as exc:
        raise BackupError(f"{home.identity_key} is damaged: {exc.message}; not backed up") from exc
    target = target.absolute()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    files: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=home.root) as staging:
        records = 0
        ledger_copy = Path(staging) / LEDGER
        if home.ledger_file.is_file():
            records = _ledger_snapshot(home.ledger_file, ledger_copy)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise BackupError(f"cannot write {target}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as sink:
                sealed = SealingWriter(sink, passphrase, cost=cost)
                with tarfile.open(fileobj=sealed, mode="w|gz") as tar:  # type: ignore[call-overload]
                    for name in TOP_FILES:
                        data = (
                            key if name == "identity.key" else _read_small(home.root / name, name)
                        )
                        if data is not None:
                            _add(tar, name, data)
                            files.append(name)
                    if home.mesh_dir.is_dir():
                        for path in sorted(home.mesh_dir.iterdir()):
                            if _MESH_NAME.match(path.name) and path.is_file():
                                data = _read_small(path, f"mesh file {path.name}")
                                if data is not None:
                                    _add(tar, f"{MESH_DIR}/{path.name}", data)
                                    files.append(f"{MESH_DIR}/{path.name}")
                    if ledger_copy.exists():
                        _add(tar, LEDGER, ledger_copy)
                        files.append(LEDGER)
                    summary = BackupSummary(
                        node_id=node_id,
                        mesh_id=_mesh_id(home),
                        ledger_records=records,
                        files=tuple(files),
                        created_at_ms=clock.now_ms(),
                    )
                    _add(tar, MANIFEST, json.dumps(_manifest(summary), indent=2).encode())
                sealed.close()
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return summary


def _manifest(summary: BackupSummary) -> dict[str, Any]:
    return {
        "format": 1,
        "node_id": summary.node_id,
        "mesh_id": summary.mesh_id,
        "ledger_records": summary.ledger_records,
        "files": list(summary.files),
        "created_at_ms": summary.created_at_ms,
    }


def _allowed(name: str) -> bool:
    if name in (*TOP_FILES, LEDGER, MANIFEST):
        return True
    parts = name.split("/")
    return len(parts) == 2 and parts[0] == MESH_DIR and bool(_MESH_NAME.match(parts[1]))


def _running_pid(home: Home) -> int | None:
    """The pid of a node running with `home` now, if any (a stale run file is not one)."""
    try:
        pid = int(json.loads(home.run_file.read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def check_restorable(home: Home, *, force: bool) -> None:
    """Refuse, before anything is asked or read, a home a restore must not touch."""
    pid = _running_pid(home)
    if pid is not None:
        raise BackupError(f"a node is running with data dir {home.root} (pid {pid}); stop it first")
    if home.identity_key.exists() and not force:
        raise BackupError(
            f"{home.root} already holds a node identity; restoring would replace it (and "
            "with it this box's place in its mesh). Give --force to restore anyway (the "
            "files replaced are kept in replaced-TIME/), or restore into another --home"
        )


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from exc
    with handle:
        yield handle


def restore_backup(
    source: Path, home: Home, passphrase: str, *, force: bool = False, clock: Clock = SYSTEM
) -> BackupSummary:
    """Restore the backup `source` into `home`. Writes nothing unless the whole file
    authenticates and holds a node identity."""
    check_restorable(home, force=force)
    with _opened(source) as handle:
        opened = read_header(handle, passphrase)  # a wrong passphrase is said at once
    with _opened(source) as handle:
        unseal(handle, None, opened)  # every chunk authenticates: now it may be written
    parent = home.root.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=f".{home.root.name}.restore-", dir=parent) as tmp:
        staging = Path(tmp)
        payload = staging / "payload"
        with _opened(source) as handle, payload.open("wb") as plain:
            os.chmod(payload, 0o600)
            unseal(handle, plain, opened)
        files = staging / "files"
        files.mkdir(mode=0o700)
        manifest = _extract(payload, files)
        payload.unlink()
        key = files / "identity.key"
        if not key.is_file():
            raise BackupError(f"{source} holds no node identity; nothing was restored")
        node_id = Identity.from_pem(key.read_bytes(), source="the backup's identity key").node_id
        check_restorable(home, force=force)  # again: a node may have started meanwhile
        _install(files, home, clock=clock)
    return BackupSummary(
        node_id=node_id,
        mesh_id=str(manifest.get("mesh_id", "")),
        ledger_records=int(manifest.get("ledger_records", 0)),
        files=tuple(str(f) for f in manifest.get("files", [])),
        created_at_ms=int(manifest.get("created_at_ms", 0)),
    )


def _extract(payload: Path, files: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = {}
    try:
        with tarfile.open(payload, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile() or not _allowed(member.name):
                    raise BackupError(f"the backup holds an unexpected entry {member.name!r}")
                if member.size > MAX_MEMBER_BYTES:
                    raise BackupError(f"the backup's {member.name} is too large")
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file
                if member.name == MANIFEST:
                    manifest = json.loads(reader.read(MAX_SMALL_FILE_BYTES))
                    continue
                target = files / member.name
                target.parent.mkdir(exist_ok=True, mode=0o700)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(reader, out)
                    out.flush()
                    os.fsync(out.fileno())
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise BackupError(
            f"the backup's contents are damaged ({exc}); nothing was restored"
        ) from exc
    if not isinstance(manifest, dict):
        raise BackupError("the backup's manifest is damaged; nothing was restored")
    return manifest


def _install(files: Path, home: Home, *, clock: Clock) -> None:
    """Move the restored files into the home; what they replace goes to replaced-TIME/."""
    home.ensure()
    os.chmod(home.root, 0o700)
    aside = home.root / f"replaced-{clock.now_ms()}"
    replaced = [
        home.root / name
        for name in (*TOP_FILES, LEDGER, f"{LEDGER}-wal", f"{LEDGER}-shm", MESH_DIR)
        if (home.root / name).exists()
    ]
    if replaced:
        aside.mkdir(mode=0o700)
        for path in replaced:  # a stale WAL next to the restored ledger would corrupt it
            os.replace(path, aside / path.name)
    for path in sorted(files.rglob("*")):
        target = home.root / path.relative_to(files)
        if path.is_dir():
            target.mkdir(exist_ok=True, mode=0o700)
        else:
            os.replace(path, target)
    _fsync_dir(home.root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
