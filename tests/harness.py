"""Several nodes' middles in one process, wired by an in-memory transport under one fake
clock (issue 13 item 8; the way aioquic's tests pass datagrams between two connections
with `transfer()`, and h11's `ConnectionPair`).

Each `Node` is a real node's middle, opened from its own home directory the way the daemon
opens it (`node.daemon._open_parts`): its `TrustStore` (a member of one mesh, joined by a
real invite), `UsersAdmin`, `LedgerStore`, `QuotaService`, `LocalModels` over scripted
backends, `Accountant`, `EntrySide`, `ServingSide`, signed cards (`node.daemon.Cards`),
`NodeService` and `LedgerSync`. Nothing binds a port and nothing runs on a timer that a
test waits for: the peer tables are filled from verified cards when a test says so
(`Mesh.connect`), ledger sync runs a round when a test says so (`Mesh.sync`).

Nodes reach each other through real `PeerClient`s over a `MemoryTransport`: a call is
serialized to bytes, parsed again at the other node and handed to its `NodeService`
(`describe`, `ping`, `join`, `push_revocations`, `infer`); replies travel back as bytes. A
`MeshError` crosses the way the gRPC servicer sends it (status, message and our error
code: `node.transport.grpc_service._abort`) and comes out as the gRPC client turns it
back (`node.transport.peer_client._rpc_error`), so each side sees what it sees in
production. A link can be cut and restored (`Network.cut`): a call over a cut link fails
as Unavailable, and so does a stream in flight, at once.

Backends are scripted: instant and deterministic, they fail before or during a stream on
command, can pause after some tokens until told to go on, and continue a text after what
was already delivered (a failover's `continuation`), so a failover's answer is one text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from mesh.clock import SYSTEM
from mesh.errors import MeshError, Overloaded, RemoteProtocolError, Unavailable
from mesh.inference import (
    ChatMessage,
    Feature,
    Finished,
    FinishReason,
    InferenceEvent,
    InferenceRequest,
    Load,
    ModelInfo,
    Route,
    Sampling,
    TextDelta,
    ToolCallDelta,
    new_request_id,
)
from mesh.ledger.records import open_record
from mesh.quota.rules import UNLIMITED, Quota, parse_quota
from mesh.routing.peers import PeerEvent, PeerTable
from mesh.routing.prefix import request_key
from mesh.routing.scheduler import Privacy
from mesh.trust.cards import HardwareSummary
from mesh.trust.invites import decode_invite, make_join_request
from mesh.trust.membership import Role
from mesh.wire import codec
from mesh.wire.codec import MAX_MESSAGE_BYTES
from mesh.wire.v1 import ledger_pb2 as lpb
from mesh.wire.v1 import node_pb2 as pb
from mesh.wire.v1 import trust_pb2 as tpb
from node.daemon import Cards
from node.serving.accounting import Accountant
from node.serving.entry import EntryAnswer, EntrySide
from node.serving.ledger_sync import LedgerSync, PeerSync
from node.serving.models import LocalModels
from node.serving.node_service import NodeService
from node.serving.plans import PlanGate
from node.serving.quota_service import QuotaService
from node.serving.serving_side import ServingSide
from node.store.home import Home
from node.store.ledger_store import LedgerStore
from node.store.trust_store import TrustStore
from node.store.users_admin import UsersAdmin
from node.transport.directory import PeerHandle
from node.transport.peer_client import PeerClient
from tests.members import new_trust

logger = logging.getLogger(__name__)

MODEL = "m"
M = TypeVar("M", bound=Message)


class FakeClock:
    """Wall and monotonic time that move only when a test moves them. A mesh's starts at
    the real time: what its trust layer signs and checks (certificates, invites, sealed
    envelopes) reads the system clock, and must agree with it."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.ms = start_ms
        self.mono = 100.0

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)
        self.mono += seconds


# --- scripted backends ---------------------------------------------------------------------


@dataclass
class Script:
    """What one source does: tokens, then finish; or fail (before the first event when
    `fail_after` is 0, else after that many tokens); or wait after `pause_after` tokens
    until its backend is resumed. A request that continues a text this script's tokens
    begin with (a failover's `continuation`) gets the tokens after it."""

    tokens: Sequence[str] = ("Hello", " world")
    fail_after: int | None = None
    error: Exception = field(default_factory=lambda: Unavailable("the peer went away"))
    prompt_tokens: int = 3
    pause_after: int | None = None
    calls: Sequence[ToolCallDelta] = ()  # tool-call pieces, one a token, before the text


