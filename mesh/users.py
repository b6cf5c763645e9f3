"""Users and their API keys, and what each key may ask for (DESIGN.md "Interface contract").

A user is a name, the SHA-256 of their API key and a privacy policy. The key itself is
`amk_` + 256 random bits (base64url): shown once when the user is added and never stored,
so a copy of the data dir cannot be used to call the API. Presenting a key means hashing it
and looking the hash up; the hash of a 256-bit secret needs no slow KDF, and a dict lookup
by hash leaks nothing useful about the key through timing.

Who is calling (`UserBook.caller`):

- a valid `Authorization: Bearer KEY` -> that user, whatever the client's address;
- a key that is malformed, unknown or removed -> 401, also from loopback;
- no key from loopback -> the box's owner (user ""), any privacy policy;
- no key from anywhere else -> 401: beyond loopback, only keys open the API.

A key's privacy policy is its default and its ceiling (`effective_privacy`): a request may
ask for a stricter policy (local-only is stricter than mesh, mesh than any), never a looser
one.

On disk: `$ALLERAC_HOME/users.json`, mode 0600, written only by the running node:

    {"version": 1, "users": [{"name": "alice", "key_hash": "<64 hex>",
                              "privacy": "mesh", "created_at_ms": 1767225600000}]}

Loading checks everything and refuses (without touching the file) anything it does not
understand: a newer version, an unknown field, a bad name or hash, duplicates, a file other
users could read or write.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import (
    ConfigError,
    InvalidRequest,
    MeshError,
    PrivacyNotAllowed,
    Unauthenticated,
    UserExists,
    UserNotFound,
)
from mesh.home import read_owner_only, write_private
from mesh.scheduler import Privacy

KEY_PREFIX = "amk_"
KEY_RANDOM_BYTES = 32
# token_urlsafe(32) is 43 base64url characters (no padding).
_KEY_FORMAT = re.compile(r"amk_[A-Za-z0-9_-]{43}")
_NAME_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH_FORMAT = re.compile(r"[0-9a-f]{64}")
MAX_AUTHORIZATION_CHARS = 1024
FORMAT_VERSION = 1
MAX_USERS = 10_000
MAX_USERS_FILE_BYTES = 4 * 1024 * 1024
_MAX_TIME_MS = (1 << 63) - 1
_FILE_FIELDS = frozenset({"version", "users"})
_RECORD_FIELDS = frozenset({"name", "key_hash", "privacy", "created_at_ms"})

# How far each policy lets a request travel; a larger number is looser.
_REACH = {Privacy.LOCAL_ONLY: 0, Privacy.MESH: 1, Privacy.ANY: 2}


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def validate_name(name: object) -> str:
    if not isinstance(name, str) or _NAME_FORMAT.fullmatch(name) is None:
        shown = repr(name)[:80]
        raise InvalidRequest(
            f"a user name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit; got {shown}",
            param="name",
        )
    return name


def effective_privacy(ceiling: Privacy, requested: Privacy | None) -> Privacy:
    """The policy a key's request runs under: the key's own unless it asks for a stricter
    one; asking for a looser one is refused."""
    if requested is None:
        return ceiling
    if _REACH[requested] > _REACH[ceiling]:
        stricter = [p.value for p in Privacy if _REACH[p] <= _REACH[ceiling]]
        raise PrivacyNotAllowed(
            f"this API key's privacy policy is {ceiling.value}: a request may ask for "
            f"{' or '.join(stricter)}, not {requested.value}",
            param="x-allerac-privacy",
        )
    return requested


def bearer_key(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer KEY` header (RFC 6750 section 2.1); None when
    there is no header."""
    if authorization is None:
        return None
    malformed = Unauthenticated("the Authorization header must be: Bearer API_KEY")
    if len(authorization) > MAX_AUTHORIZATION_CHARS:
        raise malformed
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise malformed
    return key


