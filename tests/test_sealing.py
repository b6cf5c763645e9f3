"""Sealed requests and sealed answer streams (DESIGN.md "Sealing"), with no sockets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import PROTOCOL_VERSION
from mesh.errors import (
    BadSignature,
    ClockSkew,
    MeshError,
    NotAMember,
    Overloaded,
    ReplayDetected,
    SealingError,
    UnsupportedProtocol,
)
from mesh.trust.enckeys import GRACE_MS, OVERLAP_MS, ROTATE_EVERY_MS, KeyRing, PeerKeys
from mesh.trust.enckeys import verify_encryption_keys as verify_keys
from mesh.trust.identity import Identity
from mesh.trust.membership import DAY_MS, MeshAuthority, Role
from mesh.trust.sealing import (
    REPLAY_WINDOW_MS,
    SIG_CONTEXT,
    EnvelopeOpener,
    FrameReader,
    FrameWriter,
    OpenedRequest,
    ReplayGuard,
    Sealed,
    seal_request,
)
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb

NOW = 1_700_000_000_000
CERT_TTL = 30 * DAY_MS
BODY = b"an InferBody: " + bytes(range(256)) * 4


@dataclass
class Member:
    identity: Identity
    cert: tpb.SignedCert
    keyring: KeyRing
    revoked: set[str]
    opener: EnvelopeOpener

    def peer_keys(self, now_ms: int = NOW) -> PeerKeys:
        return verify_keys(
            self.keyring.current.signed,
            identity_public_key=self.identity.public_key_raw,
            node_id=self.identity.node_id,
            now_ms=now_ms,
        )


def make_member(authority: MeshAuthority, *, hybrid: bool = True, now_ms: int = NOW) -> Member:
    identity = Identity.generate()
    cert = authority.issue(
        identity.public_key_raw, role=Role.MEMBER, now_ms=now_ms, ttl_ms=CERT_TTL
    )
    keyring = KeyRing(identity, hybrid=hybrid)
    keyring.rotate(now_ms)
    revoked: set[str] = set()
    opener = EnvelopeOpener(
        identity=identity,
        keyring=keyring,
        mesh_public_key=lambda: authority.public_key,
        revoked=lambda: frozenset(revoked),
        replay=ReplayGuard(),
    )
    return Member(identity=identity, cert=cert, keyring=keyring, revoked=revoked, opener=opener)


AUTHORITY = MeshAuthority.generate()
OTHER_MESH = MeshAuthority.generate()


@pytest.fixture
def alice() -> Member:
    return make_member(AUTHORITY)


@pytest.fixture
def bob() -> Member:
    return make_member(AUTHORITY)


def seal(
    sender: Member,
    recipient: Member | PeerKeys,
    *,
    now_ms: int = NOW,
    offer_hybrid: bool = True,
    body: bytes = BODY,
    **kwargs: object,
) -> Sealed:
    keys = recipient.peer_keys() if isinstance(recipient, Member) else recipient
    return seal_request(
        body,
        identity=sender.identity,
        sender_cert=sender.cert,
        recipient=keys,
        now_ms=now_ms,
        offer_hybrid=offer_hybrid,
        **kwargs,  # type: ignore[arg-type]
    )


def header_of(envelope: tpb.SealedEnvelope) -> tpb.EnvelopeHeader:
    header = tpb.EnvelopeHeader()
    header.ParseFromString(envelope.header)
    return header


def signed_bytes(header: bytes, ciphertext: bytes) -> bytes:
    return SIG_CONTEXT + len(header).to_bytes(4, "big") + header + ciphertext


def resign(signer: Identity, header: bytes, ciphertext: bytes) -> tpb.SealedEnvelope:
    return tpb.SealedEnvelope(
        header=header,
        ciphertext=ciphertext,
        signature=signer.sign(signed_bytes(header, ciphertext)),
    )


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offer_hybrid", "recipient_hybrid", "kem"),
    [
        (True, True, tpb.KEM_MLKEM768_X25519),
        (False, True, tpb.KEM_X25519),
        (True, False, tpb.KEM_X25519),
        (False, False, tpb.KEM_X25519),
    ],
)
def test_seal_and_open_round_trip(
    alice: Member, offer_hybrid: bool, recipient_hybrid: bool, kem: int
) -> None:
    bob = make_member(AUTHORITY, hybrid=recipient_hybrid)
    sealed = seal(alice, bob, offer_hybrid=offer_hybrid)
    header = header_of(sealed.envelope)
    assert header.kem == kem
    assert header.sender_offers_hybrid is offer_hybrid
    assert header.protocol_version == PROTOCOL_VERSION
    assert header.sender_id == alice.identity.node_id
    assert header.recipient_id == bob.identity.node_id
    assert header.recipient_key_id == bob.keyring.current.key_id
    assert header.request_id == sealed.request_id
    assert len(sealed.request_id) == 16
    assert BODY not in sealed.envelope.ciphertext

    wire = tpb.SealedEnvelope()
    wire.ParseFromString(sealed.envelope.SerializeToString())
    opened = bob.opener.open(wire, now_ms=NOW + 1)
    assert isinstance(opened, OpenedRequest)
    assert opened.body == BODY
    assert opened.request_id == sealed.request_id
    assert opened.sender.node_id == alice.identity.node_id
    assert opened.sender.role is Role.MEMBER

    # The answer goes back under the response key that travelled inside the envelope.
    frame = opened.writer.seal(b"done", final=True)
    assert sealed.reader.open(frame) == b"done"
    sealed.reader.check_complete()


def test_hybrid_ciphertext_is_larger_than_x25519(alice: Member, bob: Member) -> None:
    hybrid = seal(alice, bob, offer_hybrid=True, body=b"")
    classic = seal(alice, bob, offer_hybrid=False, body=b"")
    # ML-KEM-768 ciphertext (1088 bytes) + X25519 share vs. the X25519 share alone.
    assert len(hybrid.envelope.ciphertext) - len(classic.envelope.ciphertext) >= 1088
    assert bob.opener.open(hybrid.envelope, now_ms=NOW).body == b""
    assert bob.opener.open(classic.envelope, now_ms=NOW).body == b""


def test_frames_round_trip(alice: Member, bob: Member) -> None:
    sealed = seal(alice, bob)
    opened = bob.opener.open(sealed.envelope, now_ms=NOW)
    chunks = [b"", b"Hello", b", ", b"world" * 100, b"!"]
    frames = [opened.writer.seal(chunk) for chunk in chunks]
    frames.append(opened.writer.seal(b"finish", final=True))
    assert [f.seq for f in frames] == list(range(len(chunks) + 1))
    assert [f.final for f in frames] == [False] * len(chunks) + [True]
    received = []
    for frame in frames:
        wire = tpb.SealedFrame()
        wire.ParseFromString(frame.SerializeToString())
        received.append(sealed.reader.open(wire))
    assert received == [*chunks, b"finish"]
    assert sealed.reader.finished
    sealed.reader.check_complete()
    with pytest.raises(SealingError, match="closed"):
        opened.writer.seal(b"more")


def test_explicit_request_id(alice: Member, bob: Member) -> None:
    request_id = bytes(range(16))
    sealed = seal(alice, bob, request_id=request_id)
    opened = bob.opener.open(sealed.envelope, now_ms=NOW)
    assert opened.request_id == request_id


# --- tampering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offer_hybrid", [True, False])
def test_flipping_any_byte_of_an_envelope_fails(
    alice: Member, bob: Member, offer_hybrid: bool
) -> None:
    sealed = seal(alice, bob, offer_hybrid=offer_hybrid)
    env = sealed.envelope
    attempts = 0
    for mask in (0x01, 0xFF):
        for index in range(len(env.header)):
            tampered = tpb.SealedEnvelope(
                header=flip(env.header, index, mask),
                ciphertext=env.ciphertext,
                signature=env.signature,
            )
            with pytest.raises(MeshError):
                bob.opener.open(tampered, now_ms=NOW)
            attempts += 1
        for index in range(len(env.signature)):
            tampered = tpb.SealedEnvelope(
                header=env.header,
                ciphertext=env.ciphertext,
                signature=flip(env.signature, index, mask),
            )
            with pytest.raises(BadSignature):
                bob.opener.open(tampered, now_ms=NOW)
            attempts += 1
        for index in range(0, len(env.ciphertext), 7):
            tampered = tpb.SealedEnvelope(
                header=env.header,
                ciphertext=flip(env.ciphertext, index, mask),
                signature=env.signature,
            )
            with pytest.raises(BadSignature):
                bob.opener.open(tampered, now_ms=NOW)
            attempts += 1
    assert attempts > 2 * (len(env.header) + 64)
    # No failed attempt used up the request ID: the genuine envelope still opens.
    assert bob.opener.open(env, now_ms=NOW).body == BODY


def test_tampered_ciphertext_resigned_by_the_sender_does_not_open(
    alice: Member, bob: Member
) -> None:
    """Past the signature, HPKE's own tag catches a changed ciphertext or header."""
    sealed = seal(alice, bob)
    env = sealed.envelope
    for index in range(0, len(env.ciphertext), 97):
        header = header_of(env)
        header.request_id = os.urandom(16)  # a fresh ID, so the replay guard stays out of it
        # The header is bound as HPKE info: a re-signed new header does not open either.
        with pytest.raises(SealingError, match="does not open"):
            bob.opener.open(
                resign(alice.identity, header.SerializeToString(), env.ciphertext), now_ms=NOW
            )
        header.request_id = os.urandom(16)
        with pytest.raises(SealingError, match="does not open"):
            bob.opener.open(
                resign(alice.identity, header.SerializeToString(), flip(env.ciphertext, index)),
                now_ms=NOW,
            )


