"""Invite codes and joining (DESIGN.md "Identity and membership"), sans I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InviteError, MalformedInvite, MeshError
from mesh.trust.identity import Identity
from mesh.trust.invites import (
    CODE_PREFIX,
    JOIN_SKEW_MS,
    MAX_CODE_CHARS,
    InviteBook,
    decode_invite,
    encode_invite,
    invite_id,
    make_join_request,
    transcript,
)
from mesh.trust.membership import MeshAuthority, Role
from mesh.wire.v1 import trust_pb2 as tpb

NOW = 1_700_000_000_000
TTL = 3_600_000
AUTHORITY = MeshAuthority.generate()
INVITER = Identity.generate()
ADDRESSES = ["192.168.1.10:7411", "[fd00::1]:7411"]


def new_invite(
    book: InviteBook, *, role: Role = Role.MEMBER, now_ms: int = NOW, ttl_ms: int = TTL
) -> str:
    return book.create(
        mesh_public_key=AUTHORITY.public_key,
        inviter_node_id=INVITER.node_id,
        addresses=ADDRESSES,
        role=role,
        now_ms=now_ms,
        ttl_ms=ttl_ms,
    )


def redeem(book: InviteBook, request: tpb.JoinRequest, now_ms: int = NOW) -> Role:
    return book.redeem(request, mesh_public_key=AUTHORITY.public_key, now_ms=now_ms)


def resign(request: tpb.JoinRequest, secret: bytes, signer: Identity) -> tpb.JoinRequest:
    """Recompute proof and signature over the request's (possibly changed) fields."""
    data = transcript(
        invite=request.invite_id,
        mesh_public_key=AUTHORITY.public_key,
        identity_public_key=request.identity_public_key,
        sent_at_ms=request.sent_at_unix_ms,
    )
    out = tpb.JoinRequest()
    out.CopyFrom(request)
    out.proof = hmac.new(secret, data, hashlib.sha256).digest()
    out.signature = signer.sign(data)
    return out


@pytest.fixture
def book() -> InviteBook:
    return InviteBook()


@pytest.fixture
def joiner() -> Identity:
    return Identity.generate()


@pytest.mark.parametrize("role", list(Role))
def test_invite_round_trip(book: InviteBook, joiner: Identity, role: Role) -> None:
    code = new_invite(book, role=role)
    assert code.startswith(CODE_PREFIX)
    assert "=" not in code
    invite = decode_invite(f"  {code}\n", now_ms=NOW)  # pasted with whitespace
    assert invite.mesh_public_key == AUTHORITY.public_key
    assert invite.inviter_node_id == INVITER.node_id
    assert list(invite.inviter_addresses) == ADDRESSES
    assert invite.expires_at_unix_ms == NOW + TTL
    assert invite_id(invite.secret) in book.invites
    request = make_join_request(
        invite, joiner, now_ms=NOW + 1000, display_name="kitchen box", addresses=("10.0.0.2:1",)
    )
    assert invite.secret not in request.SerializeToString()  # the secret never travels
    wire = tpb.JoinRequest()
    wire.ParseFromString(request.SerializeToString())
    assert redeem(book, wire, now_ms=NOW + 2000) is role
    assert book.invites[invite_id(invite.secret)].used_by == joiner.node_id
    assert encode_invite(invite) == code


def test_join_request_truncates_long_fields(book: InviteBook, joiner: Identity) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    request = make_join_request(
        invite,
        joiner,
        now_ms=NOW,
        display_name="x" * 100,
        addresses=tuple(f"h{i}:1" for i in range(20)),
    )
    assert len(request.display_name) == 64
    assert len(request.addresses) == 8


def test_invite_is_single_use(book: InviteBook, joiner: Identity) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    request = make_join_request(invite, joiner, now_ms=NOW)
    assert redeem(book, request) is Role.MEMBER
    with pytest.raises(InviteError, match="already used"):
        redeem(book, request)
    # Another joiner with the same code fares no better.
    with pytest.raises(InviteError, match="already used"):
        redeem(book, make_join_request(invite, Identity.generate(), now_ms=NOW))
    # Pruning forgets used invites; they stay unusable.
    book.prune(NOW)
    assert book.invites == {}
    with pytest.raises(InviteError, match="unknown"):
        redeem(book, request)


