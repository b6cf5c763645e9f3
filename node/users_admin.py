"""The node's users: who a request comes from, and adding or removing users.

The running node holds the users in memory and is the only writer of `users.json`
(through the loopback-only `/allerac/users` endpoints that `allerac user ...` calls), so
there is no race between a command and the daemon, and a removed key is refused from the
very next request on. A change is written to disk first and takes effect only once saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mesh.config import is_loopback_host
from mesh.home import Home
from mesh.scheduler import Privacy
from mesh.users import Caller, UserBook, load_users, save_users, validate_name

logger = logging.getLogger(__name__)


class UsersAdmin:
    def __init__(self, path: Path, book: UserBook, *, default_privacy: Privacy) -> None:
        self._path = path
        self._book = book
        self._default_privacy = default_privacy

    @classmethod
    def open(cls, home: Home, *, default_privacy: Privacy) -> UsersAdmin:
        """Load HOME/users.json (a missing file is no users; a bad one is a ConfigError)."""
        return cls(home.users_file, load_users(home.users_file), default_privacy=default_privacy)

    def __len__(self) -> int:
        return len(self._book)

    def caller(self, authorization: str | None, *, loopback: bool) -> Caller:
        return self._book.caller(authorization, loopback=loopback)

    def describe(self) -> dict[str, Any]:
        return {"users": [record.describe() for record in self._book]}

    def add(self, *, name: str, privacy: Privacy | None) -> dict[str, Any]:
        """Add a user (privacy: the node's default when not given); the answer holds the
        API key, the only time it is ever shown."""
        staged = self._book.copy()
        record, key = staged.add(
            name, privacy or self._default_privacy, now_ms=int(time.time() * 1000)
        )
        save_users(self._path, staged)
        self._book = staged
        logger.info("added user %s (privacy %s)", record.name, record.privacy.value)
        return {**record.describe(), "api_key": key}

    def remove(self, name: str) -> dict[str, Any]:
        staged = self._book.copy()
        record = staged.remove(validate_name(name))
        save_users(self._path, staged)
        self._book = staged
        logger.info("removed user %s: their API key no longer works", record.name)
        return record.describe()


def log_api_access(host: str, users: UsersAdmin) -> None:
    """Say at start who can use the HTTP API bound to `host`."""
    if is_loopback_host(host):
        logger.info("HTTP API on loopback (%s): only this box can use it; no key needed", host)
        return
    logger.info(
        "HTTP API on %s, beyond loopback: other machines need an API key (%d user(s)); "
        "this box itself needs none",
        host,
        len(users),
    )
    if not len(users):
        logger.warning(
            "no users yet, so only this box can use the HTTP API; "
            "give someone a key with: allerac user add NAME"
        )