def counting(n: int) -> tuple[str, ...]:
    """A long deterministic answer: " 5", ",", " 6", ",", ... (n tokens)."""
    out: list[str] = []
    i = 5
    while len(out) < n:
        out += [f" {i}", ","]
        i += 1
    return tuple(out[:n])


async def play(
    script: Script, request: InferenceRequest, paused: asyncio.Event | None = None
) -> AsyncGenerator[InferenceEvent, None]:
    if request.inputs is not None:  # embeddings: one small vector per input
        if script.fail_after is not None:
            raise script.error
        yield Finished(
            reason=FinishReason.STOP,
            prompt_tokens=sum(len(text) for text in request.inputs),
            completion_tokens=0,
            embeddings=tuple((float(len(text)), 1.0) for text in request.inputs),
        )
        return
    tokens = list(script.tokens)
    if request.continuation:
        text = ""
        for i, token in enumerate(tokens):
            if text == request.continuation:
                tokens = tokens[i:]
                break
            text += token
        else:
            if text == request.continuation:
                tokens = []
    made = 0
    budget = request.sampling.max_tokens
    for call in script.calls:
        if script.fail_after is not None and made >= script.fail_after:
            raise script.error
        if paused is not None and script.pause_after is not None and made == script.pause_after:
            await paused.wait()
        made += 1
        yield TextDelta("", 1, (), (call,))
    for text in tokens:
        if script.fail_after is not None and made >= script.fail_after:
            raise script.error
        if budget is not None and made >= budget:
            break
        if paused is not None and script.pause_after is not None and made == script.pause_after:
            await paused.wait()
        made += 1
        yield TextDelta(text)
    if script.fail_after is not None and made >= script.fail_after:
        raise script.error
    yield Finished(
        reason=FinishReason.STOP, prompt_tokens=script.prompt_tokens, completion_tokens=made
    )


class ScriptedStream:
    def __init__(self, backend: ScriptedBackend, request: InferenceRequest) -> None:
        self._backend = backend
        self._events = play(backend.script, request, backend.go)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[InferenceEvent]:
        return self._events

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self._backend.active -= 1
            await self._events.aclose()


class ScriptedBackend:
    """A backend (`node.serving.backends.base.Backend`) that plays its `script`."""

    def __init__(
        self,
        script: Script | None = None,
        *,
        slots: int = 1,
        context: int = 4096,
        model: str = MODEL,
        parameters: int = 0,
        features: frozenset[Feature] = frozenset(),
        remember: int = 0,
    ) -> None:
        self.script = script or Script()
        self.active = 0
        self.slots = slots
        # A prompt cache holding the last `remember` chats it was asked (0: none), as the
        # llama.cpp backend says what it holds (`held_prefixes`).
        self.remember = remember
        self._held: dict[bytes, None] = {}
        self.asked: list[InferenceRequest] = []
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.info = ModelInfo(
            name=model,
            context_length=context,
            tokens_per_second=50.0,
            parameter_count=parameters,
            features=features,
        )
        self.go = asyncio.Event()  # a paused script goes on when it is set

    def resume(self) -> None:
        self.go.set()

    def load(self) -> Load:
        return Load(active_streams=self.active, queued=0, slots=self.slots)

    async def open(self, request: InferenceRequest) -> ScriptedStream:
        if self.active >= self.slots:
            raise Overloaded("every slot is taken")
        self.asked.append(request)
        self.active += 1
        key = request_key(request) if self.remember else None
        if key is not None:
            self._held.pop(key, None)
            self._held[key] = None
            while len(self._held) > self.remember:
                del self._held[next(iter(self._held))]
        return ScriptedStream(self, request)

    def held_prefixes(self) -> frozenset[bytes]:
        return frozenset(self._held)

    async def aclose(self) -> None:
        pass


def chat(
    max_tokens: int | None = None, content: str = "hi", *, model: str = MODEL, user: str = "zoe"
) -> InferenceRequest:
    return InferenceRequest(
        model=model,
        messages=(ChatMessage(role="user", content=content),),
        sampling=Sampling(max_tokens=max_tokens),
        user=user,
    )


