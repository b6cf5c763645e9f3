"""The relay operator's token: who may ask a relay for its totals (`allerac relay stats`).

A relay writes a fresh random token to `<home>/run/relay.token` (0600) when it starts and
removes it when it stops; `Stats` answers only a call that carries it as gRPC metadata
`authorization: Bearer TOKEN`. Whoever can read the relay's home is its operator: on the
relay's machine that is the account running it; elsewhere, whoever was handed the token.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable
from pathlib import Path

from cloud_relay.private_file import write_private
from mesh.errors import ConfigError, PermissionDenied, Unauthenticated

TOKEN_FILE_NAME = "relay.token"  # noqa: S105 - a file name, not a secret
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 256
AUTHORIZATION = "authorization"
BEARER = "Bearer "


def token_path(run_dir: Path) -> Path:
    return run_dir / TOKEN_FILE_NAME


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_operator_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, (token + "\n").encode())


def read_operator_token(run_dir: Path) -> str:
    """The token of the relay running with this home (raises ConfigError if there is none)."""
    path = token_path(run_dir)
    try:
        token = path.read_text(encoding="ascii")[:MAX_TOKEN_CHARS].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the relay's operator token {path}: is the relay running with this "
            "--home, and are you its operator?"
        ) from exc
    if not token:
        raise ConfigError(f"the relay's operator token {path} is empty")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, BEARER + token),)


def check_operator(metadata: Iterable[tuple[str, str | bytes]], token: str) -> None:
    """Raise unless `metadata` carries `token` (compared in constant time)."""
    presented = next((value for key, value in metadata if key == AUTHORIZATION), None)
    if not isinstance(presented, str) or not presented.startswith(BEARER):
        raise Unauthenticated(
            f"relay stats are for the relay's operator: send the token from its "
            f"<home>/run/{TOKEN_FILE_NAME} (allerac relay stats --home HOME)"
        )
    candidate = presented.removeprefix(BEARER).strip()[:MAX_TOKEN_CHARS]
    if not hmac.compare_digest(candidate.encode(), token.encode()):
        raise PermissionDenied("that is not this relay's operator token (was it restarted?)")
