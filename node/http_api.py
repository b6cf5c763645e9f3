"""The OpenAI-compatible HTTP API (aiohttp): thin handlers over `mesh.openai_api`.

`MeshError` -> HTTP status and OpenAI-style error body happens in
`_error_middleware` and nowhere else. Every answer carries `x-allerac-node` and
`x-allerac-route`. A streamed answer commits its 200 only after the first
event, so errors before the first token still get their proper status.

Who is calling is decided before a body is read (`mesh.users`): a Bearer API key
names a user, whose key sets the privacy policy's default and ceiling; no key is
the box's owner on loopback and a 401 anywhere else. The `/allerac/mesh` and
`/allerac/users` administration endpoints answer loopback clients only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh import openai_api
from mesh.errors import (
    InvalidRequest,
    MeshError,
    PermissionDenied,
    QuotaExceeded,
    RequestTooLarge,
)
from mesh.inference import Finished, InferenceRequest, TextDelta
from mesh.quota import UNLIMITED, parse_quota
from mesh.scheduler import Privacy
from mesh.users import Caller
from node.coalesce import coalesce
from node.dispatch import Answer, Dispatcher
from node.mesh_admin import MeshAdmin
from node.quota_service import QuotaService
from node.users_admin import UsersAdmin

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
MAX_BYTES = web.AppKey("max_request_bytes", int)
MESH_ADMIN = web.AppKey("mesh_admin", MeshAdmin)
USERS = web.AppKey("users", UsersAdmin)
QUOTA = web.AppKey("quota", QuotaService)
STATUS: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status")


def _json_response(
    body: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _http_error_body(exc: web.HTTPException) -> dict[str, Any]:
    """aiohttp's own refusals (no such route, wrong method), in the same OpenAI shape."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return {
        "error": {
            "message": exc.reason if exc.status != 404 else "no such endpoint",
            "type": "invalid_request_error",
            "param": None,
            "code": code.get(exc.status, "invalid_request"),
        }
    }


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except MeshError as error:
        if error.http_status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.path, error.message)
        # RFC 7235 section 3.1: a 401 names the scheme that would work.
        headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else {}
        if isinstance(error, QuotaExceeded) and error.resets_at:
            headers["Retry-After"] = str(_seconds_until(error.resets_at))
        return _json_response(
            openai_api.error_body(error), status=error.http_status, headers=headers or None
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_response(_http_error_body(exc), status=exc.status)


def _seconds_until(iso: str) -> int:
    """RFC 9110 Retry-After in seconds, until an ISO 8601 UTC time."""
    try:
        when = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 60  # not a time we can read: a minute is a sane pause
    return max(0, int(when.replace(tzinfo=datetime.UTC).timestamp() - time.time()) + 1)


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[MAX_BYTES]
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestTooLarge(f"request body is larger than the limit of {limit} bytes") from exc


def _route_headers(answer: Answer) -> dict[str, str]:
    return {
        "x-allerac-node": answer.served_by.node_id,
        "x-allerac-route": answer.served_by.route.value,
    }


PRIVACY_HEADER = "x-allerac-privacy"


def _privacy(request: web.Request) -> Privacy | None:
    value = request.headers.get(PRIVACY_HEADER)
    return Privacy.parse(value) if value is not None else None


def _from_loopback(request: web.Request) -> bool:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False  # not an IP peer (a Unix socket): not known to be this box
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket's IPv4 client
    return address.is_loopback


def _caller(request: web.Request) -> Caller:
    """Who sent this request (401 when they must and did not prove it)."""
    return request.app[USERS].caller(
        request.headers.get("Authorization"), loopback=_from_loopback(request)
    )


async def _answer(
    request: web.Request, caller: Caller, inference: InferenceRequest, stream: bool
) -> web.StreamResponse:
    privacy = caller.privacy_for(_privacy(request))
    # The user is who the key says (the owner: ""), never the body's own `user` field.
    inference = dataclasses.replace(inference, user=caller.user)
    dispatcher, quota = request.app[DISPATCHER], request.app[QUOTA]
    # Reserved at the user's home node before it is scheduled; released when it ends,
    # however it ends (a client that hangs up included).
    admission = await quota.admit(inference, privacy or dispatcher.default_privacy)
    answer: Answer | None = None
    try:
        answer = await dispatcher.open(admission.request, privacy=privacy, closed=admission.closed)
        return await _respond(request, admission.request, answer, stream)
    finally:
        quota.settle_soon(admission, answer.records if answer is not None else [])


async def _respond(
    request: web.Request, inference: InferenceRequest, answer: Answer, stream: bool
) -> web.StreamResponse:
    ids = openai_api.ResponseIds(inference, answer.served_by.model)
    if not stream:
        parts: list[str] = []
        async with contextlib.aclosing(answer.events()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    return _json_response(
                        ids.complete("".join(parts), event), headers=_route_headers(answer)
                    )
        raise AssertionError("an answer always ends with Finished")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **_route_headers(answer),
        }
    )
    async with contextlib.aclosing(answer.events()) as events:
        await response.prepare(request)
        if inference.is_chat:
            await response.write(openai_api.sse(ids.role_chunk()))
        try:
            async for event in coalesce(events):
                if isinstance(event, TextDelta):
                    await response.write(openai_api.sse(ids.chunk(event.text)))
                elif isinstance(event, Finished):
                    await response.write(openai_api.sse(ids.chunk(None, event)))
                    await response.write(openai_api.sse(ids.usage_chunk(event)))
        except MeshError as error:
            # Headers are gone: say it in the stream (the OpenAI client raises on it).
            logger.warning("stream %s failed: %s", inference.request_id, error.message)
            await response.write(openai_api.sse(openai_api.error_body(error)))
        await response.write(openai_api.SSE_DONE)
        await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    caller = _caller(request)
    body = await _read_body(request)
    inference, stream = openai_api.parse_chat_request(body, max_bytes=request.app[MAX_BYTES])
    return await _answer(request, caller, inference, stream)


