"""The node's users: who a request comes from, and adding or removing users.

The running node holds the users in memory and is the only writer of `users.json`
(through the loopback-only `/allerac/users` endpoints that `allerac user ...` calls), so
there is no race between a command and the daemon, and a removed key is refused from the
very next request on. A change is written to disk first and takes effect only once saved.

Users are the mesh's: a user added here has this node as home (it keeps their quota),
and members exchange their lists (`merge`, pulled with the ledger), so a key works on
every box a moment later.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mesh.config import is_loopback_host
from mesh.home import Home
from mesh.quota import UNLIMITED, Quota
from mesh.scheduler import Privacy
from mesh.users import (
    MAX_USERS,
    Caller,
    UserBook,
    UserRecord,
    entry_from_pb,
    entry_to_pb,
    load_users,
    save_users,
    validate_name,
)
from mesh.wire.v1 import ledger_pb2 as lpb

logger = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


class UsersAdmin:
    def __init__(
        self, path: Path, book: UserBook, *, default_privacy: Privacy, node_id: str = ""
    ) -> None:
        self._path = path
        self._book = book
        self._default_privacy = default_privacy
        self._node_id = node_id

    @classmethod
    def open(cls, home: Home, *, default_privacy: Privacy, node_id: str = "") -> UsersAdmin:
        """Load HOME/users.json (a missing file is no users; a bad one is a ConfigError)."""
        return cls(
            home.users_file,
            load_users(home.users_file),
            default_privacy=default_privacy,
            node_id=node_id,
        )

    def get(self, name: str) -> UserRecord | None:
        return self._book.get(name)

    def home_of(self, record: UserRecord) -> str:
        """The node keeping this user's quota (a user from before homes: this one)."""
        return record.home_node_id or self._node_id

    def entries(self) -> list[lpb.UserEntry]:
        return [entry_to_pb(r) for r in self._book.entries()]

    def digest(self) -> bytes:
        return self._book.digest()

    def merge(self, entries: list[lpb.UserEntry]) -> int:
        """Another member's list: take what is newer, save, and say how many changed.
        Entries that do not check out are skipped (and logged once per call)."""
        incoming = []
        for entry in entries[:MAX_USERS]:
            try:
                incoming.append(entry_from_pb(entry))
            except ValueError as exc:
                logger.warning("skipped a user entry from another member: %s", exc)
        staged = self._book.copy()
        changed = staged.merge(incoming)
        if changed:
            save_users(self._path, staged)
            self._book = staged
            for record in changed:
                logger.info(
                    "user %s %s (from another member)",
                    record.name,
                    "removed" if record.removed else "updated",
                )
        return len(changed)

    def __len__(self) -> int:
        return len(self._book)

    def caller(self, authorization: str | None, *, loopback: bool) -> Caller:
        return self._book.caller(authorization, loopback=loopback)

    def describe(self) -> dict[str, Any]:
        return {"users": [record.describe() for record in self._book]}

    def add(
        self, *, name: str, privacy: Privacy | None, quota: Quota = UNLIMITED
    ) -> dict[str, Any]:
        """Add a user (privacy: the node's default when not given), with this node as
        their home; the answer holds the API key, the only time it is ever shown."""
        staged = self._book.copy()
        record, key = staged.add(
            name,
            privacy or self._default_privacy,
            now_ms=_now_ms(),
            quota=quota,
            home_node_id=self._node_id,
        )
        save_users(self._path, staged)
        self._book = staged
        logger.info(
            "added user %s (privacy %s, quota %s)",
            record.name,
            record.privacy.value,
            record.quota.spec,
        )
        return {**record.describe(), "api_key": key}

    def update(
        self, name: str, *, privacy: Privacy | None = None, quota: Quota | None = None
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if privacy is not None:
            changes["privacy"] = privacy
        if quota is not None:
            changes["quota"] = quota
        staged = self._book.copy()
        record = staged.update(validate_name(name), now_ms=_now_ms(), **changes)
        save_users(self._path, staged)
        self._book = staged
        logger.info(
            "user %s now: privacy %s, quota %s",
            record.name,
            record.privacy.value,
            record.quota.spec,
        )
        return record.describe()

    def remove(self, name: str) -> dict[str, Any]:
        staged = self._book.copy()
        record = staged.remove(validate_name(name), now_ms=_now_ms())
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
