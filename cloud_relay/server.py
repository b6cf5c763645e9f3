"""The relay's gRPC server: thin. It opens sessions and moves frames; the rules live in
`mesh.routing.relay` (handshake, packet checks) and `cloud_relay.switchboard` (queues, rates).

One `Session` RPC per node: the stream is admitted against its source
address's share first (before a byte is read), the relay writes a challenge,
reads a signed Hello, screens what it claims (mesh served here, mesh share),
checks its signatures once, files the node under its mesh, then runs two loops
until either side ends or the switchboard closes the session: one reads the
node's packets and hands them to the switchboard; one writes what the
switchboard queued for the node. `Stats` answers only the operator's token
(`cloud_relay.operator_token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from cloud_relay import relay_pb2_grpc as rpb_grpc
from cloud_relay.operator_token import (
    check_operator,
    new_token,
    token_path,
    write_operator_token,
)
from cloud_relay.private_file import write_private
from cloud_relay.switchboard import Admission, SessionClosed, Switchboard
from cloud_relay.switchboard import Session as RelaySession
from mesh.clock import SYSTEM, Clock
from mesh.errors import MeshError
from mesh.routing.relay import (
    MAX_FRAME_BYTES,
    MAX_PACKET_BYTES,
    RelayLimits,
    new_challenge,
    read_claim,
    source_address,
    verify_hello,
)
from mesh.wire import grpc_options
from mesh.wire.v1 import relay_pb2 as rpb

logger = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
# What `read()` on a gRPC aio stream returns at its end (missing from grpc-stubs).
STREAM_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
GRACE_S = 1.0


class RelayServicer(rpb_grpc.RelayServiceServicer):
    def __init__(self, board: Switchboard, *, operator_token: str, clock: Clock = SYSTEM) -> None:
        self._clock = clock
        self._board = board
        self._operator_token = operator_token

    async def Stats(self, request: rpb.RelayStatsRequest, context: Context) -> rpb.RelayStats:
        try:
            check_operator(context.invocation_metadata() or (), self._operator_token)
        except MeshError as error:
            await context.abort(grpc.StatusCode[error.grpc_status], error.message)
        return self._board.stats()

    async def Session(self, request_iterator: Any, context: Context) -> None:
        try:
            admission = self._board.admit(source_address(context.peer()))
        except MeshError as error:
            await self._refuse(context, error)
            return
        try:
            await self._serve(admission, context)
        finally:
            admission.release()

    async def _refuse(self, context: Context, error: MeshError) -> None:
        self._board.hellos_refused += 1
        # Debug: a flood of refusals must not become a flood of log lines.
        logger.debug("refused a session from %s: %s", context.peer(), error.message)
        await context.abort(grpc.StatusCode[error.grpc_status], error.message)

    async def _serve(self, admission: Admission, context: Context) -> None:
        limits = self._board.limits
        challenge = new_challenge(self._clock.now_ms())
        await context.write(rpb.RelayFrame(challenge=challenge))
        try:
            first = await asyncio.wait_for(context.read(), limits.hello_timeout_s)
        except TimeoutError:
            self._board.hellos_refused += 1
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello in time")
            return
        if first is STREAM_EOF or first.WhichOneof("frame") != "hello":
            self._board.hellos_refused += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session starts with a hello")
            return
        try:
            self._board.screen(read_claim(first.hello))  # cheap: before any signature
            identity = verify_hello(first.hello, nonce=challenge.nonce, now_ms=self._clock.now_ms())
            session = self._board.open(identity)
        except MeshError as error:
            await self._refuse(context, error)
            return
        logger.info(
            "node %s of mesh %s connected from %s (%s)",
            identity.node_id[:7],
            identity.mesh_id[:7],
            admission.address,
            identity.role.value,
        )
        await context.write(
            rpb.RelayFrame(
                welcome=rpb.RelayWelcome(
                    node_id=identity.node_id,
                    mesh_id=identity.mesh_id,
                    max_packet_bytes=MAX_PACKET_BYTES,
                )
            )
        )
        reader = asyncio.create_task(self._read(session, context))
        writer = asyncio.create_task(self._write(session, context))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            self._board.closed(session)
            logger.info("node %s disconnected", identity.node_id[:7])

    async def _read(self, session: RelaySession, context: Context) -> None:
        while True:
            frame = await context.read()
            if frame is STREAM_EOF:
                return
            kind = frame.WhichOneof("frame")
            if kind == "packet":
                self._board.forward(session, frame.packet)
            elif kind == "revocations":
                try:
                    self._board.revocations(session, frame.revocations)
                except MeshError as error:
                    logger.info("ignored a revocation list: %s", error.message)
            else:
                logger.info("node %s sent a %s frame; closing", session.node_id[:7], kind)
                return

    async def _write(self, session: RelaySession, context: Context) -> None:
        with contextlib.suppress(SessionClosed):
            while True:
                await context.write(await session.next_frame())


def relay_server_options() -> list[tuple[str, int]]:
    options = dict(grpc_options.server_options())
    options["grpc.max_receive_message_length"] = MAX_FRAME_BYTES
    options["grpc.max_send_message_length"] = MAX_FRAME_BYTES
    options["grpc.max_concurrent_streams"] = 4  # a node keeps one session (and asks Stats)
    return list(options.items())


class Relay:
    """A running relay: `async with Relay(host=..., port=...) as relay:`.

    `run_file` (HOME/run/relay.json) is written once it listens; the operator token goes
    next to it (HOME/run/relay.token, 0600) unless `token_file` says elsewhere. With
    `allowed_meshes` the relay serves only those mesh IDs (a company's own relay)."""

    def __init__(
        self,
        *,
        host: str = "0.0.0.0",  # noqa: S104 - a relay serves the internet by design
        port: int = 7443,
        limits: RelayLimits | None = None,
        run_file: Path | None = None,
        token_file: Path | None = None,
        allowed_meshes: frozenset[str] | None = None,
    ) -> None:
        self.board = Switchboard(limits, allowed_meshes=allowed_meshes)
        self._allowed_meshes = allowed_meshes
        self._host = host
        self._port = port
        self._run_file = run_file
        if token_file is None and run_file is not None:
            token_file = token_path(run_file.parent)
        self._token_file = token_file
        self.operator_token = new_token()
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> Relay:
        server = grpc.aio.server(options=relay_server_options())
        rpb_grpc.add_RelayServiceServicer_to_server(  # type: ignore[no-untyped-call]
            RelayServicer(self.board, operator_token=self.operator_token), server
        )
        bind = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise MeshError(f"cannot listen on {bind}: {exc}") from exc
        await server.start()
        self._server = server
        self.address = bind.rsplit(":", 1)[0] + f":{port}"
        if self._token_file is not None:  # before the run file: its presence means "ready"
            write_operator_token(self._token_file, self.operator_token)
        if self._run_file is not None:
            self._run_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = {"address": self.address, "port": port, "pid": os.getpid()}
            write_private(self._run_file, (json.dumps(info, indent=2) + "\n").encode())
        logger.info("relay listening on %s", self.address)
        if self._allowed_meshes is not None:
            logger.info("serving only meshes %s", ", ".join(sorted(self._allowed_meshes)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            await self._server.stop(GRACE_S)
            self._server = None
        if self._run_file is not None:
            self._run_file.unlink(missing_ok=True)
        if self._token_file is not None:
            self._token_file.unlink(missing_ok=True)