@dataclass
class Answered:
    text: str
    finished: Finished
    answer: EntryAnswer


async def ask(
    entry: EntrySide, request: InferenceRequest, privacy: Privacy | None = None
) -> Answered:
    """The whole answer to `request` entering at `entry`."""
    async with entry.answer(request, privacy) as answer:
        text: list[str] = []
        async with contextlib.aclosing(answer.events()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                else:
                    assert isinstance(event, Finished)
                    return Answered("".join(text), event, answer)
    raise AssertionError("the answer ended without a Finished")


async def spend_until_refused(
    entry: EntrySide, request: InferenceRequest, privacy: Privacy | None = None, *, most: int = 1000
) -> tuple[list[Answered], MeshError]:
    """Ask `request` (each time anew) until `entry` refuses it: the answers, the refusal."""
    answers: list[Answered] = []
    while len(answers) < most:
        try:
            answers.append(
                await ask(entry, dataclasses.replace(request, request_id=new_request_id()), privacy)
            )
        except MeshError as exc:
            return answers, exc
    raise AssertionError(f"still answered after {most} requests")


class LogWatch(logging.Handler):
    """Wait for a log message (a line containing `text`) without polling."""

    def __init__(self, logger_name: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self._text = text
        self._logger = logging.getLogger(logger_name)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self._text in record.getMessage():
            self.seen.set()

    def __enter__(self) -> LogWatch:
        self._logger.addHandler(self)
        self._level = self._logger.level
        if not self._logger.isEnabledFor(logging.DEBUG):
            self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


# --- the network ---------------------------------------------------------------------------


class Network:
    """Who can reach whom: every pair of nodes is linked until a test cuts the link.
    Calls a node's service failed with (anything but a `MeshError`: a bug) are kept in
    `server_errors`; the harness fails the test when any are left."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}  # by address
        self._cut: dict[frozenset[str], asyncio.Event] = {}
        self.server_errors: list[BaseException] = []

    def _pair(self, a: Node, b: Node) -> frozenset[str]:
        return frozenset((a.address, b.address))

    def cut(self, a: Node, b: Node | None = None) -> None:
        """Cut the link between `a` and `b` (every link of `a` without `b`): calls over it
        fail as Unavailable, streams in flight too."""
        for other in [b] if b is not None else [n for n in self.nodes.values() if n is not a]:
            event = self._cut.setdefault(self._pair(a, other), asyncio.Event())
            event.set()

    def restore(self, a: Node, b: Node | None = None) -> None:
        for other in [b] if b is not None else [n for n in self.nodes.values() if n is not a]:
            self._cut.pop(self._pair(a, other), None)

    def restore_all(self) -> None:
        self._cut.clear()

    def link(self, a: Node, b: Node) -> asyncio.Event:
        """Set when the link between a and b is cut (a fresh one after a restore)."""
        return self._cut.setdefault(self._pair(a, b), asyncio.Event())

    def reach(self, caller: Node, address: str) -> Node:
        node = self.nodes.get(address)
        if node is None or not node.running or not caller.running:
            raise Unavailable("peer unreachable: failed to connect to all addresses")
        if self.link(caller, node).is_set():
            raise Unavailable("peer unreachable: the link is cut")
        return node


def _crossed(error: MeshError) -> MeshError:
    """`error` as the calling node sees it: sent as a gRPC status with our error code in
    the trailing metadata (`grpc_service._abort`), turned back by the client
    (`peer_client._rpc_error`)."""
    if error.grpc_status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Unavailable(f"peer unreachable: {error.message}")
    return codec.error_from_status(error.grpc_status, error.message, error.code)


_UNARY: dict[str, type[Message]] = {
    "Describe": pb.DescribeRequest,
    "Ping": pb.PingRequest,
    "Join": tpb.JoinRequest,
    "PushRevocations": tpb.SignedRevocations,
}


class MemoryTransport:
    """`node.transport.peer_client.Transport` between two nodes of one `Network`."""

    via_relay = False

    def __init__(self, net: Network, caller: Node, address: str) -> None:
        self.label = address
        self._net = net
        self._caller = caller
        # What the called node's service sees as its peer (a gRPC peer string).
        self._peer = f"ipv4:{caller.ip}:40000"

    def _carried(self, message: Message) -> bytes:
        """A message's bytes, refused as gRPC refuses one over its size limit."""
        data = message.SerializeToString()
        if len(data) > MAX_MESSAGE_BYTES:
            raise Overloaded(f"a message of {len(data)} bytes is over the limit")
        return data

    def _server_error(self, exc: BaseException) -> MeshError:
        self._net.server_errors.append(exc)
        logger.error("the service failed with a bug", exc_info=exc)
        return RemoteProtocolError(f"UNKNOWN: {exc!r}")

    async def unary(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> M:
        node = self._net.reach(self._caller, self.label)
        parsed = _UNARY[method].FromString(self._carried(request))
        service = node.service
        try:
            if method == "Describe":
                reply: Message = service.describe()
            elif method == "Ping":
                reply = service.ping(parsed, self._peer)  # type: ignore[arg-type]
            elif method == "Join":
                reply = service.join(parsed, self._peer)  # type: ignore[arg-type]
            else:
                reply = service.push_revocations(parsed, self._peer)  # type: ignore[arg-type]
        except MeshError as exc:
            raise _crossed(exc) from None
        except Exception as exc:
            raise self._server_error(exc) from None
        self._net.reach(self._caller, self.label)  # cut while it was answering: lost
        return reply_type.FromString(self._carried(reply))

    async def stream(
        self, method: str, request: Message, reply_type: type[M], timeout_s: float
    ) -> AsyncGenerator[M, None]:
        assert method == "Infer"
        node = self._net.reach(self._caller, self.label)
        cut = self._net.link(self._caller, node)
        events = node.service.infer(
            pb.InferRequest.FromString(self._carried(request)),
            peer=self._peer,
            time_remaining_s=timeout_s,
        )
        async with contextlib.aclosing(events):
            while True:
                following = asyncio.ensure_future(anext(events))
                broken = asyncio.ensure_future(cut.wait())
                try:
                    await asyncio.wait(
                        {following, broken}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    # However this ends (the link cut, the deadline, the caller gone), the
                    # serving side's work is cancelled before its stream closes, as gRPC
                    # cancels the handler of a call whose connection is gone.
                    broken.cancel()
                    if not following.done():
                        following.cancel()
                        await asyncio.wait({following})
                if following.cancelled() or cut.is_set():
                    if not following.cancelled():
                        following.exception()  # what it made reaches nobody now
                    reason = "the link is cut" if cut.is_set() else "Deadline Exceeded"
                    raise Unavailable(f"peer unreachable: {reason}")
                try:
                    event = following.result()
                except StopAsyncIteration:
                    return
                except MeshError as exc:
                    raise _crossed(exc) from None
                except Exception as exc:
                    raise self._server_error(exc) from None
                yield reply_type.FromString(self._carried(event))

    async def aclose(self) -> None:
        pass


class Directory:
    """One node's peers, as peering keeps them: a client and a verified card per peer
    (`node.transport.directory.PeerDirectory`, the entry side's `Peering`)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.handles: dict[str, PeerHandle] = {}
        self.applied: list[PeerEvent] = []
        self._card_versions: dict[str, int] = {}  # node ID -> issued-at of the card we hold

    def client(self, node_id: str) -> PeerHandle | None:
        return self.handles.get(node_id)

    def apply(self, events: list[PeerEvent]) -> None:
        self.applied.extend(events)

    async def learn(self, other: Node, *, rtt_ms: float = 1.0) -> None:
        """What peering does with a new address: the public card, verified against our
        mesh; the sealed full card; a ping for the peer's load. The peer enters the table."""
        node = self._node
        client = PeerClient(
            other.address,
            trust=node.trust,
            transport=MemoryTransport(node.net, node, other.address),
        )
        card = await client.public_card()
        self.handles[card.node_id] = PeerHandle(client, card)
        await self._learn(card.node_id, other.address)
        await self.ping(card.node_id, rtt_ms=rtt_ms)

    async def _learn(self, node_id: str, address: str) -> None:
        """The peer's sealed full card, into the table (peering's `_learn`)."""
        handle = self.handles[node_id]
        full = await handle.client.full_card(handle.card)
        self._card_versions[node_id] = full.issued_at_unix_ms
        route = Route.CLOUD if handle.card.membership.role is Role.OVERFLOW else Route.LAN
        self._node.table.verified(
            node_id=node_id,
            address=address,
            route=route,
            models=tuple(codec.model_from_pb(m) for m in full.models),
            display_name=full.display_name,
            now_ms=self._node.clock.now_ms(),
        )

    async def ping(self, node_id: str, *, rtt_ms: float = 1.0) -> bool:
        """A heartbeat: the peer's load now; False when it did not answer."""
        handle = self.handles[node_id]
        try:
            reply = await handle.client.ping()
        except MeshError:
            return False
        if reply.card_issued_at_unix_ms != self._card_versions.get(node_id):
            peer = self._node.table.get(node_id)  # a new card: fetched, as peering does
            if peer is not None:
                with contextlib.suppress(MeshError):
                    await self._learn(node_id, peer.address)
        self.apply(
            self._node.table.heartbeat_ok(
                node_id,
                now_ms=self._node.clock.now_ms(),
                rtt_ms=rtt_ms,
                load=codec.load_from_pb(reply.load),
            )
        )
        return True


# --- a node --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class NodeSpec:
    backends: list[ScriptedBackend] = field(default_factory=list)
    role: Role = Role.MEMBER
    cloud_plan: Quota = UNLIMITED
    privacy: Privacy = Privacy.MESH


class Node:
    """One node's middle, opened from its home directory (again after `restart`)."""

    def __init__(
        self, net: Network, clock: FakeClock, name: str, home: Path, index: int, spec: NodeSpec
    ) -> None:
        self.net = net
        self.clock = clock
        self.name = name
        self.home = home
        self.address = f"mem:{name}"
        self.ip = f"198.18.0.{index + 10}"
        self.spec = spec
        self.backends = spec.backends
        self.running = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        """Open what holds state, in the daemon's order; nothing runs on a timer a test
        waits for (the quota service's lease upkeep runs, on real time)."""
        before = asyncio.all_tasks()
        self.trust: TrustStore = new_trust(self.home)
        self.identity = self.trust.identity
        self.node_id = self.identity.node_id
        home = Home.resolve(self.home)
        self.users = UsersAdmin.open(home, default_privacy=self.spec.privacy, trust=self.trust)
        self.ledger = await LedgerStore.open(
            home.ledger_file, self.identity, clock=self.clock.now_ms
        )
        self.models = LocalModels(self.node_id, self.backends)  # type: ignore[arg-type]
        self.table = PeerTable()
        self.directory = Directory(self)
        self.quota = QuotaService(
            node_id=self.node_id,
            users=self.users,
            store=self.ledger,
            links=self.directory,
            cloud_plan=self.spec.cloud_plan,
            clock=self.clock,
            holds_file=self.home / "quota-holds.json",
        )
        await self.quota.start()
        self.plans = PlanGate(users=self.users)
        self.models.place_keeper = self.plans.take_place
        self.accountant = Accountant(node_id=self.node_id, ledger=self.ledger, clock=self.clock)
        self.entry = EntrySide(
            models=self.models,
            peers=self.table,
            accountant=self.accountant,
            peering=self.directory,
            admitter=self.quota,
            plans=self.plans,
            default_privacy=self.spec.privacy,
            clock=self.clock,
        )
        trust = self.trust
        self.serving = ServingSide(
            models=self.models,
            accountant=self.accountant,
            cloud_plan=lambda: self.quota if trust.role is Role.OVERFLOW else None,
            clock=self.clock,
        )
        self.cards = Cards(
            identity=self.identity,
            trust=self.trust,
            models=self.models,
            display_name=self.name,
            peer_addresses=lambda: [],
            hardware=HardwareSummary(),
            clock=self.clock,
        )
        self.cards.grpc_addresses = [self.address]
        self.cards.refresh()
        self.service = NodeService(
            trust=self.trust,
            serving=self.serving,
            models=self.models,
            public_card=lambda: self.cards.public,
            full_card=lambda: self.cards.full,
            on_revocations=self.cards.refresh,
            card_issued_at=self.cards.current_issued_at,
            ledger=self.ledger,
            quota=self.quota,
            users=self.users,
            clock=self.clock,
        )
        self.sync = LedgerSync(
            store=self.ledger,
            table=self.table,
            links=self.directory,  # type: ignore[arg-type]
            users=self.users,
            trust=self.trust,
            workers=1,  # signatures checked in process
            clock=self.clock,
        )
        self._tasks = asyncio.all_tasks() - before
        self.running = True

    async def close(self) -> None:
        """A graceful stop: leases given back, releases under way delivered."""
        if not self.running:
            return
        await self.quota.aclose()
        await self._stop()

    async def crash(self) -> None:
        """A stop with no chance to write anything on the way out (kill -9): the node's
        background work is cancelled, not finished; what it kept is what it wrote."""
        if not self.running:
            return
        await self._stop()

    async def _stop(self) -> None:
        self.running = False  # calls to it and from it fail from now on
        for task in self._tasks:  # what it started when it opened (the lease upkeep)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sync.aclose()
        await self.ledger.close()

    async def restart(self, *, crash: bool = False) -> None:
        """Stop (gracefully, or as a crash) and open again from the same home; peers must
        be learnt again (`Mesh.connect`)."""
        await (self.crash() if crash else self.close())
        for backend in self.backends:
            backend.go = asyncio.Event()
        await self.open()

    async def add_user(
        self, name: str, quota: str = "", privacy: Privacy | None = None, *, plan: str = ""
    ) -> str:
        """A user whose home is this node (on `plan`, or with `quota`); their API key."""
        chosen = self.plans.quota_of(plan) if plan else parse_quota(quota) if quota else UNLIMITED
        added = await self.users.add(name=name, privacy=privacy, quota=chosen)
        return str(added["api_key"])

    def quota_state(self, user: str) -> list[dict[str, object]]:
        """The user's quota as this node counts it (what `allerac user list` shows)."""
        record = self.users.get(user)
        assert record is not None, f"no user {user!r} here"
        return self.quota.book.describe(user, record.quota, self.clock.now_ms())

    def reserved(self, user: str) -> int:
        return int(self.quota_state(user)[0]["reserved"])  # type: ignore[call-overload]

    async def held(self) -> tuple[frozenset[bytes], frozenset[bytes]]:
        """What this node's ledger holds: its records' and receipts' bytes."""
        records = await self.ledger.records()
        receipts = await self.ledger.receipts()
        return (
            frozenset(r.SerializeToString() for r in records),
            frozenset(r.SerializeToString() for r in receipts),
        )


def _quota_work(task: asyncio.Task[Any]) -> bool:
    """A quota service's background work: releases and lease reports (not its upkeep)."""
    name = task.get_name()
    return name.startswith("quota-") and name != "quota-leases"


class Mesh:
    """Nodes of one mesh (the first is its admin; the others joined it by invite)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.net = Network()
        self.clock = FakeClock(SYSTEM.now_ms())
        self.nodes: dict[str, Node] = {}

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    async def _time_passes(self, seconds_per_tick: float = 1.0) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.clock.advance(seconds_per_tick)

    async def add(self, name: str, spec: NodeSpec | None = None, *, join: bool = True) -> Node:
        """A node; it joins the mesh of the first node (by a real invite over the
        transport), unless it is the first or `join` is False (a mesh of its own)."""
        spec = spec or NodeSpec()
        node = Node(self.net, self.clock, name, self.root / name, len(self.nodes), spec)
        admin = next(iter(self.nodes.values()), None)
        await node.open()
        self.net.nodes[node.address] = node
        if admin is not None and join:
            await self.join(node, admin, role=spec.role)
        self.nodes[name] = node
        return node

    async def join(self, node: Node, admin: Node, *, role: Role = Role.MEMBER) -> None:
        now = SYSTEM.now_ms()  # the trust layer's time: the system clock
        code = admin.trust.create_invite(
            role=role, ttl_ms=600_000, addresses=[admin.address], now=now
        )
        invite = decode_invite(code, now_ms=now)
        request = make_join_request(
            invite, node.identity, now_ms=now, display_name=node.name, addresses=(node.address,)
        )
        client = PeerClient(
            admin.address,
            trust=node.trust,
            transport=MemoryTransport(self.net, node, admin.address),
        )
        response = await client.join(request)
        node.trust.adopt(response, mesh_public_key=invite.mesh_public_key, now=now)
        node.cards.refresh()

    async def connect(self, *names: str) -> None:
        """Every node named (all by default) learns every other one, as peering does:
        verified cards, then a heartbeat. Nearer peers first: the n-th node learnt is at
        an RTT of n ms, so plans try peers in the order the mesh was built."""
        chosen = [self.nodes[n] for n in names] if names else list(self.nodes.values())
        for node in chosen:
            if node.trust.role is Role.OVERFLOW or not node.running:
                continue  # an overflow node serves; it never routes, so it learns nobody
            node.directory.handles.clear()
            for rtt, other in enumerate(self.nodes.values(), start=1):
                if other is not node and other.running:
                    await node.directory.learn(other, rtt_ms=float(rtt))

    async def sync(self, *, rounds: int = 1) -> list[PeerSync]:
        """`rounds` rounds of ledger sync: every node pulls from every peer it knows."""
        outcomes: list[PeerSync] = []
        for _ in range(rounds):
            for node in self.nodes.values():
                if not node.running:
                    continue
                for peer_id in list(node.directory.handles):
                    outcomes.append(await node.sync.pull_from(peer_id))
        return outcomes

    async def heartbeats(self, seconds: int) -> None:
        """`seconds` of peering, second by second on the fake clock: every node pings
        every peer it knows, then lets the silence count (`PeerTable.tick`)."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            for node in self.nodes.values():
                if not node.running:
                    continue
                for peer_id in list(node.directory.handles):
                    await node.directory.ping(peer_id)
                node.directory.apply(node.table.tick(self.clock.now_ms()))

    async def settled(self) -> None:
        """Wait until the quota work under way (releases, lease reports) is done."""
        for _ in range(1000):
            busy = [t for t in asyncio.all_tasks() if _quota_work(t)]
            if not busy:
                return
            await asyncio.wait(busy, timeout=5)
        raise AssertionError("quota work never settled")

    async def aclose(self) -> None:
        self.net.restore_all()  # so that leases given back on the way out get home
        # Time passes while the nodes close: a lease report that failed is due again a
        # second later on the nodes' clock (a stopped clock would keep it waiting until
        # the close gives up, seconds later).
        ticking = asyncio.create_task(self._time_passes())
        try:
            for node in reversed(self.nodes.values()):  # the mesh's admin (a home) last
                await node.close()
        finally:
            ticking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticking
        # What a crashed node left running (it can reach nobody any more).
        orphans = [t for t in asyncio.all_tasks() if _quota_work(t)]
        for task in orphans:
            task.cancel()
        await asyncio.gather(*orphans, return_exceptions=True)
        errors, self.net.server_errors = self.net.server_errors, []
        if errors:
            raise AssertionError(f"a node's service failed with a bug: {errors[0]!r}") from errors[
                0
            ]


@contextlib.asynccontextmanager
async def mesh(
    root: Path, specs: dict[str, NodeSpec] | None = None, *, connect: bool = True
) -> AsyncIterator[Mesh]:
    """`async with mesh(tmp_path, {"a": NodeSpec(...), "b": ...}) as m:` nodes of one mesh
    (the first is the admin), each knowing the others unless `connect` is False."""
    built = Mesh(root)
    loop = asyncio.get_running_loop()
    unhandled: list[Any] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        for name, spec in (specs or {}).items():
            await built.add(name, spec)
        if connect:
            await built.connect()
        yield built
    finally:
        try:
            await built.aclose()
            gc.collect()  # generators nobody closed are finalized now, and fail now
            await asyncio.sleep(0)
        finally:
            loop.set_exception_handler(None)
    if unhandled:
        raise AssertionError(f"an exception nobody handled: {unhandled[0]}")


def spent(records: Sequence[lpb.SignedRecord], user: str) -> int:
    """Tokens `user`'s records count, each record once (by node and sequence)."""
    seen: dict[tuple[str, int], int] = {}
    for signed in records:
        record = open_record(signed)
        if record.user == user:
            seen[(record.node_id, record.seq)] = record.prompt_tokens + record.completion_tokens
    return sum(seen.values())


async def all_records(nodes: Sequence[Node]) -> list[lpb.SignedRecord]:
    out: list[lpb.SignedRecord] = []
    for node in nodes:
        out += await node.ledger.records()
    return out
