"""The OpenAI-compatible HTTP API (aiohttp): thin handlers over `mesh.api.openai_api`.

`MeshError` -> HTTP status and OpenAI-style error body happens in
`_error_middleware` and nowhere else. Every answer carries `x-allerac-node` and
`x-allerac-route`. A streamed answer commits its 200 only after the first
event, so errors before the first token still get their proper status.

Before any handler runs, `_guard_middleware` checks that the request is for this
box and not a web page's (`node.api.owner.HostGuard`): a `Host` that does not name this
box is a 403 (DNS rebinding), a request with an `Origin` that is neither the node's
own nor in `[http] cors_origins` is a 403, and a POST or PATCH that is not
`application/json` is a 415 (a page's "simple" request cannot send that type without
a CORS preflight). Allowed origins get CORS headers on the OpenAI API only.

Who is calling is decided before a body is read: the owner token
(`run/owner.token`) as a Bearer key is the box's owner; an API key names a user,
whose key sets the privacy policy's default and ceiling; no key at all is the owner
only for a request that cannot be a web page's (a loopback peer, a loopback `Host`,
no `Origin`, no cross-site fetch metadata), and a 401 anywhere else. The
`/allerac/mesh` and `/allerac/users` administration endpoints need the owner token,
wherever the request comes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from mesh.api import openai_api
from mesh.api.embeddings import embeddings_body, parse_embeddings_request
from mesh.clock import SYSTEM, Clock
from mesh.errors import (
    ForeignRequest,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    OwnerRequired,
    PermissionDenied,
    QuotaExceeded,
    RemoteProtocolError,
    RequestTooLarge,
    UnsupportedMediaType,
)
from mesh.inference import Finished, TextDelta
from mesh.quota.rules import UNLIMITED, Quota, parse_quota
from mesh.quota.users import KEY_PREFIX as API_KEY_PREFIX
from mesh.quota.users import OWNER, Caller, bearer_key
from mesh.routing.scheduler import Privacy, parse_needs
from node.api.mesh_admin import MAX_INVITE_TTL_S, MeshAdmin
from node.api.owner import HostGuard, OwnerToken
from node.api.request_log import (
    RequestObserver,
    build_observe,
    facts,
    note_caller,
    note_first_token,
)
from node.serving.entry import EntryAnswer, EntrySide
from node.serving.plans import PlanGate
from node.serving.quota_service import QuotaService
from node.store.users_admin import UsersAdmin
from node.transport.coalesce import coalesce

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ENTRY = web.AppKey("entry", EntrySide)
MESH_ADMIN = web.AppKey("mesh_admin", MeshAdmin)
USERS = web.AppKey("users", UsersAdmin)
QUOTA = web.AppKey("quota", QuotaService)
PLANS = web.AppKey("plans", PlanGate)
STATUS: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status")
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
OWNER_TOKEN = web.AppKey("owner_token", OwnerToken)


@dataclasses.dataclass(kw_only=True)
class HttpLimits:
    """The API's per-request limits and allow-lists: one object, changed in place when the
    node reloads its configuration (SIGHUP), read by every request."""

    max_request_bytes: int
    guard: HostGuard


LIMITS = web.AppKey("limits", HttpLimits)
# aiohttp's own bound on a body it buffers; ours (`HttpLimits.max_request_bytes`, which
# may change while the API runs) is checked as the body arrives, in `_read_body`.
MAX_REQUEST_BYTES_CEILING = 64 << 20
CORS_ORIGIN = "allerac.cors_origin"  # request key: the allowed origin to answer with CORS

# What a browser app may send and read across origins (the OpenAI API only).
CORS_ALLOW_HEADERS = "Authorization, Content-Type, x-allerac-privacy, OpenAI-Organization"
CORS_EXPOSE_HEADERS = "x-allerac-node, x-allerac-route, Retry-After"
CORS_MAX_AGE_S = "600"
JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


def json_response(
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
        facts(request).error_code = error.code or ""
        if error.http_status >= 500:
            logger.warning("%s %s failed: %s", request.method, request.path, error.message)
        # RFC 7235 section 3.1: a 401 names the scheme that would work.
        headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else {}
        if isinstance(error, QuotaExceeded) and error.resets_at:
            headers["Retry-After"] = str(
                _seconds_until(error.resets_at, request.app[CLOCK].now_ms())
            )
        return json_response(
            openai_api.error_body(error), status=error.http_status, headers=headers or None
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(_http_error_body(exc), status=exc.status)


@web.middleware
async def _guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what is not for this box, or comes from a page the owner did not allow."""
    guard = request.app[LIMITS].guard
    host = request.headers.get("Host")
    if host is None:
        # RFC 9112 section 3.2: a request without Host is answered 400.
        raise InvalidRequest("the request has no Host header")
    if not guard.host_allowed(host):
        raise ForeignRequest(
            f"this node does not answer to the host name {host[:100]!r}: use 127.0.0.1, "
            "localhost or its address, or add the name to [http] allowed_hosts"
        )
    origin = request.headers.get("Origin")
    openai_route = request.path.startswith("/v1/")
    if origin is not None and not guard.own_origin(origin, host):
        if not (openai_route and guard.cors_allowed(origin)):
            raise ForeignRequest(
                f"requests from the web page origin {origin[:100]!r} are refused; the box's "
                "owner may allow it for the OpenAI API with [http] cors_origins"
            )
        request[CORS_ORIGIN] = origin
        if request.method == "OPTIONS":  # a CORS preflight (Fetch standard, section 3.2.2)
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": CORS_MAX_AGE_S,
                },
            )
    if request.method in JSON_METHODS and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"send the body as JSON with Content-Type: application/json "
            f"(got {request.headers.get('Content-Type', 'none')[:100]!r})"
        )
    return await handler(request)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer to an allowed origin, streamed ones too (before headers leave)."""
    origin = request.get(CORS_ORIGIN)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        response.headers.add("Vary", "Origin")


def _seconds_until(iso: str, now_ms: int) -> int:
    """RFC 9110 Retry-After in seconds, until an ISO 8601 UTC time."""
    try:
        when = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return 60  # not a time we can read: a minute is a sane pause
    return max(0, int(when.replace(tzinfo=datetime.UTC).timestamp() - now_ms / 1000) + 1)


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[LIMITS].max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )
    body = bytearray()
    async for chunk in request.content.iter_any():  # a chunked body: counted as it comes
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body is larger than the limit of {limit} bytes")
    return bytes(body)


def _route_headers(answer: EntryAnswer) -> dict[str, str]:
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


def cannot_be_a_page(request: web.Request) -> bool:
    """A request no web page could have sent: from this box, to a loopback name, with no
    `Origin` and no cross-site fetch metadata (an `<img>` or `<script>` GET carries no
    Origin, but browsers mark it `Sec-Fetch-Site: cross-site`)."""
    return (
        _from_loopback(request)
        and request.app[LIMITS].guard.is_loopback_host(request.headers.get("Host", ""))
        and "Origin" not in request.headers
        and request.headers.get("Sec-Fetch-Site", "none") in ("none", "same-origin")
    )


def is_owner_token(request: web.Request) -> bool:
    try:
        key = bearer_key(request.headers.get("Authorization"))
    except MeshError:
        return False
    return request.app[OWNER_TOKEN].matches(key)


def get_caller(request: web.Request) -> Caller:
    """Who sent this request (401 when they must and did not prove it)."""
    if is_owner_token(request):
        caller = OWNER
    else:
        caller = request.app[USERS].caller(
            request.headers.get("Authorization"), loopback=cannot_be_a_page(request)
        )
    note_caller(request, caller)
    return caller


async def _answer(
    request: web.Request, caller: Caller, parsed: openai_api.Parsed
) -> web.StreamResponse:
    inference = parsed.request
    privacy = caller.privacy_for(_privacy(request))
    # The user is who the key says (the owner: ""), never the body's own `user` field.
    inference = dataclasses.replace(inference, user=caller.user)
    # Admitted (its user's quota reserved at the home node) before it is planned; settled
    # when it ends, however it ends (a client that hangs up included). `n` choices are `n`
    # requests started side by side (each in its own slot, or on its own box), sent one
    # after the other.
    async with contextlib.AsyncExitStack() as stack:
        answers: list[EntryAnswer] = []
        for one in openai_api.split_choices(inference):
            answers.append(await stack.enter_async_context(request.app[ENTRY].answer(one, privacy)))
            stack.push_async_callback(answers[-1].aclose)  # a choice never read stops
        try:
            return await _respond(request, answers, parsed)
        finally:
            noted = facts(request)
            noted.model = answers[0].served_by.model
            noted.route = answers[0].served_by.route.value


async def _respond(
    request: web.Request, answers: list[EntryAnswer], parsed: openai_api.Parsed
) -> web.StreamResponse:
    answer = answers[0]  # the route headers are the first choice's
    inference = answer.request
    ids = openai_api.ResponseIds(
        inference, answer.served_by.model, now=request.app[CLOCK].now_ms() / 1000
    )
    if not parsed.stream:
        done: list[tuple[openai_api.Collected, Finished]] = []
        for one in answers:
            done.append(await _collect(request, one))
        _note_tokens(request, openai_api.total([finished for _, finished in done]))
        return json_response(ids.complete_choices(done), headers=_route_headers(answer))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **_route_headers(answer),
        }
    )
    await response.prepare(request)
    finished: list[Finished] = []
    try:
        for index, one in enumerate(answers):
            async with contextlib.aclosing(one.events()) as events:
                if inference.is_chat:
                    await response.write(openai_api.sse(ids.role_chunk(index)))
                async for event in coalesce(events):
                    note_first_token(request)
                    if isinstance(event, TextDelta):
                        await response.write(openai_api.sse(ids.chunk(event, index=index)))
                    elif isinstance(event, Finished):
                        finished.append(event)
                        chunk = ids.chunk(None, event, index=index)
                        await response.write(openai_api.sse(chunk))
        summed = openai_api.total(finished)
        _note_tokens(request, summed)
        if parsed.include_usage:  # the ledger records it either way
            await response.write(openai_api.sse(ids.usage_chunk(summed)))
    except MeshError as error:
        # Headers are gone: say it in the stream (the OpenAI client raises on it).
        logger.warning("stream %s failed: %s", inference.request_id, error.message)
        await response.write(openai_api.sse(openai_api.error_body(error)))
    await response.write(openai_api.SSE_DONE)
    await response.write_eof()
    return response


async def _collect(
    request: web.Request, answer: EntryAnswer
) -> tuple[openai_api.Collected, Finished]:
    collected = openai_api.Collected()
    async with contextlib.aclosing(answer.events()) as events:
        async for event in events:
            note_first_token(request)
            if isinstance(event, TextDelta):
                collected.add(event)
            else:
                return collected, event
    raise AssertionError("an answer always ends with Finished")


def _note_tokens(request: web.Request, finished: Finished) -> None:
    noted = facts(request)
    noted.prompt_tokens = finished.prompt_tokens
    noted.completion_tokens = finished.completion_tokens


async def chat_completions(request: web.Request) -> web.StreamResponse:
    caller = get_caller(request)
    body = await _read_body(request)
    parsed = openai_api.parse_chat_request(body, max_bytes=request.app[LIMITS].max_request_bytes)
    return await _answer(request, caller, parsed)


async def completions(request: web.Request) -> web.StreamResponse:
    caller = get_caller(request)
    body = await _read_body(request)
    parsed = openai_api.parse_completion_request(
        body, max_bytes=request.app[LIMITS].max_request_bytes
    )
    return await _answer(request, caller, parsed)


async def create_embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings: planned, sealed, recorded and counted like a chat request."""
    caller = get_caller(request)
    body = await _read_body(request)
    parsed = parse_embeddings_request(body, max_bytes=request.app[LIMITS].max_request_bytes)
    inference = dataclasses.replace(parsed.request, user=caller.user)
    privacy = caller.privacy_for(_privacy(request))
    async with request.app[ENTRY].answer(inference, privacy) as answer:
        noted = facts(request)
        noted.model = answer.served_by.model
        noted.route = answer.served_by.route.value
        async with contextlib.aclosing(answer.events()) as events:
            async for event in events:
                if isinstance(event, Finished):
                    _note_tokens(request, event)
                    return json_response(
                        embeddings_body(
                            answer.request,
                            event,
                            model=answer.served_by.model,
                            encoding=parsed.encoding,
                        ),
                        headers=_route_headers(answer),
                    )
    raise RemoteProtocolError("the embeddings answer ended without its vectors")