def test_malformed_envelopes(alice: Member, bob: Member) -> None:
    env = seal(alice, bob).envelope
    with pytest.raises(SealingError, match="malformed"):
        bob.opener.open(tpb.SealedEnvelope(), now_ms=NOW)
    with pytest.raises(SealingError, match="malformed"):
        bob.opener.open(
            tpb.SealedEnvelope(
                header=env.header, ciphertext=env.ciphertext, signature=env.signature[:63]
            ),
            now_ms=NOW,
        )
    with pytest.raises(SealingError, match="malformed"):
        bob.opener.open(
            tpb.SealedEnvelope(header=b"\x00" * 4097, ciphertext=b"", signature=b"\x00" * 64),
            now_ms=NOW,
        )
    with pytest.raises(SealingError, match="parse"):
        bob.opener.open(
            tpb.SealedEnvelope(header=b"\xff\xff\xff", ciphertext=b"", signature=b"\x00" * 64),
            now_ms=NOW,
        )


def test_other_protocol_version_is_reported(alice: Member, bob: Member) -> None:
    env = seal(alice, bob).envelope
    header = header_of(env)
    header.protocol_version = PROTOCOL_VERSION + 1
    with pytest.raises(UnsupportedProtocol):
        bob.opener.open(
            resign(alice.identity, header.SerializeToString(), env.ciphertext), now_ms=NOW
        )


