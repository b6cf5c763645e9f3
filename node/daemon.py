"""One running agent: identity, backends, the gRPC server and the HTTP API.

`Node` is an async context manager. Entering it loads the identity and every
model (a missing or broken model fails here, at start, not at the first
request), binds both servers and publishes `run/node.json`. Leaving it drains:
both servers stop taking new work and give in-flight answers up to
`shutdown_grace_s` to finish, then whatever is left is cancelled, the model
workers are joined and node.json is removed.

Every part is built in one `AsyncExitStack`, in two phases: `_open_parts` opens what
holds state (identity, trust, users, ledger, models, quotas; no port is bound, nothing
runs), and `RunningNode.serve` starts what talks to others (servers, peering, relays,
sync, mDNS). Each part registers its own stop as it starts, so a start that fails half
way stops exactly what was started, and a normal stop runs in the reverse order: mDNS,
ledger sync, peering, background work, the drain (servers, answers in flight), relays,
quotas, backends, the ledger (last: every answer has left its record), the run files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from mesh import PROTOCOL_VERSION, __version__
from mesh.clock import SYSTEM, Clock
from mesh.config import NodeConfig, cloud_plan_quota
from mesh.errors import ConfigError
from mesh.profiles import Profile, apply_profile
from mesh.profiles import choose as choose_profile
from mesh.routing.peers import PeerTable
from mesh.routing.scheduler import Privacy
from mesh.trust.cards import HardwareSummary, sign_card
from mesh.trust.identity import Identity
from mesh.trust.membership import Role
from mesh.trust.names import default_display_name
from mesh.wire import grpc_options
from mesh.wire.v1 import node_pb2 as pb
from node.api.console import Console
from node.api.display_name import add_display_name_route
from node.api.http_api import HttpLimits, build_app
from node.api.mesh_admin import MeshAdmin
from node.api.metrics import LiveState, Metrics, add_metrics_route
from node.api.models_admin import register_models_admin
from node.api.owner import HostGuard, OwnerToken
from node.api.usage_api import UsageSource, add_usage_routes
from node.reconfigure import Reconfigurer
from node.serving.accounting import Accountant
from node.serving.backends import create_backend
from node.serving.entry import EntrySide
from node.serving.ledger_sync import LedgerSync
from node.serving.models import LocalModels
from node.serving.node_service import NodeService
from node.serving.plans import PlanGate
from node.serving.quota_service import QuotaService
from node.serving.serving_side import ServingSide
from node.store.config_file import ConfigSource
from node.store.hardware import physical_cores, probe_hardware
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from node.store.ledger_store import LedgerStore
from node.store.model_files import check_memory
from node.store.names_file import NamesFile, names_path, read_own_name, write_own_name
from node.store.trust_store import TrustStore
from node.store.users_admin import UsersAdmin, log_api_access
from node.tasks import Tasks
from node.transport import node_pb2_grpc as pb_grpc
from node.transport.grpc_front import GrpcFront
from node.transport.grpc_service import NodeServicer
from node.transport.http_guard import GuardedSite, HttpConnectionGuard
from node.transport.listeners import AcceptErrorLog, ListenerSettings, raise_nofile_limit
from node.transport.peering import Peering
from node.transport.relay_client import RelayLink

if TYPE_CHECKING:
    from node.transport.discovery import Discovery

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
MAINTENANCE_INTERVAL_S = 5.0
OWN_CHAIN_WAIT_S = 15.0  # a node that lost its ledger waits this long for its chain
TPS_DRIFT = 0.2  # re-sign the card when a model's measured speed moved this much
# Servers cut what is left this long after the grace period; by then the backends have
# ended every stream themselves, so this margin is only for writing the last bytes.
SERVER_STOP_MARGIN_S = 2.0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def advertised_addresses(host: str, port: int) -> list[str]:
    """Where peers can reach a server bound to `host`: itself, or for a wildcard bind
    every address of this machine (LAN ones first, loopback last)."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        return [f"{_url_host(host)}:{port}"]
    import ifaddr

    lan: list[str] = []
    loopback: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 needs a scope; LAN IPv4 is what boxes use
            (loopback if ipaddress.ip_address(ip.ip).is_loopback else lan).append(f"{ip.ip}:{port}")
    return lan + loopback or [f"127.0.0.1:{port}"]


