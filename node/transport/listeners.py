"""What the public ports may hold, and what the node says when it is short of descriptors.

- `CappedListener`: a listening socket whose own accept loop asks `mesh.routing.connlimits`
  before anything is built for a connection. A refused one costs an `accept()` and a
  `close()` (with a reset, so no TIME_WAIT is kept for it), a few microseconds: asyncio's
  own accept path builds a task, a transport and a protocol first, in batches of up to
  `backlog`, which under a flood left thousands of descriptors waiting to be closed and
  the owner's requests waiting behind them. Admitted connections become asyncio
  transports (`loop.connect_accepted_socket`) with the listener's protocol.
- `raise_nofile_limit()`: at start the soft descriptor limit is raised to the hard one
  (systemd and most shells give 1024 soft, far below what a node can use).
- `ListenerSettings.from_environment()`: the caps of both ports, sized from that limit
  (`mesh.routing.connlimits.budget`: a quarter, at least 256, stays with the node's own files,
  model, database and outgoing peer connections), and the deadlines: the config's
  `[http]` and `[grpc]` keys, each overridden by an `ALLERAC_*` environment variable (the
  tests set them low to run fast).
- `AcceptErrorLog`: asyncio reports every failed `accept()` (EMFILE/ENFILE) through the
  loop's exception handler, and on Linux retries up to 100 accepts per wake-up, each
  reported: a node out of descriptors logged megabytes a second. This handler logs
  that at most once per interval, counting what it left out.
- `Throttle`: "at most once per interval" for any other log line a stranger can cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import resource
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh.clock import SYSTEM
from mesh.config import NodeConfig
from mesh.errors import ConfigError
from mesh.routing.connlimits import Budget, Caps, ConnLimits, budget, caps_for

logger = logging.getLogger(__name__)

# Defaults (config keys `[http]`/`[grpc]`, or environment variables `ENV_*`, change them).
HTTP_CONNS_PER_SOURCE = 128  # one machine's apps and browser tabs, streaming at once
GRPC_CONNS_PER_SOURCE = 64  # a box opens one channel per peer; an office NAT has a few
HTTP_HEADER_TIMEOUT_S = 10.0  # from connecting (or the first byte after an idle keep-alive)
HTTP_BODY_IDLE_S = 10.0  # the longest a request body may stall while it is still expected
HTTP_KEEPALIVE_IDLE_S = 60.0  # an idle keep-alive connection is closed after this
GRPC_MEMBER_DEADLINE_S = 10.0  # a gRPC connection must carry a member's sealed call by then
LOG_INTERVAL_S = 60.0  # a stranger's refusals and accept errors: one line per interval
NOFILE_CEILING = 1 << 20  # when the hard limit is "unlimited"

ENV_HTTP_CONNS_PER_SOURCE = "ALLERAC_HTTP_CONNS_PER_SOURCE"
ENV_GRPC_CONNS_PER_SOURCE = "ALLERAC_GRPC_CONNS_PER_SOURCE"
ENV_HTTP_MAX_CONNS = "ALLERAC_HTTP_MAX_CONNS"
ENV_GRPC_MAX_CONNS = "ALLERAC_GRPC_MAX_CONNS"
ENV_HTTP_HEADER_TIMEOUT_S = "ALLERAC_HTTP_HEADER_TIMEOUT_S"
ENV_HTTP_BODY_IDLE_S = "ALLERAC_HTTP_BODY_IDLE_S"
ENV_HTTP_KEEPALIVE_IDLE_S = "ALLERAC_HTTP_KEEPALIVE_IDLE_S"
ENV_GRPC_MEMBER_DEADLINE_S = "ALLERAC_GRPC_MEMBER_DEADLINE_S"

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's own words
BACKLOG = 1024  # connections waiting in the kernel cost the node no descriptor
ACCEPT_BATCH = 64  # accepts per wake-up: other work gets the loop in between
ACCEPT_RETRY_S = 1.0  # after running out of descriptors, try again this much later
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise ConfigError(f"environment {name} = {raw!r}: must be {kind}")
    return value


@dataclass(frozen=True, kw_only=True)
class ListenerSettings:
    budget: Budget
    http: Caps
    grpc: Caps
    http_header_timeout_s: float = HTTP_HEADER_TIMEOUT_S
    http_body_idle_s: float = HTTP_BODY_IDLE_S
    http_keepalive_idle_s: float = HTTP_KEEPALIVE_IDLE_S
    grpc_member_deadline_s: float = GRPC_MEMBER_DEADLINE_S

    @classmethod
    def from_environment(
        cls,
        nofile: int,
        env: Mapping[str, str] | None = None,
        *,
        config: NodeConfig | None = None,
    ) -> ListenerSettings:
        """Defaults, then the config's `[http]`/`[grpc]` keys, then `ALLERAC_*` variables
        (for tests and a quick change without editing the config)."""
        env = os.environ if env is None else env
        cfg = config or NodeConfig()
        sized = budget(nofile)

        def count(name: str, configured: int | None, default: int) -> int:
            chosen = configured if configured is not None else default
            return int(_number(env, name, chosen, integer=True))

        def seconds(name: str, configured: float | None, default: float) -> float:
            return _number(
                env, name, configured if configured is not None else default, integer=False
            )

        return cls(
            budget=sized,
            http=caps_for(
                total=count(ENV_HTTP_MAX_CONNS, cfg.http_max_connections, sized.http_total),
                per_source=count(
                    ENV_HTTP_CONNS_PER_SOURCE,
                    cfg.http_max_connections_per_address,
                    HTTP_CONNS_PER_SOURCE,
                ),
            ),
            grpc=caps_for(
                total=count(ENV_GRPC_MAX_CONNS, cfg.grpc_max_connections, sized.grpc_total),
                per_source=count(
                    ENV_GRPC_CONNS_PER_SOURCE,
                    cfg.grpc_max_connections_per_address,
                    GRPC_CONNS_PER_SOURCE,
                ),
            ),
            http_header_timeout_s=seconds(
                ENV_HTTP_HEADER_TIMEOUT_S, cfg.http_header_timeout_s, HTTP_HEADER_TIMEOUT_S
            ),
            http_body_idle_s=seconds(
                ENV_HTTP_BODY_IDLE_S, cfg.http_body_idle_timeout_s, HTTP_BODY_IDLE_S
            ),
            http_keepalive_idle_s=seconds(
                ENV_HTTP_KEEPALIVE_IDLE_S, cfg.http_keepalive_idle_s, HTTP_KEEPALIVE_IDLE_S
            ),
            grpc_member_deadline_s=seconds(
                ENV_GRPC_MEMBER_DEADLINE_S, cfg.grpc_member_deadline_s, GRPC_MEMBER_DEADLINE_S
            ),
        )


class Throttle:
    """`due()`: True at most once per `interval_s`; `skipped` counts the Falses since."""

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, *, clock: Callable[[], float] = SYSTEM.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._next = -math.inf
        self.skipped = 0

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            self.skipped += 1
            return False
        self._next = now + self.interval_s
        return True

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


def refusals_note(skipped: int) -> str:
    """The tail of a throttled refusal line: what the log left out since the last one."""
    if skipped:
        return f"; {skipped} more refused since the last report"
    return f"; more refusals are counted, and reported at most every {LOG_INTERVAL_S:.0f} s"


class AcceptErrorLog:
    """A loop exception handler that logs failed accepts at most once per interval and
    passes every other report on to the handler that was there before."""

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, *, clock: Callable[[], float] = SYSTEM.monotonic
    ) -> None:
        self._throttle = Throttle(interval_s, clock=clock)
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        self._loop = loop
        loop.set_exception_handler(self._handle)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and loop.get_exception_handler() == self._handle:
            loop.set_exception_handler(self._previous)
        self._loop = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR_MESSAGE:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        if self._throttle.due():
            logger.error(
                "cannot accept connections: %s (%d more such errors since the last report; "
                "the node retries every second)",
                context.get("exception"),
                self._throttle.take_skipped(),
            )


def bind_sockets(host: str, port: int, *, dual_stack_wildcard: bool = False) -> list[socket.socket]:
    """Listening, non-blocking sockets for every address `host` resolves to, all on one
    port (port 0: the first one's). `dual_stack_wildcard`: "::" takes IPv4 too, as gRPC
    binds it; otherwise an IPv6 socket is IPv6-only, as asyncio binds it."""
    infos = socket.getaddrinfo(
        host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                wildcard = ipaddress.ip_address(str(address[0]).partition("%")[0]).is_unspecified
                v6only = 0 if dual_stack_wildcard and wildcard else 1
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            if sockets[0] is not sock:  # one port for all, also when port 0 picked it
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Admission:
    """An admitted connection's place in the caps; `release()` gives it back, once."""

    __slots__ = ("_held", "_limits", "address")

    def __init__(self, limits: ConnLimits, address: str) -> None:
        self._limits = limits
        self.address = address
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limits.release(self.address)


class CappedListener:
    """Accepts on its sockets, refuses what the caps refuse, and hands the rest to
    `protocol(admission)` as asyncio transports. The protocol releases the admission
    when its connection is lost."""

    def __init__(
        self,
        name: str,
        limits: ConnLimits,
        protocol: Callable[[Admission], asyncio.Protocol],
    ) -> None:
        self.name = name
        self.limits = limits
        self._protocol = protocol
        self._sockets: list[socket.socket] = []
        self._retries: dict[int, asyncio.TimerHandle] = {}
        self._adopting: set[asyncio.Task[None]] = set()
        self._refusals = Throttle()
        self._errors = Throttle()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1]) if self._sockets else 0

    def start(self, host: str, port: int, *, dual_stack_wildcard: bool = False) -> int:
        """Bind and start accepting; returns the port bound."""
        self._loop = asyncio.get_running_loop()
        self._sockets = bind_sockets(host, port, dual_stack_wildcard=dual_stack_wildcard)
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        return self.port

    def stop_accepting(self) -> None:
        """Close the listening sockets (new connections are refused by the kernel); the
        connections already open go on."""
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def aclose(self) -> None:
        self.stop_accepting()
        tasks = list(self._adopting)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self, sock: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not self.limits.admit(address):
                self._refused(address)
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                conn.close()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn, Admission(self.limits, address)))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket, admission: Admission) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: self._protocol(admission), conn)
        except (OSError, asyncio.CancelledError) as exc:
            admission.release()
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.debug("%s: a connection from %s failed at once: %s", self.name, conn, exc)

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        assert self._loop is not None
        if exc.errno in RESOURCE_ERRNOS:  # out of descriptors: pause, or it spins
            fd = sock.fileno()
            self._loop.remove_reader(fd)
            self._retries[fd] = self._loop.call_later(ACCEPT_RETRY_S, self._resume, sock)
        if self._errors.due():
            logger.error(
                "%s: cannot accept connections: %s (%d more such errors since the last "
                "report; retrying every %.0f s)",
                self.name,
                exc,
                self._errors.take_skipped(),
                ACCEPT_RETRY_S,
            )

    def _resume(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._retries.pop(sock.fileno(), None)
        if sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _refused(self, address: str) -> None:
        if self._refusals.due():
            caps = self.limits.caps
            logger.warning(
                "%s: refused a connection from %s: over the caps (%d per address, %d in all)%s",
                self.name,
                address,
                caps.per_source,
                caps.total,
                refusals_note(self._refusals.take_skipped()),
            )
