"""The gRPC NodeService: thin. Wire types in, `node.transport.calls.NodeCalls`, wire types
out. `MeshError` -> gRPC status happens in `_abort` and nowhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from mesh.errors import MeshError
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.transport import node_pb2_grpc as pb_grpc
from node.transport.calls import NodeCalls

Context = grpc.aio.ServicerContext[Any, Any]
ERROR_CODE_METADATA = "x-allerac-error"


async def _abort(context: Context, error: MeshError) -> NoReturn:
    context.set_trailing_metadata(((ERROR_CODE_METADATA, error.code),))
    await context.abort(grpc.StatusCode[error.grpc_status], error.message)
    raise AssertionError("unreachable: abort raises")


class NodeServicer(pb_grpc.NodeServiceServicer):
    """Direct gRPC: `NodeCalls`, with `MeshError` turned into a status."""

    def __init__(self, calls: NodeCalls) -> None:
        self._calls = calls

    async def Describe(self, request: pb.DescribeRequest, context: Context) -> pb.SignedCard:
        return self._calls.describe()

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        try:
            return self._calls.ping(request, context.peer())
        except MeshError as error:
            await _abort(context, error)

    async def Join(self, request: tpb.JoinRequest, context: Context) -> tpb.JoinResponse:
        try:
            return self._calls.join(request, context.peer())
        except MeshError as error:
            await _abort(context, error)

    async def PushRevocations(
        self, request: tpb.SignedRevocations, context: Context
    ) -> pb.PushRevocationsResponse:
        try:
            return self._calls.push_revocations(request, context.peer())
        except MeshError as error:
            await _abort(context, error)

    async def Infer(
        self, request: pb.InferRequest, context: Context
    ) -> AsyncIterator[pb.InferEvent]:
        events = self._calls.infer(
            request, peer=context.peer(), time_remaining_s=context.time_remaining()
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except MeshError as error:
            await _abort(context, error)
