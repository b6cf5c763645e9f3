"""The HTTP API's request log: one line per request, never a key, a prompt or an answer.

`observe` is the outermost middleware of the app (inside the connection guard): it
times the request, lets the handlers note what they learnt in the request's
`RequestFacts` (who called, which model, where it was served, the tokens, when the
first token left), and when the answer is complete, streamed ones included, logs one
line and hands the facts to the metrics. What is logged is chosen field by field: the
method, the path without its query string (a console login URL carries a one-time
token there), the status, the user's name (`owner` for the box's owner, `-` when
nobody proved who they are), model, route, tokens and duration. Headers and bodies
never reach it.

`--log-format json` makes every log line of `allerac up` a JSON object
(`JsonFormatter`); a request line carries its fields as keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from aiohttp import web

from mesh.quota.users import Caller

logger = logging.getLogger("allerac.requests")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FACTS_KEY = "allerac.facts"
STARTED_KEY = "allerac.started"  # loop.time() when the request reached the app
CLIENT_GONE = 499  # nginx's convention: the client closed the connection first
MAX_PATH_CHARS = 200
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class RequestFacts:
    """What one request was, as far as the log and the metrics may know it."""

    method: str = ""
    path: str = ""
    status: int = 0
    user_class: str = "anonymous"  # owner | user | anonymous
    user: str = "-"
    model: str = ""
    route: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0
    first_token_s: float | None = None
    error_code: str = ""


class RequestObserver(Protocol):
    def request_done(self, endpoint: str, facts: RequestFacts) -> None: ...


def facts(request: web.Request) -> RequestFacts:
    found = request.get(FACTS_KEY)
    if isinstance(found, RequestFacts):
        return found
    made = RequestFacts()
    request[FACTS_KEY] = made
    return made


def note_caller(request: web.Request, caller: Caller) -> None:
    noted = facts(request)
    if caller.ceiling is None and not caller.user:
        noted.user_class, noted.user = "owner", "owner"
    else:
        noted.user_class, noted.user = "user", caller.user


def note_first_token(request: web.Request) -> None:
    noted = facts(request)
    started = request.get(STARTED_KEY)
    if not isinstance(started, float):
        return
    if noted.first_token_s is None:
        noted.first_token_s = asyncio.get_running_loop().time() - started


def endpoint_of(request: web.Request) -> str:
    """The route's template (`/allerac/users/{name}`), never the user's value: a bounded
    label for the metrics; `other` for paths no route has."""
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else ""
    return canonical or "other"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_PATH_CHARS else text[:MAX_PATH_CHARS] + "..."


def format_text(noted: RequestFacts) -> str:
    tokens = (
        f" tokens={noted.prompt_tokens}+{noted.completion_tokens}"
        if noted.prompt_tokens or noted.completion_tokens
        else ""
    )
    return (
        f"{noted.method} {noted.path} {noted.status} user={noted.user}"
        f"{' model=' + noted.model if noted.model else ''}"
        f"{' route=' + noted.route if noted.route else ''}{tokens}"
        f"{' error=' + noted.error_code if noted.error_code else ''}"
        f" {noted.duration_s * 1000:.1f}ms"
    )


def build_observe(observers: list[RequestObserver]) -> Any:
    """The middleware; `observers` (the metrics) see every request's facts."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        noted = facts(request)
        request[STARTED_KEY] = started
        noted.method = request.method[:16]
        noted.path = _clip(request.path)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            noted.status = status
            noted.duration_s = loop.time() - started
            # The facts themselves: only the JSON formatter turns them into a dict.
            logger.info("%s", format_text(noted), extra={"request": noted})
            endpoint = endpoint_of(request)
            for observer in observers:
                observer.request_done(endpoint, noted)

    return observe


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message; a request line adds its
    fields (`request`)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if isinstance(request, RequestFacts):
            line.update({k: v for k, v in asdict(request).items() if v not in ("", None)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Logging for `allerac up`: text lines (the default) or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