def test_malformed_request_id(alice: Member, bob: Member) -> None:
    with pytest.raises(SealingError, match="request ID"):
        bob.opener.open(seal(alice, bob, request_id=b"\x01" * 15).envelope, now_ms=NOW)


# --- replay and clocks -------------------------------------------------------------------------


def test_replayed_envelope_is_detected(alice: Member, bob: Member) -> None:
    env = seal(alice, bob).envelope
    bob.opener.open(env, now_ms=NOW)
    with pytest.raises(ReplayDetected):
        bob.opener.open(env, now_ms=NOW)
    with pytest.raises(ReplayDetected):
        bob.opener.open(env, now_ms=NOW + REPLAY_WINDOW_MS)
    # Once it could be forgotten, the clock check refuses it instead.
    with pytest.raises(ClockSkew):
        bob.opener.open(env, now_ms=NOW + REPLAY_WINDOW_MS + 1)


@pytest.mark.parametrize(
    ("issued_offset", "shown"),
    [(60_001, "+60.0 s"), (-61_000, "-61.0 s"), (3_600_000, "+3600.0 s")],
)
def test_clock_skew_beyond_a_minute(
    alice: Member, bob: Member, issued_offset: int, shown: str
) -> None:
    env = seal(alice, bob, now_ms=NOW + issued_offset).envelope
    with pytest.raises(ClockSkew, match=r"±60 s") as info:
        bob.opener.open(env, now_ms=NOW)
    assert shown in info.value.message