async def completions(request: web.Request) -> web.StreamResponse:
    caller = _caller(request)
    body = await _read_body(request)
    inference, stream = openai_api.parse_completion_request(body, max_bytes=request.app[MAX_BYTES])
    return await _answer(request, caller, inference, stream)


async def list_models(request: web.Request) -> web.Response:
    """Every model the mesh can serve, and where (the nodes up that serve it)."""
    _caller(request)  # beyond loopback: only with a key
    served = request.app[DISPATCHER].mesh_models()
    body = openai_api.models_list([info for info, _ in served])
    for entry, (_, nodes) in zip(body["data"], served, strict=True):
        entry["served_by"] = nodes
    return _json_response(body)


async def route_explain(request: web.Request) -> web.Response:
    caller = _caller(request)
    model = request.query.get("model", "")
    if not model:
        raise InvalidRequest("model is required", param="model")
    requested = request.query.get("privacy")
    dispatcher = request.app[DISPATCHER]
    privacy = caller.privacy_for(Privacy.parse(requested) if requested is not None else None)
    raw_max = request.query.get("max_tokens")
    if raw_max is not None and not raw_max.isdigit():
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    return _json_response(
        dispatcher.explain(
            model,
            privacy or dispatcher.default_privacy,
            int(raw_max) if raw_max is not None else None,
        )
    )


async def get_status(request: web.Request) -> web.Response:
    _caller(request)  # beyond loopback: only with a key
    return _json_response(request.app[STATUS]())


# --- administration (the box's owner only) ---------------------------------------------------


def _require_loopback(request: web.Request, what: str) -> None:
    # An API key never opens administration: only being on this box does.
    if not _from_loopback(request):
        raise PermissionDenied(f"{what} administration is only available on this box (loopback)")


def _owner_only(request: web.Request) -> MeshAdmin:
    _require_loopback(request, "mesh")
    return request.app[MESH_ADMIN]


