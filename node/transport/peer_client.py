"""Talking to another node's gRPC agent: its cards, sealed inference, joining, revocations.

Everything that matters is sealed (`mesh.trust.sealing`): the request to the peer's
current encryption key, the answer as numbered frames under a key only the two
ends know. A peer is used only after its card verifies against our mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from mesh import PROTOCOL_VERSION
from mesh.errors import InviteError, MeshError, RemoteProtocolError, Unavailable
from mesh.inference import Finished, InferenceEvent, InferenceRequest
from mesh.trust.cards import PeerCard, open_card, verify_peer_card
from mesh.trust.goodbye import Goodbye
from mesh.trust.invites import decode_invite, make_join_request
from mesh.trust.sealing import Sealed, seal_request
from mesh.wire import codec, grpc_options
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.trust_store import TrustStore
from node.tasks import Tasks
from node.transport import node_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0
INFER_TIMEOUT_S = 600.0
SYNC_TIMEOUT_S = 120.0
# How long a call may stay open after its final frame (the peer ends it at once): one held
# longer is cancelled, so a peer cannot pile up open streams on the connection.
END_WAIT_S = 5.0


def _rpc_error(exc: grpc.aio.AioRpcError) -> MeshError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"peer unreachable: {exc.details()}")
    error_code = ""
    metadata: Any = exc.trailing_metadata() or ()
    for item in metadata:
        if item[0] == "x-allerac-error" and isinstance(item[1], str):
            error_code = item[1]
    return codec.error_from_status(code.name, exc.details() or "", error_code)


M = TypeVar("M", bound=Message)


class Transport(Protocol):
    """How NodeService calls reach a peer: a direct gRPC channel or a relay session."""

    label: str

    def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]: ...

    async def unary(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> M: ...

    async def aclose(self) -> None: ...


def _raise_if_we_are_cancelled(exc: asyncio.CancelledError) -> NoReturn:
    """gRPC aio raises CancelledError in a call whose channel was closed under it (a peer's
    client replaced while a heartbeat was in flight): that is the call failing, not our
    task being cancelled, and it must not end the task that made the call."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise exc
    raise Unavailable("the connection to the peer was closed") from exc


class GrpcTransport:
    def __init__(self, address: str) -> None:
        self.label = address
        self._channel = grpc.aio.insecure_channel(address, options=grpc_options.channel_options())
        self._stub = pb_grpc.NodeServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def unary(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> M:
        try:
            reply: M = await getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        except grpc.aio.UsageError as exc:  # the channel was closed under us (client replaced)
            raise Unavailable("the connection to the peer was closed") from exc
        except asyncio.CancelledError as exc:
            _raise_if_we_are_cancelled(exc)
        return reply

    async def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]:
        try:
            call = getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.aio.UsageError as exc:  # the channel was closed under us (client replaced)
            raise Unavailable("the connection to the peer was closed") from exc
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        except asyncio.CancelledError as exc:
            _raise_if_we_are_cancelled(exc)
        finally:
            call.cancel()

    async def aclose(self) -> None:
        await self._channel.close(None)


