"""The gRPC agent's public port: caps per source, and a deadline to prove membership.

gRPC core caps connections only in total (`grpc.max_allowed_incoming_connections`,
used here as a backstop) and knows neither source addresses nor members: one stranger
could fill any total and keep every member out, and 21,000 idle connections used up
the node's descriptors. So the gRPC server listens on 127.0.0.1 (an ephemeral port)
and the public port belongs to this front, which splices each admitted connection to
it, byte for byte:

- On accept the connection is counted against its source (`mesh.routing.connlimits`: per
  address, in total, with a reserve for loopback); over the caps it is closed at once,
  before anything is built for it (`node.transport.listeners.CappedListener`).
- An admitted connection must carry a call that proves membership within
  `member_deadline_s`, or it is closed: an `Infer` that answered (its sealed envelope
  opened, so a verified, unrevoked member sent it), or a redeemed invite. A connection
  with a call still running is given another period (a member's request may wait in a
  queue before its first answer; a stranger's calls end at once). The public calls
  (Describe, Ping, Join) are for getting to know a node, not for holding a connection.
  A member's box fetches the sealed card right after connecting and syncs its ledger
  every 2 s, so its connections qualify at once.
- Each call is told its real client: gRPC sees the front's own socket as the peer, so
  `_FrontInterceptor` maps that socket's port back to the public connection and hands
  the servicer a context whose `peer()` is the client's address (rejections are logged
  and pings rate-limited per real source).
- Flow control both ways: a side whose writes back up pauses reading on the other, so
  neither buffers more than a transport's high-water mark.

What it costs: three descriptors per connection instead of one, and two loopback hops
per message (bench/bench_routing.py measures it).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc

from mesh.routing.connlimits import Caps, ConnLimits
from mesh.wire.v1 import node_pb2 as pb
from node.transport.listeners import Admission, CappedListener, Throttle

logger = logging.getLogger(__name__)

BACKEND_HOST = "127.0.0.1"
BACKEND_CONNECT_TIMEOUT_S = 5.0  # loopback: at once, unless the gRPC server is stuck
_SERVICE = pb.DESCRIPTOR.services_by_name["NodeService"].full_name
# Calls whose success proves the caller is (now) a member of this node's mesh.
MEMBER_PROOF_METHODS = frozenset({f"/{_SERVICE}/Infer", f"/{_SERVICE}/Join"})

if TYPE_CHECKING:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


def _grpc_peer(host: str, port: int) -> str:
    """The form gRPC gives `context.peer()`: 'ipv4:1.2.3.4:5', 'ipv6:[::1]:5'."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return f"unknown:{host}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ipv4:{ip.ipv4_mapped}:{port}"
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{host}:{port}"


class _Splice:
    """One public connection and its connection to the gRPC server."""

    __slots__ = (
        "address",
        "backend",
        "backend_port",
        "calls",
        "connecting",
        "deadline",
        "front",
        "member",
        "peer",
        "public",
    )

    def __init__(self, front: GrpcFront, public: asyncio.Transport, address: str) -> None:
        self.front = front
        self.public = public
        self.address = address
        peer = public.get_extra_info("peername")
        self.peer = _grpc_peer(address, int(peer[1]) if isinstance(peer, tuple) else 0)
        self.backend: asyncio.Transport | None = None
        self.backend_port = 0
        self.calls = 0  # in progress: a member's request may wait in a queue before it answers
        self.connecting: asyncio.Task[None] | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.member = False

    def proven(self) -> None:
        if not self.member:
            self.member = True
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

    def close(self) -> None:
        """Cut both sides now."""
        self.public.abort()
        if self.backend is not None:
            self.backend.abort()


class _PublicSide(asyncio.Protocol):
    def __init__(self, front: GrpcFront, admission: Admission) -> None:
        self._front = front
        self._admission = admission
        self.splice: _Splice | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        tcp.pause_reading()  # until the gRPC server's side is connected
        self.splice = _Splice(self._front, tcp, self._admission.address)
        self._front._opened(self.splice)

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        if splice is not None and splice.backend is not None:
            splice.backend.write(data)

    def eof_received(self) -> bool:
        splice = self.splice
        if splice is not None and splice.backend is not None:
            splice.backend.close()  # after what is buffered
        return False

    def pause_writing(self) -> None:
        splice = self.splice
        if splice is not None and splice.backend is not None:
            splice.backend.pause_reading()

    def resume_writing(self) -> None:
        splice = self.splice
        if splice is not None and splice.backend is not None:
            splice.backend.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admission.release()
        splice, self.splice = self.splice, None
        if splice is not None:
            self._front._closed(splice)
            if splice.backend is not None:
                splice.backend.abort()  # the client is gone; nothing left to deliver


class _BackendSide(asyncio.Protocol):
    def __init__(self, splice: _Splice) -> None:
        self._splice = splice

    def data_received(self, data: bytes) -> None:
        self._splice.public.write(data)

    def eof_received(self) -> bool:
        self._splice.public.close()  # after what is buffered (a GOAWAY, the last frames)
        return False

    def pause_writing(self) -> None:
        self._splice.public.pause_reading()

    def resume_writing(self) -> None:
        self._splice.public.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.front._backend_lost(self._splice)
        self._splice.public.close()


