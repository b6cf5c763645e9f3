"""The node's service to other nodes, whatever carries the call: direct gRPC
(`node.transport.grpc_service.NodeServicer`) or a relay session (`node.transport.relay_client`).

Only Describe (the public card), Ping and Join answer in clear. Infer accepts
sealed envelopes from verified, unrevoked members only, and answers in sealed
frames; errors after the envelope opened travel sealed too, because their text
can name the model or echo the request. Refusals raise `MeshError`; the transports
turn them into their own status (gRPC: `node.transport.grpc_service._abort`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable

from mesh.clock import SYSTEM, Clock
from mesh.errors import InvalidRequest, MeshError, Overloaded, PermissionDenied, Unavailable
from mesh.inference import Finished, InferenceRequest, Route
from mesh.routing.ratelimit import Rate, SourceLimiter, source_address
from mesh.trust.goodbye import MAX_NODE_ID_CHARS, Goodbye
from mesh.trust.membership import Role
from mesh.trust.sealing import FrameWriter, OpenedRequest
from mesh.wire import codec, grpc_options
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.serving.accounting import Arrival
from node.serving.models import LocalModels
from node.serving.quota_service import QuotaService
from node.serving.serving_side import ServingSide
from node.store.ledger_store import LedgerStore
from node.store.trust_store import TrustStore
from node.store.users_admin import UsersAdmin
from node.transport.coalesce import coalesce

logger = logging.getLogger(__name__)
REJECTIONS_REMEMBERED = 1024
# At most one sealed answer frame per window after the first token: a relaying box spends
# most of its CPU per gRPC message (283 µs per relayed token unbatched, 146 µs at 30 ms).
STREAM_WINDOW_S = 0.03
# What strangers may ask before proving anything, per source address. A peer pings each
# address it knows once a second (heartbeats), so 20 a second leaves room for many
# boxes behind one NAT; an invite is redeemed once, so 10 at once and one a second
# leaves room for typos while making guessing pointless (codes hold 128 random bits).
PING_RATE = Rate(per_s=20.0, burst=40.0)
JOIN_RATE = Rate(per_s=1.0, burst=10.0)


def _sealed(writer: FrameWriter, event: pb.InferEvent, *, final: bool) -> pb.InferEvent:
    return pb.InferEvent(sealed=writer.seal(event.SerializeToString(), final=final))


class NodeService:
    """What every NodeService method does, over wire messages, whatever carried them:
    direct gRPC (`NodeServicer`) or a relay session (`node.transport.relay_client`). Refusals
    raise `MeshError`; an Infer refusal is raised before its first event."""

    def __init__(
        self,
        *,
        trust: TrustStore,
        serving: ServingSide,
        models: LocalModels,
        public_card: Callable[[], pb.SignedCard],
        full_card: Callable[[], pb.SignedCard],
        on_revocations: Callable[[], None] = lambda: None,
        on_leaving: Callable[[Goodbye], None] = lambda goodbye: None,
        on_member_joined: Callable[[list[str]], None] = lambda addresses: None,
        card_issued_at: Callable[[], int] = lambda: 0,
        ledger: LedgerStore | None = None,
        quota: QuotaService | None = None,
        users: UsersAdmin | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._trust = trust
        self._serving = serving
        self._models = models
        self._public_card = public_card
        self._full_card = full_card
        self._on_revocations = on_revocations
        self._on_leaving = on_leaving
        self._on_member_joined = on_member_joined
        self._card_issued_at = card_issued_at
        self._ledger = ledger
        self._quota = quota
        self._users = users
        self._rejected: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._streams_per_peer: dict[str, int] = {}
        self._pings = SourceLimiter(PING_RATE)
        self._joins = SourceLimiter(JOIN_RATE)

    def log_rejection(self, peer: str, error: MeshError) -> None:
        """Log a refused peer once per reason, so a misbehaving peer cannot flood the log."""
        key = (peer.rsplit(":", 1)[0], error.code)
        if key in self._rejected:
            return
        self._rejected[key] = None
        if len(self._rejected) > REJECTIONS_REMEMBERED:
            self._rejected.popitem(last=False)
        logger.warning("refused a request from %s: %s", peer, error.message)

    def describe(self) -> pb.SignedCard:
        return self._public_card()

    def ping(self, request: pb.PingRequest, peer: str) -> pb.PingResponse:
        """`peer`: the gRPC peer (its address is rate-limited) or the relay's sender."""
        if not self._pings.allow(source_address(peer), self._clock.monotonic()):
            raise Overloaded("too many pings from this address; slow down")
        if (
            len(request.nonce) > 64
            or len(request.leaving_node_id) > MAX_NODE_ID_CHARS
            or len(request.recipient_node_id) > MAX_NODE_ID_CHARS
            or len(request.goodbye_signature) > 64
        ):
            raise InvalidRequest("ping fields are too long")
        if request.leaving_node_id:
            # Counts only if the leaving node signed it (Peering checks, mesh/goodbye.py).
            self._on_leaving(
                Goodbye(
                    leaving_node_id=request.leaving_node_id,
                    recipient_node_id=request.recipient_node_id,
                    sent_at_ms=request.sent_at_unix_ms,
                    card_issued_at_ms=request.card_issued_at_unix_ms,
                    signature=request.goodbye_signature,
                )
            )
        return pb.PingResponse(
            nonce=request.nonce,
            node_id=self._trust.identity.node_id,
            received_at_unix_ms=self._clock.now_ms(),
            load=codec.load_to_pb(self._models.load()),
            card_issued_at_unix_ms=self._card_issued_at(),
        )

    def join(self, request: tpb.JoinRequest, peer: str) -> tpb.JoinResponse:
        if not self._joins.allow(source_address(peer), self._clock.monotonic()):
            raise Overloaded("too many invite redemptions from this address; wait a few seconds")
        try:
            response = self._trust.redeem(request, now=self._clock.now_ms())
        except MeshError as error:
            self.log_rejection(peer, error)
            raise
        logger.info("a node joined the mesh through an invite")
        self._on_member_joined(list(request.addresses)[:8])
        return response

    def push_revocations(
        self, request: tpb.SignedRevocations, peer: str
    ) -> pb.PushRevocationsResponse:
        try:
            if self._trust.apply_revocations(request):
                logger.info("revocation list v%d applied", self._trust.revocations_version)
                self._on_revocations()
        except MeshError as error:
            self.log_rejection(peer, error)
            raise
        return pb.PushRevocationsResponse(version=self._trust.revocations_version)

    async def infer(
        self,
        request: pb.InferRequest,
        *,
        peer: str,
        time_remaining_s: float | None,
        via_relay: str = "",
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """Open the sealed request and stream the sealed answer. `via_relay` is the node ID
        the relay says sent it; the envelope's signed sender must be that node."""
        try:
            codec.check_protocol_version(request.protocol_version)
            if request.WhichOneof("payload") != "sealed":
                raise InvalidRequest("only sealed requests are served")
            opened = self._trust.opener.open(request.sealed, now_ms=self._clock.now_ms())
            if via_relay and opened.sender.node_id != via_relay:
                raise PermissionDenied("the envelope's sender is not the node that sent it")
        except MeshError as error:
            self.log_rejection(peer, error)
            raise
        sender = opened.sender.node_id
        if self._streams_per_peer.get(sender, 0) >= grpc_options.MAX_STREAMS_PER_PEER:
            raise Overloaded(
                f"at most {grpc_options.MAX_STREAMS_PER_PEER} concurrent requests per node"
            )
        self._streams_per_peer[sender] = self._streams_per_peer.get(sender, 0) + 1
        # Callers set deadlines; one that did not still cannot hold a stream forever.
        ends_at = self._clock.monotonic() + (time_remaining_s or grpc_options.MAX_CALL_S)
        try:
            async with contextlib.aclosing(self._serve(opened, bool(via_relay))) as events:
                async for event in events:
                    yield event
                    if self._clock.monotonic() > ends_at:
                        raise Overloaded("the call ran past its deadline")
        finally:
            left = self._streams_per_peer.pop(sender) - 1
            if left:
                self._streams_per_peer[sender] = left

    def _arrival(self, sender: str, via_relay: bool) -> Arrival:
        """The tier the entry node reached us by, as it sees it (and records it)."""
        if self._trust.role is Role.OVERFLOW:
            route = Route.CLOUD
        else:
            route = Route.RELAY if via_relay else Route.LAN
        return Arrival(entry_node_id=sender, route=route)

    async def _serve(
        self, opened: OpenedRequest, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """One sealed call, answered through the table of kinds (`_CALLS`)."""
        writer = opened.writer
        try:
            call = codec.parse_message(pb.SealedCall, opened.body)
            kind = call.WhichOneof("call")
            if kind is None or kind not in _CALLS:
                raise InvalidRequest("the sealed call asks for nothing this node knows")
            answer, overflow_refusal = _CALLS[kind]
            if opened.sender.role is Role.OVERFLOW and overflow_refusal:
                raise PermissionDenied(overflow_refusal)
        except MeshError as error:
            yield _sealed(writer, codec.error_to_pb(error), final=True)
            return
        # Closed with us, so a caller that goes away stops the work at once.
        async with contextlib.aclosing(answer(self, opened, call, via_relay)) as frames:
            async for frame in frames:
                yield frame

    async def _infer_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        try:
            inference = codec.request_from_pb(call.infer)
        except MeshError as error:
            yield _sealed(opened.writer, codec.error_to_pb(error), final=True)
            return
        arrival = self._arrival(opened.sender.node_id, via_relay)
        async with contextlib.aclosing(self._stream(opened.writer, inference, arrival)) as frames:
            async for frame in frames:
                yield frame

    async def _card_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        yield _sealed(opened.writer, pb.InferEvent(card=self._full_card()), final=True)

    async def _stream(
        self, writer: FrameWriter, inference: InferenceRequest, arrival: Arrival
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """A peer's request served here (the mesh never forwards twice), sealed."""
        try:
            async with self._serving.answer(inference, arrival) as answer:
                async with (
                    contextlib.aclosing(answer.events()) as events,
                    # Closed first: its pump must stop reading `events` before they close
                    # (a caller that hangs up between two frames closes this generator).
                    contextlib.aclosing(coalesce(events, window_s=STREAM_WINDOW_S)) as batched,
                ):
                    async for event in batched:
                        final = isinstance(event, Finished)
                        yield _sealed(
                            writer, codec.event_to_pb(event, answer.served_by), final=final
                        )
        except MeshError as error:
            yield _sealed(writer, codec.error_to_pb(error), final=True)

    async def _quota_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """A member's quota call: this node keeps that user's quota."""
        try:
            if self._quota is None:
                raise Unavailable("this node keeps no quotas")
            grant = await self._quota.serve_call(call.quota, opened.sender.node_id)
            event = pb.InferEvent(quota=grant)
        except MeshError as error:
            event = codec.error_to_pb(error)
        yield _sealed(opened.writer, event, final=True)

    async def _users_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """A member's users exchange: this node's list, unless the member has the same."""
        try:
            if self._users is None:
                raise Unavailable("this node keeps no users")
            event = pb.InferEvent(users=self._users.user_list(call.users.digest))
        except MeshError as error:
            event = codec.error_to_pb(error)
        yield _sealed(opened.writer, event, final=True)

    async def _admin_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """An admin makes this node an admin too (`allerac mesh admin add` there)."""
        try:
            self._trust.accept_admin(call.admin, granted_by=opened.sender, now=self._clock.now_ms())
            self._on_revocations()  # the card shows the new certificate: re-sign it
            event = pb.InferEvent(card=self._full_card())
        except MeshError as error:
            event = codec.error_to_pb(error)
        yield _sealed(opened.writer, event, final=True)

    async def _ledger_call(
        self, opened: OpenedRequest, call: pb.SealedCall, via_relay: bool
    ) -> AsyncGenerator[pb.InferEvent, None]:
        """What this node's ledger holds that the asking member lacks (ledger sync)."""
        writer = opened.writer
        try:
            if self._ledger is None:
                raise Unavailable("this node keeps no ledger")
            frames = await self._ledger.answer(call.ledger, asker=opened.sender.node_id)
        except MeshError as error:
            yield _sealed(writer, codec.error_to_pb(error), final=True)
            return
        for i, frame in enumerate(frames):
            final = i == len(frames) - 1
            yield _sealed(writer, pb.InferEvent(ledger=frame), final=final)


_Answer = Callable[
    [NodeService, OpenedRequest, pb.SealedCall, bool], AsyncGenerator[pb.InferEvent, None]
]
# Every kind of sealed call (node.proto's SealedCall), the method that answers it, and what
# an overflow (cloud) node is told when it asks ("": it may). Cloud nodes serve the mesh:
# they never send it requests, learn its members' models or hardware, read its ledger,
# hold quotas or see its users.
_CALLS: dict[str, tuple[_Answer, str]] = {
    "infer": (
        NodeService._infer_call,
        "overflow nodes serve requests; they do not send them",
    ),
    "card": (NodeService._card_call, "overflow nodes do not receive members' cards"),
    "ledger": (NodeService._ledger_call, "overflow nodes do not read the mesh's ledger"),
    "quota": (NodeService._quota_call, "overflow nodes neither hold quotas nor see users"),
    "users": (NodeService._users_call, "overflow nodes neither hold quotas nor see users"),
    "admin": (NodeService._admin_call, "overflow nodes do not administer the mesh"),
}
