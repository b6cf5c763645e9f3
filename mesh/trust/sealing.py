"""Sealed requests and sealed answer streams (DESIGN.md "Sealing"), sans I/O.

Request (sender -> recipient), one `SealedEnvelope`:
  header      EnvelopeHeader in clear: version, sender, recipient, request ID,
              issued-at, recipient key ID, KEM, sender's membership cert, and
              whether the sender offers the hybrid KEM.
  ciphertext  HPKE single-shot (RFC 9180 §6.1) to the recipient's current key:
              KEM X25519 or ML-KEM-768+X25519, HKDF-SHA256, ChaCha20-Poly1305,
              with info = INFO_CONTEXT || header. Changing any header byte makes
              opening fail (RFC 9180 §8.1: info as authenticated context).
  signature   sender's Ed25519 identity key over SIG_CONTEXT || len(header) ||
              header || ciphertext: the recipient knows who sent it (HPKE's base
              mode alone leaves the sender anonymous).
The plaintext holds a fresh 32-byte response key and the request body (for the node
service, a `SealedCall`: which kind of call it is travels sealed too).

Answer (recipient -> sender), a stream of `SealedFrame`s: ChaCha20-Poly1305
under the response key, nonce = 4 zero bytes || frame number (u64 BE), AAD =
FRAME_CONTEXT || request ID || final flag. The reader insists on frame numbers
0, 1, 2, ... and on a final frame, so reordered, dropped, duplicated, spliced
(from another request: other key and AAD) and truncated streams are detected.

Replay: the recipient rejects an envelope issued more than ±60 s from its clock
(saying so) and any request ID it has already seen inside that window. The window
lives in memory, so a node also refuses every envelope issued before it started
(`not_before_ms`): a request captured before a restart cannot be replayed after it.
The cost: a sender whose clock is behind this node's by d cannot reach it for the
first d after its start (it fails over to another node meanwhile).

Downgrade: a recipient that offers the hybrid KEM rejects an X25519 envelope
from a sender that says (in the signed, info-bound header) it offers hybrid too.
Stripping the hybrid key from a recipient's keys breaks their signature.

What an observer (or the relay) learns from an envelope: sender and recipient node IDs,
the sender's membership certificate (its identity key, mesh ID, role and expiry), the
recipient's key ID, the KEM, the issue time, a random request ID, sizes and timing.
Never the kind of call, the model, the prompt, the answer or the user.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION
from mesh.errors import (
    BadSignature,
    ClockSkew,
    Overloaded,
    ReplayDetected,
    SealingError,
    UnsupportedProtocol,
)
from mesh.trust.enckeys import KeyRing, PeerKeys
from mesh.trust.identity import Identity, verify_signature
from mesh.trust.membership import Membership, verify_cert
from mesh.wire.v1 import trust_pb2 as tpb

SIG_CONTEXT = b"allerac-mesh/v1/envelope\x00"
INFO_CONTEXT = b"allerac-mesh/v1/hpke-info\x00"
FRAME_CONTEXT = b"allerac-mesh/v1/frame\x00"
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
MAX_HEADER_BYTES = 4096
MAX_FRAME_BYTES = 1024 * 1024
REPLAY_WINDOW_MS = 60_000
MAX_REMEMBERED_REQUESTS = 1_000_000
REQUEST_ID_BYTES = 16
RESPONSE_KEY_BYTES = 32

_X25519 = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_HYBRID = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def _signed_bytes(header: bytes, ciphertext: bytes) -> bytes:
    return SIG_CONTEXT + len(header).to_bytes(4, "big") + header + ciphertext


# --- answer frames ----------------------------------------------------------------------------


def _nonce(seq: int) -> bytes:
    return b"\x00\x00\x00\x00" + seq.to_bytes(8, "big")


def _aad(request_id: bytes, final: bool) -> bytes:
    return FRAME_CONTEXT + request_id + (b"\x01" if final else b"\x00")


class FrameWriter:
    """The recipient's side of the answer stream."""

    def __init__(self, response_key: bytes, request_id: bytes) -> None:
        self._aead = ChaCha20Poly1305(response_key)
        self._request_id = request_id
        self._seq = 0
        self._closed = False

    def seal(self, plaintext: bytes, *, final: bool = False) -> tpb.SealedFrame:
        if self._closed:
            raise SealingError("the answer stream is already closed")
        seq = self._seq
        self._seq += 1
        self._closed = final
        ciphertext = self._aead.encrypt(_nonce(seq), plaintext, _aad(self._request_id, final))
        return tpb.SealedFrame(seq=seq, final=final, ciphertext=ciphertext)