@pytest.mark.parametrize("issued_offset", [60_000, -60_000, 0, 59_999])
def test_clock_skew_within_a_minute_is_accepted(
    alice: Member, bob: Member, issued_offset: int
) -> None:
    env = seal(alice, bob, now_ms=NOW + issued_offset).envelope
    assert bob.opener.open(env, now_ms=NOW).body == BODY


def test_same_request_id_accepted_again_only_after_the_window(alice: Member, bob: Member) -> None:
    request_id = os.urandom(16)
    bob.opener.open(seal(alice, bob, request_id=request_id).envelope, now_ms=NOW)
    for later in (1, REPLAY_WINDOW_MS // 2, REPLAY_WINDOW_MS):
        fresh = seal(alice, bob, request_id=request_id, now_ms=NOW + later).envelope
        with pytest.raises(ReplayDetected):
            bob.opener.open(fresh, now_ms=NOW + later)
    later = REPLAY_WINDOW_MS + 1
    again = seal(alice, bob, request_id=request_id, now_ms=NOW + later).envelope
    assert bob.opener.open(again, now_ms=NOW + later).request_id == request_id
    with pytest.raises(ReplayDetected):
        bob.opener.open(again, now_ms=NOW + later)


def admit(guard: ReplayGuard, request_id: bytes, issued_at_ms: int, now_ms: int) -> None:
    """What the opener does for a request that opens: check, then remember."""
    guard.check(request_id, issued_at_ms, now_ms)
    guard.remember(request_id, issued_at_ms)


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard()
    for i in range(100):
        admit(guard, i.to_bytes(16, "big"), NOW + i, NOW + i)
    assert len(guard) == 100
    with pytest.raises(ReplayDetected):
        admit(guard, (5).to_bytes(16, "big"), NOW + 10, NOW + 50)
    # Halfway through the window nothing can be forgotten yet.
    admit(guard, b"half" * 4, NOW + 30_000, NOW + 30_000)
    assert len(guard) == 101
    # After the window every old ID is forgotten: only the newest remain.
    late = NOW + 99 + REPLAY_WINDOW_MS + 1
    admit(guard, b"late" * 4, late, late)
    assert len(guard) == 2
    admit(guard, b"later" + b"\x00" * 11, late + REPLAY_WINDOW_MS, late + 2 * REPLAY_WINDOW_MS)
    assert len(guard) == 1
    # A forgotten ID is accepted again (with a current issued-at).
    admit(guard, (5).to_bytes(16, "big"), late + REPLAY_WINDOW_MS, late + REPLAY_WINDOW_MS)
    assert len(guard) == 2


def test_replay_guard_capacity() -> None:
    guard = ReplayGuard(capacity=3)
    for i in range(3):
        admit(guard, bytes([i]) * 16, NOW, NOW)
    with pytest.raises(Overloaded):
        admit(guard, b"\x09" * 16, NOW, NOW)
    admit(guard, b"\x09" * 16, NOW + REPLAY_WINDOW_MS + 1, NOW + REPLAY_WINDOW_MS + 1)
    assert len(guard) == 1


def test_clock_skew_is_checked_before_replay_memory() -> None:
    guard = ReplayGuard(window_ms=1000)
    with pytest.raises(ClockSkew, match=r"\+1\.0 s|±1 s"):
        guard.check(b"\x00" * 16, NOW + 1001, NOW)
    assert len(guard) == 0


# --- who may send ---------------------------------------------------------------------------


def test_wrong_recipient(alice: Member, bob: Member) -> None:
    carol = make_member(AUTHORITY)
    env = seal(alice, bob).envelope
    with pytest.raises(SealingError, match="another node"):
        carol.opener.open(env, now_ms=NOW)
    # Carol cannot open it by claiming to be Bob either: she lacks Bob's keys.
    impostor = dataclasses.replace(carol.opener, identity=bob.identity)
    with pytest.raises(SealingError, match="no longer has"):
        impostor.open(env, now_ms=NOW)


def test_sender_of_another_mesh_is_not_a_member(bob: Member) -> None:
    mallory = make_member(OTHER_MESH)
    with pytest.raises(NotAMember):
        bob.opener.open(seal(mallory, bob).envelope, now_ms=NOW)


def test_revoked_sender_is_not_a_member(alice: Member, bob: Member) -> None:
    assert bob.opener.open(seal(alice, bob).envelope, now_ms=NOW)
    bob.revoked.add(alice.identity.node_id)  # read at each call: takes effect at once
    with pytest.raises(NotAMember, match="revoked"):
        bob.opener.open(seal(alice, bob).envelope, now_ms=NOW)


def test_expired_sender_cert_is_not_a_member(bob: Member) -> None:
    alice = make_member(AUTHORITY)
    later = NOW + CERT_TTL
    bob.keyring.rotate(later)
    keys = bob.peer_keys(later)
    with pytest.raises(NotAMember, match="expired"):
        bob.opener.open(seal(alice, keys, now_ms=later).envelope, now_ms=later)


def test_sender_signing_with_another_identity_key(alice: Member, bob: Member) -> None:
    mallory = Identity.generate()
    env = seal(alice, bob).envelope
    # Same header (Alice's valid cert, Alice's node ID), Mallory's signature.
    with pytest.raises(BadSignature, match="does not verify"):
        bob.opener.open(resign(mallory, env.header, env.ciphertext), now_ms=NOW)
    # Mallory sealing under her own node ID with Alice's cert.
    stolen = seal_request(
        BODY,
        identity=mallory,
        sender_cert=alice.cert,
        recipient=bob.peer_keys(),
        now_ms=NOW,
        offer_hybrid=True,
    )
    with pytest.raises(BadSignature, match="not the node its certificate names"):
        bob.opener.open(stolen.envelope, now_ms=NOW)


def test_downgrade_to_x25519_is_refused(alice: Member, bob: Member) -> None:
    real = bob.peer_keys()
    assert real.offers_hybrid
    stripped = dataclasses.replace(real, mlkem768=None)  # an attacker's copy without ML-KEM
    sealed = seal(alice, stripped, offer_hybrid=True)
    header = header_of(sealed.envelope)
    assert header.kem == tpb.KEM_X25519
    assert header.sender_offers_hybrid
    with pytest.raises(SealingError, match="downgrade"):
        bob.opener.open(sealed.envelope, now_ms=NOW)


def test_x25519_is_fine_when_the_sender_does_not_offer_hybrid(alice: Member, bob: Member) -> None:
    sealed = seal(alice, bob, offer_hybrid=False)
    assert header_of(sealed.envelope).kem == tpb.KEM_X25519
    assert bob.opener.open(sealed.envelope, now_ms=NOW).body == BODY


def test_hybrid_envelope_to_a_recipient_without_hybrid_is_refused(alice: Member) -> None:
    bob = make_member(AUTHORITY, hybrid=False)
    env = seal(alice, bob, offer_hybrid=False).envelope
    header = header_of(env)
    header.kem = tpb.KEM_MLKEM768_X25519
    with pytest.raises(SealingError, match="did not offer"):
        bob.opener.open(
            resign(alice.identity, header.SerializeToString(), env.ciphertext), now_ms=NOW
        )


@pytest.mark.parametrize("kem", [tpb.KEM_UNSPECIFIED, 7])
def test_unknown_kem_is_refused(alice: Member, bob: Member, kem: int) -> None:
    env = seal(alice, bob).envelope
    header = header_of(env)
    header.kem = kem  # type: ignore[assignment]
    with pytest.raises(SealingError, match="unknown KEM"):
        bob.opener.open(
            resign(alice.identity, header.SerializeToString(), env.ciphertext), now_ms=NOW
        )


def test_rotated_out_key_cannot_open(alice: Member, bob: Member) -> None:
    old_keys = bob.peer_keys(NOW)
    t1 = NOW + ROTATE_EVERY_MS
    created, _ = bob.keyring.rotate(t1)
    assert created is not None
    # Inside the grace period the old key still opens what a sender sealed with an old card
    # (one that does not check expiry, or sealed just before it and arrived late).
    grace_end = NOW + ROTATE_EVERY_MS + OVERLAP_MS + GRACE_MS
    stale = dataclasses.replace(old_keys, expires_at_ms=grace_end + ROTATE_EVERY_MS)
    assert bob.opener.open(seal(alice, stale, now_ms=grace_end).envelope, now_ms=grace_end)
    later = grace_end + 1
    _, dropped = bob.keyring.rotate(later)
    assert dropped == [old_keys.key_id]
    # A sender now refuses the expired keys itself...
    with pytest.raises(SealingError, match="expired"):
        seal(alice, old_keys, now_ms=later)
    # ...and one that ignores their expiry gets nothing: the private key is gone.
    with pytest.raises(SealingError, match="rotated out"):
        bob.opener.open(seal(alice, stale, now_ms=later).envelope, now_ms=later)
    # The new key works.
    assert bob.opener.open(seal(alice, bob.peer_keys(later), now_ms=later).envelope, now_ms=later)


# --- answer frames -------------------------------------------------------------------------


def stream(alice: Member, bob: Member, n: int = 4) -> tuple[Sealed, list[tpb.SealedFrame]]:
    sealed = seal(alice, bob)
    writer = bob.opener.open(sealed.envelope, now_ms=NOW).writer
    frames = [writer.seal(f"chunk {i}".encode()) for i in range(n - 1)]
    frames.append(writer.seal(b"end", final=True))
    return sealed, frames


def test_frames_reordered(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob)
    with pytest.raises(SealingError, match="frame 1 arrived where frame 0"):
        sealed.reader.open(frames[1])
    assert sealed.reader.open(frames[0]) == b"chunk 0"
    with pytest.raises(SealingError, match="reordered"):
        sealed.reader.open(frames[2])


def test_frame_dropped(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob)
    sealed.reader.open(frames[0])
    with pytest.raises(SealingError):
        sealed.reader.open(frames[2])


def test_frame_duplicated(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob)
    sealed.reader.open(frames[0])
    with pytest.raises(SealingError):
        sealed.reader.open(frames[0])


def test_frame_renumbered(alice: Member, bob: Member) -> None:
    """Renumbering frame 2 as frame 1 (dropping frame 1) fails the nonce."""
    sealed, frames = stream(alice, bob)
    sealed.reader.open(frames[0])
    moved = tpb.SealedFrame(seq=1, final=False, ciphertext=frames[2].ciphertext)
    with pytest.raises(SealingError, match="does not authenticate"):
        sealed.reader.open(moved)


def test_frame_flipped_byte(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob)
    for index in range(len(frames[0].ciphertext)):
        for mask in (0x01, 0x80):
            tampered = tpb.SealedFrame(
                seq=0, final=False, ciphertext=flip(frames[0].ciphertext, index, mask)
            )
            with pytest.raises(SealingError, match="does not authenticate"):
                sealed.reader.open(tampered)
    # Failed frames do not advance the reader.
    assert sealed.reader.open(frames[0]) == b"chunk 0"


def test_frame_final_flag_flipped(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob, n=3)
    early_end = tpb.SealedFrame(seq=0, final=True, ciphertext=frames[0].ciphertext)
    with pytest.raises(SealingError, match="does not authenticate"):
        sealed.reader.open(early_end)
    sealed.reader.open(frames[0])
    sealed.reader.open(frames[1])
    not_final = tpb.SealedFrame(seq=2, final=False, ciphertext=frames[2].ciphertext)
    with pytest.raises(SealingError, match="does not authenticate"):
        sealed.reader.open(not_final)
    assert sealed.reader.open(frames[2]) == b"end"
    sealed.reader.check_complete()


def test_frame_spliced_from_another_request(alice: Member, bob: Member) -> None:
    first, frames_a = stream(alice, bob)
    second, frames_b = stream(alice, bob)
    with pytest.raises(SealingError, match="does not authenticate"):
        first.reader.open(frames_b[0])
    # Same response key, other request ID: the AAD still tells them apart.
    key = os.urandom(32)
    writer = FrameWriter(key, b"\x01" * 16)
    reader = FrameReader(key, b"\x02" * 16)
    with pytest.raises(SealingError, match="does not authenticate"):
        reader.open(writer.seal(b"x"))
    assert first.reader.open(frames_a[0]) == b"chunk 0"
    assert second.reader.open(frames_b[0]) == b"chunk 0"


def test_frame_after_final(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob, n=1)
    assert sealed.reader.open(frames[0]) == b"end"
    with pytest.raises(SealingError, match="after the final"):
        sealed.reader.open(frames[0])
    with pytest.raises(SealingError, match="after the final"):
        sealed.reader.open(tpb.SealedFrame(seq=1, final=False, ciphertext=b""))


def test_truncated_stream(alice: Member, bob: Member) -> None:
    sealed, frames = stream(alice, bob)
    with pytest.raises(SealingError, match="after 0 frames"):
        sealed.reader.check_complete()
    for frame in frames[:-1]:
        sealed.reader.open(frame)
    assert not sealed.reader.finished
    with pytest.raises(SealingError, match="truncated"):
        sealed.reader.check_complete()
    sealed.reader.open(frames[-1])
    sealed.reader.check_complete()


def test_oversized_frame(alice: Member, bob: Member) -> None:
    sealed, _ = stream(alice, bob)
    with pytest.raises(SealingError, match="too large"):
        sealed.reader.open(tpb.SealedFrame(seq=0, ciphertext=b"\x00" * (1024 * 1024 + 1)))


# --- arbitrary bytes ---------------------------------------------------------------------------

H_ALICE = make_member(AUTHORITY)
H_BOB = make_member(AUTHORITY)
H_BOB_X = make_member(AUTHORITY, hybrid=False)
H_ENV = seal(H_ALICE, H_BOB).envelope


@settings(max_examples=300, deadline=None)
@given(
    header=st.binary(max_size=600)
    | st.builds(
        flip, st.just(H_ENV.header), st.integers(0, len(H_ENV.header) - 1), st.integers(1, 255)
    ),
    ciphertext=st.binary(max_size=1500) | st.just(H_ENV.ciphertext),
    signature=st.binary(min_size=64, max_size=64)
    | st.binary(max_size=80)
    | st.just(H_ENV.signature),
    now_ms=st.integers(NOW - 120_000, NOW + 120_000) | st.integers(-(2**63), 2**63 - 1),
)
def test_open_arbitrary_envelopes(
    header: bytes, ciphertext: bytes, signature: bytes, now_ms: int
) -> None:
    if (header, ciphertext, signature) == (H_ENV.header, H_ENV.ciphertext, H_ENV.signature):
        return
    envelope = tpb.SealedEnvelope(header=header, ciphertext=ciphertext, signature=signature)
    with pytest.raises(MeshError):
        H_BOB.opener.open(envelope, now_ms=now_ms)


_KEMS = st.sampled_from([tpb.KEM_UNSPECIFIED, tpb.KEM_X25519, tpb.KEM_MLKEM768_X25519, 3])


@settings(max_examples=300, deadline=None)
@given(
    recipient=st.sampled_from([H_BOB, H_BOB_X]),
    request_id=st.binary(min_size=16, max_size=16) | st.binary(max_size=20),
    issued_offset=st.integers(-70_000, 70_000),
    kem=_KEMS,
    offers_hybrid=st.booleans(),
    key_id=st.sampled_from(["current", "other"]),
    ciphertext=st.binary(max_size=1500),
    prefix_real=st.booleans(),
)
def test_open_validly_signed_envelopes_with_arbitrary_contents(
    recipient: Member,
    request_id: bytes,
    issued_offset: int,
    kem: int,
    offers_hybrid: bool,
    key_id: str,
    ciphertext: bytes,
    prefix_real: bool,
) -> None:
    """A member signs a header and ciphertext that are not a real seal: past every signature
    check, the KEM choice, key lookup and HPKE must still refuse it with a MeshError."""
    header = tpb.EnvelopeHeader(
        protocol_version=PROTOCOL_VERSION,
        sender_id=H_ALICE.identity.node_id,
        recipient_id=recipient.identity.node_id,
        request_id=request_id,
        issued_at_unix_ms=NOW + issued_offset,
        recipient_key_id=recipient.keyring.current.key_id if key_id == "current" else "ab" * 8,
        kem=kem,  # type: ignore[arg-type]
        sender_cert=H_ALICE.cert,
        sender_offers_hybrid=offers_hybrid,
    ).SerializeToString()
    if prefix_real:  # a real KEM share in front of garbage
        real = seal(H_ALICE, recipient, offer_hybrid=kem == tpb.KEM_MLKEM768_X25519)
        ciphertext = real.envelope.ciphertext[: len(ciphertext)] + ciphertext
    with pytest.raises(MeshError):
        recipient.opener.open(resign(H_ALICE.identity, header, ciphertext), now_ms=NOW)


_READER_KEY = os.urandom(32)
_READER_ID = os.urandom(16)
_GENUINE = FrameWriter(_READER_KEY, _READER_ID)
_GENUINE_FRAMES = [_GENUINE.seal(b"a"), _GENUINE.seal(b"b", final=True)]


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(
        st.builds(
            tpb.SealedFrame,
            seq=st.integers(0, 3) | st.integers(0, 2**64 - 1),
            final=st.booleans(),
            ciphertext=st.binary(max_size=64),
        )
        | st.sampled_from(_GENUINE_FRAMES),
        max_size=5,
    )
)
def test_frame_reader_on_arbitrary_frames(frames: list[tpb.SealedFrame]) -> None:
    reader = FrameReader(_READER_KEY, _READER_ID)
    for frame in frames:
        try:
            plaintext = reader.open(frame)
        except MeshError:
            continue
        assert isinstance(plaintext, bytes)
        assert frame in _GENUINE_FRAMES  # nothing forged ever opens


