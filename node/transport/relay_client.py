"""This node's session with a relay (DESIGN.md "Relay"; wire in relay.proto).

One outbound gRPC stream, kept open: answer the relay's challenge with a Hello
signed by the identity key, then carry NodeService calls both ways as packets.
Calls we make (`call`) are streams keyed by our stream ID; calls other members
make to us are served by the same `NodeCalls` the direct gRPC server uses, so a
request is opened, checked and answered identically whichever way it came.
The payloads are already sealed end to end: the relay forwards what it cannot
read.

When the session drops, every call in flight through it fails with
`Unavailable` (the entry side fails over) and the link reconnects with
jittered exponential backoff capped at one second, so a restarted relay has
its nodes back within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from cloud_relay import relay_pb2_grpc as rpb_grpc
from mesh.clock import SYSTEM, Clock
from mesh.errors import (
    InvalidRequest,
    MeshError,
    Overloaded,
    PermissionDenied,
    RemoteProtocolError,
    Unavailable,
)
from mesh.routing.relay import MAX_FRAME_BYTES, MAX_TIMEOUT_S, sign_hello
from mesh.trust.membership import Role, role_from_pb
from mesh.wire import codec, grpc_options
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import relay_pb2 as rpb
from mesh.wire.v1 import trust_pb2 as tpb
from node.store.trust_store import TrustStore
from node.tasks import Tasks
from node.transport.calls import NodeCalls
from node.transport.peer_client import M

logger = logging.getLogger(__name__)

# What `read()` on a gRPC aio stream returns at its end (missing from grpc-stubs).
STREAM_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
HANDSHAKE_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
OUTBOX_FRAMES = 1024  # frames waiting to go to the relay (senders wait when it is full)
CALL_QUEUE_FRAMES = 4096  # replies buffered per call we made (a reader that falls behind fails)
MAX_SERVED_CALLS = 256  # calls from others served through the relay at once


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayMember:
    node_id: str
    role: Role


_END = object()


class _Call:
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(CALL_QUEUE_FRAMES)


def _refusal_error(refusal: rpb.RelayRefusal) -> MeshError:
    reason = refusal.reason
    text = f"relay refused: {refusal.message}"
    if reason in (
        rpb.REFUSAL_REASON_PEER_FULL,
        rpb.REFUSAL_REASON_RATE_LIMITED,
        rpb.REFUSAL_REASON_RELAY_FULL,
    ):
        return Overloaded(text)
    if reason == rpb.REFUSAL_REASON_NOT_ALLOWED:
        return PermissionDenied(text)
    if reason == rpb.REFUSAL_REASON_UNKNOWN_PEER:
        return Unavailable(text)
    return RemoteProtocolError(text)


class RelayLink:
    def __init__(
        self,
        address: str,
        *,
        trust: TrustStore,
        calls: NodeCalls,
        on_directory: Callable[[list[RelayMember]], None] = lambda members: None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self.address = address
        self._trust = trust
        self._calls = calls
        self._on_directory = on_directory
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}  # calls we made, by stream ID
        self._served: dict[tuple[str, int], asyncio.Task[None]] = {}  # calls made to us
        self._outbox: asyncio.Queue[rpb.RelayFrame] = asyncio.Queue(OUTBOX_FRAMES)
        self._tasks = Tasks(f"relay {address}")
        self.connected = asyncio.Event()
        self.last_error = ""

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> RelayLink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._tasks.start(self._run(), "session")

    async def aclose(self) -> None:
        await self._tasks.aclose()

    def push_revocations(self, signed: tpb.SignedRevocations) -> None:
        """Hand the relay a newer revocation list now: it closes the revoked nodes'
        sessions at once (a new session's hello carries it too, should this be lost)."""
        if not self.connected.is_set():
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(rpb.RelayFrame(revocations=signed))

    async def restart(self) -> None:
        """Open a new session now (the node's membership changed: a join). The old
        session's tasks end with their group; a closed group starts nothing, so the new
        session gets a group of its own."""
        await self._tasks.aclose()
        self._tasks = Tasks(f"relay {self.address}")
        await self.start()

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            opened_at = self._clock.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except MeshError as exc:
                self.last_error = exc.message
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a broken relay must not end the node's retries
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("relay session to %s failed", self.address)
            if self._clock.monotonic() - opened_at > 5:
                backoff = BACKOFF_FIRST_S  # it had been working: retry at once
            logger.info("relay %s: %s; retrying", self.address, self.last_error or "closed")
            # Full jitter, so nodes cut off together do not come back in lockstep.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _session(self) -> None:
        options = dict(grpc_options.channel_options())
        options["grpc.max_receive_message_length"] = MAX_FRAME_BYTES
        options["grpc.max_send_message_length"] = MAX_FRAME_BYTES
        async with grpc.aio.insecure_channel(self.address, options=list(options.items())) as ch:
            stub = rpb_grpc.RelayServiceStub(ch)  # type: ignore[no-untyped-call]
            stream = stub.Session()
            try:
                await self._handshake(stream)
                self.last_error = ""
                self.connected.set()
                logger.info("relay %s: session open", self.address)
                writer = asyncio.create_task(self._write(stream))
                reader = asyncio.create_task(self._read(stream))
                try:
                    done, _ = await asyncio.wait(
                        {reader, writer}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()  # raise what ended it
                    self.last_error = "the relay closed the session"
                finally:
                    for task in (reader, writer):
                        task.cancel()
                    await asyncio.gather(reader, writer, return_exceptions=True)
            finally:
                stream.cancel()
                self._session_lost()

    async def _handshake(self, stream: Any) -> None:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            first = await stream.read()
            if first is STREAM_EOF or first.WhichOneof("frame") != "challenge":
                raise RemoteProtocolError("the relay did not start with a challenge")
            trust = self._trust
            revocations = trust.revocations.signed if trust.revocations is not None else None
            hello = sign_hello(
                first.challenge, identity=trust.identity, cert=trust.cert, revocations=revocations
            )
            await stream.write(rpb.RelayFrame(hello=hello))
            welcome = await stream.read()
            if welcome is STREAM_EOF or welcome.WhichOneof("frame") != "welcome":
                raise RemoteProtocolError("the relay did not welcome this node")
            if welcome.welcome.node_id != trust.identity.node_id:
                raise RemoteProtocolError("the relay welcomed another node")

    def _session_lost(self) -> None:
        self.connected.clear()
        self._on_directory([])
        lost = Unavailable(f"lost the relay session ({self.address})")
        for call in self._pending.values():
            self._push(call, lost)
        for task in self._served.values():
            task.cancel()
        # Frames for the old session are void: stream IDs and calls died with it.
        while not self._outbox.empty():
            self._outbox.get_nowait()

    async def _write(self, stream: Any) -> None:
        while True:
            await stream.write(await self._outbox.get())

    async def _read(self, stream: Any) -> None:
        while True:
            frame = await stream.read()
            if frame is STREAM_EOF:
                return
            kind = frame.WhichOneof("frame")
            if kind == "packet":
                self._packet(frame.packet)
            elif kind == "refusal":
                self._refusal(frame.refusal)
            elif kind == "directory":
                members = [
                    RelayMember(node_id=m.node_id[:64], role=role_from_pb(m.role))
                    for m in frame.directory.members
                    if m.node_id != self._trust.identity.node_id
                ]
                self._on_directory(members)
            else:
                logger.debug("relay sent an unexpected %s frame", kind)

    # --- calls we make ------------------------------------------------------------------------

    def _push(self, call: _Call, item: Any) -> None:
        try:
            call.queue.put_nowait(item)
        except asyncio.QueueFull:
            # The reader fell behind by thousands of frames: end the call rather than grow.
            with contextlib.suppress(asyncio.QueueEmpty):
                call.queue.get_nowait()
            call.queue.put_nowait(Unavailable("fell behind the relay stream"))

    async def call(
        self, peer: str, method: str, payload: bytes, *, timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """One NodeService call to `peer` through the relay: its response messages."""
        if not self.connected.is_set():
            raise Unavailable(f"not connected to the relay {self.address}")
        stream_id = next(self._ids)
        call = _Call()
        self._pending[stream_id] = call
        ended = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._outbox.put(
                    rpb.RelayFrame(
                        packet=rpb.RelayPacket(
                            peer=peer,
                            stream_id=stream_id,
                            kind=rpb.PACKET_KIND_CALL,
                            method=method,
                            payload=payload,
                            timeout_s=min(timeout_s, MAX_TIMEOUT_S),
                        )
                    )
                )
                while True:
                    item = await call.queue.get()
                    if item is _END:
                        ended = True
                        return
                    if isinstance(item, MeshError):
                        ended = True
                        raise item
                    yield item
        except TimeoutError as exc:
            raise Unavailable(f"no answer through the relay in {timeout_s:g} s") from exc
        finally:
            self._pending.pop(stream_id, None)
            if not ended and self.connected.is_set():
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(
                        rpb.RelayFrame(
                            packet=rpb.RelayPacket(
                                peer=peer, stream_id=stream_id, kind=rpb.PACKET_KIND_CANCEL
                            )
                        )
                    )

    def _packet(self, packet: rpb.RelayPacket) -> None:
        kind = packet.kind
        if kind == rpb.PACKET_KIND_REPLY or kind == rpb.PACKET_KIND_END:
            call = self._pending.get(packet.stream_id)
            if call is None:
                return  # a call we gave up on
            if kind == rpb.PACKET_KIND_REPLY:
                self._push(call, packet.payload)
            elif packet.HasField("error"):
                error = packet.error
                self._push(
                    call, codec.error_from_status(error.grpc_status, error.message, error.code)
                )
            else:
                self._push(call, _END)
        elif kind == rpb.PACKET_KIND_CALL:
            self._serve(packet)
        elif kind == rpb.PACKET_KIND_CANCEL:
            task = self._served.get((packet.peer, packet.stream_id))
            if task is not None:
                task.cancel()

    def _refusal(self, refusal: rpb.RelayRefusal) -> None:
        if refusal.kind in (rpb.PACKET_KIND_CALL, rpb.PACKET_KIND_CANCEL):
            call = self._pending.get(refusal.stream_id)
            if call is not None:
                self._push(call, _refusal_error(refusal))
        else:
            # Our answer could not be delivered: its caller is gone or choked; stop serving it.
            task = self._served.get((refusal.peer, refusal.stream_id))
            if task is not None:
                task.cancel()

    # --- calls made to us -----------------------------------------------------------------------

    def _serve(self, packet: rpb.RelayPacket) -> None:
        key = (packet.peer, packet.stream_id)
        if key in self._served:
            return  # a duplicate CALL for a live stream: ignore it
        if len(self._served) >= MAX_SERVED_CALLS:
            self._end(packet.peer, packet.stream_id, Overloaded("too many calls through the relay"))
            return
        task = asyncio.create_task(self._answer(packet))
        self._served[key] = task
        task.add_done_callback(lambda _t: self._served.pop(key, None))

    def _end(self, peer: str, stream_id: int, error: MeshError | None) -> None:
        packet = rpb.RelayPacket(peer=peer, stream_id=stream_id, kind=rpb.PACKET_KIND_END)
        if error is not None:
            packet.error.CopyFrom(codec.error_to_pb(error).error)
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(rpb.RelayFrame(packet=packet))

    async def _reply(self, peer: str, stream_id: int, payload: bytes) -> None:
        await self._outbox.put(
            rpb.RelayFrame(
                packet=rpb.RelayPacket(
                    peer=peer, stream_id=stream_id, kind=rpb.PACKET_KIND_REPLY, payload=payload
                )
            )
        )

    async def _answer(self, packet: rpb.RelayPacket) -> None:
        peer, stream_id = packet.peer, packet.stream_id
        label = f"relay:{peer[:7]}"
        try:
            if packet.method == "Describe":
                await self._reply(peer, stream_id, self._calls.describe().SerializeToString())
            elif packet.method == "Ping":
                ping = codec.parse_message(pb.PingRequest, packet.payload)
                await self._reply(
                    peer, stream_id, self._calls.ping(ping, label).SerializeToString()
                )
            elif packet.method == "PushRevocations":
                signed = codec.parse_message(tpb.SignedRevocations, packet.payload)
                reply = self._calls.push_revocations(signed, label)
                await self._reply(peer, stream_id, reply.SerializeToString())
            elif packet.method == "Infer":
                request = codec.parse_message(pb.InferRequest, packet.payload)
                timeout = packet.timeout_s if 0 < packet.timeout_s <= MAX_TIMEOUT_S else None
                events = self._calls.infer(
                    request, peer=label, time_remaining_s=timeout, via_relay=peer
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        await self._reply(peer, stream_id, event.SerializeToString())
            else:
                raise RemoteProtocolError(f"unknown method {packet.method[:40]!r}")
        except MeshError as error:
            self._end(peer, stream_id, error)
            return
        self._end(peer, stream_id, None)


class RelayTransport:
    """Calls to one node through this node's relay session (a `node.transport.peer_client`
    transport, like its `GrpcTransport`)."""

    via_relay = True

    def __init__(self, link: RelayLink, node_id: str) -> None:
        self.label = f"relay:{node_id}"
        self._link = link
        self._node_id = node_id

    async def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]:
        replies = self._link.call(
            self._node_id, method, request.SerializeToString(), timeout_s=timeout_s
        )
        async with contextlib.aclosing(replies):
            async for payload in replies:
                try:
                    yield codec.parse_message(reply_type, payload)
                except InvalidRequest as exc:
                    raise RemoteProtocolError(f"peer sent {exc.message}") from exc

    async def unary(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> M:
        async with contextlib.aclosing(
            self.stream(method, request, reply_type, timeout_s)
        ) as replies:
            async for reply in replies:
                return reply
        raise RemoteProtocolError(f"peer sent no answer to {method}")

    async def aclose(self) -> None:
        return None  # the relay session belongs to the node, not to one peer