@dataclass(frozen=True, kw_only=True, slots=True)
class UserRecord:
    name: str
    key_hash: str
    privacy: Privacy
    created_at_ms: int

    def describe(self) -> dict[str, Any]:
        """What may be shown about a user: never the hash."""
        return {
            "name": self.name,
            "privacy": self.privacy.value,
            "created_at_ms": self.created_at_ms,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Caller:
    """Who sent a request: a user, or the box's owner (user "", no privacy ceiling)."""

    user: str
    ceiling: Privacy | None

    def privacy_for(self, requested: Privacy | None) -> Privacy | None:
        """The policy to run under; None means "the node's configured default"."""
        if self.ceiling is None:
            return requested
        return effective_privacy(self.ceiling, requested)


OWNER = Caller(user="", ceiling=None)


class UserBook:
    """Every user of one node, by name and by key hash."""

    def __init__(self, records: tuple[UserRecord, ...] | list[UserRecord] = ()) -> None:
        self._by_name: dict[str, UserRecord] = {}
        self._by_hash: dict[str, UserRecord] = {}
        for record in records:
            self._insert(record)

    def _insert(self, record: UserRecord) -> None:
        if record.name in self._by_name:
            raise UserExists(f"a user named {record.name!r} already exists", param="name")
        if record.key_hash in self._by_hash:
            raise UserExists(f"user {record.name!r} has the same key as another user")
        if len(self._by_name) >= MAX_USERS:
            raise InvalidRequest(f"a node has at most {MAX_USERS} users")
        self._by_name[record.name] = record
        self._by_hash[record.key_hash] = record

    def __iter__(self) -> Iterator[UserRecord]:
        return iter(sorted(self._by_name.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def copy(self) -> UserBook:
        return UserBook(list(self._by_name.values()))

    def add(self, name: str, privacy: Privacy, *, now_ms: int) -> tuple[UserRecord, str]:
        """Add a user; returns their record and their API key (the only time it exists)."""
        key = new_api_key()
        record = UserRecord(
            name=validate_name(name),
            key_hash=hash_api_key(key),
            privacy=privacy,
            created_at_ms=now_ms,
        )
        self._insert(record)
        return record, key

    def remove(self, name: str) -> UserRecord:
        record = self._by_name.pop(name, None)
        if record is None:
            raise UserNotFound(f"no user named {name[:80]!r}", param="name")
        del self._by_hash[record.key_hash]
        return record

    def authenticate(self, key: str) -> UserRecord:
        record = (
            self._by_hash.get(hash_api_key(key)) if _KEY_FORMAT.fullmatch(key) is not None else None
        )
        if record is None:
            raise Unauthenticated("invalid API key (wrong, or its user was removed)")
        return record

    def caller(self, authorization: str | None, *, loopback: bool) -> Caller:
        """Who sent a request with this Authorization header, from loopback or not."""
        try:
            key = bearer_key(authorization)
            if key is None:
                if loopback:
                    return OWNER
                raise Unauthenticated(
                    "an API key is required beyond this box: send Authorization: Bearer API_KEY "
                    "(the box's owner creates keys with: allerac user add NAME)"
                )
            record = self.authenticate(key)
        except Unauthenticated as exc:
            if loopback and authorization is not None:
                # The owner's tools often insist on sending some key: say how to be the owner.
                raise Unauthenticated(
                    f"{exc.message}; on this box, send no key at all to act as its owner"
                ) from exc
            raise
        return Caller(user=record.name, ceiling=record.privacy)


# --- the file ---------------------------------------------------------------------------------


def dump_users(book: UserBook) -> bytes:
    body = {
        "version": FORMAT_VERSION,
        "users": [
            {
                "name": r.name,
                "key_hash": r.key_hash,
                "privacy": r.privacy.value,
                "created_at_ms": r.created_at_ms,
            }
            for r in book
        ],
    }
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out


def _record(index: int, raw: object) -> UserRecord:
    where = f"users[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    if set(raw) != _RECORD_FIELDS:
        missing = sorted(_RECORD_FIELDS - set(raw))
        unknown = sorted(set(raw) - _RECORD_FIELDS)
        raise ValueError(f"{where} has missing fields {missing} or unknown fields {unknown}")
    try:
        name = validate_name(raw["name"])
    except InvalidRequest as exc:
        raise ValueError(f"{where}.name: {exc.message}") from exc
    key_hash = raw["key_hash"]
    if not isinstance(key_hash, str) or _HASH_FORMAT.fullmatch(key_hash) is None:
        raise ValueError(f"{where}.key_hash is not 64 lowercase hex digits")
    privacy = raw["privacy"]
    if not isinstance(privacy, str) or privacy not in {p.value for p in Privacy}:
        raise ValueError(
            f"{where}.privacy must be one of {', '.join(p.value for p in Privacy)}, "
            f"got {repr(privacy)[:40]}"
        )
    created = raw["created_at_ms"]
    if (
        isinstance(created, bool)
        or not isinstance(created, int)
        or not 0 <= created <= _MAX_TIME_MS
    ):
        raise ValueError(f"{where}.created_at_ms is not a time in milliseconds")
    return UserRecord(name=name, key_hash=key_hash, privacy=Privacy(privacy), created_at_ms=created)


def parse_users(data: bytes, *, source: str = "users file") -> UserBook:
    """The users in `data` (a users.json); ConfigError naming the problem otherwise."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"{source} is not a valid users file ({problem}); it was left untouched")

    if len(data) > MAX_USERS_FILE_BYTES:
        raise bad(f"larger than {MAX_USERS_FILE_BYTES} bytes")
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except RecursionError as exc:
        raise bad("nested too deeply") from exc
    except ValueError as exc:  # bad UTF-8 or JSON, duplicate fields
        raise bad(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(body, dict):
        raise bad("not a JSON object")
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad("no version number")
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}; this node reads version {FORMAT_VERSION}")
    if set(body) != _FILE_FIELDS:
        raise bad(f"unknown fields {sorted(set(body) - _FILE_FIELDS)} or no users list")
    users = body["users"]
    if not isinstance(users, list):
        raise bad("users is not a list")
    if len(users) > MAX_USERS:
        raise bad(f"more than {MAX_USERS} users")
    try:
        return UserBook([_record(i, raw) for i, raw in enumerate(users)])
    except ValueError as exc:
        raise bad(str(exc)) from exc
    except MeshError as exc:  # duplicates
        raise bad(exc.message) from exc


def load_users(path: Path) -> UserBook:
    """The users saved at `path`; an empty book when there is no file yet."""
    data = read_owner_only(
        path, what="users file", max_bytes=MAX_USERS_FILE_BYTES, error=ConfigError
    )
    if data is None:
        return UserBook()
    return parse_users(data, source=f"users file {path}")


def save_users(path: Path, book: UserBook) -> None:
    try:
        write_private(path, dump_users(book))
    except OSError as exc:
        raise ConfigError(f"cannot write users file {path}: {exc.strerror}") from exc