def test_request_ids_are_remembered_per_sender(alice: Member, bob: Member) -> None:
    # A member who sees another's request ID in a clear header cannot burn it first.
    carol = make_member(AUTHORITY)
    request_id = os.urandom(16)
    assert bob.opener.open(seal(carol, bob, request_id=request_id).envelope, now_ms=NOW)
    assert bob.opener.open(seal(alice, bob, request_id=request_id).envelope, now_ms=NOW)
    with pytest.raises(ReplayDetected):
        bob.opener.open(seal(alice, bob, request_id=request_id).envelope, now_ms=NOW)


def test_a_request_that_fails_to_open_does_not_burn_its_id(alice: Member, bob: Member) -> None:
    request_id = os.urandom(16)
    genuine = seal(alice, bob, request_id=request_id).envelope
    broken = tpb.SealedEnvelope()
    broken.CopyFrom(genuine)
    broken.ciphertext = genuine.ciphertext[:-1] + bytes([genuine.ciphertext[-1] ^ 1])
    broken.signature = alice.identity.sign(
        b"allerac-mesh/v1/envelope\x00"
        + len(broken.header).to_bytes(4, "big")
        + broken.header
        + broken.ciphertext
    )
    with pytest.raises(SealingError):
        bob.opener.open(broken, now_ms=NOW)
    assert bob.opener.open(genuine, now_ms=NOW).request_id == request_id


