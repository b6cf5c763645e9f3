"""`GET /allerac/usage` and `GET /allerac/status/stream`: what the console and other tools
read about the mesh, over HTTP.

`/allerac/usage?period=P&by=K[&user=U]` answers exactly what `allerac usage --json`
prints for the same arguments (one computation, `node.store.usage_report`), plus, for
the owner, the ledger's verification (`allerac ledger verify --json`). The owner (token,
or the console's owner session) sees every row; a person's API key sees their own rows
only, and asking for someone else's is a 403. The ledger is read and verified off the
event loop, and again only when its files changed.

`/allerac/status/stream` is `/allerac/status` as server-sent events: one `status` event
at once and then every `STREAM_INTERVAL_S`, until the client leaves, the stream has run
`STREAM_MAX_S` (clients reconnect) or the node stops.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from mesh.clock import Clock
from mesh.errors import InvalidRequest, MeshError, OwnerRequired, PermissionDenied
from mesh.ledger.records import USAGE_KEYS, period_bounds
from mesh.quota.users import bearer_key
from node.api.http_api import get_caller, is_owner_token, json_response
from node.api.request_log import note_caller
from node.store.ledger_store import LedgerFile
from node.store.usage_report import usage, verification, verified_ledger

STREAM_INTERVAL_S = 1.0
STREAM_MAX_S = 600.0


class UsageSource:
    """The verified ledger, read again only when its files changed (the database or its
    write-ahead log), once for all the readers asking at the same time."""

    def __init__(self, ledger_file: Path) -> None:
        self._ledger_file = ledger_file
        self._lock = asyncio.Lock()
        self._seen: tuple[object, ...] = ()
        self._held: tuple[LedgerFile, Any] | None = None

    def _fingerprint(self) -> tuple[object, ...]:
        marks: list[object] = []
        for path in (
            self._ledger_file,
            self._ledger_file.with_name(self._ledger_file.name + "-wal"),
        ):
            try:
                stat = path.stat()
            except FileNotFoundError:
                marks.append(None)
                continue
            marks.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(marks)

    async def read(self) -> tuple[LedgerFile, Any]:
        async with self._lock:
            seen = self._fingerprint()
            if self._held is None or seen != self._seen:
                self._held = await asyncio.to_thread(
                    verified_ledger, self._ledger_file, require_receipts=True
                )
                self._seen = seen
            return self._held


def _who(request: web.Request) -> str | None:
    """None for the owner (every row); a user's name for their API key (their rows)."""
    if is_owner_token(request):
        note_caller(request, get_caller(request))
        return None
    try:
        key = bearer_key(request.headers.get("Authorization"))
    except MeshError:
        key = None
    if not key:
        raise OwnerRequired(
            "usage needs the owner token (all rows) or an API key (its own rows): send "
            "Authorization: Bearer TOKEN_OR_KEY"
        )
    return get_caller(request).user


def add_usage_routes(
    app: web.Application,
    *,
    source: UsageSource,
    names: Callable[[], dict[str, str]],
    status: Callable[[], dict[str, Any]],
    stopping: asyncio.Event,
    clock: Clock,
) -> None:
    async def get_usage(request: web.Request) -> web.Response:
        only = _who(request)
        query = request.query
        by = query.get("by", "user")
        if by not in USAGE_KEYS:
            raise InvalidRequest(f"by must be one of {', '.join(USAGE_KEYS)}", param="by")
        period = query.get("period", "all")
        period_bounds(period, now_ms=clock.now_ms())  # a bad period is a 400 before any work
        user = query.get("user")
        if only is not None:
            if user is not None and user != only:
                raise PermissionDenied("an API key sees its own usage only", param="user")
            user = only
        held, report = await source.read()
        body = usage(
            held, report, by=by, user=user, period=period, now_ms=clock.now_ms(), names=names()
        )
        if only is None:
            body["verification"] = verification(held, report)
        else:  # another user's records are not theirs to see, refused or missing
            body["missing"] = []
        return json_response(body)

    async def status_stream(request: web.Request) -> web.StreamResponse:
        get_caller(request)  # beyond loopback: only with a key, as /allerac/status
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + STREAM_MAX_S
        while not stopping.is_set() and loop.time() < ends_at:
            event = f"event: status\ndata: {json.dumps(status(), ensure_ascii=False)}\n\n"
            await response.write(event.encode("utf-8"))
            try:
                await asyncio.wait_for(stopping.wait(), STREAM_INTERVAL_S)
            except TimeoutError:
                continue
        await response.write_eof()
        return response

    app.router.add_get("/allerac/usage", get_usage)
    app.router.add_get("/allerac/status/stream", status_stream)
