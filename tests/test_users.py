"""Users and API keys without a node: keys, who a request comes from, the privacy ceiling
and the users file (Hypothesis: the parser reads a valid file back or raises ConfigError)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import (
    ConfigError,
    InvalidRequest,
    PrivacyNotAllowed,
    Unauthenticated,
    UserExists,
    UserNotFound,
)
from mesh.quota.rules import parse_quota
from mesh.quota.users import (
    KEY_PREFIX,
    OWNER,
    UserBook,
    UserRecord,
    dump_users,
    effective_privacy,
    entry_to_pb,
    hash_api_key,
    parse_users,
    sign_record,
)
from mesh.routing.scheduler import Privacy
from mesh.trust.identity import Identity
from mesh.trust.membership import MeshAuthority, Role, verify_cert
from node.store.users_admin import load_users, save_users

NOW_MS = 1_767_225_600_000
LOOSENESS = [Privacy.LOCAL_ONLY, Privacy.MESH, Privacy.ANY]


def test_a_new_key_is_recognisable_random_and_only_its_hash_is_kept() -> None:
    book = UserBook()
    alice, alice_key = book.add("alice", Privacy.MESH, now_ms=NOW_MS)
    _, bob_key = book.add("bob", Privacy.MESH, now_ms=NOW_MS)
    assert alice_key.startswith(KEY_PREFIX)
    assert len(alice_key) >= len(KEY_PREFIX) + 43  # 256 random bits in base64url
    assert alice_key != bob_key
    assert alice.key_hash == hash_api_key(alice_key) != alice_key
    saved = dump_users(book).decode()
    assert alice_key not in saved
    assert bob_key not in saved
    assert alice.key_hash in saved


def test_authenticate_finds_the_user_and_refuses_anything_else() -> None:
    book = UserBook()
    alice, key = book.add("alice", Privacy.LOCAL_ONLY, now_ms=NOW_MS)
    assert book.authenticate(key) == alice
    for wrong in ["", key + "x", key[:-1], key.upper(), alice.key_hash, "amk_" + "A" * 43]:
        with pytest.raises(Unauthenticated) as info:
            book.authenticate(wrong)
        assert info.value.http_status == 401
        assert info.value.code == "invalid_api_key"


def test_a_removed_user_is_refused_and_unknown_names_are_named() -> None:
    book = UserBook()
    _, key = book.add("alice", Privacy.MESH, now_ms=NOW_MS)
    book.remove("alice")
    with pytest.raises(Unauthenticated, match="removed"):
        book.authenticate(key)
    with pytest.raises(UserNotFound, match="no user named 'alice'"):
        book.remove("alice")


@pytest.mark.parametrize(
    "name", ["", "-alice", ".x", "a b", "a/b", "ä", "x" * 65, "alice\n", "a:b"]
)
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidRequest, match="1 to 64 letters") as info:
        UserBook().add(name, Privacy.MESH, now_ms=NOW_MS)
    assert info.value.param == "name"


def test_a_name_is_taken_only_once() -> None:
    book = UserBook()
    book.add("alice", Privacy.MESH, now_ms=NOW_MS)
    with pytest.raises(UserExists, match="already exists") as info:
        book.add("alice", Privacy.ANY, now_ms=NOW_MS)
    assert info.value.http_status == 409
    assert [r.privacy for r in book] == [Privacy.MESH]


def test_a_copy_changes_without_touching_the_original() -> None:
    book = UserBook()
    book.add("alice", Privacy.MESH, now_ms=NOW_MS)
    staged = book.copy()
    staged.remove("alice")
    staged.add("bob", Privacy.MESH, now_ms=NOW_MS)
    assert [r.name for r in book] == ["alice"]
    assert [r.name for r in staged] == ["bob"]


# --- the privacy ceiling ------------------------------------------------------------------------


@pytest.mark.parametrize("ceiling", LOOSENESS)
def test_no_requested_policy_means_the_keys_own(ceiling: Privacy) -> None:
    assert effective_privacy(ceiling, None) is ceiling


@pytest.mark.parametrize("ceiling", LOOSENESS)
@pytest.mark.parametrize("requested", LOOSENESS)
def test_stricter_is_granted_looser_is_refused(ceiling: Privacy, requested: Privacy) -> None:
    if LOOSENESS.index(requested) <= LOOSENESS.index(ceiling):
        assert effective_privacy(ceiling, requested) is requested
        return
    with pytest.raises(PrivacyNotAllowed) as info:
        effective_privacy(ceiling, requested)
    assert info.value.http_status == 403
    assert info.value.code == "privacy_not_allowed"
    assert f"privacy policy is {ceiling.value}" in info.value.message
    assert requested.value in info.value.message


# --- who is calling -----------------------------------------------------------------------------


def test_callers_by_key_and_by_address() -> None:
    book = UserBook()
    _, key = book.add("alice", Privacy.LOCAL_ONLY, now_ms=NOW_MS)
    for loopback in (True, False):
        caller = book.caller(f"Bearer {key}", loopback=loopback)
        assert caller.user == "alice"
        assert caller.privacy_for(None) is Privacy.LOCAL_ONLY
        with pytest.raises(PrivacyNotAllowed):
            caller.privacy_for(Privacy.MESH)
        assert book.caller(f"bearer   {key} ", loopback=loopback).user == "alice"
    owner = book.caller(None, loopback=True)
    assert owner == OWNER
    assert owner.user == ""
    assert owner.privacy_for(None) is None  # the node's configured default
    assert owner.privacy_for(Privacy.ANY) is Privacy.ANY
    with pytest.raises(Unauthenticated, match="an API key is required"):
        book.caller(None, loopback=False)


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "amk_x", "Bearer wrong", "Token abc"]
)
@pytest.mark.parametrize("loopback", [True, False])
def test_a_bad_authorization_header_is_refused_even_on_loopback(
    header: str, loopback: bool
) -> None:
    with pytest.raises(Unauthenticated) as info:
        UserBook().caller(header, loopback=loopback)
    # On loopback the error says how to be the owner instead.
    assert ("send no key at all" in info.value.message) is loopback


def test_an_absurdly_long_header_is_refused_before_hashing() -> None:
    with pytest.raises(Unauthenticated, match="Bearer API_KEY"):
        UserBook().caller("Bearer " + "a" * 100_000, loopback=False)


# --- the file -----------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    assert len(load_users(path)) == 0  # no file yet: no users
    book = UserBook()
    _, key = book.add("alice", Privacy.ANY, now_ms=NOW_MS)
    book.add("bob.smith", Privacy.LOCAL_ONLY, now_ms=NOW_MS + 1)
    save_users(path, book)
    assert path.stat().st_mode & 0o777 == 0o600
    assert key not in path.read_text()
    again = load_users(path)
    assert list(again) == list(book)
    assert again.authenticate(key).name == "alice"
    assert json.loads(path.read_text())["version"] == 3


def test_a_version_1_file_is_read_as_it_is(tmp_path: Path) -> None:
    book = parse_users(_file([GOOD]))
    [alice] = list(book)
    assert (alice.name, alice.quota.spec, alice.home_node_id, alice.removed) == (
        "alice",
        "unlimited",
        "",
        False,
    )
    assert alice.updated_at_ms == NOW_MS


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_file_open_to_other_users_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "users.json"
    save_users(path, UserBook())
    path.chmod(mode)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        load_users(path)


def test_a_directory_or_a_symlink_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "users.json"
    folder.mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        load_users(folder)
    real = tmp_path / "real.json"
    save_users(real, UserBook())
    link = tmp_path / "link.json"
    os.symlink(real, link)
    with pytest.raises(ConfigError, match="cannot open users file"):
        load_users(link)


def _file(users: list[dict[str, object]], **top: object) -> bytes:
    return json.dumps({"version": 1, "users": users, **top}).encode()


def _file2(users: list[dict[str, object]]) -> bytes:
    return json.dumps({"version": 2, "users": users}).encode()


GOOD = {"name": "alice", "key_hash": "ab" * 32, "privacy": "mesh", "created_at_ms": NOW_MS}
GOOD2 = {
    **GOOD,
    "quota": "cloud=1M/month",
    "home_node_id": "ABCDEFG-HIJKLMN",
    "updated_at_ms": NOW_MS,
    "removed": False,
}

BAD_FILES = [
    ("not JSON", b"{", "JSONDecodeError"),
    ("not UTF-8", b'{"version": 1, "users": ["\xff"]}', "UnicodeDecodeError"),
    ("a list", b"[]", "not a JSON object"),
    ("no version", json.dumps({"users": []}).encode(), "no version number"),
    ("a newer version", json.dumps({"version": 4, "users": []}).encode(), "format version 4"),
    ("version as bool", json.dumps({"version": True, "users": []}).encode(), "no version"),
    ("unknown top field", _file([], extra=1), "unknown fields ['extra']"),
    ("users not a list", json.dumps({"version": 1, "users": {}}).encode(), "not a list"),
    ("duplicate JSON field", b'{"version": 1, "version": 1, "users": []}', "duplicate field"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (
        "v3 signers not an object",
        json.dumps({"version": 3, "users": [], "signers": []}).encode(),
        "signers",
    ),
]

# One bad entry does not make the file unreadable: it is set aside, named, and the rest load.
BAD_ENTRIES = [
    ("record not an object", _file(["alice"]), "users[0] is not an object"),
    ("missing field", _file([{k: v for k, v in GOOD.items() if k != "privacy"}]), "'privacy'"),
    ("unknown field", _file([{**GOOD, "key": "amk_x"}]), "unknown fields ['key']"),
    ("bad name", _file([{**GOOD, "name": "-x"}]), "users[0].name"),
    ("short hash", _file([{**GOOD, "key_hash": "ab"}]), "users[0].key_hash"),
    ("upper-case hash", _file([{**GOOD, "key_hash": "AB" * 32}]), "users[0].key_hash"),
    ("bad privacy", _file([{**GOOD, "privacy": "public"}]), "users[0].privacy"),
    ("negative time", _file([{**GOOD, "created_at_ms": -1}]), "created_at_ms"),
    ("time as bool", _file([{**GOOD, "created_at_ms": True}]), "created_at_ms"),
    ("time as float", _file([{**GOOD, "created_at_ms": 1.5}]), "created_at_ms"),
    ("duplicate name", _file([GOOD, {**GOOD, "key_hash": "cd" * 32}]), "already exists"),
    ("duplicate hash", _file([GOOD, {**GOOD, "name": "bob"}]), "same key"),
    ("v2 without its fields", _file([GOOD], version=2), "missing fields"),
    ("bad quota", _file2([{**GOOD2, "quota": "cloud=lots"}]), "users[0].quota"),
    ("quota not a string", _file2([{**GOOD2, "quota": 5}]), "users[0].quota"),
    ("bad home", _file2([{**GOOD2, "home_node_id": "../x"}]), "home_node_id"),
    ("removed not a bool", _file2([{**GOOD2, "removed": 1}]), "removed"),
    ("bad update time", _file2([{**GOOD2, "updated_at_ms": "now"}]), "updated_at_ms"),
]


@pytest.mark.parametrize(
    ("data", "problem"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_a_bad_file_is_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_users(data, source="users file /h/users.json")
    assert problem in info.value.message
    assert "users file /h/users.json is not a valid users file" in info.value.message
    assert "left untouched" in info.value.message


@pytest.mark.parametrize(
    ("data", "problem"), [b[1:] for b in BAD_ENTRIES], ids=[b[0] for b in BAD_ENTRIES]
)
def test_a_bad_entry_is_set_aside_naming_the_problem(data: bytes, problem: str) -> None:
    book = parse_users(data, source="users file /h/users.json")
    assert len(book.set_aside) == 1, book.set_aside
    where, why = book.set_aside[0]
    assert where.startswith("users[")
    assert problem in why
    assert len(book) <= 1  # whatever else was good loaded


def test_an_entry_dated_in_the_future_is_set_aside() -> None:
    late = {**GOOD2, "name": "mallory", "key_hash": "cd" * 32, "updated_at_ms": (1 << 63) - 1}
    book = parse_users(_file2([GOOD2, late]), now_ms=NOW_MS)
    assert [r.name for r in book] == ["alice"]
    assert book.set_aside == [("users[1] ('mallory')", "users[1] is dated in the future")]


def test_a_bad_file_on_disk_is_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(b'{"version": 1, "users": {"name": "alice"}}')
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=str(path)):
        load_users(path)
    assert path.read_bytes() == before


names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
records = st.builds(
    UserRecord,
    name=names,
    key_hash=st.binary(min_size=32, max_size=32).map(bytes.hex),
    privacy=st.sampled_from(list(Privacy)),
    created_at_ms=st.integers(0, (1 << 63) - 1),
    quota=st.sampled_from(["unlimited", "cloud=1M/month", "mesh=50k/day,cloud=2G"]).map(
        parse_quota
    ),
    home_node_id=st.sampled_from(["", "ABCDEFG-HIJKLMN"]),
    updated_at_ms=st.integers(0, (1 << 63) - 1),
    removed=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=8, unique_by=(lambda r: r.name, lambda r: r.key_hash)))
def test_any_book_survives_the_file(users: list[UserRecord]) -> None:
    book = UserBook(users)
    again = parse_users(dump_users(book))
    assert again.entries() == sorted(users, key=lambda r: r.name)
    assert list(again) == sorted((u for u in users if not u.removed), key=lambda r: r.name)


class Box:
    """A member of one test mesh: its identity, role and verified membership."""

    def __init__(self, authority: MeshAuthority, role: Role) -> None:
        self.identity = Identity.generate()
        cert = authority.issue(
            self.identity.public_key_raw, role=role, now_ms=NOW_MS - 1000, ttl_ms=10**12
        )
        self.cert = cert
        self.membership = verify_cert(cert, mesh_public_key=authority.public_key, now_ms=NOW_MS)
        self.node_id = self.identity.node_id
        self.book = UserBook()

    def add(self, name: str, **kwargs: Any) -> tuple[UserRecord, str]:
        record, key = self.book.add(
            name,
            kwargs.pop("privacy", Privacy.MESH),
            now_ms=kwargs.pop("now_ms", NOW_MS),
            home_node_id=self.node_id,
            **kwargs,
        )
        signed = sign_record(record, self.identity)
        self.book.replace_record(signed)
        return signed, key

    def change(self, name: str, now_ms: int, **changes: Any) -> None:
        self.book.replace_record(
            sign_record(self.book.update(name, now_ms=now_ms, **changes), self.identity)
        )

    def remove(self, name: str, now_ms: int) -> None:
        self.book.remove(name, now_ms=now_ms)
        self.book.replace_record(sign_record(self.book.get_entry(name), self.identity))


@pytest.fixture
def mesh() -> dict[str, Box]:
    authority = MeshAuthority.generate()
    return {
        "home": Box(authority, Role.MEMBER),
        "other": Box(authority, Role.MEMBER),
        "admin": Box(authority, Role.ADMIN),
    }


def merge(
    into: Box, entries: list[UserRecord], mesh: dict[str, Box], **kw: Any
) -> tuple[list[str], list[tuple[str, str]]]:
    signers = {box.node_id: box.membership for box in mesh.values()}
    changed, refused = into.book.merge(
        entries, signers=signers, now_ms=kw.pop("now_ms", NOW_MS + 60_000), **kw
    )
    return [r.name for r in changed], refused


def test_merging_takes_the_later_change_and_removals_travel(mesh: dict[str, Box]) -> None:
    here, there = mesh["home"], mesh["other"]
    _, key = here.add("alice", quota=parse_quota("cloud=1k"))
    assert merge(there, here.book.entries(), mesh) == (["alice"], [])
    assert there.book.authenticate(key).quota.spec == "cloud=1k/month"
    assert merge(there, here.book.entries(), mesh) == ([], [])  # nothing newer
    assert there.book.digest() == here.book.digest()
    here.change("alice", NOW_MS + 5, quota=parse_quota("cloud=2k"))
    merge(there, here.book.entries(), mesh)
    assert there.book.authenticate(key).quota.spec == "cloud=2k/month"
    here.remove("alice", NOW_MS + 9)
    merge(there, here.book.entries(), mesh)
    with pytest.raises(Unauthenticated):
        there.book.authenticate(key)
    assert list(there.book) == []
    # An older copy of alice arriving late does not bring her back.
    old = dataclasses.replace(here.book.get_entry("alice"), removed=False, updated_at_ms=1)
    assert merge(there, [sign_record(old, here.identity)], mesh) == ([], [])
    # Added again, with a new key: later than the tombstone, so it wins everywhere.
    _, new_key = here.add("alice", privacy=Privacy.ANY, now_ms=NOW_MS + 10)
    merge(there, here.book.entries(), mesh)
    assert there.book.authenticate(new_key).privacy is Privacy.ANY
    with pytest.raises(Unauthenticated):
        there.book.authenticate(key)


def test_a_merged_entry_may_not_take_another_users_key(mesh: dict[str, Box]) -> None:
    here = mesh["home"]
    alice, _ = here.add("alice")
    thief = sign_record(
        dataclasses.replace(alice, name="mallory", updated_at_ms=NOW_MS + 1), here.identity
    )
    assert merge(here, [thief], mesh)[0] == []
    assert [r.name for r in here.book] == ["alice"]


def test_only_the_home_or_an_admin_may_change_a_user(mesh: dict[str, Box]) -> None:
    """The takeover of issue 12: a member re-signs another home's user with its own key,
    dated far in the future. Every box refuses it; the home's and an admin's changes go."""
    home, other, admin = mesh["home"], mesh["other"], mesh["admin"]
    alice, key = home.add("alice")
    merge(other, home.book.entries(), mesh)
    merge(admin, home.book.entries(), mesh)
    stolen_key = "amk_" + "x" * 43
    for forged, why in [
        (
            dataclasses.replace(alice, key_hash=hash_api_key(stolen_key), updated_at_ms=NOW_MS + 5),
            "only its home node",
        ),
        (
            dataclasses.replace(alice, home_node_id=other.node_id, updated_at_ms=NOW_MS + 5),
            "only its home node",
        ),
        (
            dataclasses.replace(
                alice, quota=parse_quota("cloud=unlimited"), updated_at_ms=(1 << 63) - 1
            ),
            "dated in the future",
        ),
    ]:
        changed, refused = merge(admin, [sign_record(forged, other.identity)], mesh)
        assert changed == []
        assert why in refused[0][1]
    assert admin.book.authenticate(key).name == "alice"
    # Signed by nobody we know, or a signature that does not match: refused.
    unsigned = dataclasses.replace(
        alice, updated_at_ms=NOW_MS + 6, signer_node_id="", signature=b""
    )
    assert "not signed by a member" in merge(admin, [unsigned], mesh)[1][0][1]
    tampered = dataclasses.replace(
        sign_record(dataclasses.replace(alice, updated_at_ms=NOW_MS + 6), home.identity),
        privacy=Privacy.ANY,
    )
    assert "does not verify" in merge(admin, [tampered], mesh)[1][0][1]
    # A member adds its own users; the admin may change anyone's.
    other.add("bob")
    assert merge(home, other.book.entries(), mesh)[0] == ["bob"]
    admin.book.replace_record(
        sign_record(
            admin.book.update("alice", now_ms=NOW_MS + 7, quota=parse_quota("cloud=5k")),
            admin.identity,
        )
    )
    assert merge(home, admin.book.entries(), mesh) == (["alice"], [])
    assert home.book.authenticate(key).quota.spec == "cloud=5k/month"


def test_changes_signed_after_a_revocation_are_refused(mesh: dict[str, Box]) -> None:
    home, admin = mesh["home"], mesh["admin"]
    home.add("alice", now_ms=NOW_MS)
    revoked_at = {home.node_id: NOW_MS + 3}
    # Made before the revocation: kept.
    assert merge(admin, home.book.entries(), mesh, revoked_at=revoked_at.get) == (["alice"], [])
    home.change("alice", NOW_MS + 4, quota=parse_quota("cloud=9G"))
    changed, refused = merge(admin, home.book.entries(), mesh, revoked_at=revoked_at.get)
    assert changed == []
    assert "revoked before it was made" in refused[0][1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["version", "users", "x"]),
            st.one_of(
                st.integers(0, 3),
                st.lists(
                    st.fixed_dictionaries(
                        {}, optional={k: st.just(v) | json_values for k, v in GOOD.items()}
                    )
                ),
            ),
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_the_parser_reads_a_book_or_raises_config_error(data: bytes) -> None:
    try:
        book = parse_users(data, now_ms=NOW_MS)
    except ConfigError as exc:
        message = exc.message
    else:
        message = ""
    if message:
        assert "not a valid users file" in message
        return
    assert list(parse_users(dump_users(book))) == list(book)
    assert all(isinstance(r.privacy, Privacy) for r in book)


async def test_another_members_bad_entries_are_skipped_and_the_good_ones_kept(
    tmp_path: Path,
) -> None:
    import time

    from mesh.wire.v1 import ledger_pb2 as lpb
    from node.store.home import Home
    from node.store.users_admin import UsersAdmin
    from tests.members import new_trust

    trust = new_trust(tmp_path)  # a mesh of one: its admin
    admin = UsersAdmin.open(Home(tmp_path), default_privacy=Privacy.MESH, trust=trust)
    assert trust.authority is not None
    member = Identity.generate()
    now = int(time.time() * 1000)
    cert = trust.authority.issue(member.public_key_raw, role=Role.MEMBER, now_ms=now, ttl_ms=10**9)
    theirs = UserBook()
    alice, _ = theirs.add(
        "alice", Privacy.ANY, now_ms=now, quota=parse_quota("cloud=1k"), home_node_id=member.node_id
    )
    theirs.replace_record(sign_record(alice, member))
    good = [entry_to_pb(r) for r in theirs.entries()]
    bad = [
        lpb.UserEntry(name="-bad", key_hash="ab" * 32, privacy="mesh", quota="unlimited"),
        lpb.UserEntry(name="bob", key_hash="zz", privacy="mesh", quota="unlimited"),
        lpb.UserEntry(name="carol", key_hash="cd" * 32, privacy="public", quota="unlimited"),
        lpb.UserEntry(name="dave", key_hash="ef" * 32, privacy="mesh", quota="cloud=lots"),
        lpb.UserEntry(
            name="erin", key_hash="01" * 32, privacy="mesh", quota="", updated_at_unix_ms=-5
        ),
        # well formed, but signed by nobody
        lpb.UserEntry(name="frank", key_hash="23" * 32, privacy="mesh", quota="unlimited"),
    ]
    listed = lpb.UserList(users=bad + good, signer_certs=[cert.SerializeToString()])
    assert await admin.merge(listed) == 1
    assert [r.name for r in load_users(tmp_path / "users.json")] == ["alice"]
    kept = admin.get("alice")
    assert kept is not None
    assert kept.signer_node_id == member.node_id
    # The certificate travels with the entry it signed, so a third node can check it too.
    assert admin.user_list(b"").signer_certs == [cert.SerializeToString()]


async def test_users_are_written_off_the_event_loop_one_change_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 6: an fsync'd users file was written on the event loop, stalling
    every answer in flight for as long as the disk took."""
    import asyncio
    import time

    import node.store.users_admin as users_admin
    from node.store.home import Home
    from tests.members import new_trust

    admin = users_admin.UsersAdmin.open(
        Home(tmp_path), default_privacy=Privacy.MESH, trust=new_trust(tmp_path)
    )
    real_save = users_admin.save_users

    def slow_save(path: Path, book: UserBook) -> None:
        time.sleep(0.3)  # a slow disk
        real_save(path, book)

    monkeypatch.setattr(users_admin, "save_users", slow_save)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        for _ in range(40):
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    keys = await asyncio.gather(
        admin.add(name="ada", privacy=None), admin.add(name="bob", privacy=None), ticker()
    )
    assert max(gaps) < 0.2, max(gaps)  # the loop went on while the disk was slow
    assert sorted(u.name for u in load_users(tmp_path / "users.json")) == ["ada", "bob"]
    assert keys[0]["api_key"] != keys[1]["api_key"]
