"""Users and their API keys, and what each key may ask for (DESIGN.md "Interface contract").

A user is a name, the SHA-256 of their API key, a privacy policy and a quota
(`mesh.quota.rules`), kept by the user's home node (where they were added). The key itself is
`amk_` + 256 random bits (base64url): shown once when the user is added and never stored,
so a copy of the data dir cannot be used to call the API. Presenting a key means hashing it
and looking the hash up; the hash of a 256-bit secret needs no slow KDF, and a dict lookup
by hash leaks nothing useful about the key through timing.

Who is calling (`UserBook.caller`):

- a valid `Authorization: Bearer KEY` -> that user, whatever the client's address;
- a key that is malformed, unknown or removed -> 401, also from loopback;
- no key, on a request no web page could have sent (the HTTP API decides:
  `node.api.http_api._cannot_be_a_page`; the owner token counts too) -> the box's owner
  (user ""), any privacy policy;
- no key anywhere else -> 401: only keys open the API.

A key's privacy policy is its default and its ceiling (`effective_privacy`): a request may
ask for a stricter policy (local-only is stricter than mesh, mesh than any), never a looser
one.

Users are the mesh's, not one box's: members exchange their user lists (`merge`), so a
key works on every box. Each entry carries when it last changed; the later change wins,
and a removed user stays as a tombstone so that the removal travels too.

Who may change a user: each entry is signed by the node that made the change
(`signed_bytes`), and a merge keeps it only when that node is the user's home (for a new
user: the home it names is itself) or an admin of the mesh, its membership certificate
verifies, the change is not dated after the node's revocation, and not dated past now
plus the clock skew allowed between members (60 s). So a member can add its own users
but never replace another home's key or quota, nor win every later merge with a date in
the far future.

On disk (`node.store.users_admin` reads and writes it): `$ALLERAC_HOME/users.json`, mode
0600, written only by the running node:

    {"version": 3, "users": [{"name": "alice", "key_hash": "<64 hex>", "privacy": "mesh",
                              "quota": "cloud=1M/month", "home_node_id": "<node ID>",
                              "created_at_ms": 1767225600000, "updated_at_ms": 1767225600000,
                              "removed": false, "signer_node_id": "<node ID>",
                              "signature": "<128 hex>"}],
     "signers": {"<node ID>": "<base64 SignedCert>"}}

Version 1 and 2 files (unsigned) are read as they are; the node signs the users it is home
to. Loading refuses (without touching the file) what it cannot read as a whole: a newer
version, an unknown top-level field, a file other users could read or write. One bad entry
does not stop the node: it is set aside (`parse_users` returns it, with why) so that the
node can report it by name and keep a copy before it ever writes the file again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
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
from mesh.quota.rules import UNLIMITED, Quota, parse_quota
from mesh.routing.scheduler import Privacy
from mesh.trust.identity import Identity, verify_signature
from mesh.trust.membership import Membership, Role
from mesh.wire.v1 import ledger_pb2 as lpb

KEY_PREFIX = "amk_"
KEY_RANDOM_BYTES = 32
# token_urlsafe(32) is 43 base64url characters (no padding).
_KEY_FORMAT = re.compile(r"amk_[A-Za-z0-9_-]{43}")
_NAME_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH_FORMAT = re.compile(r"[0-9a-f]{64}")
MAX_AUTHORIZATION_CHARS = 1024
FORMAT_VERSION = 3
MAX_USERS = 10_000
MAX_USERS_FILE_BYTES = 4 * 1024 * 1024
_MAX_TIME_MS = (1 << 63) - 1
_FILE_FIELDS = frozenset({"version", "users"})
_V3_FILE_FIELDS = _FILE_FIELDS | {"signers"}
_V1_FIELDS = frozenset({"name", "key_hash", "privacy", "created_at_ms"})
_RECORD_FIELDS = _V1_FIELDS | {"quota", "home_node_id", "updated_at_ms", "removed"}
_V3_RECORD_FIELDS = _RECORD_FIELDS | {"signer_node_id", "signature"}
_SIGNATURE_FORMAT = re.compile(r"([0-9a-f]{128})?")
SIGNATURE_CONTEXT = b"allerac-mesh/v1/user-entry\x00"
# How far ahead of this node's clock a change may be dated (as for sealed requests).
CLOCK_SKEW_MS = 60_000
_NODE_ID_FORMAT = re.compile(r"[A-Z2-7-]{1,80}")

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
    quota: Quota = UNLIMITED
    home_node_id: str = ""  # the node keeping the user's quota ("": this node)
    updated_at_ms: int = 0
    removed: bool = False
    signer_node_id: str = ""  # who made this change ("": not signed, from an old file)
    signature: bytes = b""

    @property
    def version(self) -> tuple[int, str, bool]:
        """Later wins; on a tie, a deterministic order (every node picks the same)."""
        return (self.updated_at_ms or self.created_at_ms, self.key_hash, self.removed)

    def describe(self) -> dict[str, Any]:
        """What may be shown about a user: never the hash."""
        return {
            "name": self.name,
            "privacy": self.privacy.value,
            "quota": self.quota.spec,
            "home_node_id": self.home_node_id,
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


# --- who may change a user --------------------------------------------------------------------


def signed_bytes(record: UserRecord) -> bytes:
    """What the signer of a change signs: the entry's fields, canonical JSON (the same on
    every node, whatever carried the entry)."""
    body = {
        "name": record.name,
        "key_hash": record.key_hash,
        "privacy": record.privacy.value,
        "quota": record.quota.spec,
        "home_node_id": record.home_node_id,
        "created_at_ms": record.created_at_ms,
        "updated_at_ms": record.updated_at_ms,
        "removed": record.removed,
    }
    return SIGNATURE_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_record(record: UserRecord, identity: Identity) -> UserRecord:
    return replace(
        record, signer_node_id=identity.node_id, signature=identity.sign(signed_bytes(record))
    )


def may_change(
    ours: UserRecord | None,
    record: UserRecord,
    *,
    signers: Mapping[str, Membership],
    now_ms: int,
    revoked_at: Callable[[str], int | None] = lambda node_id: None,
) -> str | None:
    """Why another member's `record` must not replace `ours` (None: it may)."""
    if max(record.updated_at_ms, record.created_at_ms) > now_ms + CLOCK_SKEW_MS:
        return "it is dated in the future"
    signer = signers.get(record.signer_node_id)
    if signer is None:
        return "it is not signed by a member of this mesh"
    if not verify_signature(signer.identity_public_key, record.signature, signed_bytes(record)):
        return f"its signature by {signer.node_id[:7]} does not verify"
    revoked = revoked_at(signer.node_id)
    if revoked is not None and record.updated_at_ms >= revoked:
        return f"its signer {signer.node_id[:7]} was revoked before it was made"
    if signer.role is Role.ADMIN:
        return None
    if ours is None or ours.removed:
        if record.home_node_id != signer.node_id:
            return f"{signer.node_id[:7]} may add users only with itself as their home"
        return None
    if ours.home_node_id != signer.node_id:
        return f"only its home node {ours.home_node_id[:7]} or an admin may change it"
    if record.home_node_id != ours.home_node_id:
        return "only an admin may move a user to another home"
    return None