def test_invites_are_independent(book: InviteBook, joiner: Identity) -> None:
    first = decode_invite(new_invite(book, role=Role.OVERFLOW), now_ms=NOW)
    second = decode_invite(new_invite(book, role=Role.ADMIN), now_ms=NOW)
    assert first.secret != second.secret
    assert redeem(book, make_join_request(second, joiner, now_ms=NOW)) is Role.ADMIN
    assert redeem(book, make_join_request(first, joiner, now_ms=NOW)) is Role.OVERFLOW


def test_expired_invite(book: InviteBook, joiner: Identity) -> None:
    code = new_invite(book)
    invite = decode_invite(code, now_ms=NOW + TTL - 1)
    with pytest.raises(InviteError, match="expired"):
        decode_invite(code, now_ms=NOW + TTL)
    late = NOW + TTL
    with pytest.raises(InviteError, match="expired"):
        redeem(book, make_join_request(invite, joiner, now_ms=late), now_ms=late)
    # A failed redeem does not use the invite up; in time it still works.
    assert redeem(book, make_join_request(invite, joiner, now_ms=late - 1), now_ms=late - 1)


def test_prune_drops_expired_invites(book: InviteBook) -> None:
    new_invite(book, ttl_ms=10)
    new_invite(book, ttl_ms=TTL)
    book.prune(NOW + 10)
    assert len(book.invites) == 1


def test_wrong_secret(book: InviteBook, joiner: Identity) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    request = make_join_request(invite, joiner, now_ms=NOW)
    # Proof made with another secret, under the genuine invite ID.
    forged = resign(request, b"\x00" * 32, joiner)
    with pytest.raises(InviteError, match="does not prove"):
        redeem(book, forged)
    # A guessed invite with another secret names an unknown invite.
    guessed = tpb.Invite()
    guessed.CopyFrom(invite)
    guessed.secret = bytes(32)
    with pytest.raises(InviteError, match="unknown"):
        redeem(book, make_join_request(guessed, joiner, now_ms=NOW))
    # The genuine request still works afterwards.
    assert redeem(book, request) is Role.MEMBER


def test_request_signed_by_another_key(book: InviteBook, joiner: Identity) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    request = make_join_request(invite, joiner, now_ms=NOW)
    mallory = Identity.generate()
    # Names Mallory's key (proof recomputed, the secret is known) but signed by the joiner.
    request.identity_public_key = mallory.public_key_raw
    with pytest.raises(InviteError, match="not signed by the key it names"):
        redeem(book, resign(request, invite.secret, joiner))
    # Names the joiner's key, signed by Mallory.
    request.identity_public_key = joiner.public_key_raw
    with pytest.raises(InviteError, match="not signed by the key it names"):
        redeem(book, resign(request, invite.secret, mallory))
    assert book.invites[invite_id(invite.secret)].used_by == ""


def test_tampered_fields(book: InviteBook, joiner: Identity) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    genuine = make_join_request(invite, joiner, now_ms=NOW)

    def tampered(**changes: object) -> tpb.JoinRequest:
        request = tpb.JoinRequest()
        request.CopyFrom(genuine)
        for name, value in changes.items():
            setattr(request, name, value)
        return request

    cases: list[tuple[tpb.JoinRequest, str]] = [
        (tampered(sent_at_unix_ms=NOW + 1), "does not prove"),
        (tampered(identity_public_key=Identity.generate().public_key_raw), "does not prove"),
        (tampered(identity_public_key=joiner.public_key_raw[:31]), "malformed"),
        (tampered(identity_public_key=b""), "malformed"),
        (tampered(proof=genuine.proof[:-1] + bytes([genuine.proof[-1] ^ 1])), "does not prove"),
        (tampered(proof=b""), "does not prove"),
        (
            tampered(signature=genuine.signature[:-1] + bytes([genuine.signature[-1] ^ 1])),
            "not signed",
        ),
        (tampered(signature=b""), "not signed"),
        (tampered(invite_id=genuine.invite_id[:-1] + b"\x00"), "unknown"),
        (tampered(invite_id=b""), "unknown"),
    ]
    for request, message in cases:
        with pytest.raises(InviteError, match=message):
            redeem(book, request)
    # A request for another mesh (inviter holds another mesh key) does not prove the secret.
    with pytest.raises(InviteError, match="does not prove"):
        book.redeem(genuine, mesh_public_key=MeshAuthority.generate().public_key, now_ms=NOW)
    assert redeem(book, genuine) is Role.MEMBER


