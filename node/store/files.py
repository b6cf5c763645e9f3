"""The node's private files: replaced atomically and readable by their owner only.

A write goes to a temporary file in the same directory (mode 0600), is fsync'd, then
renamed over the old one, so a crash leaves the old file or the new one, never half of
either. A read refuses what it should not trust: a link, anything but a regular file, a
file other users may read, one larger than expected.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mesh.errors import MeshError


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_owner_only(
    path: Path, *, what: str, max_bytes: int, error: type[MeshError]
) -> bytes | None:
    """The bytes of a secret file only its owner may read, or None when it does not exist.

    Refuses (with `error`, naming `what` and the path, and leaving the file untouched) a
    link, anything but a regular file, a file others may read, and one over `max_bytes`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what} {path} is not a regular file; it was left untouched")
    with os.fdopen(fd, "rb") as handle:
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(
                f"{what} {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise error(f"{what} {path} is too large (over {max_bytes} bytes); it was left untouched")
    return data