@dataclass(kw_only=True)
class Parts:
    """What a node holds state in, opened before anything runs."""

    listeners: ListenerSettings
    identity: Identity
    display_name: str  # the config's, or the host name plus a short node-ID suffix
    created_identity: bool
    owner_token: OwnerToken
    trust: TrustStore
    users: UsersAdmin
    ledger: LedgerStore
    models: LocalModels
    peer_table: PeerTable
    peering: Peering
    quota: QuotaService
    plans: PlanGate
    entry: EntrySide
    serving: ServingSide
    cards: Cards
    relays: list[RelayLink] = field(default_factory=list)  # started with the servers


class Cards:
    """This node's two signed cards (public: what strangers may see; full: for members),
    re-signed when what they say changes."""

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustStore,
        models: LocalModels,
        display_name: str,
        peer_addresses: Callable[[], list[str]],
        hardware: HardwareSummary,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._hardware = hardware
        self._identity = identity
        self._trust = trust
        self._models = models
        self.display_name = display_name  # the owner may rename the box while it runs
        self._peer_addresses = peer_addresses
        self.grpc_addresses: list[str] = []  # set when the gRPC agent is bound
        self.public = pb.SignedCard()
        self.full = pb.SignedCard()
        self.issued_at_ms = 0
        self._prefixes: dict[str, frozenset[bytes]] = {}  # what the full card says is held

    def current_issued_at(self) -> int:
        """The cards' version, re-signed first when the conversations this box's models hold
        moved (peers fetch the new full card when a heartbeat shows the version changed)."""
        if self._models.held_prefixes() != self._prefixes:
            self.refresh()
        return self.issued_at_ms

    def refresh(self) -> None:
        """Re-sign both cards (after a key rotation, a join, a model change)."""
        self._prefixes = self._models.held_prefixes()
        trust = self._trust
        common = {
            "membership": trust.cert,
            "encryption_keys": trust.keyring.current.signed,
            "mesh_id": trust.mesh_id,
            "now_ms": self._clock.now_ms(),
        }
        self.public = sign_card(self._identity, public=True, **common)  # type: ignore[arg-type]
        self.full = sign_card(
            self._identity,
            models=self._models.models(),
            grpc_addresses=self.grpc_addresses,
            display_name=self.display_name,
            peer_addresses=self._peer_addresses(),
            tier=pb.TIER_CLOUD if trust.role is Role.OVERFLOW else pb.TIER_HOME,
            hardware=self._hardware,
            **common,  # type: ignore[arg-type]
        )
        # Strictly increasing, so peers notice every change even within one millisecond.
        self.issued_at_ms = max(
            int(common["now_ms"]),  # type: ignore[call-overload]
            self.issued_at_ms + 1,
        )

    def speeds_moved(self) -> bool:
        """A model's measured speed moved by more than TPS_DRIFT since the card said it."""
        card = pb.NodeCard.FromString(self.full.card)
        advertised = {
            m.name: (m.tokens_per_second, m.prompt_tokens_per_second) for m in card.models
        }
        for info in self._models.models():
            said = advertised.get(info.name, (0.0, 0.0))
            for before, now in zip(
                said, (info.tokens_per_second, info.prompt_tokens_per_second), strict=True
            ):
                if now and (not before or abs(now - before) / before > TPS_DRIFT):
                    return True
        return False


