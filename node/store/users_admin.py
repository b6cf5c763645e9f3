"""The node's users: who a request comes from, adding or removing users, and the users file
(`load_users`, `save_users`; its format is `mesh.quota.users`').

The running node holds the users in memory and is the only writer of `users.json`
(through the loopback-only `/allerac/users` endpoints that `allerac user ...` calls), so
there is no race between a command and the daemon, and a removed key is refused from the
very next request on. A change is written to disk first and takes effect only once saved.

Users are the mesh's: a user added here has this node as home (it keeps their quota),
and members exchange their lists (`merge`, pulled with the ledger), so a key works on
every box a moment later. Every change made here is signed by this node; another
member's entry is kept only when its signer was allowed to make it (`mesh.quota.users.
may_change`: the user's home or an admin, not dated ahead, not after a revocation).

A users file with a bad entry does not stop the node: the entry is named in the log,
the file as it was is copied to `users.json.bad-TIME` before anything rewrites it, and
the rest of the users load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from mesh.clock import SYSTEM, Clock
from mesh.config import is_loopback_host
from mesh.errors import ConfigError, MeshError, PermissionDenied
from mesh.quota.rules import UNLIMITED, Quota
from mesh.quota.users import (
    MAX_USERS,
    MAX_USERS_FILE_BYTES,
    Caller,
    UserBook,
    UserRecord,
    dump_users,
    entry_from_pb,
    entry_to_pb,
    parse_users,
    sign_record,
    validate_name,
)
from mesh.routing.scheduler import Privacy
from mesh.trust.membership import Membership, Role, verify_cert
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.files import read_owner_only, write_private
from node.store.home import Home
from node.store.trust_store import TrustStore

logger = logging.getLogger(__name__)


def load_users(path: Path, *, now_ms: int | None = None) -> UserBook:
    """The users saved at `path`; an empty book when there is no file yet."""
    data = read_owner_only(
        path, what="users file", max_bytes=MAX_USERS_FILE_BYTES, error=ConfigError
    )
    if data is None:
        return UserBook()
    return parse_users(data, source=f"users file {path}", now_ms=now_ms)


def save_users(path: Path, book: UserBook) -> None:
    try:
        write_private(path, dump_users(book))
    except OSError as exc:
        raise ConfigError(f"cannot write users file {path}: {exc.strerror}") from exc


class UsersAdmin:
    def __init__(
        self,
        path: Path,
        book: UserBook,
        *,
        default_privacy: Privacy,
        trust: TrustStore,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._path = path
        self._book = book
        self._default_privacy = default_privacy
        self._trust = trust
        self._node_id = trust.identity.node_id
        self._changing = asyncio.Lock()  # one change at a time, each on the last one's book

    @classmethod
    def open(
        cls, home: Home, *, default_privacy: Privacy, trust: TrustStore, clock: Clock = SYSTEM
    ) -> UsersAdmin:
        """Load HOME/users.json (a missing file is no users; one that cannot be read as a
        whole is a ConfigError; a bad entry is set aside, named, and the file kept)."""
        book = load_users(home.users_file, now_ms=clock.now_ms())
        if book.set_aside:
            kept = home.users_file.with_name(f"{home.users_file.name}.bad-{clock.now_ms()}")
            shutil.copy2(home.users_file, kept)
            kept.chmod(0o600)
            for where, why in book.set_aside:
                logger.error(
                    "users file %s: %s was set aside and is not used: %s (the file as it "
                    "was is kept in %s)",
                    home.users_file,
                    where,
                    why,
                    kept,
                )
        admin = cls(
            home.users_file, book, default_privacy=default_privacy, trust=trust, clock=clock
        )
        admin._sign_own()
        return admin

    def _sign_own(self) -> None:
        """Users from before signatures whose home is this node: sign them now, so they
        travel (other members keep only signed entries)."""
        unsigned = [
            r
            for r in self._book.entries()
            if not r.signer_node_id and r.home_node_id in ("", self._node_id)
        ]
        if not unsigned:
            return
        staged = self._book.copy()
        for record in unsigned:
            staged.replace_record(
                self._signed(dataclasses.replace(record, home_node_id=self._node_id))
            )
        self._save(staged)

    def _may_change_here(self, name: str) -> None:
        """Only the user's home or an admin may change a user (the others would refuse
        the change, and the mesh would disagree)."""
        record = self._book.get(validate_name(name))
        if record is None or self._trust.role is Role.ADMIN:
            return
        home = record.home_node_id or self._node_id
        if home != self._node_id:
            raise PermissionDenied(
                f"user {record.name!r} belongs to node {home}: change them there, or on an "
                "admin of the mesh"
            )

    def _signed(self, record: UserRecord) -> UserRecord:
        return sign_record(record, self._trust.identity)

    def _save(self, staged: UserBook) -> None:
        """At start only: the writes while running go through `_save_soon`."""
        staged.signer_certs[self._node_id] = self._trust.cert.SerializeToString()
        save_users(self._path, staged)
        self._book = staged

    async def _save_soon(self, staged: UserBook) -> None:
        """Write the staged book (fsync'd) off the event loop, then make it the book; the
        caller holds `_changing`, so changes are made one after the other, each on the
        book the previous one left."""
        staged.signer_certs[self._node_id] = self._trust.cert.SerializeToString()
        await asyncio.to_thread(save_users, self._path, staged)
        self._book = staged

    def get(self, name: str) -> UserRecord | None:
        return self._book.get(name)

    def home_of(self, record: UserRecord) -> str:
        """The node keeping this user's quota (a user from before homes: this one)."""
        return record.home_node_id or self._node_id

    def entries(self) -> list[lpb.UserEntry]:
        return [entry_to_pb(r) for r in self._book.entries()]

    def digest(self) -> bytes:
        return self._book.digest()

    def user_list(self, asked_digest: bytes) -> lpb.UserList:
        """The answer to a member's users call: everything (with the certificates of the
        nodes that signed it) unless it already holds the same list."""
        digest = self._book.digest()
        reply = lpb.UserList(digest=digest)
        if asked_digest != digest:
            entries = self._book.entries()
            reply.users.extend(entry_to_pb(r) for r in entries)
            signers = {r.signer_node_id for r in entries}
            certs = {**self._book.signer_certs, self._node_id: self._trust.cert.SerializeToString()}
            reply.signer_certs.extend(certs[n] for n in sorted(signers) if n in certs)
        return reply

    def _verified_signers(
        self, certs: list[bytes], now_ms: int
    ) -> dict[str, tuple[Membership, bytes]]:
        """The signers' certificates that prove membership of this mesh (revoked ones too:
        what they signed before their revocation stays good)."""
        out: dict[str, tuple[Membership, bytes]] = {}
        for raw in [*certs[:MAX_USERS], *self._book.signer_certs.values()]:
            signed = tpb.SignedCert()
            try:
                signed.ParseFromString(raw)
                membership = verify_cert(
                    signed, mesh_public_key=self._trust.mesh_public_key, now_ms=now_ms
                )
            except (DecodeError, MeshError):
                continue
            out.setdefault(membership.node_id, (membership, raw))
        me = self._trust.membership
        if me is not None:
            out[self._node_id] = (me, self._trust.cert.SerializeToString())
        return out

    async def merge(self, listed: lpb.UserList | list[lpb.UserEntry]) -> int:
        async with self._changing:
            return await self._merge(listed)

    async def _merge(self, listed: lpb.UserList | list[lpb.UserEntry]) -> int:
        """Another member's list: take what is newer and allowed, save, and say how many
        changed. Entries that do not check out are skipped (and logged)."""
        entries = list(listed.users) if isinstance(listed, lpb.UserList) else listed
        certs = list(listed.signer_certs) if isinstance(listed, lpb.UserList) else []
        now = self._clock.now_ms()
        incoming = []
        for entry in entries[:MAX_USERS]:
            try:
                incoming.append(entry_from_pb(entry))
            except ValueError as exc:
                logger.warning("skipped a user entry from another member: %s", exc)
        signers = self._verified_signers(certs, now)
        staged = self._book.copy()
        changed, refused = staged.merge(
            incoming,
            signers={n: m for n, (m, _) in signers.items()},
            now_ms=now,
            revoked_at=self._trust.revoked_at,
        )
        for name, why in refused[:10]:
            logger.warning("refused a change to user %s from another member: %s", name, why)
        if changed:
            for record in changed:
                if record.signer_node_id in signers:
                    staged.signer_certs[record.signer_node_id] = signers[record.signer_node_id][1]
            await self._save_soon(staged)
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

    async def add(
        self, *, name: str, privacy: Privacy | None, quota: Quota = UNLIMITED
    ) -> dict[str, Any]:
        """Add a user (privacy: the node's default when not given), with this node as
        their home; the answer holds the API key, the only time it is ever shown."""
        async with self._changing:
            return await self._add(name=name, privacy=privacy, quota=quota)

    async def _add(self, *, name: str, privacy: Privacy | None, quota: Quota) -> dict[str, Any]:
        staged = self._book.copy()
        record, key = staged.add(
            name,
            privacy or self._default_privacy,
            now_ms=self._clock.now_ms(),
            quota=quota,
            home_node_id=self._node_id,
        )
        record = self._signed(record)
        staged.replace_record(record)
        await self._save_soon(staged)
        logger.info(
            "added user %s (privacy %s, quota %s)",
            record.name,
            record.privacy.value,
            record.quota.spec,
        )
        return {**record.describe(), "api_key": key}

    async def update(
        self, name: str, *, privacy: Privacy | None = None, quota: Quota | None = None
    ) -> dict[str, Any]:
        async with self._changing:
            return await self._update(name, privacy=privacy, quota=quota)

    async def _update(
        self, name: str, *, privacy: Privacy | None, quota: Quota | None
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if privacy is not None:
            changes["privacy"] = privacy
        if quota is not None:
            changes["quota"] = quota
        self._may_change_here(name)
        staged = self._book.copy()
        record = self._signed(
            staged.update(validate_name(name), now_ms=self._clock.now_ms(), **changes)
        )
        staged.replace_record(record)
        await self._save_soon(staged)
        logger.info(
            "user %s now: privacy %s, quota %s",
            record.name,
            record.privacy.value,
            record.quota.spec,
        )
        return record.describe()

    async def remove(self, name: str) -> dict[str, Any]:
        async with self._changing:
            return await self._remove(name)

    async def _remove(self, name: str) -> dict[str, Any]:
        self._may_change_here(name)
        staged = self._book.copy()
        record = staged.remove(validate_name(name), now_ms=self._clock.now_ms())
        tombstone = staged.get_entry(record.name)
        staged.replace_record(self._signed(tombstone))
        await self._save_soon(staged)
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
