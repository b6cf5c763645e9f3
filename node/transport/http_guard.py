"""The HTTP API's listener: caps per source, and deadlines for headers and bodies.

aiohttp's server counts no connections and has no deadline for a request's headers
or for a body that stops arriving: 1,500 connections that never finished their
headers were held for as long as their sender liked. So the node makes the listening
socket itself (`GuardedSite`, an aiohttp site like `TCPSite`) and puts a thin protocol
(`_GuardedConnection`) in front of aiohttp's own per-connection `RequestHandler`:

- On accept the connection is counted against its source (`mesh.routing.connlimits`: per
  address, in total, with a reserve for loopback). Over the caps it is closed at once,
  before aiohttp or even asyncio builds anything for it (`node.transport.listeners.CappedListener`).
- From the connection's start, and from the first byte after an idle keep-alive, the
  request's headers must be complete within `header_timeout_s`. A request is complete
  when aiohttp hands it to the app: the guard's middleware, outermost, sees it.
- While a request's body is still expected, `body_idle_s` without a byte closes the
  connection. Time only counts while aiohttp is reading: a client that sends faster
  than the handler reads is paused by aiohttp, not stalled.
- An idle keep-alive connection is closed by aiohttp itself (`keepalive_timeout`, set
  by the daemon; aiohttp also runs it from the connection's start, so it must stay
  above the header deadline). A pipelined request that arrives while the previous one
  is handled is bounded by that too, not by the header deadline.

What it does not do: bound a client that reads its answer slowly (the answer is as
long as the request allowed), or the number of requests on one connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, cast

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from mesh.routing.connlimits import Caps, ConnLimits
from node.transport.listeners import Admission, CappedListener

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Phase(Enum):
    HEADERS = "headers"  # waiting for a request's headers (deadline running)
    REQUEST = "request"  # the app has the request (body deadline while a body is expected)
    IDLE = "idle"  # between requests (aiohttp's keep-alive timeout)


class HttpConnectionGuard:
    """Caps and deadlines for one HTTP listener; `middleware` goes first in the app."""

    def __init__(self, *, caps: Caps, header_timeout_s: float, body_idle_s: float) -> None:
        self.limits = ConnLimits(caps)
        self.header_timeout_s = header_timeout_s
        self.body_idle_s = body_idle_s
        self.header_timeouts = 0
        self.body_timeouts = 0
        self._connections: dict[RequestHandler, _GuardedConnection] = {}

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = self._connections.get(request.protocol)
            if connection is None:
                return await handler(request)
            connection.request_started(request.content)
            try:
                return await handler(request)
            finally:
                connection.request_ended()

        self.middleware = middleware

    def listener(self, server: web.Server) -> CappedListener:
        return CappedListener(
            "HTTP", self.limits, lambda admission: _GuardedConnection(self, server, admission)
        )

    def _opened(self, handler: RequestHandler, connection: _GuardedConnection) -> None:
        self._connections[handler] = connection

    def _closed(self, handler: RequestHandler) -> None:
        self._connections.pop(handler, None)

    def stats(self) -> dict[str, Any]:
        s = self.limits.stats()
        return {
            "open": s.open,
            "peak": s.peak,
            "refused": s.refused,
            "header_timeouts": self.header_timeouts,
            "body_timeouts": self.body_timeouts,
            "per_source_cap": self.limits.caps.per_source,
            "total_cap": self.limits.caps.total,
        }


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's `RequestHandler` for one connection, behind the caps and deadlines."""

    def __init__(
        self, guard: HttpConnectionGuard, server: web.Server, admission: Admission
    ) -> None:
        self._guard = guard
        self._server = server
        self._admission = admission
        self._loop = asyncio.get_running_loop()
        self._inner: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._address = admission.address
        self._phase = _Phase.HEADERS
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._last_byte_at = 0.0

    # --- asyncio's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        self._transport = tcp
        self._inner = self._server()
        self._guard._opened(self._inner, self)
        self._inner.connection_made(tcp)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        self._last_byte_at = self._loop.time()
        if self._phase is _Phase.IDLE:
            self._await_headers()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return None  # close the transport: aiohttp keeps no half-open connections

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._admission.release()
        inner, self._inner = self._inner, None
        self._body = None
        if inner is None:
            return
        self._guard._closed(inner)
        inner.connection_lost(exc)

    # --- the app's side (the guard's middleware) -----------------------------------------------

    def request_started(self, body: StreamReader) -> None:
        self._cancel_timer()
        self._phase = _Phase.REQUEST
        if not body.is_eof():
            self._body = body
            self._timer = self._loop.call_at(
                self._last_byte_at + self._guard.body_idle_s, self._check_body
            )

    def request_ended(self) -> None:
        self._cancel_timer()
        self._body = None
        if self._inner is not None:
            self._phase = _Phase.IDLE

    # --- deadlines -----------------------------------------------------------------------------

    def _await_headers(self) -> None:
        self._cancel_timer()
        self._phase = _Phase.HEADERS
        self._timer = self._loop.call_later(self._guard.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._timer = None
        if self._phase is _Phase.HEADERS and self._transport is not None:
            self._guard.header_timeouts += 1
            logger.debug("HTTP: %s sent no complete request in time; closed", self._address)
            self._transport.abort()

    def _check_body(self) -> None:
        self._timer = None
        body, transport = self._body, self._transport
        if self._phase is not _Phase.REQUEST or body is None or transport is None:
            return
        if body.is_eof():
            self._body = None
            return
        now = self._loop.time()
        if not transport.is_reading():  # aiohttp paused it: the handler is behind, not the client
            self._last_byte_at = now
        stalled_until = self._last_byte_at + self._guard.body_idle_s
        if now < stalled_until:
            self._timer = self._loop.call_at(stalled_until, self._check_body)
            return
        self._guard.body_timeouts += 1
        logger.debug("HTTP: the body from %s stalled; closed", self._address)
        transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GuardedSite(web.BaseSite):
    """Like `web.TCPSite`, with every connection behind an `HttpConnectionGuard`."""

    __slots__ = ("_bound_port", "_guard", "_host", "_listener", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: HttpConnectionGuard,
        host: str,
        port: int,
    ) -> None:
        super().__init__(runner)
        self._guard = guard
        self._host = host
        self._port = port
        self._bound_port = port
        self._listener: CappedListener | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._bound_port}"

    @property
    def port(self) -> int:
        return self._bound_port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._listener = self._guard.listener(server)
        self._bound_port = self._listener.start(self._host, self._port)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()  # open connections are the runner's to drain
            self._listener = None
        await super().stop()
