"""The OpenAI-compatible HTTP API (aiohttp): thin handlers over `mesh.openai_api`.

`MeshError` -> HTTP status and OpenAI-style error body happens in
`_error_middleware` and nowhere else. Every answer carries `x-allerac-node` and
`x-allerac-route`. A streamed answer commits its 200 only after the first
event, so errors before the first token still get their proper status.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh import openai_api
from mesh.config import is_loopback_host
from mesh.errors import InvalidRequest, MeshError, PermissionDenied, RequestTooLarge
from mesh.inference import Finished, InferenceRequest, TextDelta
from mesh.scheduler import Privacy
from node.coalesce import coalesce
from node.dispatch import Answer, Dispatcher
from node.mesh_admin import MeshAdmin

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
MAX_BYTES = web.AppKey("max_request_bytes", int)
MESH_ADMIN = web.AppKey("mesh_admin", MeshAdmin)
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
        return _json_response(openai_api.error_body(error), status=error.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_response(_http_error_body(exc), status=exc.status)


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


async def _answer(
    request: web.Request, inference: InferenceRequest, stream: bool
) -> web.StreamResponse:
    answer = await request.app[DISPATCHER].open(inference, privacy=_privacy(request))
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
    body = await _read_body(request)
    inference, stream = openai_api.parse_chat_request(body, max_bytes=request.app[MAX_BYTES])
    return await _answer(request, inference, stream)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _read_body(request)
    inference, stream = openai_api.parse_completion_request(body, max_bytes=request.app[MAX_BYTES])
    return await _answer(request, inference, stream)


async def list_models(request: web.Request) -> web.Response:
    """Every model the mesh can serve, and where (the nodes up that serve it)."""
    served = request.app[DISPATCHER].mesh_models()
    body = openai_api.models_list([info for info, _ in served])
    for entry, (_, nodes) in zip(body["data"], served, strict=True):
        entry["served_by"] = nodes
    return _json_response(body)


async def route_explain(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    if not model:
        raise InvalidRequest("model is required", param="model")
    privacy = Privacy.parse(request.query.get("privacy", "mesh"))
    raw_max = request.query.get("max_tokens")
    if raw_max is not None and not raw_max.isdigit():
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    return _json_response(
        request.app[DISPATCHER].explain(
            model, privacy, int(raw_max) if raw_max is not None else None
        )
    )


async def get_status(request: web.Request) -> web.Response:
    return _json_response(request.app[STATUS]())


# --- mesh administration (the box's owner only) ----------------------------------------------


def _owner_only(request: web.Request) -> MeshAdmin:
    if not is_loopback_host(request.remote or ""):
        raise PermissionDenied("mesh administration is only available on this box (loopback)")
    return request.app[MESH_ADMIN]


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


def build_app(
    *,
    dispatcher: Dispatcher,
    max_request_bytes: int,
    status: Callable[[], dict[str, Any]],
    mesh_admin: MeshAdmin,
) -> web.Application:
    # client_max_size bounds what aiohttp itself buffers; _read_body gives the clear error.
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_error_middleware])
    app[DISPATCHER] = dispatcher
    app[MAX_BYTES] = max_request_bytes
    app[STATUS] = status
    app[MESH_ADMIN] = mesh_admin
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
    return app