def _users_owner_only(request: web.Request) -> UsersAdmin:
    _require_loopback(request, "user")
    return request.app[USERS]


async def _json_fields(request: web.Request) -> dict[str, Any]:
    return openai_api.decode_json_body(await _read_body(request), max_bytes=64 * 1024)


def _string(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key} must be a non-empty string", param=key)
    return value


async def mesh_describe(request: web.Request) -> web.Response:
    return _json_response(_owner_only(request).describe())


async def mesh_invite(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    ttl = body.get("ttl_s", 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidRequest("ttl_s must be a number of seconds", param="ttl_s")
    return _json_response(admin.invite(role=_string(body, "role", "member"), ttl_s=float(ttl)))


async def mesh_join(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    return _json_response(await admin.join(_string(body, "code")))


async def mesh_members(request: web.Request) -> web.Response:
    return _json_response(_owner_only(request).members())


async def mesh_revoke(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    return _json_response(await admin.revoke(_string(body, "node_id")))


async def users_list(request: web.Request) -> web.Response:
    """The users, each with their quota's state as this node counts it (exact at the
    user's home node, which holds the reservations)."""
    users = _users_owner_only(request)
    book = request.app[QUOTA].book
    now_ms = int(time.time() * 1000)
    listed = users.describe()
    for entry in listed["users"]:
        record = users.get(entry["name"])
        if record is not None:
            entry["quota_state"] = book.describe(record.name, record.quota, now_ms)
    return _json_response(listed)


async def users_add(request: web.Request) -> web.Response:
    users = _users_owner_only(request)
    body = await _json_fields(request)
    privacy = body.get("privacy")
    quota = body.get("quota")
    return _json_response(
        users.add(
            name=_string(body, "name"),
            privacy=Privacy.parse(_string(body, "privacy")) if privacy is not None else None,
            quota=parse_quota(_string(body, "quota")) if quota is not None else UNLIMITED,
        ),
        status=201,
    )


async def users_update(request: web.Request) -> web.Response:
    users = _users_owner_only(request)
    body = await _json_fields(request)
    privacy, quota = body.get("privacy"), body.get("quota")
    if privacy is None and quota is None:
        raise InvalidRequest("send privacy, quota or both")
    return _json_response(
        users.update(
            request.match_info["name"],
            privacy=Privacy.parse(_string(body, "privacy")) if privacy is not None else None,
            quota=parse_quota(_string(body, "quota")) if quota is not None else None,
        )
    )


async def users_remove(request: web.Request) -> web.Response:
    return _json_response(_users_owner_only(request).remove(request.match_info["name"]))


def build_app(
    *,
    dispatcher: Dispatcher,
    max_request_bytes: int,
    status: Callable[[], dict[str, Any]],
    mesh_admin: MeshAdmin,
    users: UsersAdmin,
    quota: QuotaService,
) -> web.Application:
    # client_max_size bounds what aiohttp itself buffers; _read_body gives the clear error.
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_error_middleware])
    app[DISPATCHER] = dispatcher
    app[MAX_BYTES] = max_request_bytes
    app[STATUS] = status
    app[MESH_ADMIN] = mesh_admin
    app[USERS] = users
    app[QUOTA] = quota
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/allerac/status", get_status)
    app.router.add_get("/allerac/route", route_explain)
    app.router.add_get("/allerac/mesh", mesh_describe)
    app.router.add_post("/allerac/mesh/invites", mesh_invite)
    app.router.add_post("/allerac/mesh/join", mesh_join)
    app.router.add_get("/allerac/mesh/members", mesh_members)
    app.router.add_post("/allerac/mesh/revoke", mesh_revoke)
    app.router.add_get("/allerac/users", users_list)
    app.router.add_post("/allerac/users", users_add)
    app.router.add_delete("/allerac/users/{name}", users_remove)
    app.router.add_patch("/allerac/users/{name}", users_update)
    return app