class FrameReader:
    """The sender's side: opens frames in order and notices what is missing."""

    def __init__(self, response_key: bytes, request_id: bytes) -> None:
        self._aead = ChaCha20Poly1305(response_key)
        self._request_id = request_id
        self._expected = 0
        self.finished = False

    def open(self, frame: tpb.SealedFrame) -> bytes:
        if self.finished:
            raise SealingError("a frame arrived after the final frame")
        if frame.seq != self._expected:
            raise SealingError(
                f"frame {frame.seq} arrived where frame {self._expected} was due "
                "(reordered, dropped or replayed)"
            )
        if len(frame.ciphertext) > MAX_FRAME_BYTES:
            raise SealingError("frame is too large")
        try:
            plaintext = self._aead.decrypt(
                _nonce(frame.seq), frame.ciphertext, _aad(self._request_id, frame.final)
            )
        except InvalidTag as exc:
            raise SealingError("frame does not authenticate (tampered or spliced)") from exc
        self._expected += 1
        self.finished = frame.final
        return plaintext

    def check_complete(self) -> None:
        """Call when the transport says the stream ended."""
        if not self.finished:
            raise SealingError(
                f"the answer ended after {self._expected} frames without its final frame "
                "(truncated)"
            )


# --- request envelopes -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sealed:
    envelope: tpb.SealedEnvelope
    request_id: bytes
    reader: FrameReader


def seal_request(
    body: bytes,
    *,
    identity: Identity,
    sender_cert: tpb.SignedCert,
    recipient: PeerKeys,
    now_ms: int,
    offer_hybrid: bool,
    request_id: bytes | None = None,
) -> Sealed:
    request_id = request_id if request_id is not None else os.urandom(REQUEST_ID_BYTES)
    if now_ms >= recipient.expires_at_ms:
        raise SealingError(
            f"the encryption keys of node {recipient.node_id[:7]} have expired; "
            "fetch its card again"
        )
    use_hybrid = offer_hybrid and recipient.mlkem768 is not None
    header = tpb.EnvelopeHeader(
        protocol_version=PROTOCOL_VERSION,
        sender_id=identity.node_id,
        recipient_id=recipient.node_id,
        request_id=request_id,
        issued_at_unix_ms=now_ms,
        recipient_key_id=recipient.key_id,
        kem=tpb.KEM_MLKEM768_X25519 if use_hybrid else tpb.KEM_X25519,
        sender_cert=sender_cert,
        sender_offers_hybrid=offer_hybrid,
    )
    header_bytes = header.SerializeToString(deterministic=True)
    response_key = os.urandom(RESPONSE_KEY_BYTES)
    # The kind of call is sealed too (it is in `body`): an observer must not tell a prompt
    # from a ledger sync.
    plaintext = tpb.SealedRequestBody(response_key=response_key, body=body).SerializeToString()
    info = INFO_CONTEXT + header_bytes
    if use_hybrid:
        assert recipient.mlkem768 is not None
        public = hpke.MLKEM768X25519PublicKey(recipient.mlkem768, recipient.x25519)
        ciphertext = _HYBRID.encrypt(plaintext, public, info=info)
    else:
        ciphertext = _X25519.encrypt(plaintext, recipient.x25519, info=info)
    signature = identity.sign(_signed_bytes(header_bytes, ciphertext))
    envelope = tpb.SealedEnvelope(header=header_bytes, ciphertext=ciphertext, signature=signature)
    return Sealed(
        envelope=envelope, request_id=request_id, reader=FrameReader(response_key, request_id)
    )


class ReplayGuard:
    """Request IDs seen inside the window; each is forgotten once its issued-at could no
    longer pass the clock-skew check, so memory is bounded by the request rate."""

    def __init__(
        self,
        *,
        window_ms: int = REPLAY_WINDOW_MS,
        capacity: int = MAX_REMEMBERED_REQUESTS,
        not_before_ms: int = 0,
    ) -> None:
        self._window_ms = window_ms
        # What was seen before this guard existed (a previous run of the node) is unknown,
        # so nothing issued before then is accepted.
        self._not_before_ms = not_before_ms
        self._capacity = capacity
        self._seen: dict[bytes, int] = {}  # request ID -> forget after (ms)
        self._expiry: list[tuple[int, bytes]] = []  # heap of (forget after, request ID)

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, request_id: bytes, issued_at_ms: int, now_ms: int) -> None:
        """Refuse a skewed or already seen request; `remember` it once it proved genuine."""
        skew = issued_at_ms - now_ms
        if abs(skew) > self._window_ms:
            raise ClockSkew(
                f"request was issued {skew / 1000:+.1f} s from this node's clock; more than "
                f"±{self._window_ms // 1000} s apart: check both clocks (NTP)"
            )
        if issued_at_ms < self._not_before_ms:
            raise ReplayDetected(
                "request was issued before this node started, so it may be a replay; "
                f"it is refused (issued {(self._not_before_ms - issued_at_ms) / 1000:.1f} s "
                "before the start)"
            )
        while self._expiry and self._expiry[0][0] < now_ms:
            _, old = heapq.heappop(self._expiry)
            self._seen.pop(old, None)
        if request_id in self._seen:
            raise ReplayDetected("this request was already received (replayed)")
        if len(self._seen) >= self._capacity:
            raise Overloaded("too many requests inside the replay window")

    def remember(self, request_id: bytes, issued_at_ms: int) -> None:
        if request_id in self._seen:
            raise ReplayDetected("this request was already received (replayed)")
        forget_after = issued_at_ms + self._window_ms
        self._seen[request_id] = forget_after
        heapq.heappush(self._expiry, (forget_after, request_id))