@pytest.mark.parametrize("offset", [JOIN_SKEW_MS + 1, -(JOIN_SKEW_MS + 1), 10 * JOIN_SKEW_MS])
def test_join_request_with_a_clock_far_off(book: InviteBook, joiner: Identity, offset: int) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    with pytest.raises(InviteError, match="clock"):
        redeem(book, make_join_request(invite, joiner, now_ms=NOW + offset), now_ms=NOW)


@pytest.mark.parametrize("offset", [JOIN_SKEW_MS, -JOIN_SKEW_MS])
def test_join_request_with_a_clock_a_bit_off(
    book: InviteBook, joiner: Identity, offset: int
) -> None:
    invite = decode_invite(new_invite(book, now_ms=NOW - TTL // 2), now_ms=NOW)
    assert redeem(book, make_join_request(invite, joiner, now_ms=NOW + offset), now_ms=NOW)


# --- the inviter's book on disk ------------------------------------------------------------


def test_book_json_round_trip(book: InviteBook, joiner: Identity) -> None:
    used = decode_invite(new_invite(book, role=Role.ADMIN), now_ms=NOW)
    redeem(book, make_join_request(used, joiner, now_ms=NOW))
    code = new_invite(book, role=Role.OVERFLOW)
    restored = InviteBook.from_json(book.to_json())
    assert restored.invites == book.invites
    assert json.loads(restored.to_json()) == json.loads(book.to_json())
    with pytest.raises(InviteError, match="already used"):
        redeem(restored, make_join_request(used, Identity.generate(), now_ms=NOW))
    pending = decode_invite(code, now_ms=NOW)
    assert redeem(restored, make_join_request(pending, joiner, now_ms=NOW)) is Role.OVERFLOW
    assert InviteBook.from_json(InviteBook().to_json()).invites == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        "[{]",
        '{"secret": "00"}',
        "null",
        "5",
        '"text"',
        "[1]",
        "[[]]",
        "[null]",
        '[{"role": "member", "expires_at_ms": 1}]',
        '[{"secret": "zz", "role": "member", "expires_at_ms": 1}]',
        '[{"secret": "00", "role": "emperor", "expires_at_ms": 1}]',
        '[{"secret": "00", "role": "member"}]',
        '[{"secret": "00", "role": "member", "expires_at_ms": "soon"}]',
        '[{"secret": "00", "role": "member", "expires_at_ms": null}]',
        '[{"secret": "00", "role": "member", "expires_at_ms": NaN}]',
        '[{"secret": 5, "role": "member", "expires_at_ms": 1}]',
    ],
)
def test_corrupt_book_json(text: str) -> None:
    with pytest.raises(InviteError, match="corrupt"):
        InviteBook.from_json(text)


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e999"])
def test_corrupt_book_json_with_infinite_expiry(value: str) -> None:
    text = f'[{{"secret": "00", "role": "member", "expires_at_ms": {value}}}]'
    with pytest.raises(InviteError, match="corrupt"):
        InviteBook.from_json(text)


def test_corrupt_book_json_deeply_nested() -> None:
    with pytest.raises(InviteError, match="corrupt"):
        InviteBook.from_json("[" * 100_000)


# --- decoding codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "",
        "   ",
        "hello",
        "allerac1",
        CODE_PREFIX,
        "allerac2-AAAA",
        "ALLERAC1-AAAA",
        CODE_PREFIX + "A",
        CODE_PREFIX + "!!!!",
        CODE_PREFIX + "é",
        CODE_PREFIX + "A" * (MAX_CODE_CHARS + 1),
        CODE_PREFIX + "____",
    ],
)
def test_decode_garbage(code: str) -> None:
    with pytest.raises(MalformedInvite):
        decode_invite(code, now_ms=NOW)


def test_decode_wrong_prefix(book: InviteBook) -> None:
    code = new_invite(book)
    body = code[len(CODE_PREFIX) :]
    for prefix in ("", "allerac0-", "allerac1", "xallerac1-", "allerac1_"):
        with pytest.raises(MalformedInvite, match="not an Allerac invite"):
            decode_invite(prefix + body, now_ms=NOW)


