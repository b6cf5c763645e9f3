"""The node's identity key file, `$ALLERAC_HOME/identity.key`: unencrypted PKCS#8 PEM,
mode 0600, created atomically (exclusive create + fsync + link, so two processes starting
at once end up with one key). A key file that exists but cannot be read or parsed is
reported and never replaced: replacing it would silently give the box a new identity and
orphan its memberships.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mesh.errors import IdentityError
from mesh.trust.identity import Identity
from node.store.files import read_owner_only

MAX_KEY_FILE_BYTES = 4096


def load_or_create_identity(path: Path) -> tuple[Identity, bool]:
    """Load the identity at `path`, or create it there if no file exists.

    Returns (identity, created). Never overwrites an existing file.
    """
    data = read_owner_only(
        path, what="identity key", max_bytes=MAX_KEY_FILE_BYTES, error=IdentityError
    )
    if data is None:
        return _create_identity(path), True
    return Identity.from_pem(data, source=f"identity key {path}"), False


def _create_identity(path: Path) -> Identity:
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.to_pem())
            handle.flush()
            os.fsync(handle.fileno())
        # link() fails if another process created the key meanwhile: never overwrite.
        os.link(tmp, path)
    except FileExistsError:
        return load_or_create_identity(path)[0]
    except OSError as exc:
        raise IdentityError(f"cannot create identity key {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return identity
