"""The data directory of one node (`$ALLERAC_HOME`) and what lives in it.

Several nodes on one machine are several homes. Layout:

    identity.key       Ed25519 identity (0600)
    config.toml        optional configuration, read when no --config is given
    users.json         users and the SHA-256 of their API keys (0600; see mesh/quota/users.py)
    run/node.json      written by a running node: IDs, bound addresses, pid
    run/owner.token    written at every start: the owner's credential (0600)
    ledger.db          the usage ledger (aiosqlite, WAL)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from node.store.files import write_private

HOME_ENV = "ALLERAC_HOME"
MAX_RUN_FILE_BYTES = 64 * 1024


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Allerac"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "allerac"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> Home:
        root = Path(explicit).expanduser() if explicit else default_home()
        return cls(root.absolute())

    @property
    def identity_key(self) -> Path:
        return self.root / "identity.key"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def users_file(self) -> Path:
        return self.root / "users.json"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def run_file(self) -> Path:
        return self.run_dir / "node.json"

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.run_dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {self.root}: {exc.strerror}") from exc

    @property
    def owner_token_file(self) -> Path:
        return self.run_dir / "owner.token"

    @property
    def ledger_file(self) -> Path:
        return self.root / "ledger.db"

    @property
    def mesh_dir(self) -> Path:
        return self.root / "mesh"

    def write_run_info(self, info: dict[str, Any]) -> None:
        """Atomically publish what a running node bound (read by status/chat/tests)."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps(info, indent=2, sort_keys=True) + "\n"
        write_private(self.run_file, data.encode("utf-8"))

    def read_run_info(self) -> dict[str, Any]:
        if not self.root.is_dir():  # a mistyped --home: say so, not "no node is running"
            raise ConfigError(
                f"no data dir {self.root}: no node has run there (check --home; start a "
                "node with: allerac up)"
            )
        try:
            with self.run_file.open("rb") as handle:
                data = handle.read(MAX_RUN_FILE_BYTES + 1)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no node is running with data dir {self.root} (no {self.run_file}); "
                "start one with: allerac up"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {self.run_file}: {exc.strerror}") from exc
        try:
            info = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd nesting
            raise ConfigError(f"{self.run_file} is corrupt: {type(exc).__name__}") from exc
        if not isinstance(info, dict) or not isinstance(info.get("http_url"), str):
            raise ConfigError(f"{self.run_file} is corrupt: no http_url")
        return info

    def clear_run_info(self, pid: int) -> None:
        """Remove node.json, but only if it is still ours (a newer node may have replaced it)."""
        try:
            info = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(info, dict) and info.get("pid") == pid:
            self.run_file.unlink(missing_ok=True)