@dataclass(frozen=True, kw_only=True)
class OpenedRequest:
    sender: Membership
    request_id: bytes
    body: bytes
    writer: FrameWriter


@dataclass
class EnvelopeOpener:
    """The recipient's side. `revoked` and `mesh_public_key` are read at each call, so a
    revocation or a change of mesh takes effect at once."""

    identity: Identity
    keyring: KeyRing
    mesh_public_key: Callable[[], bytes]
    revoked: Callable[[], frozenset[str]]
    replay: ReplayGuard

    def open(self, envelope: tpb.SealedEnvelope, *, now_ms: int) -> OpenedRequest:
        if (
            len(envelope.header) > MAX_HEADER_BYTES
            or len(envelope.ciphertext) > MAX_ENVELOPE_BYTES
            or len(envelope.signature) != 64
        ):
            raise SealingError("sealed envelope is malformed")
        header = tpb.EnvelopeHeader()
        try:
            header.ParseFromString(envelope.header)
        except (DecodeError, ValueError) as exc:
            raise SealingError("sealed envelope header does not parse") from exc
        if header.protocol_version != PROTOCOL_VERSION:
            raise UnsupportedProtocol(
                f"envelope speaks protocol {header.protocol_version}; this node speaks "
                f"{PROTOCOL_VERSION}"
            )
        if header.recipient_id != self.identity.node_id:
            raise SealingError("envelope is addressed to another node")
        if len(header.request_id) != REQUEST_ID_BYTES:
            raise SealingError("envelope has a malformed request ID")
        sender = verify_cert(
            header.sender_cert,
            mesh_public_key=self.mesh_public_key(),
            now_ms=now_ms,
            revoked=self.revoked(),
        )
        if sender.node_id != header.sender_id:
            raise BadSignature("envelope sender is not the node its certificate names")
        if not verify_signature(
            sender.identity_public_key,
            envelope.signature,
            _signed_bytes(envelope.header, envelope.ciphertext),
        ):
            raise BadSignature("envelope signature does not verify (forged or tampered)")
        # Request IDs are remembered per sender: one member cannot burn another's IDs.
        replay_key = sender.identity_public_key + header.request_id
        self.replay.check(replay_key, header.issued_at_unix_ms, now_ms)
        pair = self.keyring.find(header.recipient_key_id, now_ms)
        if pair is None:
            raise SealingError(
                "envelope is sealed to an encryption key this node no longer has "
                "(rotated out); fetch its card again"
            )
        hybrid = header.kem == tpb.KEM_MLKEM768_X25519
        if header.kem not in (tpb.KEM_X25519, tpb.KEM_MLKEM768_X25519):
            raise SealingError(f"unknown KEM {header.kem}")
        if not hybrid and header.sender_offers_hybrid and pair.mlkem768 is not None:
            raise SealingError(
                "downgrade refused: both nodes offer hybrid ML-KEM-768+X25519 but the "
                "envelope uses X25519 alone"
            )
        info = INFO_CONTEXT + envelope.header
        try:
            if hybrid:
                if pair.mlkem768 is None:
                    raise SealingError("envelope uses the hybrid KEM this node did not offer")
                private = hpke.MLKEM768X25519PrivateKey(pair.mlkem768, pair.x25519)
                plaintext = _HYBRID.decrypt(envelope.ciphertext, private, info=info)
            else:
                plaintext = _X25519.decrypt(envelope.ciphertext, pair.x25519, info=info)
        except (InvalidTag, ValueError) as exc:
            raise SealingError(
                "envelope does not open (tampered or sealed to another key)"
            ) from exc
        body = tpb.SealedRequestBody()
        try:
            body.ParseFromString(plaintext)
        except (DecodeError, ValueError) as exc:
            raise SealingError("sealed body does not parse") from exc
        if len(body.response_key) != RESPONSE_KEY_BYTES:
            raise SealingError("sealed body has a malformed response key")
        # Only a request that opened is remembered, so a failed one never burns its ID.
        self.replay.remember(replay_key, header.issued_at_unix_ms)
        return OpenedRequest(
            sender=sender,
            request_id=header.request_id,
            body=body.body,
            writer=FrameWriter(body.response_key, header.request_id),
        )