async def _open_parts(
    config: NodeConfig,
    home: Home,
    stack: AsyncExitStack,
    clock: Clock,
    *,
    hardware: HardwareSummary | None = None,
) -> Parts:
    """Open what holds state, in order; each part's closing goes on `stack`. Every part
    reads the time from `clock`."""
    listeners = _limit_connections(config, stack)
    home.ensure()
    identity, created = load_or_create_identity(home.identity_key)
    display_name = (
        config.display_name
        or read_own_name(home.root)
        or default_display_name(socket.gethostname(), identity.node_id)
    )
    # A new owner credential at every start: what the CLI sends for administration.
    owner_token = OwnerToken.issue(home)
    stack.callback(OwnerToken.clear, home, owner_token)
    stack.callback(home.clear_run_info, os.getpid())  # written once the node serves
    trust = TrustStore.open(home, identity, clock=clock)
    # Beyond loopback the HTTP API serves API keys only, so a bad users file stops here.
    users = UsersAdmin.open(home, default_privacy=Privacy(config.privacy), trust=trust, clock=clock)
    ledger = await LedgerStore.open(home.ledger_file, identity, clock=clock.now_ms)
    stack.push_async_callback(ledger.close)  # runs last: every answer has left its record
    # The served set changes while the node runs (node/reconfigure.py); whatever is loaded
    # when it stops is closed here, after the drain.
    models = LocalModels(identity.node_id, [])
    stack.push_async_callback(models.aclose)
    for model in config.models:
        backend = create_backend(model)
        await backend.start()
        models.swap(add=[backend], remove=())
    relays: list[RelayLink] = []

    async def close_relays() -> None:  # after the drain: answers through a relay finish too
        for link in relays:
            await link.aclose()

    stack.push_async_callback(close_relays)
    peer_table = PeerTable()
    cards: Cards | None = None

    def cards_changed() -> None:
        if cards is not None:
            cards.refresh()

    peering = Peering(
        trust=trust,
        table=peer_table,
        static_peers=config.peers,
        on_change=cards_changed,
        card_issued_at=lambda: cards.issued_at_ms if cards is not None else 0,
        clock=clock,
    )
    cards = Cards(
        identity=identity,
        trust=trust,
        models=models,
        display_name=display_name,
        peer_addresses=peering.direct_addresses,
        hardware=hardware if hardware is not None else probe_hardware(),  # once, at start
        clock=clock,
    )
    quota = QuotaService(
        node_id=identity.node_id,
        users=users,
        store=ledger,
        links=peering,
        cloud_plan=cloud_plan_quota(config.cloud_plan),
        holds_file=home.root / "quota-holds.json",
        clock=clock,
    )
    await quota.start()
    stack.push_async_callback(quota.aclose)  # after the drain: every release is under way
    accountant = Accountant(node_id=identity.node_id, ledger=ledger, clock=clock)
    plans = PlanGate(users=users, overrides=config.plans)
    models.place_keeper = plans.take_place  # a full model's last places: higher plans first
    return Parts(
        listeners=listeners,
        identity=identity,
        display_name=display_name,
        created_identity=created,
        owner_token=owner_token,
        trust=trust,
        users=users,
        ledger=ledger,
        models=models,
        peer_table=peer_table,
        peering=peering,
        quota=quota,
        plans=plans,
        entry=EntrySide(
            models=models,
            peers=peer_table,
            accountant=accountant,
            peering=peering,
            admitter=quota,
            plans=plans,
            max_wait_ms=config.max_wait_ms,
            default_privacy=Privacy(config.privacy),
            cache_aware=config.cache_aware,
            clock=clock,
        ),
        serving=ServingSide(
            models=models,
            accountant=accountant,
            # The mesh's cloud plan is held by the overflow node serving it.
            cloud_plan=lambda: quota if trust.role is Role.OVERFLOW else None,
            clock=clock,
        ),
        cards=cards,
        relays=relays,
    )


