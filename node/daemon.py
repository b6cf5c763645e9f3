"""One running agent: identity, backends, the gRPC server and the HTTP API.

`Node` is an async context manager. Entering it loads the identity and every
model (a missing or broken model fails here, at start, not at the first
request), binds both servers and publishes `run/node.json`. Leaving it drains:
both servers stop taking new work and give in-flight answers up to
`shutdown_grace_s` to finish, then whatever is left is cancelled, the model
workers are joined and node.json is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from types import TracebackType
from typing import Any

import grpc
from aiohttp import web

from mesh import PROTOCOL_VERSION, __version__
from mesh.config import NodeConfig, cloud_plan_quota
from mesh.errors import ConfigError
from mesh.routing.peers import PeerTable
from mesh.routing.scheduler import Privacy
from mesh.trust.cards import HardwareSummary, sign_card
from mesh.trust.identity import Identity
from mesh.trust.membership import Role
from mesh.wire import grpc_options
from mesh.wire.v1 import node_pb2 as pb
from node.api.http_api import build_app
from node.api.mesh_admin import MeshAdmin
from node.api.owner import HostGuard, OwnerToken
from node.serving.backends import create_backend
from node.serving.backends.base import Backend
from node.serving.dispatch import Dispatcher
from node.serving.ledger_sync import LedgerSync
from node.serving.node_service import NodeService
from node.serving.quota_service import QuotaService
from node.store.hardware import probe_hardware
from node.store.home import Home
from node.store.identity_key import load_or_create_identity
from node.store.ledger_store import LedgerStore
from node.store.trust_store import TrustStore
from node.store.users_admin import UsersAdmin, log_api_access
from node.transport import node_pb2_grpc as pb_grpc
from node.transport.discovery import Discovery
from node.transport.grpc_front import GrpcFront
from node.transport.grpc_service import NodeServicer
from node.transport.http_guard import GuardedSite, HttpConnectionGuard
from node.transport.listeners import AcceptErrorLog, ListenerSettings, raise_nofile_limit
from node.transport.peering import Peering
from node.transport.relay_client import RelayLink

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


class Node:
    def __init__(self, config: NodeConfig, home: Home) -> None:
        self.config = config
        self.home = home
        self.identity: Identity | None = None
        self.created_identity = False
        self.backends: list[Backend] = []
        self.dispatcher: Dispatcher | None = None
        self.http_url = ""
        self.grpc_address = ""
        self._grpc_server: grpc.aio.Server | None = None
        self._http_runner: web.AppRunner | None = None
        self.listeners: ListenerSettings | None = None
        self._grpc_front: GrpcFront | None = None
        self._http_guard: HttpConnectionGuard | None = None
        self._accept_errors: AcceptErrorLog | None = None
        self.trust: TrustStore | None = None
        self.users: UsersAdmin | None = None
        self.ledger: LedgerStore | None = None
        self.ledger_sync: LedgerSync | None = None
        self.quota: QuotaService | None = None
        self.peer_table = PeerTable()
        self.peering: Peering | None = None
        self.discovery: Discovery | None = None
        self.relays: list[RelayLink] = []
        self.calls: NodeService | None = None
        self.grpc_addresses: list[str] = []
        self._public_card = pb.SignedCard()
        self._full_card = pb.SignedCard()
        self._card_issued_at_ms = 0
        self._hardware = HardwareSummary()  # probed once, at start
        self._maintenance: asyncio.Task[None] | None = None
        self._started_at = time.time()
        self.owner_token: OwnerToken | None = None

    @property
    def node_id(self) -> str:
        assert self.identity is not None
        return self.identity.node_id

    async def __aenter__(self) -> Node:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _start(self) -> None:
        cfg = self.config
        self._limit_connections()
        self.home.ensure()
        self._hardware = probe_hardware()
        self.identity, self.created_identity = load_or_create_identity(self.home.identity_key)
        # A new owner credential at every start: what the CLI sends for administration.
        self.owner_token = OwnerToken.issue(self.home)
        self.trust = TrustStore.open(self.home, self.identity)
        # Beyond loopback the HTTP API serves API keys only, so a bad users file stops here.
        self.users = UsersAdmin.open(
            self.home, default_privacy=Privacy(cfg.privacy), trust=self.trust
        )
        self.ledger = await LedgerStore.open(self.home.ledger_file, self.identity)
        for model in cfg.models:
            backend = create_backend(model)
            await backend.start()
            self.backends.append(backend)
        self.peer_table = PeerTable()
        self.peering = Peering(
            trust=self.trust,
            table=self.peer_table,
            static_peers=cfg.peers,
            on_change=self.refresh_cards,
            card_issued_at=lambda: self._card_issued_at_ms,
        )
        self.quota = QuotaService(
            node_id=self.node_id,
            users=self.users,
            store=self.ledger,
            links=self.peering,
            cloud_plan=cloud_plan_quota(cfg.cloud_plan),
            holds_file=self.home.root / "quota-holds.json",
        )
        await self.quota.start()
        self.dispatcher = Dispatcher(
            node_id=self.node_id,
            backends=self.backends,
            peers=self.peer_table,
            links=self.peering,
            max_wait_ms=cfg.max_wait_ms,
            default_privacy=Privacy(cfg.privacy),
            ledger=self.ledger,
        )
        await self._start_grpc()
        await self._start_http()
        log_api_access(cfg.http_host, self.users)
        self.refresh_cards()
        self._maintenance = asyncio.create_task(self._maintain(), name="trust-maintenance")
        await self._start_relays()
        await self.peering.start()
        trust = self.trust
        self.ledger_sync = LedgerSync(
            store=self.ledger,
            table=self.peer_table,
            links=self.peering,
            users=self.users,
            trust=self.trust,
            active=lambda: trust.role is not Role.OVERFLOW,  # overflow nodes never ask
        )
        await self.ledger_sync.start(own_chain_wait_s=self._own_chain_wait_s())
        await self._start_discovery()
        self.home.write_run_info(self.run_info())
        logger.info(
            "node %s serving on %s (gRPC %s)", self.node_id, self.http_url, self.grpc_address
        )

    def _limit_connections(self) -> None:
        """Descriptors first: the soft limit up to the hard one, the listeners' caps sized
        from it, and failed accepts logged once a minute instead of in a tight loop."""
        nofile = raise_nofile_limit()
        self.listeners = settings = ListenerSettings.from_environment(nofile, config=self.config)
        self._accept_errors = AcceptErrorLog()
        self._accept_errors.install(asyncio.get_running_loop())
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

    async def _start_grpc(self) -> None:
        assert self.dispatcher is not None
        assert self.trust is not None
        assert self.listeners is not None
        # The public port is the front's (caps per source, a deadline to prove membership);
        # the gRPC server itself listens on loopback only, behind it.
        front = GrpcFront(
            caps=self.listeners.grpc, member_deadline_s=self.listeners.grpc_member_deadline_s
        )
        self._grpc_front = front
        server = grpc.aio.server(
            interceptors=[front.interceptor],
            options=grpc_options.node_server_options(max_connections=self.listeners.grpc.total),
        )
        self.calls = NodeService(
            trust=self.trust,
            dispatcher=self.dispatcher,
            public_card=lambda: self._public_card,
            full_card=lambda: self._full_card,
            on_revocations=self.after_membership_change,
            on_leaving=lambda goodbye: (
                self.peering.leaving(goodbye) if self.peering is not None else None
            ),
            card_issued_at=lambda: self._card_issued_at_ms,
            on_member_joined=self._member_joined,
            ledger=self.ledger,
            quota=self.quota,
            users=self.users,
        )
        pb_grpc.add_NodeServiceServicer_to_server(  # type: ignore[no-untyped-call]
            NodeServicer(self.calls), server
        )
        backend_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc_server = server
        host = self.config.grpc_host
        bind = f"{_url_host(host)}:{self.config.grpc_port}"
        try:
            port = await front.start(host, self.config.grpc_port, backend_port=backend_port)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"cannot bind the gRPC agent to {bind}: {reason}") from exc
        self.grpc_addresses = advertised_addresses(host, port)
        self.grpc_address = self.grpc_addresses[0]

    async def _start_http(self) -> None:
        assert self.dispatcher is not None
        assert self.quota is not None
        assert self.trust is not None
        assert self.users is not None
        assert self.owner_token is not None
        assert self.listeners is not None
        app = build_app(
            dispatcher=self.dispatcher,
            max_request_bytes=self.config.max_request_bytes,
            status=self.status,
            mesh_admin=MeshAdmin(
                trust=self.trust,
                addresses=lambda: self.grpc_addresses,
                display_name=self.config.display_name,
                on_change=self.after_membership_change,
                on_joined=self.after_join,
            ),
            users=self.users,
            quota=self.quota,
            owner=self.owner_token,
            guard=HostGuard.build(
                bound_host=self.config.http_host,
                allowed_hosts=self.config.http_allowed_hosts,
                cors_origins=self.config.http_cors_origins,
            ),
        )
        # Caps per source and deadlines for headers and bodies (node/http_guard.py); its
        # middleware goes first, so it sees every request the moment its headers are in.
        guard = HttpConnectionGuard(
            caps=self.listeners.http,
            header_timeout_s=self.listeners.http_header_timeout_s,
            body_idle_s=self.listeners.http_body_idle_s,
        )
        self._http_guard = guard
        app.middlewares.insert(0, guard.middleware)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away cancels its generation
            shutdown_timeout=self.config.shutdown_grace_s + SERVER_STOP_MARGIN_S,
            access_log=None,
            keepalive_timeout=self.listeners.http_keepalive_idle_s,
        )
        await runner.setup()
        self._http_runner = runner
        site = GuardedSite(runner, guard, self.config.http_host, self.config.http_port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot bind the HTTP API to {self.config.http_host}:{self.config.http_port}: "
                f"{exc.strerror}"
            ) from exc
        port = site.port
        self.http_url = f"http://{_url_host(self.config.http_host)}:{port}"

    async def _end_in_flight(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while any(b.busy() for b in self.backends) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls worker threads)
            await asyncio.sleep(DRAIN_POLL_S)
        for backend in self.backends:
            backend.cancel_all()

    async def _start_relays(self) -> None:
        """One session per configured relay: other offices and cloud nodes are reached
        through it, and they reach this node through it."""
        assert self.trust is not None
        assert self.calls is not None
        assert self.peering is not None
        for address in self.config.relays:
            link = RelayLink(
                address,
                trust=self.trust,
                calls=self.calls,
                on_directory=self.peering.relay_directory,
            )
            self.peering.attach_relay(link)
            await link.start()
            self.relays.append(link)

    async def _start_discovery(self) -> None:
        if not self.config.mdns:
            return
        ips = [a.rsplit(":", 1)[0] for a in self.grpc_addresses]
        lan = [ip for ip in ips if not ipaddress.ip_address(ip).is_loopback]
        if not lan:
            logger.info("mDNS off: the gRPC agent listens on loopback only")
            return
        assert self.trust is not None
        trust, peering = self.trust, self.peering
        assert peering is not None
        self.discovery = Discovery(
            node_id=self.node_id,
            mesh_id=lambda: trust.mesh_id,
            ips=lan,
            port=int(self.grpc_addresses[0].rsplit(":", 1)[1]),
            on_sighting=lambda address, node_id: peering.consider(address),
        )
        try:
            await self.discovery.start()
        except OSError as exc:
            logger.warning("mDNS unavailable (%s); use --peer to name other boxes", exc)
            self.discovery = None

    def _member_joined(self, addresses: list[str]) -> None:
        if self.peering is not None:
            for address in addresses:
                self.peering.consider(address)

    async def after_join(self, inviter_addresses: list[str]) -> None:
        self.after_membership_change()
        for link in self.relays:  # the relay files a node under the mesh of its certificate
            await link.restart()
        if self.peering is not None:
            for address in inviter_addresses:
                self.peering.consider(address)
        if self.discovery is not None:
            await self.discovery.update()

    def refresh_cards(self) -> None:
        """Re-sign both cards (after a key rotation, a join, a model change)."""
        assert self.trust is not None
        assert self.identity is not None
        assert self.dispatcher is not None
        common = {
            "membership": self.trust.cert,
            "encryption_keys": self.trust.keyring.current.signed,
            "mesh_id": self.trust.mesh_id,
            "now_ms": int(time.time() * 1000),
        }
        self._public_card = sign_card(self.identity, public=True, **common)  # type: ignore[arg-type]
        self._full_card = sign_card(
            self.identity,
            models=self.dispatcher.models(),
            grpc_addresses=self.grpc_addresses,
            display_name=self.config.display_name or socket.gethostname(),
            peer_addresses=self.peering.direct_addresses() if self.peering else [],
            tier=pb.TIER_CLOUD if self.trust.role is Role.OVERFLOW else pb.TIER_HOME,
            hardware=self._hardware,
            **common,  # type: ignore[arg-type]
        )
        # Strictly increasing, so peers notice every change even within one millisecond.
        self._card_issued_at_ms = max(
            int(common["now_ms"]),  # type: ignore[call-overload]
            self._card_issued_at_ms + 1,
        )

    async def _maintain(self) -> None:
        """Rotate encryption keys when due (and destroy expired ones); re-sign the card
        when measured speeds moved, so peers schedule with current numbers."""
        assert self.trust is not None
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            if self.trust.rotate_keys(int(time.time() * 1000)) or self._speeds_moved():
                self.refresh_cards()

    def _speeds_moved(self) -> bool:
        assert self.dispatcher is not None
        card = pb.NodeCard.FromString(self._full_card.card)
        advertised = {m.name: m.tokens_per_second for m in card.models}
        for info in self.dispatcher.models():
            before = advertised.get(info.name, 0.0)
            now = info.tokens_per_second
            if now and (not before or abs(now - before) / before > TPS_DRIFT):
                return True
        return False

    def _own_chain_wait_s(self) -> float | None:
        """A node that is not new but whose ledger holds nothing of its own chain (its
        disk was replaced, its ledger.db lost) holds its own records until a member says
        how far its chain went, so that it goes on from there (issue 12: a rebuilt box
        signing a second #1 is a fork)."""
        assert self.ledger is not None
        assert self.trust is not None
        others = self.trust.authority is None or bool(self.trust.members)
        if self.created_identity or not self.ledger.empty_at_open or not others:
            return None
        self.ledger.hold_own_records()
        logger.warning(
            "this node's ledger holds none of its own records although the node is not new: "
            "its next records wait (up to %d s) until a member has told it how far its chain went",
            OWN_CHAIN_WAIT_S,
        )
        return OWN_CHAIN_WAIT_S

    def after_membership_change(self) -> None:
        """A join, or a newer revocation list: re-sign the cards; a revoked node is
        dropped by peering and the relays at once."""
        self.refresh_cards()
        self.home.write_run_info(self.run_info())
        if self.peering is not None:
            self.peering.drop_revoked()
        if self.trust is not None and self.trust.revocations is not None:
            for link in self.relays:
                link.push_revocations(self.trust.revocations.signed)

    def run_info(self) -> dict[str, Any]:
        assert self.trust is not None
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
            "started_at": self._started_at,
        }

    def status(self) -> dict[str, Any]:
        assert self.dispatcher is not None
        load = self.dispatcher.load()
        counters = self.dispatcher.counters()
        return {
            **self.run_info(),
            "protocol_version": PROTOCOL_VERSION,
            "display_name": self.config.display_name or socket.gethostname(),
            "uptime_s": round(time.time() - self._started_at, 1),
            "connections": self._connection_stats(),
            "load": {
                "active_streams": load.active_streams,
                "queued": load.queued,
                "slots": load.slots,
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
                    "chat": m.chat,
                    "requests": counters.get(m.name, {}),
                }
                for m in self.dispatcher.models()
            ],
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
                    "ledger_sync": self._sync_status(peer.node_id),
                }
                for peer in self.peer_table
            ],
        }

    def _connection_stats(self) -> dict[str, Any]:
        budget = self.listeners.budget if self.listeners is not None else None
        return {
            "descriptor_limit": budget.nofile if budget is not None else None,
            "http": self._http_guard.stats() if self._http_guard is not None else None,
            "grpc": self._grpc_front.stats() if self._grpc_front is not None else None,
        }

    def _sync_status(self, node_id: str) -> dict[str, Any] | None:
        done = self.ledger_sync.peers.get(node_id) if self.ledger_sync else None
        if done is None:
            return None
        return {
            "at_unix_ms": done.at_ms,
            "records": done.records,
            "receipts": done.receipts,
            "error": done.error,
        }

    async def aclose(self) -> None:
        """Drain and stop; safe to call on a partly started node.

        New requests are refused at once; answers in progress get `shutdown_grace_s`
        to finish. Whatever still runs then is cancelled *by the backend*, so its
        stream ends properly (a final chunk, usage, [DONE]) before the servers'
        own deadline (grace + SERVER_STOP_MARGIN_S) would cut connections.
        """
        grace = self.config.shutdown_grace_s
        if self.discovery is not None:
            await self.discovery.aclose()  # mDNS goodbye
            self.discovery = None
        if self.ledger_sync is not None:
            await self.ledger_sync.aclose()
            self.ledger_sync = None
        if self.peering is not None:
            await self.peering.aclose()  # peers hear we are leaving and stop sending now
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        for backend in self.backends:
            backend.drain()
        if self._grpc_front is not None:
            self._grpc_front.stop_accepting()  # open connections still carry the drain
        stopping = []
        if self._grpc_server is not None:
            stopping.append(self._grpc_server.stop(grace + SERVER_STOP_MARGIN_S))
        if self._http_runner is not None:
            stopping.append(self._http_runner.cleanup())
        if stopping:
            await asyncio.gather(self._end_in_flight(grace), *stopping, return_exceptions=True)
        self._grpc_server = None
        self._http_runner = None
        if self._grpc_front is not None:  # after the gRPC server: what it sent is delivered
            await self._grpc_front.aclose()
            self._grpc_front = None
        if self.quota is not None:  # after the drain: every answer's release is under way
            await self.quota.aclose()
        for link in self.relays:  # after the drain: answers through the relay finish too
            await link.aclose()
        self.relays = []
        for backend in self.backends:
            await backend.aclose()
        self.backends = []
        if self.ledger is not None:  # last: every answer above has left its record
            await self.ledger.close()
            self.ledger = None
        if self.identity is not None:
            self.home.clear_run_info(os.getpid())
        if self.owner_token is not None:
            OwnerToken.clear(self.home, self.owner_token)
        if self._accept_errors is not None:
            self._accept_errors.uninstall(asyncio.get_running_loop())
            self._accept_errors = None
