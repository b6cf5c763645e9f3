"""Talking to another node's gRPC agent: its cards, sealed inference, joining, revocations.

Everything that matters is sealed (`mesh.sealing`): the request to the peer's
current encryption key, the answer as numbered frames under a key only the two
ends know. A peer is used only after its card verifies against our mesh.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION
from mesh.cards import PeerCard, open_card, verify_peer_card
from mesh.errors import InviteError, MeshError, RemoteProtocolError, Unavailable
from mesh.inference import Finished, InferenceEvent, InferenceRequest
from mesh.invites import decode_invite, make_join_request
from mesh.sealing import Sealed, seal_request
from mesh.wire import codec, grpc_options
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import node_pb2_grpc as pb_grpc
from mesh.wire.v1 import trust_pb2 as tpb
from node.trust_store import TrustStore

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0
INFER_TIMEOUT_S = 600.0


def _now_ms() -> int:
    return int(time.time() * 1000)


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


class PeerClient:
    def __init__(self, address: str, *, trust: TrustStore) -> None:
        self.address = address
        self._trust = trust
        self._channel = grpc.aio.insecure_channel(address, options=grpc_options.channel_options())
        self._stub = pb_grpc.NodeServiceStub(self._channel)  # type: ignore[no-untyped-call]

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
        await self._channel.close(None)

    async def public_card(self, *, timeout_s: float = CONTROL_TIMEOUT_S) -> PeerCard:
        try:
            signed = await self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        return verify_peer_card(
            signed,
            mesh_public_key=self._trust.mesh_public_key,
            now_ms=_now_ms(),
            revoked=self._trust.revoked,
        )

    def _seal(self, peer: PeerCard, body: bytes, purpose: str) -> Sealed:
        return seal_request(
            body,
            identity=self._trust.identity,
            sender_cert=self._trust.cert,
            recipient=peer.keys,
            now_ms=_now_ms(),
            offer_hybrid=self._trust.keyring.hybrid,
            purpose=purpose,
        )

    async def _sealed_call(
        self, peer: PeerCard, body: bytes, purpose: str, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        sealed = self._seal(peer, body, purpose)
        call = self._stub.Infer(
            pb.InferRequest(protocol_version=PROTOCOL_VERSION, sealed=sealed.envelope),
            timeout=timeout_s,
        )
        try:
            async for message in call:
                if message.WhichOneof("event") != "sealed":
                    raise RemoteProtocolError("peer sent an unsealed answer")
                yield sealed.reader.open(message.sealed)
            sealed.reader.check_complete()
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        finally:
            call.cancel()

    async def full_card(
        self, peer: PeerCard, *, timeout_s: float = CONTROL_TIMEOUT_S
    ) -> pb.NodeCard:
        """Models, hardware and addresses: only members may see them, so they come sealed."""
        frames = [f async for f in self._sealed_call(peer, b"", "card", timeout_s)]
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
        body = codec.request_to_pb(request).SerializeToString()
        async for plaintext in self._sealed_call(peer, body, "infer", timeout_s):
            message = pb.InferEvent()
            try:
                message.ParseFromString(plaintext)
            except DecodeError as exc:
                raise RemoteProtocolError("peer sent an unreadable event") from exc
            event = codec.event_from_pb(message)
            yield event
            if isinstance(event, Finished):
                return

    async def ping(
        self, *, timeout_s: float = CONTROL_TIMEOUT_S, leaving_node_id: str = ""
    ) -> pb.PingResponse:
        try:
            reply: pb.PingResponse = await self._stub.Ping(
                pb.PingRequest(
                    nonce=os.urandom(8),
                    sent_at_unix_ms=_now_ms(),
                    leaving_node_id=leaving_node_id,
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        return reply

    async def join(self, request: tpb.JoinRequest) -> tpb.JoinResponse:
        try:
            response: tpb.JoinResponse = await self._stub.Join(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        return response

    async def push_revocations(self, signed: tpb.SignedRevocations) -> int:
        try:
            reply = await self._stub.PushRevocations(signed, timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
        return int(reply.version)


async def join_mesh(
    code: str, trust: TrustStore, *, display_name: str, addresses: tuple[str, ...]
) -> list[str]:
    """Redeem an invite at the inviter and adopt the certificate it returns.
    Returns the inviter's addresses: the first peer to talk to in the new mesh."""
    invite = decode_invite(code, now_ms=_now_ms())
    if invite.mesh_public_key == trust.mesh_public_key:
        raise InviteError("this node is already a member of that mesh")
    request = make_join_request(
        invite,
        trust.identity,
        now_ms=_now_ms(),
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
        trust.adopt(response, mesh_public_key=invite.mesh_public_key, now=_now_ms())
        return list(invite.inviter_addresses)
    raise Unavailable("could not reach the inviter: " + "; ".join(errors))