def _limit_connections(config: NodeConfig, stack: AsyncExitStack) -> ListenerSettings:
    """Descriptors first: the soft limit up to the hard one, the listeners' caps sized
    from it, and failed accepts logged once a minute instead of in a tight loop."""
    nofile = raise_nofile_limit()
    settings = ListenerSettings.from_environment(nofile, config=config)
    accept_errors = AcceptErrorLog()
    loop = asyncio.get_running_loop()
    accept_errors.install(loop)
    stack.callback(accept_errors.uninstall, loop)
    logger.info(
        "descriptor limit %d (%d kept for the node itself); HTTP: %d connections, %d per "
        "address; gRPC: %d connections, %d per address",
        nofile,
        settings.budget.kept_fds,
        settings.http.total,
        settings.http.per_source,
        settings.grpc.total,
        settings.grpc.per_source,
    )
    return settings


class Node:
    """`async with Node(config, home) as node:` runs a node (a `RunningNode`) for the
    block, and drains and stops it after."""

    def __init__(
        self,
        config: NodeConfig,
        home: Home,
        *,
        source: ConfigSource | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        self.config = config
        self.home = home
        self._source = source  # where the configuration is read again (SIGHUP, models)
        self._clock = clock
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> RunningNode:
        stack = AsyncExitStack()
        try:
            # The box profile (mesh.profiles): the models' defaults and what the card says.
            hardware = probe_hardware()
            profile = choose_profile(self.config.profile, hardware, physical_cores())
            hardware = dataclasses.replace(hardware, profile=profile.name.value)
            config = apply_profile(self.config, profile)
            logger.info(
                "box profile %s (%s): threads %s, context %d, %.1f GiB for models",
                profile.name,
                profile.chosen_by,
                profile.threads or "the backend's (physical cores or $ALLERAC_THREADS)",
                profile.context_length,
                profile.model_memory_bytes / (1 << 30),
            )
            check_memory(config.models, profile)
            parts = await _open_parts(config, self.home, stack, self._clock, hardware=hardware)
            node = RunningNode(config, self.home, parts, self._clock, source=self._source)
            node.profile = profile
            node.hardware = hardware
            await node.serve(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return node

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()


class RunningNode:
    """A node's parts, its servers and its background work, while it runs."""

    def __init__(
        self,
        config: NodeConfig,
        home: Home,
        parts: Parts,
        clock: Clock,
        *,
        source: ConfigSource | None = None,
    ) -> None:
        self._clock = clock
        self.config = config
        self.home = home
        self.parts = parts
        self.identity = parts.identity
        self.node_id = parts.identity.node_id
        self.display_name = parts.display_name
        # Names of the boxes seen, for `allerac usage --by node` (read with no node running).
        self.names = NamesFile(names_path(home.root))
        self.metrics = Metrics()
        self.console = Console(node_id=self.node_id, clock=clock)
        self._stopping = asyncio.Event()  # set when the drain starts: live streams end
        self._mesh_admin: MeshAdmin | None = None  # made with the HTTP API
        self.created_identity = parts.created_identity
        self.owner_token = parts.owner_token
        self.trust = parts.trust
        self.models = parts.models
        self.peer_table = parts.peer_table
        self.peering = parts.peering
        self.entry = parts.entry
        self.plans = parts.plans
        self.cards = parts.cards
        self.relays = parts.relays
        self.listeners = parts.listeners
        self.http_url = ""
        self.grpc_address = ""
        self.grpc_addresses: list[str] = []
        self.discovery: Discovery | None = None  # none when mDNS is off or unavailable
        # The box profile and hardware (set by `Node` when it starts; these are their
        # values before that, for parts built without it).
        self.profile: Profile = choose_profile(config.profile, HardwareSummary(), 1)
        self.hardware = HardwareSummary()
        self._tasks = Tasks("node")
        self._started_at_ms = clock.now_ms()
        self.calls = NodeService(
            trust=parts.trust,
            serving=parts.serving,
            models=parts.models,
            public_card=lambda: self.cards.public,
            full_card=lambda: self.cards.full,
            on_revocations=self.after_membership_change,
            on_leaving=parts.peering.leaving,
            card_issued_at=self.cards.current_issued_at,
            on_member_joined=self._member_joined,
            ledger=parts.ledger,
            quota=parts.quota,
            users=parts.users,
            clock=clock,
        )
        # The public port is the front's (caps per source, a deadline to prove membership);
        # the gRPC server itself listens on loopback only, behind it.
        self._grpc_front = GrpcFront(
            caps=self.listeners.grpc, member_deadline_s=self.listeners.grpc_member_deadline_s
        )
        # Caps per source and deadlines for headers and bodies (node/transport/http_guard.py).
        self.http_guard = HttpConnectionGuard(
            caps=self.listeners.http,
            header_timeout_s=self.listeners.http_header_timeout_s,
            body_idle_s=self.listeners.http_body_idle_s,
        )
        self.http_limits = HttpLimits(
            max_request_bytes=config.max_request_bytes,
            guard=HostGuard.build(
                bound_host=config.http_host,
                allowed_hosts=config.http_allowed_hosts,
                cors_origins=config.http_cors_origins,
            ),
        )
        # One path for every change of configuration while running: SIGHUP and models.
        self.reconfigurer = Reconfigurer(self, source)
        trust = parts.trust
        self.ledger_sync = LedgerSync(
            store=parts.ledger,
            table=parts.peer_table,
            links=parts.peering,
            users=parts.users,
            trust=parts.trust,
            active=lambda: trust.role is not Role.OVERFLOW,  # overflow nodes never ask
            clock=clock,
        )

    async def serve(self, stack: AsyncExitStack) -> None:
        """Start everything that talks to others; each stop goes on `stack`."""
        stack.push_async_callback(self._grpc_front.aclose)  # after the drain: all delivered
        servers: list[Callable[[float], Any]] = []  # how to stop each server started

        async def drain() -> None:
            self._stopping.set()
            grace = self.config.shutdown_grace_s
            for backend in self.models.backends():
                backend.drain()
            self._grpc_front.stop_accepting()  # open connections still carry the drain
            await asyncio.gather(
                self._end_in_flight(grace),
                *(stop(grace + SERVER_STOP_MARGIN_S) for stop in servers),
                return_exceptions=True,
            )

        # Models being unloaded finish their answers within the drain; then it stops.
        stack.push_async_callback(self.reconfigurer.aclose)  # runs after the drain
        stack.push_async_callback(drain)
        await self._start_grpc(servers)
        await self._start_http(servers)
        log_api_access(self.config.http_host, self.parts.users)
        self.cards.refresh()
        self.names.observe(self._names_seen())
        self._tasks.start(self._maintain(), "trust maintenance")
        stack.push_async_callback(self._tasks.aclose)
        await self._start_relays()
        await self.peering.start()
        stack.push_async_callback(self.peering.aclose)  # peers hear we leave, stop sending
        await self.ledger_sync.start(own_chain_wait_s=self._own_chain_wait_s())
        stack.push_async_callback(self.ledger_sync.aclose)
        await self._start_discovery(stack)
        self.home.write_run_info(self.run_info())
        logger.info(
            "node %s serving on %s (gRPC %s)", self.node_id, self.http_url, self.grpc_address
        )

    async def _start_grpc(self, servers: list[Callable[[float], Any]]) -> None:
        front = self._grpc_front
        server = grpc.aio.server(
            interceptors=[front.interceptor],
            options=grpc_options.node_server_options(max_connections=self.listeners.grpc.total),
        )
        pb_grpc.add_NodeServiceServicer_to_server(  # type: ignore[no-untyped-call]
            NodeServicer(self.calls), server
        )
        backend_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server.stop)
        host = self.config.grpc_host
        bind = f"{_url_host(host)}:{self.config.grpc_port}"
        try:
            port = await front.start(host, self.config.grpc_port, backend_port=backend_port)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"cannot bind the gRPC agent to {bind}: {reason}") from exc
        self.grpc_addresses = advertised_addresses(host, port)
        self.grpc_address = self.grpc_addresses[0]
        self.cards.grpc_addresses = self.grpc_addresses

    async def _start_http(self, servers: list[Callable[[float], Any]]) -> None:
        parts = self.parts
        self._mesh_admin = mesh_admin = MeshAdmin(
            trust=parts.trust,
            addresses=lambda: self.grpc_addresses,
            display_name=self.display_name,
            on_change=self.after_membership_change,
            on_joined=self.after_join,
            peer=lambda node_id: self.peering.client(node_id),
            peer_addresses=lambda: self.peering.direct_addresses(),
            clock=self._clock,
        )
        app = build_app(
            entry=parts.entry,
            limits=self.http_limits,
            status=self.status,
            mesh_admin=mesh_admin,
            users=parts.users,
            quota=parts.quota,
            owner=parts.owner_token,
            plans=parts.plans,
            clock=self._clock,
            observers=(self.metrics,),
        )
        # The console (its pages, sign-in and sessions), /metrics, usage and the live
        # status stream: node/api/console.py, metrics.py, usage_api.py.
        app.middlewares.append(self.console.middleware())
        self.console.add_routes(app)
        add_metrics_route(
            app, self.metrics, self._live_state, scraper_token=self.config.metrics_token
        )
        add_display_name_route(
            app, rename=self.rename, set_in_config=bool(self.config.display_name)
        )
        add_usage_routes(
            app,
            source=UsageSource(self.home.ledger_file),
            names=self._names_known,
            status=self.status,
            stopping=self._stopping,
            clock=self._clock,
        )
        register_models_admin(app, self.reconfigurer)
        # The guard's middleware goes first, so it sees every request the moment its
        # headers are in.
        guard = self.http_guard
        app.middlewares.insert(0, guard.middleware)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away cancels its generation
            shutdown_timeout=self.config.shutdown_grace_s + SERVER_STOP_MARGIN_S,
            access_log=None,
            keepalive_timeout=self.listeners.http_keepalive_idle_s,
        )
        await runner.setup()
        servers.append(lambda _grace: runner.cleanup())
        site = GuardedSite(runner, guard, self.config.http_host, self.config.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot bind the HTTP API to {self.config.http_host}:{self.config.http_port}: "
                f"{exc.strerror}"
            ) from exc
        self.http_url = f"http://{_url_host(self.config.http_host)}:{site.port}"

    async def _end_in_flight(self, grace_s: float) -> None:
        backends = self.models.backends()
        deadline = self._clock.monotonic() + grace_s
        while any(b.busy() for b in backends) and self._clock.monotonic() < deadline:  # noqa: ASYNC110 (polls worker threads)
            await asyncio.sleep(DRAIN_POLL_S)
        for backend in backends:
            backend.cancel_all()

    async def _start_relays(self) -> None:
        """One session per configured relay: other offices and cloud nodes are reached
        through it, and they reach this node through it."""
        for address in self.config.relays:
            await self.start_relay(address)

    async def start_relay(self, address: str) -> None:
        link = RelayLink(
            address,
            trust=self.trust,
            calls=self.calls,
            on_directory=self.peering.relay_directory,
            clock=self._clock,
        )
        self.peering.attach_relay(link)
        self.relays.append(link)  # its stop is the parts' (after the drain)
        await link.start()

    async def stop_relay(self, address: str) -> None:
        """A relay taken out of the configuration: its session ends (calls through it fail
        over); peering goes on through another relay, if any."""
        for link in [link for link in self.relays if link.address == address]:
            self.relays.remove(link)
            await link.aclose()
        self.peering.attach_relay(self.relays[-1] if self.relays else None)

    async def _start_discovery(self, stack: AsyncExitStack) -> None:
        if not self.config.mdns:
            return
        ips = [a.rsplit(":", 1)[0] for a in self.grpc_addresses]
        lan = [ip for ip in ips if not ipaddress.ip_address(ip).is_loopback]
        if not lan:
            logger.info("mDNS off: the gRPC agent listens on loopback only")
            return
        # Imported here: python-zeroconf costs every node start ~0.1 s CPU, and most
        # boxes in tests (and behind --no-mdns) never announce.
        from node.transport.discovery import Discovery

        trust, peering = self.trust, self.peering
        discovery = Discovery(
            node_id=self.node_id,
            mesh_id=lambda: trust.mesh_id,
            ips=lan,
            port=int(self.grpc_addresses[0].rsplit(":", 1)[1]),
            on_sighting=lambda address, node_id: peering.consider(address),
            clock=self._clock,
        )
        try:
            await discovery.start()
        except OSError as exc:
            logger.warning("mDNS unavailable (%s); use --peer to name other boxes", exc)
            await discovery.aclose()
            return
        self.discovery = discovery
        stack.push_async_callback(discovery.aclose)  # first of all: the mDNS goodbye

    def _member_joined(self, addresses: list[str]) -> None:
        for address in addresses:
            self.peering.consider(address)

    async def after_join(self, inviter_addresses: list[str]) -> None:
        self.after_membership_change()
        for link in self.relays:  # the relay files a node under the mesh of its certificate
            await link.restart()
        for address in inviter_addresses:
            self.peering.consider(address)
        if self.discovery is not None:
            await self.discovery.update()

    async def _maintain(self) -> None:
        """Rotate encryption keys when due (and destroy expired ones); re-sign the card
        when measured speeds moved, so peers schedule with current numbers."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            if self.trust.rotate_keys(self._clock.now_ms()) or self.cards.speeds_moved():
                self.cards.refresh()
            self.names.observe(self._names_seen())

    def rename(self, name: str) -> None:
        """A new display name, from the console: kept in the data dir (the config's, when
        set, wins; the API refuses then), shown to peers with the re-signed card."""
        write_own_name(self.home.root, name)
        self.display_name = name
        self.cards.display_name = name
        if self._mesh_admin is not None:
            self._mesh_admin.display_name = name
        self.cards.refresh()
        self.names.observe(self._names_seen())
        logger.info("this box is now called %r", name)

    def _names_seen(self) -> dict[str, str]:
        """Display names as this node knows them now: the members it invited, its peers'
        signed cards, itself."""
        seen = {
            str(m["node_id"]): str(m.get("display_name", ""))
            for m in self.trust.members.values()
            if m.get("node_id")
        }
        seen.update({p.node_id: p.display_name for p in self.peer_table if p.display_name})
        seen[self.node_id] = self.display_name
        return seen

    def _names_known(self) -> dict[str, str]:
        return {**self.names.names, **self._names_seen()}

    async def _live_state(self) -> LiveState:
        load = self.models.load()
        states: dict[str, int] = {}
        for peer in self.peer_table:
            states[peer.state.value] = states.get(peer.state.value, 0) + 1
        now_ms = self._clock.now_ms()
        heads = await self.parts.ledger.heads()
        return LiveState(
            active_streams=load.active_streams,
            queued=load.queued,
            slots=load.slots,
            peers_by_state=states,
            relays_connected=sum(link.connected.is_set() for link in self.relays),
            relays_configured=len(self.relays),
            ledger_records=sum(head.seq for head in heads),
            ledger_sync_age_s={
                node_id: max(0.0, (now_ms - done.at_ms) / 1000)
                for node_id, done in self.ledger_sync.peers.items()
            },
        )

    def _own_chain_wait_s(self) -> float | None:
        """A node that is not new but whose ledger holds nothing of its own chain (its
        disk was replaced, its ledger.db lost) holds its own records until a member says
        how far its chain went, so that it goes on from there (issue 12: a rebuilt box
        signing a second #1 is a fork)."""
        ledger = self.parts.ledger
        others = self.trust.authority is None or bool(self.trust.members)
        if self.created_identity or not ledger.empty_at_open or not others:
            return None
        ledger.hold_own_records()
        logger.warning(
            "this node's ledger holds none of its own records although the node is not new: "
            "its next records wait (up to %d s) until a member has told it how far its chain went",
            OWN_CHAIN_WAIT_S,
        )
        return OWN_CHAIN_WAIT_S

    def after_membership_change(self) -> None:
        """A join, or a newer revocation list: re-sign the cards; a revoked node is
        dropped by peering and the relays at once."""
        self.cards.refresh()
        self.home.write_run_info(self.run_info())
        self.peering.drop_revoked()
        if self.trust.revocations is not None:
            for link in self.relays:
                link.push_revocations(self.trust.revocations.signed)

    def run_info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "mesh_id": self.trust.mesh_id,
            "role": self.trust.role.value,
            "grpc_addresses": self.grpc_addresses,
            "pid": os.getpid(),
            "http_url": self.http_url,
            "grpc_address": self.grpc_address,
            "relays": [
                {"address": link.address, "connected": link.connected.is_set()}
                for link in self.relays
            ],
            "version": __version__,
            "started_at": self._started_at_ms / 1000,
        }

    def status(self) -> dict[str, Any]:
        load = self.models.load()
        counters = self.models.counters()
        return {
            **self.run_info(),
            "protocol_version": PROTOCOL_VERSION,
            "display_name": self.display_name,
            "display_name_in_config": bool(self.config.display_name),  # not renamed at run time
            "uptime_s": round((self._clock.now_ms() - self._started_at_ms) / 1000, 1),
            "connections": self._connection_stats(),
            "profile": self.profile.describe(),
            "hardware": dataclasses.asdict(self.hardware),
            "load": {
                "active_streams": load.active_streams,
                "queued": load.queued,
                "slots": load.slots,
                "parallel": load.parallel,
                "free": load.free,
                "draining": load.draining,
            },
            "models": [
                {
                    "name": m.name,
                    "aliases": list(m.aliases),
                    "family": m.family,
                    "parameter_count": m.parameter_count,
                    "quantization": m.quantization,
                    "context_length": m.context_length,
                    "backend": m.backend,
                    "tokens_per_second": m.tokens_per_second,
                    "prompt_tokens_per_second": m.prompt_tokens_per_second,
                    "chat": m.chat,
                    "threads": m.threads,
                    "parallel": m.parallel,
                    "requests": counters.get(m.name, {}),
                    "conversations_held": len(m.prefixes),
                }
                for m in self.models.models()
            ],
            # Requests peers sent here for a conversation this box held (cache-aware
            # routing), and how many found it still held.
            "cache_routed": dict(self.models.cache_routed),
            "peers": [
                {
                    "node_id": peer.node_id,
                    "display_name": peer.display_name,
                    "address": peer.address,
                    "route": peer.route.value,
                    "state": peer.state.value,
                    "rtt_ms": round(peer.rtt_ms, 2),
                    "load": {
                        "active_streams": peer.load.active_streams,
                        "queued": peer.load.queued,
                        "slots": peer.load.slots,
                    },
                    "models": [m.name for m in peer.models],
                    "tokens_per_second": {m.name: m.tokens_per_second for m in peer.models},
                    "ledger_sync": self._sync_status(peer.node_id),
                }
                for peer in self.peer_table
            ],
        }

    def _connection_stats(self) -> dict[str, Any]:
        return {
            "descriptor_limit": self.listeners.budget.nofile,
            "http": self.http_guard.stats(),
            "grpc": self._grpc_front.stats(),
        }

    def _sync_status(self, node_id: str) -> dict[str, Any] | None:
        done = self.ledger_sync.peers.get(node_id)
        if done is None:
            return None
        return {
            "at_unix_ms": done.at_ms,
            "records": done.records,
            "receipts": done.receipts,
            "error": done.error,
        }
