"""Node identity: node ID format and check characters, and the key file on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import IdentityError, InvalidRequest, MeshError
from mesh.trust.identity import (
    Identity,
    node_id_from_public_key,
    parse_node_id,
    short_node_id,
    verify_signature,
)
from node.store.identity_key import load_or_create_identity

B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NODE_ID = Identity.generate().node_id


def test_node_id_format() -> None:
    assert len(NODE_ID) == 63
    groups = NODE_ID.split("-")
    assert len(groups) == 8
    assert all(len(g) == 7 and set(g) <= set(B32) for g in groups)
    assert short_node_id(NODE_ID) == groups[0]


def test_node_id_is_derived_from_the_public_key() -> None:
    identity = Identity.generate()
    assert node_id_from_public_key(identity.public_key_raw) == identity.node_id
    assert Identity.generate().node_id != identity.node_id


def test_node_id_from_a_wrong_size_key_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="32 bytes"):
        node_id_from_public_key(b"\x00" * 31)


@pytest.mark.parametrize(
    "typed",
    [
        NODE_ID,
        NODE_ID.lower(),
        NODE_ID.replace("-", ""),
        NODE_ID.replace("-", "").lower(),
        NODE_ID.replace("-", " "),
        f"  {NODE_ID}\n",
    ],
    ids=["canonical", "lowercase", "no-dashes", "lower-no-dashes", "spaces", "padded"],
)
def test_parse_node_id_accepts_typed_forms(typed: str) -> None:
    assert parse_node_id(typed) == NODE_ID


def test_every_single_character_substitution_is_caught() -> None:
    rejected = 0
    tried = 0
    for position, char in enumerate(NODE_ID):
        if char == "-":
            continue
        for other in B32:
            if other == char:
                continue
            tried += 1
            mistyped = NODE_ID[:position] + other + NODE_ID[position + 1 :]
            with pytest.raises(InvalidRequest, match="check character"):
                parse_node_id(mistyped)
            rejected += 1
    assert tried == rejected == 56 * 31


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a node id",
        NODE_ID[:-1],
        NODE_ID + "A",
        "1" + NODE_ID[1:],
        "8" + NODE_ID[1:],
        "x" * 200,
    ],
    ids=["empty", "words", "short", "long", "digit-1", "digit-8", "huge"],
)
def test_parse_node_id_rejects_non_ids(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_node_id(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=140) | st.text(alphabet=B32.lower() + B32 + "- ", max_size=70))
def test_parse_node_id_returns_a_node_id_or_raises_mesh_error(text: str) -> None:
    try:
        result = parse_node_id(text)
    except MeshError as exc:
        error = exc
    else:
        assert isinstance(result, str)
        assert len(result) == 63
        assert parse_node_id(result) == result
        return
    assert isinstance(error, InvalidRequest)


def test_signatures_verify_only_for_the_signed_message() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert verify_signature(identity.public_key_raw, signature, b"message")
    assert not verify_signature(identity.public_key_raw, signature, b"messagE")
    assert not verify_signature(Identity.generate().public_key_raw, signature, b"message")
    assert not verify_signature(b"short", signature, b"message")


# --- the key file ---------------------------------------------------------------------------


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.key"
    first, created = load_or_create_identity(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_ISREG(path.stat().st_mode)
    contents = path.read_bytes()
    assert contents.startswith(b"-----BEGIN PRIVATE KEY-----")
    second, created_again = load_or_create_identity(path)
    assert not created_again
    assert second.node_id == first.node_id
    assert path.read_bytes() == contents
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]  # no temp file left


def _write_key(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        Identity.generate().to_pem()[:60],
    ],
    ids=["garbage", "empty", "bad-base64-body", "truncated"],
)
def test_corrupt_key_file_is_reported_and_left_untouched(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "identity.key"
    _write_key(path, data)
    with pytest.raises(IdentityError, match="left untouched"):
        load_or_create_identity(path)
    assert path.read_bytes() == data


def test_key_of_another_algorithm_is_rejected(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "identity.key"
    _write_key(path, pem)
    with pytest.raises(IdentityError, match="not an Ed25519"):
        load_or_create_identity(path)
    assert path.read_bytes() == pem


def test_oversized_key_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    data = Identity.generate().to_pem() + b"\n" * 5000
    _write_key(path, data)
    with pytest.raises(IdentityError, match="too large"):
        load_or_create_identity(path)
    assert path.read_bytes() == data


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    pem = Identity.generate().to_pem()
    _write_key(path, pem, mode)
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        load_or_create_identity(path)
    assert path.read_bytes() == pem


def test_directory_at_key_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir()
    with pytest.raises(IdentityError, match="not a regular file"):
        load_or_create_identity(path)
    assert path.is_dir()


def test_symlink_at_key_path_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    _write_key(target, Identity.generate().to_pem())
    path = tmp_path / "identity.key"
    path.symlink_to(target)
    with pytest.raises(IdentityError, match="cannot open identity key"):
        load_or_create_identity(path)


def test_pem_round_trip() -> None:
    identity = Identity.generate()
    assert Identity.from_pem(identity.to_pem()).node_id == identity.node_id