async def list_models(request: web.Request) -> web.Response:
    """Every model the mesh can serve, and where (the nodes up that serve it)."""
    get_caller(request)  # beyond loopback: only with a key
    served = request.app[ENTRY].mesh_models()
    body = openai_api.models_list([info for info, _ in served])
    for entry, (_, nodes) in zip(body["data"], served, strict=True):
        entry["served_by"] = nodes
    return json_response(body)


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: a model the mesh serves, by name or alias (404 otherwise)."""
    get_caller(request)
    wanted = request.match_info["model"]
    served = request.app[ENTRY].mesh_models()
    for info, nodes in served:
        if wanted == info.name or wanted in info.aliases:
            body = openai_api.model_object(info)
            body["served_by"] = nodes
            return json_response(body)
    known = ", ".join(sorted(info.name for info, _ in served)) or "none"
    raise ModelNotFound(
        f"model {wanted[:200]!r} is not served in this mesh; available: {known}", param="model"
    )


async def route_explain(request: web.Request) -> web.Response:
    caller = get_caller(request)
    model = request.query.get("model", "")
    if not model:
        raise InvalidRequest("model is required", param="model")
    requested = request.query.get("privacy")
    entry = request.app[ENTRY]
    privacy = caller.privacy_for(Privacy.parse(requested) if requested is not None else None)
    raw_max = request.query.get("max_tokens")
    if raw_max is not None and not raw_max.isdigit():
        raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
    return json_response(
        entry.explain(
            model,
            privacy or entry.default_privacy,
            int(raw_max) if raw_max is not None else None,
            needs=parse_needs(request.query.get("needs", "")),
        )
    )


async def route_explain_request(request: web.Request) -> web.Response:
    """POST /allerac/route: where a chat request (an OpenAI chat body; privacy from the
    query, as GET has it, or the usual header) would go now, and why: its prompt, what it
    asks, and the boxes holding the start of its conversation (`route --messages`)."""
    caller = get_caller(request)
    body = await _read_body(request)
    parsed = openai_api.parse_chat_request(body, max_bytes=request.app[LIMITS].max_request_bytes)
    entry = request.app[ENTRY]
    requested = request.query.get("privacy")
    asked = Privacy.parse(requested) if requested is not None else _privacy(request)
    privacy = caller.privacy_for(asked) or entry.default_privacy
    return json_response(
        entry.explain_request(dataclasses.replace(parsed.request, user=caller.user), privacy)
    )


async def get_status(request: web.Request) -> web.Response:
    get_caller(request)  # beyond loopback: only with a key
    return json_response(request.app[STATUS]())


# --- administration (the box's owner only) ---------------------------------------------------


def require_owner(request: web.Request, what: str) -> None:
    """Only the owner token opens administration: neither an API key nor being on loopback
    (a web page the owner opens sends from loopback too)."""
    if is_owner_token(request):
        note_caller(request, OWNER)
        return
    if API_KEY_PREFIX in request.headers.get("Authorization", ""):
        raise PermissionDenied(
            f"{what} administration needs the box owner's token; an API key never opens it"
        )
    raise OwnerRequired(
        f"{what} administration needs the box owner's token: send Authorization: Bearer "
        "TOKEN with the token from run/owner.token in the node's data dir (the allerac "
        "commands do; it changes at every start)"
    )


def _owner_only(request: web.Request) -> MeshAdmin:
    require_owner(request, "mesh")
    return request.app[MESH_ADMIN]


def _users_owner_only(request: web.Request) -> UsersAdmin:
    require_owner(request, "user")
    return request.app[USERS]


async def _json_fields(request: web.Request) -> dict[str, Any]:
    return openai_api.decode_json_body(await _read_body(request), max_bytes=64 * 1024)


def _string(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key} must be a non-empty string", param=key)
    return value


async def mesh_describe(request: web.Request) -> web.Response:
    return json_response(_owner_only(request).describe())


async def mesh_invite(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    ttl = body.get("ttl_s", 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidRequest("ttl_s must be a number of seconds", param="ttl_s")
    if not 1 <= ttl <= MAX_INVITE_TTL_S:  # compared before float(): 10**400 has no float
        raise InvalidRequest(
            f"ttl_s must be from 1 to {MAX_INVITE_TTL_S} seconds (30 days)", param="ttl_s"
        )
    return json_response(admin.invite(role=_string(body, "role", "member"), ttl_s=float(ttl)))


async def mesh_join(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    leave = body.get("leave_current", False)
    if not isinstance(leave, bool):
        raise InvalidRequest("leave_current must be true or false", param="leave_current")
    return json_response(await admin.join(_string(body, "code"), leave_current=leave))


async def mesh_members(request: web.Request) -> web.Response:
    return json_response(_owner_only(request).members())


async def mesh_revoke(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    return json_response(await admin.revoke(_string(body, "node_id")))


async def mesh_admin_add(request: web.Request) -> web.Response:
    admin = _owner_only(request)
    body = await _json_fields(request)
    return json_response(await admin.add_admin(_string(body, "node_id")))


async def users_list(request: web.Request) -> web.Response:
    """The users, each with their quota's state as this node counts it (exact at the
    user's home node, which holds the reservations)."""
    users = _users_owner_only(request)
    book = request.app[QUOTA].book
    now_ms = request.app[CLOCK].now_ms()
    listed = users.describe()
    for entry in listed["users"]:
        record = users.get(entry["name"])
        if record is not None:
            entry["quota_state"] = book.describe(record.name, record.quota, now_ms)
    return json_response(listed)


