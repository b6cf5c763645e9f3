"""The gRPC NodeService: thin. Wire types in, `Dispatcher` call, wire types out.

`MeshError` -> gRPC status happens in `_abort` and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from mesh.errors import InvalidRequest, MeshError
from mesh.wire import codec
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import node_pb2_grpc as pb_grpc
from node.dispatch import Dispatcher

logger = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: MeshError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.grpc_status], error.message)
    raise AssertionError("unreachable: abort raises")


class NodeServicer(pb_grpc.NodeServiceServicer):
    def __init__(
        self,
        *,
        node_id: str,
        dispatcher: Dispatcher,
        card: Callable[[], pb.SignedCard],
    ) -> None:
        self._node_id = node_id
        self._dispatcher = dispatcher
        self._card = card

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SignedCard:
        return self._card()

    async def Ping(
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PingResponse:
        if len(request.nonce) > 64:
            await _abort(context, InvalidRequest("ping nonce is longer than 64 bytes"))
        return pb.PingResponse(
            nonce=request.nonce,
            node_id=self._node_id,
            received_at_unix_ms=int(time.time() * 1000),
            load=codec.load_to_pb(self._dispatcher.load()),
        )

    async def Infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.InferEvent]:
        try:
            inference = codec.request_from_pb(request)
            answer = await self._dispatcher.open(inference)
        except MeshError as error:
            await _abort(context, error)
        # Who served it travels in the Finish event and, for generic gRPC tooling, in
        # trailing metadata: sending initial metadata separately would cost the first
        # token an extra write (~1-2 ms measured here).
        context.set_trailing_metadata(
            (
                ("x-allerac-node", answer.served_by.node_id),
                ("x-allerac-route", answer.served_by.route.value),
            )
        )
        async with contextlib.aclosing(answer.events()) as events:
            try:
                async for event in events:
                    yield codec.event_to_pb(event, answer.served_by)
            except MeshError as error:
                await _abort(context, error)
