"""What a transport serves: the node's calls, whatever carries them (direct gRPC or a relay
session). The servers here depend on this protocol; the node's service that answers them
(`node.serving.node_service.NodeService`) satisfies it, so transport never imports serving.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb


class NodeCalls(Protocol):
    def describe(self) -> pb.SignedCard: ...

    def ping(self, request: pb.PingRequest, peer: str) -> pb.PingResponse: ...

    def join(self, request: tpb.JoinRequest, peer: str) -> tpb.JoinResponse: ...

    def push_revocations(
        self, request: tpb.SignedRevocations, peer: str
    ) -> pb.PushRevocationsResponse: ...

    def infer(
        self,
        request: pb.InferRequest,
        *,
        peer: str,
        time_remaining_s: float | None,
        via_relay: str = "",
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """Open the sealed request and stream the sealed answer."""
        ...