def _quota(request: web.Request, body: dict[str, Any]) -> Quota | None:
    """A user's quota: a spec (`quota`) or a plan's (`plan`, mesh.quota.plans)."""
    if body.get("quota") is not None and body.get("plan") is not None:
        raise InvalidRequest("send a quota or a plan, not both", param="plan")
    if body.get("plan") is not None:
        plans = request.app.get(PLANS)
        if plans is None:
            raise InvalidRequest("this node has no plans", param="plan")
        return plans.quota_of(_string(body, "plan"))
    if body.get("quota") is not None:
        return parse_quota(_string(body, "quota"))
    return None


async def users_add(request: web.Request) -> web.Response:
    users = _users_owner_only(request)
    body = await _json_fields(request)
    privacy = body.get("privacy")
    return json_response(
        await users.add(
            name=_string(body, "name"),
            privacy=Privacy.parse(_string(body, "privacy")) if privacy is not None else None,
            quota=_quota(request, body) or UNLIMITED,
        ),
        status=201,
    )


async def users_update(request: web.Request) -> web.Response:
    users = _users_owner_only(request)
    body = await _json_fields(request)
    privacy, quota = body.get("privacy"), _quota(request, body)
    if privacy is None and quota is None:
        raise InvalidRequest("send privacy, quota (or plan), or both")
    return json_response(
        await users.update(
            request.match_info["name"],
            privacy=Privacy.parse(_string(body, "privacy")) if privacy is not None else None,
            quota=quota,
        )
    )