def _invite_code(**fields: object) -> str:
    invite = tpb.Invite(
        secret=b"\x07" * 32,
        mesh_public_key=AUTHORITY.public_key,
        inviter_node_id=INVITER.node_id,
        inviter_addresses=ADDRESSES,
        role=tpb.ROLE_MEMBER,
        expires_at_unix_ms=NOW + TTL,
    )
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(invite, name)[:]
            getattr(invite, name).extend(value)
        else:
            setattr(invite, name, value)
    return encode_invite(invite)


def test_decode_invalid_contents() -> None:
    assert decode_invite(_invite_code(), now_ms=NOW).secret == b"\x07" * 32
    for fields in (
        {"secret": b"\x07" * 31},
        {"secret": b""},
        {"mesh_public_key": AUTHORITY.public_key[:31]},
        {"inviter_addresses": []},
        {"expires_at_unix_ms": 0},
    ):
        with pytest.raises(MalformedInvite):  # a 400: not an invite at all
            decode_invite(_invite_code(**fields), now_ms=NOW)
    with pytest.raises(InviteError, match="expired"):  # a 403: an invite, no longer valid
        decode_invite(_invite_code(expires_at_unix_ms=NOW), now_ms=NOW)


def test_decode_truncated_codes_never_succeed(book: InviteBook) -> None:
    code = new_invite(book)
    for cut in range(len(code)):
        with pytest.raises(MeshError):
            decode_invite(code[:cut], now_ms=NOW)


def test_decode_truncated_codes_are_malformed(book: InviteBook) -> None:
    code = new_invite(book)
    for cut in range(len(code)):
        with pytest.raises(MalformedInvite):
            decode_invite(code[:cut], now_ms=NOW)


@pytest.mark.parametrize("role", [tpb.ROLE_UNSPECIFIED, 42])
def test_decode_unknown_role_is_malformed(role: int) -> None:
    with pytest.raises(MalformedInvite):
        decode_invite(_invite_code(role=role), now_ms=NOW)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200) | st.text(alphabet="allerac1-", max_size=20))
def test_decode_arbitrary_text(text: str) -> None:
    try:
        result = decode_invite(text, now_ms=NOW)
    except MeshError:
        return
    assert isinstance(result, tpb.Invite)


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=300, deadline=None)
@given(
    body=st.text(alphabet=_B64URL, max_size=400)
    | st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    now_ms=st.integers(-(2**63), 2**63 - 1),
)
def test_decode_arbitrary_base64url(body: str, now_ms: int) -> None:
    try:
        result = decode_invite(CODE_PREFIX + body, now_ms=now_ms)
    except MeshError:
        return
    assert isinstance(result, tpb.Invite)
    assert len(result.secret) == 32
    assert now_ms < result.expires_at_unix_ms


@settings(max_examples=150, deadline=None)
@given(
    invite_id_=st.binary(max_size=20),
    identity_public_key=st.binary(max_size=40),
    sent_at=st.integers(-(2**63), 2**63 - 1),
    proof=st.binary(max_size=40),
    signature=st.binary(max_size=80),
)
def test_redeem_arbitrary_requests(
    invite_id_: bytes, identity_public_key: bytes, sent_at: int, proof: bytes, signature: bytes
) -> None:
    book = InviteBook()
    invite = decode_invite(new_invite(book), now_ms=NOW)
    ident = invite_id(invite.secret)
    request = tpb.JoinRequest(
        invite_id=ident if len(invite_id_) % 2 else invite_id_,
        identity_public_key=identity_public_key,
        sent_at_unix_ms=sent_at if sent_at % 3 else NOW,
        proof=proof,
        signature=signature,
    )
    with pytest.raises(InviteError):
        redeem(book, request)


def test_name_and_addresses_of_a_join_request_cannot_be_changed_on_the_way(
    book: InviteBook, joiner: Identity
) -> None:
    invite = decode_invite(new_invite(book), now_ms=NOW)
    request = make_join_request(
        invite, joiner, now_ms=NOW, display_name="kitchen", addresses=("10.0.0.2:8471",)
    )
    for mutate in (
        lambda r: setattr(r, "display_name", "evil"),
        lambda r: r.addresses.append("203.0.113.9:8471"),
    ):
        tampered = tpb.JoinRequest()
        tampered.CopyFrom(request)
        mutate(tampered)
        with pytest.raises(InviteError):
            redeem(book, tampered)
    assert redeem(book, request) is Role.MEMBER