class _PeerContext:
    """The servicer's context, with the public client as `peer()`."""

    __slots__ = ("_context", "_peer")

    def __init__(self, context: Any, peer: str) -> None:
        self._context = context
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _FrontInterceptor(_Interceptor):
    """Gives each call its real client, and marks connections that proved membership."""

    def __init__(self, front: GrpcFront) -> None:
        self._front = front
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        front = self._front
        proves = method in MEMBER_PROOF_METHODS
        unary_stream: Any = handler.unary_stream
        unary_unary: Any = handler.unary_unary
        if unary_stream is not None and inspect.isasyncgenfunction(unary_stream):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                splice = front._splice_of(context.peer())
                if splice is None:
                    async with contextlib.aclosing(unary_stream(request, context)) as replies:
                        async for reply in replies:
                            yield reply
                    return
                splice.calls += 1
                try:
                    replies = unary_stream(request, _PeerContext(context, splice.peer))
                    async with contextlib.aclosing(replies):
                        async for reply in replies:
                            if proves:
                                splice.proven()  # the envelope opened: a member sent it
                            yield reply
                finally:
                    splice.calls -= 1

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if unary_unary is not None and inspect.iscoroutinefunction(unary_unary):

            async def unary(request: Any, context: Any) -> Any:
                splice = front._splice_of(context.peer())
                if splice is None:
                    return await unary_unary(request, context)
                splice.calls += 1
                try:
                    reply = await unary_unary(request, _PeerContext(context, splice.peer))
                finally:
                    splice.calls -= 1
                if proves:
                    splice.proven()  # a redeemed invite: a member from now on
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class GrpcFront:
    """The public gRPC port: `interceptor` goes into the gRPC server, then `start()`."""

    def __init__(self, *, caps: Caps, member_deadline_s: float) -> None:
        self.limits = ConnLimits(caps)
        self.member_deadline_s = member_deadline_s
        self.interceptor = _FrontInterceptor(self)
        self.closed_not_member = 0
        self._splices: set[_Splice] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._by_backend_port: dict[int, _Splice] = {}
        self._backend_port = 0
        self._listener = CappedListener(
            "gRPC", self.limits, lambda admission: _PublicSide(self, admission)
        )
        self._backend_errors = Throttle()

    async def start(self, host: str, port: int, *, backend_port: int) -> int:
        """Listen on host:port (what peers reach); returns the port bound. Like gRPC, "::"
        takes IPv4 clients too."""
        self._backend_port = backend_port
        return self._listener.start(host, port, dual_stack_wildcard=True)

    def stop_accepting(self) -> None:
        """New connections are refused by the kernel; open ones go on (a drain)."""
        self._listener.stop_accepting()

    async def aclose(self) -> None:
        await self._listener.aclose()
        tasks = list(self._connecting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for splice in list(self._splices):
            splice.close()

    def stats(self) -> dict[str, Any]:
        s = self.limits.stats()
        return {
            "open": s.open,
            "peak": s.peak,
            "refused": s.refused,
            "members": sum(1 for splice in self._splices if splice.member),
            "closed_not_member": self.closed_not_member,
            "per_source_cap": self.limits.caps.per_source,
            "total_cap": self.limits.caps.total,
        }

    # --- the splices' side -------------------------------------------------------------------

    def _opened(self, splice: _Splice) -> None:
        self._splices.add(splice)
        loop = asyncio.get_running_loop()
        splice.deadline = loop.call_later(self.member_deadline_s, self._deadline_passed, splice)
        task = loop.create_task(self._connect(splice), name="grpc-front-connect")
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        splice.connecting = task

    async def _connect(self, splice: _Splice) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(BACKEND_CONNECT_TIMEOUT_S):
                backend, _ = await loop.create_connection(
                    lambda: _BackendSide(splice), BACKEND_HOST, self._backend_port
                )
        except (OSError, TimeoutError) as exc:
            if self._backend_errors.due():
                logger.error(
                    "gRPC front: cannot reach the gRPC server (%s); %d more such errors since",
                    exc,
                    self._backend_errors.take_skipped(),
                )
            splice.public.abort()
            return
        finally:
            splice.connecting = None
        if splice not in self._splices:  # the client left while we connected
            backend.abort()
            return
        splice.backend = backend
        splice.backend_port = int(backend.get_extra_info("sockname")[1])
        self._by_backend_port[splice.backend_port] = splice
        splice.public.resume_reading()

    def _splice_of(self, grpc_peer: str) -> _Splice | None:
        """The public connection behind the gRPC server's peer 'ipv4:127.0.0.1:PORT'."""
        host, _, port = grpc_peer.rpartition(":")
        if host != "ipv4:" + BACKEND_HOST or not port.isdigit():
            return None
        return self._by_backend_port.get(int(port))

    def _deadline_passed(self, splice: _Splice) -> None:
        splice.deadline = None
        if splice.member or splice not in self._splices:
            return
        if splice.calls:  # a call still running may yet prove it (a queued request)
            loop = asyncio.get_running_loop()
            splice.deadline = loop.call_later(self.member_deadline_s, self._deadline_passed, splice)
            return
        self.closed_not_member += 1
        logger.debug("gRPC: %s proved no membership in time; closed", splice.address)
        splice.close()

    def _backend_lost(self, splice: _Splice) -> None:
        if self._by_backend_port.get(splice.backend_port) is splice:
            del self._by_backend_port[splice.backend_port]

    def _closed(self, splice: _Splice) -> None:
        if splice not in self._splices:
            return
        self._splices.discard(splice)
        self._backend_lost(splice)
        if splice.deadline is not None:
            splice.deadline.cancel()
            splice.deadline = None
        if splice.connecting is not None:
            splice.connecting.cancel()  # _connect's finally clears the reference
