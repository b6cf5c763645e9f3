"""Asking a relay for its totals (`allerac relay stats`), as its operator."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from cloud_relay import relay_pb2_grpc as rpb_grpc
from cloud_relay.operator_token import bearer_metadata
from mesh.errors import PermissionDenied, Unavailable
from mesh.wire import grpc_options
from mesh.wire.v1 import relay_pb2 as rpb

STATS_TIMEOUT_S = 5.0
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


async def fetch_stats(address: str, *, token: str) -> dict[str, Any]:
    """The relay's totals; `token` is its operator token (`read_operator_token`)."""
    async with grpc.aio.insecure_channel(address, options=grpc_options.channel_options()) as ch:
        stub = rpb_grpc.RelayServiceStub(ch)  # type: ignore[no-untyped-call]
        try:
            stats = await stub.Stats(
                rpb.RelayStatsRequest(), timeout=STATS_TIMEOUT_S, metadata=bearer_metadata(token)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSED:
                raise PermissionDenied(f"relay {address} refused: {exc.details()}") from exc
            raise Unavailable(f"relay {address} did not answer: {exc.details()}") from exc
    return MessageToDict(
        stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