class UserBook:
    """Every user of the mesh this node knows, by name and by key hash; removed users
    stay as tombstones (not listed, no key) so that removals travel."""

    def __init__(self, records: tuple[UserRecord, ...] | list[UserRecord] = ()) -> None:
        self._by_name: dict[str, UserRecord] = {}  # tombstones included
        self._by_hash: dict[str, UserRecord] = {}  # live users only
        # node ID -> serialized SignedCert of the nodes that signed entries held here
        self.signer_certs: dict[str, bytes] = {}
        # Entries of the file that could not be taken: (where, why); never written back.
        self.set_aside: list[tuple[str, str]] = []
        for record in records:
            self._insert(record)

    def _insert(self, record: UserRecord) -> None:
        if record.name in self._by_name:
            raise UserExists(f"a user named {record.name!r} already exists", param="name")
        if not record.removed and record.key_hash in self._by_hash:
            raise UserExists(f"user {record.name!r} has the same key as another user")
        if len(self._by_name) >= MAX_USERS:
            raise InvalidRequest(f"a mesh has at most {MAX_USERS} users (removed ones count)")
        self._by_name[record.name] = record
        if not record.removed:
            self._by_hash[record.key_hash] = record

    def __iter__(self) -> Iterator[UserRecord]:
        """The live users, by name."""
        return iter(sorted((r for r in self._by_name.values() if not r.removed), key=_name))

    def __len__(self) -> int:
        return len(self._by_hash)

    def entries(self) -> list[UserRecord]:
        """Everything, tombstones too: what is exchanged with other members."""
        return sorted(self._by_name.values(), key=_name)

    def get(self, name: str) -> UserRecord | None:
        record = self._by_name.get(name)
        return None if record is None or record.removed else record

    def get_entry(self, name: str) -> UserRecord:
        """The entry for `name`, tombstone or not (KeyError when there is none)."""
        return self._by_name[name]

    def copy(self) -> UserBook:
        book = UserBook(list(self._by_name.values()))
        book.signer_certs = dict(self.signer_certs)
        return book

    def replace_record(self, record: UserRecord) -> None:
        """Put a (re-signed) version of a record in place, same name and key."""
        old = self._by_name[record.name]
        self._by_name[record.name] = record
        if not old.removed:
            self._by_hash[old.key_hash] = record

    def add(
        self,
        name: str,
        privacy: Privacy,
        *,
        now_ms: int,
        quota: Quota = UNLIMITED,
        home_node_id: str = "",
    ) -> tuple[UserRecord, str]:
        """Add a user; returns their record and their API key (the only time it exists).
        A removed user's name may be taken again (with a new key)."""
        key = new_api_key()
        record = UserRecord(
            name=validate_name(name),
            key_hash=hash_api_key(key),
            privacy=privacy,
            created_at_ms=now_ms,
            quota=quota,
            home_node_id=home_node_id,
            updated_at_ms=now_ms,
        )
        old = self._by_name.get(record.name)
        if old is not None and old.removed:
            # Later than the tombstone, or the tombstone would win the merge.
            later = max(now_ms, old.version[0] + 1)
            record = replace(record, created_at_ms=later, updated_at_ms=later)
            del self._by_name[record.name]
        self._insert(record)
        return record, key

    def update(self, name: str, *, now_ms: int, **changes: Any) -> UserRecord:
        """Change a live user's privacy or quota."""
        record = self.get(name)
        if record is None:
            raise UserNotFound(f"no user named {name[:80]!r}", param="name")
        later = max(now_ms, record.version[0] + 1)
        changed = replace(record, updated_at_ms=later, **changes)
        self._by_name[name] = changed
        self._by_hash[record.key_hash] = changed
        return changed

    def remove(self, name: str, *, now_ms: int = 0) -> UserRecord:
        """Remove a user: their key stops working; a tombstone remains to tell the mesh."""
        record = self.get(name)
        if record is None:
            raise UserNotFound(f"no user named {name[:80]!r}", param="name")
        del self._by_hash[record.key_hash]
        later = max(now_ms, record.version[0] + 1)
        self._by_name[name] = replace(record, removed=True, updated_at_ms=later)
        return record

    def merge(
        self,
        incoming: list[UserRecord],
        *,
        signers: Mapping[str, Membership],
        now_ms: int,
        revoked_at: Callable[[str], int | None] = lambda node_id: None,
    ) -> tuple[list[UserRecord], list[tuple[str, str]]]:
        """Take the entries from another member that are newer than ours and that their
        signer was allowed to make (`may_change`); returns what changed, and each refused
        entry's name with why. An entry whose key another live user holds is skipped."""
        changed = []
        refused: list[tuple[str, str]] = []
        for record in incoming:
            ours = self._by_name.get(record.name)
            if ours is not None and ours.version >= record.version:
                continue
            why = may_change(ours, record, signers=signers, now_ms=now_ms, revoked_at=revoked_at)
            if why is not None:
                refused.append((record.name, why))
                continue
            holder = self._by_hash.get(record.key_hash)
            if not record.removed and holder is not None and holder.name != record.name:
                continue
            if ours is None and len(self._by_name) >= MAX_USERS:
                continue
            if ours is not None and not ours.removed:
                del self._by_hash[ours.key_hash]
            self._by_name[record.name] = record
            if not record.removed:
                self._by_hash[record.key_hash] = record
            changed.append(record)
        return changed, refused

    def digest(self) -> bytes:
        """Equal on two nodes exactly when their lists are (tombstones included)."""
        return hashlib.sha256(dump_users(self)).digest()

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