class PeerClient:
    def __init__(
        self, address: str, *, trust: TrustStore, transport: Transport | None = None
    ) -> None:
        self.address = address
        self._trust = trust
        self.transport: Transport = transport or GrpcTransport(address)
        self._ends = Tasks(f"peer client {address}")  # answers read to their end (`infer`)

    @property
    def via_relay(self) -> bool:
        return bool(getattr(self.transport, "via_relay", False))

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._ends.aclose()
        await self.transport.aclose()

    async def public_card(self, *, timeout_s: float = CONTROL_TIMEOUT_S) -> PeerCard:
        signed = await self.transport.unary(
            "Describe", pb.DescribeRequest(), pb.SignedCard, timeout_s
        )
        return verify_peer_card(
            signed,
            mesh_public_key=self._trust.mesh_public_key,
            now_ms=self._trust.clock.now_ms(),
            revoked=self._trust.revoked,
        )

    def _seal(self, peer: PeerCard, call: pb.SealedCall) -> Sealed:
        return seal_request(
            call.SerializeToString(),
            identity=self._trust.identity,
            sender_cert=self._trust.cert,
            recipient=peer.keys,
            now_ms=self._trust.clock.now_ms(),
            offer_hybrid=self._trust.keyring.hybrid,
        )

    async def _sealed_call(
        self, peer: PeerCard, call: pb.SealedCall, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        sealed = self._seal(peer, call)
        request = pb.InferRequest(protocol_version=PROTOCOL_VERSION, sealed=sealed.envelope)
        events = self.transport.stream("Infer", request, pb.InferEvent, timeout_s)
        async with contextlib.aclosing(events):
            async for message in events:
                if message.WhichOneof("event") != "sealed":
                    raise RemoteProtocolError("peer sent an unsealed answer")
                yield sealed.reader.open(message.sealed)
        sealed.reader.check_complete()

    async def full_card(
        self, peer: PeerCard, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> pb.NodeCard:
        """Models, hardware and addresses: only members may see them, so they come sealed."""
        call = pb.SealedCall(card=pb.CardRequest())
        frames = [f async for f in self._sealed_call(peer, call, timeout_s)]
        event = pb.InferEvent()
        try:
            event.ParseFromString(frames[-1])
        except DecodeError as exc:
            raise RemoteProtocolError("peer sent an unreadable card") from exc
        if event.WhichOneof("event") != "card":
            codec.event_from_pb(event)  # raises the peer's error
            raise RemoteProtocolError("peer answered a card request with something else")
        card = open_card(event.card)
        if card.node_id != peer.node_id:
            raise RemoteProtocolError("peer's full card is for another node")
        return card

    async def infer(
        self, peer: PeerCard, request: InferenceRequest, *, timeout_s: float = INFER_TIMEOUT_S
    ) -> AsyncGenerator[InferenceEvent, None]:
        call = pb.SealedCall(infer=codec.request_to_pb(request))
        frames = self._sealed_call(peer, call, timeout_s)
        finished = False
        try:
            async for plaintext in frames:
                message = pb.InferEvent()
                try:
                    message.ParseFromString(plaintext)
                except DecodeError as exc:
                    raise RemoteProtocolError("peer sent an unreadable event") from exc
                event = codec.event_from_pb(message)
                finished = isinstance(event, Finished)
                yield event
                if finished:
                    return
        finally:
            if finished and not self._ends.closed:
                # The peer ends the call right after its final frame: its status is read
                # in the background, off the answer's path, rather than the call being
                # cancelled (a reset both sides would then process for nothing).
                self._ends.start(_read_to_end(frames), "an answer's end")
            else:
                await frames.aclose()

    async def sync(
        self, peer: PeerCard, request: lpb.SyncRequest, *, timeout_s: float = SYNC_TIMEOUT_S
    ) -> AsyncGenerator[lpb.SyncBatch, None]:
        """The peer's answer to a ledger sync request, frame by frame."""
        async for plaintext in self._sealed_call(peer, pb.SealedCall(ledger=request), timeout_s):
            message = pb.InferEvent()
            try:
                message.ParseFromString(plaintext)
            except DecodeError as exc:
                raise RemoteProtocolError("peer sent an unreadable ledger answer") from exc
            if message.WhichOneof("event") != "ledger":
                codec.event_from_pb(message)  # raises the peer's error
                raise RemoteProtocolError("peer answered a ledger request with something else")
            yield message.ledger

    async def _one_answer(
        self, peer: PeerCard, call: pb.SealedCall, which: str, timeout_s: float
    ) -> pb.InferEvent:
        """A sealed request answered by one event of kind `which` (or the peer's error)."""
        kind = call.WhichOneof("call")
        frames = [f async for f in self._sealed_call(peer, call, timeout_s)]
        message = pb.InferEvent()
        try:
            message.ParseFromString(frames[-1] if frames else b"")
        except DecodeError as exc:
            raise RemoteProtocolError(f"peer sent an unreadable {kind} answer") from exc
        if message.WhichOneof("event") != which:
            codec.event_from_pb(message)  # raises the peer's error
            raise RemoteProtocolError(f"peer answered a {kind} request with something else")
        return message

    async def quota(
        self, peer: PeerCard, call: lpb.QuotaCall, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> lpb.QuotaGrant:
        """Reserve or release at the node keeping a user's quota."""
        return (await self._one_answer(peer, pb.SealedCall(quota=call), "quota", timeout_s)).quota

    async def users(
        self, peer: PeerCard, digest: bytes, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> lpb.UserList:
        """The peer's list of the mesh's users (empty when it has the same `digest`)."""
        call = pb.SealedCall(users=lpb.UserList(digest=digest))
        return (await self._one_answer(peer, call, "users", timeout_s)).users

    async def grant_admin(
        self, peer: PeerCard, grant: pb.AdminGrant, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> pb.SignedCard:
        """Make `peer` an admin of the mesh; returns its full card, now an admin's."""
        call = pb.SealedCall(admin=grant)
        return (await self._one_answer(peer, call, "card", timeout_s)).card

    async def ping(
        self, *, timeout_s: float = CONTROL_TIMEOUT_S, goodbye: Goodbye | None = None
    ) -> pb.PingResponse:
        request = pb.PingRequest(nonce=os.urandom(8), sent_at_unix_ms=self._trust.clock.now_ms())
        if goodbye is not None:
            request.sent_at_unix_ms = goodbye.sent_at_ms
            request.leaving_node_id = goodbye.leaving_node_id
            request.recipient_node_id = goodbye.recipient_node_id
            request.card_issued_at_unix_ms = goodbye.card_issued_at_ms
            request.goodbye_signature = goodbye.signature
        return await self.transport.unary("Ping", request, pb.PingResponse, timeout_s)

    async def join(self, request: tpb.JoinRequest) -> tpb.JoinResponse:
        return await self.transport.unary("Join", request, tpb.JoinResponse, CONTROL_TIMEOUT_S)

    async def push_revocations(self, signed: tpb.SignedRevocations) -> int:
        reply = await self.transport.unary(
            "PushRevocations", signed, pb.PushRevocationsResponse, CONTROL_TIMEOUT_S
        )
        return int(reply.version)


async def _read_to_end(frames: AsyncGenerator[bytes, None]) -> None:
    """The rest of an answer whose final frame came: nothing but the call's status (the
    frame reader refuses anything after the final frame; the answer was delivered, so
    that is only logged)."""
    try:
        async with asyncio.timeout(END_WAIT_S), contextlib.aclosing(frames):
            async for _ in frames:
                pass
    except MeshError as exc:
        logger.debug("after its final frame, an answer's call ended with: %s", exc.message)
    except TimeoutError:
        logger.debug("an answer's call stayed open after its final frame; cancelled")


async def join_mesh(
    code: str, trust: TrustStore, *, display_name: str, addresses: tuple[str, ...]
) -> list[str]:
    """Redeem an invite at the inviter and adopt the certificate it returns.
    Returns the inviter's addresses: the first peer to talk to in the new mesh."""
    invite = decode_invite(code, now_ms=trust.clock.now_ms())
    if invite.mesh_public_key == trust.mesh_public_key:
        raise InviteError("this node is already a member of that mesh")
    request = make_join_request(
        invite,
        trust.identity,
        now_ms=trust.clock.now_ms(),
        display_name=display_name,
        addresses=addresses,
    )
    errors = []
    for address in invite.inviter_addresses:
        try:
            async with PeerClient(address, trust=trust) as client:
                response = await client.join(request)
        except Unavailable as exc:
            errors.append(f"{address}: {exc.message}")
            continue
        trust.adopt(response, mesh_public_key=invite.mesh_public_key, now=trust.clock.now_ms())
        return list(invite.inviter_addresses)
    raise Unavailable("could not reach the inviter: " + "; ".join(errors))
