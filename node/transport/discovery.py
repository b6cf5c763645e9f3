"""mDNS on the LAN (python-zeroconf): announce this node, notice the others.

Announces `<first group of node ID>._allerac._tcp.local.` with the hint TXT
(`mesh.routing.discovery`) on every IPv4 address the gRPC agent listens on, and
browses for the same type. A sighting of our mesh is handed to the peering
layer as an address to try; trust comes later, from the signed cards. A
graceful stop unregisters the service, which sends mDNS goodbyes.

Anyone on the LAN can multicast announcements, so what discovery keeps is
bounded (the rules are `mesh.routing.discovery.NameBook` and `ForwardGate`): each
packet's records reach python-zeroconf's cache and browser only for instance
names the book holds, charged to the address the packet came from; TTLs are
capped; records of names the book refuses, evicts or expires are taken back out
of the cache and their refresh queries cancelled; a sweep every second expires
names and removes anything else the cache holds. Addresses handed to peering are
rate-limited per source. A flood leaves one warning a minute in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf._dns import DNSPointer, DNSRecord, DNSService
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _TYPE_A, _TYPE_AAAA, _TYPE_NSEC, _TYPE_PTR, _TYPE_SRV

from mesh.clock import SYSTEM, Clock
from mesh.routing.discovery import (
    DEFAULT_LIMITS,
    SERVICE_TYPE,
    DiscoveryLimits,
    ForwardGate,
    NameBook,
    NameState,
    capped_ttl,
    hint_properties,
    parse_hint,
)
from mesh.trust.identity import short_node_id
from node.tasks import Tasks

logger = logging.getLogger(__name__)
RESOLVE_TIMEOUT_MS = 3000
MAX_PENDING_RESOLVES = 64
SWEEP_INTERVAL_S = 1.0
FLOOD_LOG_INTERVAL_S = 60.0
UNKNOWN_SOURCE = "unknown"  # records that did not come in a packet (the browser's first look)
_SERVICE_KEY = SERVICE_TYPE.lower()
_INSTANCE_SUFFIX = "." + _SERVICE_KEY
_ADDRESS_TYPES = (_TYPE_A, _TYPE_AAAA, _TYPE_NSEC)


# --- the one place that leans on python-zeroconf's internals ---------------------------------
#
# Checked against python-zeroconf 0.154.0. It caps its record cache (10,000 records in all,
# evicting those closest to expiry, so a flood's day-long TTLs outlive a real peer's 120 s
# ones), but its browser keeps a refresh schedule per instance name it hears of with no cap
# (`QueryScheduler._next_scheduled_for_alias` and `_query_heap`), and it knows nothing of a
# packet's source. The hook it gives every record listener, `async_update_records` (before the
# cache takes a packet's records) and `async_update_records_complete` (after), is where we cap
# TTLs, charge names to sources, hide refused names from the browser and take refused records
# back out of the cache. Beyond that public hook we rely on:
#   - `AsyncEngine.protocols[i].last_message` (a `DNSIncoming` with `.source` and `.now`), set
#     just before the record manager delivers that message's records: the packet's source;
#   - `DNSRecord.ttl` being writable, and a record not yet cached being ours to change (the
#     record manager itself raises short PTR TTLs that way);
#   - `DNSCache.cache`, `async_get_unique`, `async_entries_with_name`, `async_remove_records`;
#   - `QueryScheduler.cancel_ptr_refresh`, `_query_heap` (cancelled entries stay in the heap
#     until they come due, so we drop them) and `_next_scheduled_for_alias`.
# tests/test_netns_mdns_flood.py::test_the_zeroconf_internals_discovery_relies_on_still_hold
# fails loudly when any of these changes.


def packet_source(zc: Zeroconf, now: float) -> str | None:
    """The address the packet whose records are being delivered at `now` came from."""
    for protocol in zc.engine.protocols:
        message = protocol.last_message
        if message is None or message.now != now or message.is_query():
            continue
        return str(message.source[0]) if message.source is not None else None
    return None


class BoundedBrowser(AsyncServiceBrowser):
    """python-zeroconf's browser, told only about names the book holds (see above)."""

    def __init__(
        self,
        zc: Zeroconf,
        book: NameBook,
        handler: Callable[..., None],
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._book = book
        self._rejected: list[Any] = []  # this packet's records to take back out
        self._evicted: list[str] = []  # names this packet pushed out of the book
        super().__init__(zc, [SERVICE_TYPE], handlers=[handler])

    # Called by the record manager for every packet, before the cache takes its records.
    def async_update_records(self, zc: Zeroconf, now: float, records: list[Any]) -> None:
        source = packet_source(zc, now)
        book, limits = self._book, self._book.limits
        now_ms = int(self._clock.monotonic() * 1000)
        passed: list[Any] = []
        later: list[Any] = []
        for update in records:
            record = update.new
            if source is not None and record.ttl > limits.max_record_ttl_s:
                record.ttl = capped_ttl(record.ttl, limits)  # not cached yet: ours to change
            if record.type == _TYPE_PTR and record.key == _SERVICE_KEY:
                if self._admit(record, source or UNKNOWN_SOURCE, now_ms):
                    passed.append(update)
            else:
                later.append(update)
        for update in later:  # SRV first: it says whose address records to keep
            record = update.new
            if record.type == _TYPE_SRV and record.key in book:
                book.note_server(record.key, record.server)
        for update in later:
            record = update.new
            if record.key in book or (
                record.type in _ADDRESS_TYPES and book.knows_server(record.key)
            ):
                passed.append(update)
            else:
                self._rejected.append(record)
        if passed:
            super().async_update_records(zc, now, passed)

    def _admit(self, pointer: Any, source: str, now_ms: int) -> bool:
        if pointer.ttl == 0:  # a goodbye: only for a name we hold
            return pointer.alias in self._book
        if not pointer.alias_key.endswith(_INSTANCE_SUFFIX):  # not `<instance>.<our type>`
            self._rejected.append(pointer)
            return False
        admission = self._book.admit(pointer.alias, source=source, now_ms=now_ms)
        self._evicted.extend(admission.evicted)
        if not admission.admitted:
            self._rejected.append(pointer)
            return False
        # The browser schedules refreshes by the exact spelling; one spelling per name.
        return bool(self._book.name_as_admitted(pointer.alias) == pointer.alias)

    # Called after the cache has taken the packet's records.
    def async_update_records_complete(self) -> None:
        cache = self.zc.cache
        rejected, self._rejected = self._rejected, []
        for record in rejected:
            cached = cache.async_get_unique(record)
            if cached is not None:
                cache.async_remove_records((cached,))
        evicted, self._evicted = self._evicted, []
        for name in evicted:
            self.forget(name)
        super().async_update_records_complete()

    def forget(self, name: str) -> None:
        """Take a name the book no longer holds out of the cache and the refresh schedule."""
        cache = self.zc.cache
        pointer = DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 0, name)
        self.query_scheduler.cancel_ptr_refresh(pointer)
        cached = cache.async_get_unique(pointer)
        if cached is not None:
            cache.async_remove_records((cached,))
        servers = set()
        own = cache.async_entries_with_name(name)
        for record in own:
            if isinstance(record, DNSService):
                servers.add(record.server_key)
        cache.async_remove_records(own)
        for server in servers:
            if not self._book.knows_server(server):
                cache.async_remove_records(
                    [r for r in cache.async_entries_with_name(server) if r.type in _ADDRESS_TYPES]
                )

    def sweep(self) -> int:
        """Remove from the cache whatever no held name needs, at most
        `max_records_per_name` records per name, and drop cancelled refreshes. Returns the
        number of records removed."""
        cache, book = self.zc.cache, self._book
        per_name = book.limits.max_records_per_name
        doomed: list[DNSRecord] = []
        for key, store in list(cache.cache.items()):
            records = list(store.values())
            if key == _SERVICE_KEY:
                doomed += [
                    r for r in records if not isinstance(r, DNSPointer) or r.alias not in book
                ]
                continue
            if key in book:
                kept = [r for r in records if r.type not in (_TYPE_A, _TYPE_AAAA)]
            elif book.knows_server(key):
                kept = [r for r in records if r.type in _ADDRESS_TYPES]
            else:
                kept = []
            kept.sort(key=lambda r: r.created, reverse=True)
            doomed += [r for r in records if r not in kept[:per_name]]
        if doomed:
            cache.async_remove_records(doomed)
        scheduler = self.query_scheduler
        for alias in [a for a in scheduler._next_scheduled_for_alias if a not in book]:
            scheduler._next_scheduled_for_alias.pop(alias).cancelled = True
        heap = scheduler._query_heap
        if len(heap) > 2 * len(scheduler._next_scheduled_for_alias) + 64:
            live = [query for query in heap if not query.cancelled]
            heapq.heapify(live)
            scheduler._query_heap = live
        return len(doomed)