def _name(record: UserRecord) -> str:
    return record.name


def entry_to_json(r: UserRecord) -> dict[str, Any]:
    return {
        "name": r.name,
        "key_hash": r.key_hash,
        "privacy": r.privacy.value,
        "quota": r.quota.spec,
        "home_node_id": r.home_node_id,
        "created_at_ms": r.created_at_ms,
        "updated_at_ms": r.updated_at_ms,
        "removed": r.removed,
        "signer_node_id": r.signer_node_id,
        "signature": r.signature.hex(),
    }


def entry_to_pb(r: UserRecord) -> lpb.UserEntry:
    return lpb.UserEntry(
        name=r.name,
        key_hash=r.key_hash,
        privacy=r.privacy.value,
        quota=r.quota.spec,
        home_node_id=r.home_node_id,
        created_at_unix_ms=r.created_at_ms,
        updated_at_unix_ms=r.updated_at_ms,
        removed=r.removed,
        signer_node_id=r.signer_node_id,
        signature=r.signature,
    )


def entry_from_pb(entry: lpb.UserEntry) -> UserRecord:
    """Another member's entry, checked as strictly as the file (ValueError otherwise)."""
    return entry_from_json(
        {
            "name": entry.name,
            "key_hash": entry.key_hash,
            "privacy": entry.privacy,
            "quota": entry.quota,
            "home_node_id": entry.home_node_id,
            "created_at_ms": entry.created_at_unix_ms,
            "updated_at_ms": entry.updated_at_unix_ms,
            "removed": entry.removed,
            "signer_node_id": entry.signer_node_id,
            "signature": entry.signature.hex(),
        }
    )


