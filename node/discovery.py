"""mDNS on the LAN (python-zeroconf): announce this node, notice the others.

Announces `<first group of node ID>._allerac._tcp.local.` with the hint TXT
(`mesh.discovery`) on every IPv4 address the gRPC agent listens on, and
browses for the same type. A sighting of our mesh is handed to the peering
layer as an address to try; trust comes later, from the signed cards. A
graceful stop unregisters the service, which sends mDNS goodbyes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.discovery import SERVICE_TYPE, hint_properties, parse_hint
from mesh.identity import short_node_id

logger = logging.getLogger(__name__)
RESOLVE_TIMEOUT_MS = 3000
MAX_PENDING_RESOLVES = 64
MAX_REMEMBERED_SIGHTINGS = 1024


class Discovery:
    def __init__(
        self,
        *,
        node_id: str,
        mesh_id: Callable[[], str],
        ips: list[str],
        port: int,
        on_sighting: Callable[[str, str], None],  # (address "ip:port", node ID)
    ) -> None:
        self._node_id = node_id
        self._mesh_id = mesh_id
        self._ips = ips
        self._port = port
        self._on_sighting = on_sighting
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        # Every valid sighting, of any mesh: after joining another mesh its boxes are
        # already known.
        self._seen: dict[str, tuple[str, str, list[str]]] = {}  # name -> (node, mesh, addrs)

    def _service_info(self) -> AsyncServiceInfo:
        short = short_node_id(self._node_id).lower()
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{short}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in self._ips],
            port=self._port,
            properties=hint_properties(
                node_id=self._node_id, mesh_id=self._mesh_id(), port=self._port
            ),
            server=f"allerac-{short}.local.",
        )

    async def start(self) -> None:
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._info = self._service_info()
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )
        logger.info("announcing on mDNS as %s (%s)", self._info.name, ", ".join(self._ips))

    async def update(self) -> None:
        """Our mesh changed (joined another): announce the new hint."""
        if self._zc is None or self._info is None:
            return
        self._info = self._service_info()
        await self._zc.async_update_service(self._info)
        for node_id, mesh_id, addresses in list(self._seen.values()):
            if mesh_id == self._mesh_id() and node_id != self._node_id:
                for address in addresses:
                    self._on_sighting(address, node_id)

    async def aclose(self) -> None:
        for task in self._resolving:
            task.cancel()
        await asyncio.gather(*self._resolving, return_exceptions=True)
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_all_services()  # mDNS goodbye
            await self._zc.async_close()
            self._zc = None

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # heartbeats decide when a peer is gone; a goodbye alone proves nothing
        if len(self._resolving) >= MAX_PENDING_RESOLVES:
            logger.debug("mDNS: too many sightings at once; dropping %s", name)
            return
        task = asyncio.create_task(self._resolve(service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS)
        except Exception as exc:  # zeroconf raises several kinds on malformed records
            logger.debug("mDNS: cannot resolve %r: %s", name, exc)
            return
        if not found:
            return
        hint, why = parse_hint(dict(info.properties))
        if hint is None:
            logger.debug("mDNS: ignoring %r: %s", name, why)
            return
        addresses = [f"{ip}:{hint.port}" for ip in info.parsed_addresses(IPVersion.V4Only)[:4]]
        if len(self._seen) < MAX_REMEMBERED_SIGHTINGS or name in self._seen:
            self._seen[name] = (hint.node_id, hint.mesh_id, addresses)
        if hint.node_id == self._node_id or hint.mesh_id != self._mesh_id():
            return
        for address in addresses:
            self._on_sighting(address, hint.node_id)