# --- discovery ---------------------------------------------------------------------------------


class Discovery:
    def __init__(
        self,
        *,
        node_id: str,
        mesh_id: Callable[[], str],
        ips: list[str],
        port: int,
        on_sighting: Callable[[str, str], None],  # (address "ip:port", node ID)
        limits: DiscoveryLimits = DEFAULT_LIMITS,
        clock: Clock = SYSTEM,
    ) -> None:
        self._clock = clock
        self._node_id = node_id
        self._mesh_id = mesh_id
        self._ips = ips
        self._port = port
        self._on_sighting = on_sighting
        self._zc: AsyncZeroconf | None = None
        self._browser: BoundedBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._announcing: Awaitable[object] | None = None  # the latest announcement's repeats
        self._resolving: dict[str, asyncio.Task[None]] = {}  # lowercased name -> its resolve
        self._tasks = Tasks("mdns")
        # Every name held, of any mesh: after joining another mesh its boxes are known.
        self._book = NameBook(limits)
        self._gate = ForwardGate(limits)
        self._resolves_dropped = 0
        self._last_flood_log = -math.inf

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
        # zeroconf repeats the announcement in the background (twice, a second apart).
        self._announcing = await self._zc.async_register_service(self._info, allow_name_change=True)
        self._browser = BoundedBrowser(self._zc.zeroconf, self._book, self._on_change, self._clock)
        self._tasks.start(self._sweep_forever(), "sweep")
        logger.info("announcing on mDNS as %s (%s)", self._info.name, ", ".join(self._ips))

    async def update(self) -> None:
        """Our mesh changed (joined another): announce the new hint."""
        if self._zc is None or self._info is None:
            return
        self._info = self._service_info()
        # Repeats of an earlier announcement still to come would carry the old mesh after
        # the new one, and listeners would keep the old hint: they stop here.
        self._quiet_announcements()
        self._announcing = await self._zc.async_update_service(self._info)
        for hint, addresses, source in self._book.hints():
            if hint.mesh_id == self._mesh_id() and hint.node_id != self._node_id:
                self._forward(hint.node_id, addresses, source)

    def _quiet_announcements(self) -> None:
        if isinstance(self._announcing, asyncio.Future) and not self._announcing.done():
            self._announcing.cancel()
        self._announcing = None

    async def aclose(self) -> None:
        self._quiet_announcements()
        await self._tasks.aclose()
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            with contextlib.suppress(Exception):
                await self._zc.async_unregister_all_services()  # mDNS goodbye
            await self._zc.async_close()
            self._zc = None

    # --- sightings ---------------------------------------------------------------------------

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # heartbeats decide when a peer is gone; a goodbye alone proves nothing
        state = self._book.state_of(name)
        if state is None or state is NameState.REJECTED:
            return  # not held (over its source's share), or junk already looked at
        self._resolve_soon(service_type, name)

    def _resolve_soon(self, service_type: str, name: str) -> None:
        """Resolve from the cache at once (an announcement carries every record); ask the
        network only when something is missing, a bounded number of names at a time."""
        if self._resolve_from_cache(service_type, name):
            return
        key = name.lower()
        if key in self._resolving:
            return
        if len(self._resolving) >= MAX_PENDING_RESOLVES:
            self._resolves_dropped += 1  # it stays pending: the sweep tries the cache again
            return
        task = self._tasks.start(self._resolve(service_type, name), f"resolve {key}")
        self._resolving[key] = task
        task.add_done_callback(lambda _: self._resolving.pop(key, None))  # only ever this one

    def _resolve_from_cache(self, service_type: str, name: str) -> bool:
        if self._zc is None:
            return True
        info = AsyncServiceInfo(service_type, name)
        try:
            found = info.load_from_cache(self._zc.zeroconf)
        except Exception as exc:  # zeroconf raises several kinds on malformed records
            logger.debug("mDNS: cannot resolve %r: %s", name, exc)
            self._book.rejected(name)
            return True
        if found:
            self._sighted(name, info)
        return found

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS)
        except Exception as exc:  # zeroconf raises several kinds on malformed records
            logger.debug("mDNS: cannot resolve %r: %s", name, exc)
            self._book.rejected(name)
            return
        if found and name in self._book:
            self._sighted(name, info)

    def _sighted(self, name: str, info: AsyncServiceInfo) -> None:
        try:
            properties = dict(info.properties)
            ips = info.parsed_addresses(IPVersion.V4Only)[:4]
        except Exception as exc:  # zeroconf decodes TXT lazily
            logger.debug("mDNS: cannot resolve %r: %s", name, exc)
            self._book.rejected(name)
            return
        hint, why = parse_hint(properties)
        if hint is None:
            logger.debug("mDNS: ignoring %r: %s", name, why)
            self._book.rejected(name)
            return
        addresses = [f"{ip}:{hint.port}" for ip in ips]
        self._book.resolved(name, hint, addresses, now_ms=int(self._clock.monotonic() * 1000))
        if self._info is not None and name.lower() == self._info.name.lower():
            self._book.protect(name)  # our own announcement, heard back
        if hint.node_id == self._node_id or hint.mesh_id != self._mesh_id():
            return
        source = self._book.source_of(name) or UNKNOWN_SOURCE
        self._forward(hint.node_id, addresses, source)

    def _forward(self, node_id: str, addresses: tuple[str, ...] | list[str], source: str) -> None:
        now_ms = int(self._clock.monotonic() * 1000)
        for address in addresses:
            if self._gate.allow(source, address, now_ms=now_ms):
                self._on_sighting(address, node_id)

    # --- the sweep ---------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self._sweep()
            except Exception:  # bounding discovery must not stop because of one bad record
                logger.exception("mDNS sweep failed; going on")

    def _sweep(self) -> None:
        browser = self._browser
        if browser is None:
            return
        for name in self._book.expire(int(self._clock.monotonic() * 1000)):
            browser.forget(name)  # a resolve still running for it ends by its deadline
        browser.sweep()
        for name in self._book.pending()[:MAX_PENDING_RESOLVES]:
            if name.lower() not in self._resolving:
                self._resolve_from_cache(SERVICE_TYPE, name)
        self._log_flood()

    def _log_flood(self) -> None:
        now = self._clock.monotonic()
        if now - self._last_flood_log < FLOOD_LOG_INTERVAL_S:
            return
        refused = self._book.take_refused()
        forwards, self._gate.refused = self._gate.refused, 0
        resolves, self._resolves_dropped = self._resolves_dropped, 0
        if not refused and not forwards and not resolves:
            return
        self._last_flood_log = now
        worst = sorted(refused.items(), key=lambda item: -item[1])[:3]
        logger.warning(
            "mDNS: more announcements than discovery keeps (a flood?): refused %d new names "
            "(%s; each address may hold %d), %d addresses not passed on, %d resolves put off",
            sum(refused.values()),
            ", ".join(f"{count} from {source}" for source, count in worst) or "none",
            self._book.limits.max_names_per_source,
            forwards,
            resolves,
        )