def dump_users(book: UserBook) -> bytes:
    entries = book.entries()
    signers = {r.signer_node_id for r in entries if r.signer_node_id}
    body = {
        "version": FORMAT_VERSION,
        "users": [entry_to_json(r) for r in entries],
        "signers": {
            node_id: base64.b64encode(cert).decode("ascii")
            for node_id, cert in sorted(book.signer_certs.items())
            if node_id in signers
        },
    }
    return (json.dumps(body, indent=2) + "\n").encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out


def _time(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TIME_MS:
        raise ValueError(f"{what} is not a time in milliseconds")
    return value


def entry_from_json(
    raw: object, *, where: str = "user", version: int = FORMAT_VERSION
) -> UserRecord:
    """One user entry (from the file, or from another member); ValueError naming the
    problem otherwise."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is not an object")
    fields = {1: _V1_FIELDS, 2: _RECORD_FIELDS}.get(version, _V3_RECORD_FIELDS)
    if set(raw) != fields:
        missing = sorted(fields - set(raw))
        unknown = sorted(set(raw) - fields)
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
    created = _time(raw["created_at_ms"], f"{where}.created_at_ms")
    record = UserRecord(
        name=name, key_hash=key_hash, privacy=Privacy(privacy), created_at_ms=created
    )
    if version == 1:
        return replace(record, updated_at_ms=created)
    quota = raw["quota"]
    if not isinstance(quota, str):
        raise ValueError(f"{where}.quota is not a string")
    try:
        parsed = parse_quota(quota)
    except InvalidRequest as exc:
        raise ValueError(f"{where}.quota: {exc.message}") from exc
    home = raw["home_node_id"]
    if not isinstance(home, str) or (home and _NODE_ID_FORMAT.fullmatch(home) is None):
        raise ValueError(f"{where}.home_node_id is not a node ID")
    removed = raw["removed"]
    if not isinstance(removed, bool):
        raise ValueError(f"{where}.removed is not true or false")
    record = replace(
        record,
        quota=parsed,
        home_node_id=home,
        updated_at_ms=_time(raw["updated_at_ms"], f"{where}.updated_at_ms"),
        removed=removed,
    )
    if version < 3:
        return record
    signer = raw["signer_node_id"]
    if not isinstance(signer, str) or (signer and _NODE_ID_FORMAT.fullmatch(signer) is None):
        raise ValueError(f"{where}.signer_node_id is not a node ID")
    signature = raw["signature"]
    if not isinstance(signature, str) or _SIGNATURE_FORMAT.fullmatch(signature) is None:
        raise ValueError(f"{where}.signature is not 128 hex digits")
    return replace(record, signer_node_id=signer, signature=bytes.fromhex(signature))


def parse_users(data: bytes, *, source: str = "users file", now_ms: int | None = None) -> UserBook:
    """The users in `data` (a users.json); ConfigError naming the problem when the file
    cannot be read as a whole. A bad entry (or one dated past `now_ms` plus the allowed
    skew) is set aside in `book.set_aside`, with where it is and why; the others load."""

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
    if version not in (1, 2, FORMAT_VERSION):
        raise bad(f"format version {version}; this node reads versions 1 to {FORMAT_VERSION}")
    fields = _V3_FILE_FIELDS if version >= 3 else _FILE_FIELDS
    if set(body) != fields:
        raise bad(
            f"unknown fields {sorted(set(body) - fields)} or missing {sorted(fields - set(body))}"
        )
    users = body["users"]
    if not isinstance(users, list):
        raise bad("users is not a list")
    if len(users) > MAX_USERS:
        raise bad(f"more than {MAX_USERS} users")
    book = UserBook()
    for i, raw in enumerate(users):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"users[{i}]" + (f" ({str(name)[:64]!r})" if isinstance(name, str) else "")
        try:
            record = entry_from_json(raw, where=f"users[{i}]", version=version)
            if now_ms is not None and max(record.updated_at_ms, record.created_at_ms) > (
                now_ms + CLOCK_SKEW_MS
            ):
                raise ValueError(f"users[{i}] is dated in the future")
            book._insert(record)
        except (ValueError, MeshError) as exc:
            book.set_aside.append((where, exc.message if isinstance(exc, MeshError) else str(exc)))
    if version >= 3:
        signers = body["signers"]
        if not isinstance(signers, dict):
            raise bad("signers is not an object")
        for node_id, cert in signers.items():
            if not isinstance(cert, str) or len(cert) > 8192:
                raise bad(f"signers[{str(node_id)[:80]!r}] is not a certificate")
            try:
                book.signer_certs[node_id] = base64.b64decode(cert, validate=True)
            except ValueError as exc:
                raise bad(f"signers[{str(node_id)[:80]!r}] is not base64") from exc
    return book