async def users_remove(request: web.Request) -> web.Response:
    return json_response(await _users_owner_only(request).remove(request.match_info["name"]))


def build_app(
    *,
    entry: EntrySide,
    limits: HttpLimits,
    status: Callable[[], dict[str, Any]],
    mesh_admin: MeshAdmin,
    users: UsersAdmin,
    quota: QuotaService,
    owner: OwnerToken,
    plans: PlanGate | None = None,
    clock: Clock = SYSTEM,
    observers: tuple[RequestObserver, ...] = (),
) -> web.Application:
    # _read_body bounds every body by the limit in force; client_max_size is only a ceiling.
    # The guard runs inside the error middleware, so its refusals are OpenAI-style JSON;
    # the request log (node/api/request_log.py) outside both sees every final status.
    app = web.Application(
        client_max_size=MAX_REQUEST_BYTES_CEILING,
        middlewares=[build_observe(list(observers)), _error_middleware, _guard_middleware],
    )
    app.on_response_prepare.append(_cors_headers)
    app[OWNER_TOKEN] = owner
    app[LIMITS] = limits
    app[CLOCK] = clock
    app[ENTRY] = entry
    app[STATUS] = status
    app[MESH_ADMIN] = mesh_admin
    app[USERS] = users
    app[QUOTA] = quota
    if plans is not None:
        app[PLANS] = plans
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", create_embeddings)
    app.router.add_get("/allerac/status", get_status)
    app.router.add_get("/allerac/route", route_explain)
    app.router.add_post("/allerac/route", route_explain_request)
    app.router.add_get("/allerac/mesh", mesh_describe)
    app.router.add_post("/allerac/mesh/invites", mesh_invite)
    app.router.add_post("/allerac/mesh/join", mesh_join)
    app.router.add_get("/allerac/mesh/members", mesh_members)
    app.router.add_post("/allerac/mesh/revoke", mesh_revoke)
    app.router.add_post("/allerac/mesh/admins", mesh_admin_add)
    app.router.add_get("/allerac/users", users_list)
    app.router.add_post("/allerac/users", users_add)
    app.router.add_delete("/allerac/users/{name}", users_remove)
    app.router.add_patch("/allerac/users/{name}", users_update)
    return app