CALLS = {
    "infer": pb.SealedCall(infer=pb.InferBody(model="secret-model")),
    "card": pb.SealedCall(card=pb.CardRequest()),
    "ledger": pb.SealedCall(ledger=lpb.SyncRequest()),
    "quota": pb.SealedCall(quota=lpb.QuotaCall()),
    "users": pb.SealedCall(users=lpb.UserList(digest=b"d")),
}


@pytest.mark.parametrize("kind", sorted(CALLS))
def test_the_kind_of_call_travels_sealed(alice: Member, bob: Member, kind: str) -> None:
    """An observer (the relay) must not tell a prompt from a ledger sync: the kind of call
    is the sealed body's oneof, inside the ciphertext, and the clear header has no field
    for it (protocol 2's `purpose` string is gone from both)."""
    sealed = seal(alice, bob, body=CALLS[kind].SerializeToString())
    assert kind.encode() not in sealed.envelope.header
    assert "purpose" not in tpb.EnvelopeHeader.DESCRIPTOR.fields_by_name
    assert "purpose" not in tpb.SealedRequestBody.DESCRIPTOR.fields_by_name
    opened = bob.opener.open(sealed.envelope, now_ms=NOW)
    assert pb.SealedCall.FromString(opened.body).WhichOneof("call") == kind
