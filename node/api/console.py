"""The console ("Allerac One"): the node's own web pages at `/`, and how a browser signs in.

The pages are static files shipped in the package (`node/api/console_static/`: plain
JavaScript and CSS, a vendored QR library with its licence); they call the same HTTP
endpoints the `allerac` commands call. Nothing is fetched from elsewhere, and the
Content-Security-Policy says so to the browser.

Signing in keeps every rule of node/api/owner.py (a web page can do nothing):
- The owner runs `allerac console`: it asks the node (with the owner token) for a
  one-time login URL, valid `LOGIN_TTL_S`, and opens or prints it. Visiting it sets a
  session cookie (`HttpOnly`, `SameSite=Strict`, named after the node so that two boxes
  on one host keep apart) and sends the browser to `/` without the token in its address.
- A person signs in with their API key (`POST /console/sign-in`, JSON, so only a page of
  this very origin can send it): their session stands for their key, so they see what
  the key may see (their own usage, chat) and never the administration; removing the
  user ends the session at their next request.
- Every request a session makes must carry its CSRF token (`X-Allerac-CSRF`), reads
  included: the cookie alone opens nothing (403 `csrf_token_required`). The page reads
  its token from `GET /console/session`, which a page of another origin cannot read
  (no CORS, its `Origin` is refused, the strict cookie is not sent cross-site, and
  cross-site fetch metadata is refused).
- A request with its own `Authorization` is left as it is: the session never widens or
  replaces a credential a client chose.

Sessions live in memory (a restart signs everyone out, as it renews the owner token),
at most `MAX_SESSIONS`, each for `SESSION_TTL_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from mesh.api.openai_api import decode_json_body
from mesh.clock import Clock
from mesh.errors import CsrfRequired, InvalidRequest, OwnerRequired, PermissionDenied
from mesh.quota.users import OWNER
from node.api.http_api import OWNER_TOKEN, USERS, is_owner_token, json_response
from node.api.request_log import note_caller

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGIN_TTL_S = 120
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 64
MAX_LOGIN_TOKENS = 16
CSRF_HEADER = "X-Allerac-CSRF"
STATIC_PACKAGE = "node.api"
STATIC_DIR = "console_static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
# The pages load only their own files and talk only to this node.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# Paths that read the cookie themselves (or need none); every other path with a session
# cookie must carry the CSRF token.
OWN_PATHS = frozenset({"/", "/console/login", "/console/sign-in", "/console/session"})


@dataclass
class Session:
    owner: bool
    user: str  # "" for the owner
    authorization: str  # what the session stands for (never sent to the browser)
    csrf: str
    expires_at_ms: int


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class Console:
    """Login tokens, sessions and the console's routes for one node."""

    def __init__(self, *, node_id: str, clock: Clock) -> None:
        self._clock = clock
        self.cookie_name = "allerac_" + node_id.replace("-", "")[:10].lower()
        self._login_tokens: dict[bytes, int] = {}  # token digest -> expiry (ms)
        self._sessions: dict[bytes, Session] = {}  # session ID digest -> session
        self._files = _load_static()

    # --- tokens and sessions ------------------------------------------------------------------

    def issue_login_token(self) -> str:
        now = self._clock.now_ms()
        self._login_tokens = {d: t for d, t in self._login_tokens.items() if t > now}
        while len(self._login_tokens) >= MAX_LOGIN_TOKENS:
            del self._login_tokens[next(iter(self._login_tokens))]
        token = secrets.token_urlsafe(32)
        self._login_tokens[_digest(token)] = now + LOGIN_TTL_S * 1000
        return token

    def _redeem(self, token: str) -> bool:
        expires = self._login_tokens.pop(_digest(token), None)  # one time, right or late
        return expires is not None and expires > self._clock.now_ms()

    def _open_session(self, *, owner: bool, user: str, authorization: str) -> tuple[str, Session]:
        now = self._clock.now_ms()
        self._sessions = {d: s for d, s in self._sessions.items() if s.expires_at_ms > now}
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(32)
        session = Session(
            owner=owner,
            user=user,
            authorization=authorization,
            csrf=secrets.token_urlsafe(32),
            expires_at_ms=now + SESSION_TTL_S * 1000,
        )
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def session_of(self, request: web.Request) -> Session | None:
        session_id = request.cookies.get(self.cookie_name)
        if not session_id or len(session_id) > 128:
            return None
        session = self._sessions.get(_digest(session_id))
        if session is None or session.expires_at_ms <= self._clock.now_ms():
            return None
        return session

    def _set_cookie(self, response: web.StreamResponse, session_id: str) -> None:
        response.set_cookie(
            self.cookie_name,
            session_id,
            httponly=True,
            samesite="Strict",
            path="/",
            max_age=SESSION_TTL_S,
        )

    # --- the middleware -------------------------------------------------------------------------

    def middleware(self) -> Any:
        @web.middleware
        async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
            if (
                request.path in OWN_PATHS
                or request.path.startswith("/console/static/")
                or self.cookie_name not in request.cookies
                or "Authorization" in request.headers
            ):
                return await handler(request)
            session = self.session_of(request)
            if session is None:
                # An old or foreign cookie proves nothing: the request is judged as if it
                # had none (so the page can tell the session is over).
                return await handler(request)
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode("utf-8"), session.csrf.encode("ascii")):
                raise CsrfRequired(
                    f"a console session's requests must carry its {CSRF_HEADER} header; the "
                    "cookie alone opens nothing"
                )
            headers = request.headers.copy()
            headers["Authorization"] = session.authorization
            return await handler(request.clone(headers=headers))

        return sessions

    # --- routes -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/console/static/{name}", self._static)
        app.router.add_post("/console/login-tokens", self._login_token)
        app.router.add_get("/console/login", self._login)
        app.router.add_post("/console/sign-in", self._sign_in)
        app.router.add_get("/console/session", self._session)
        app.router.add_post("/console/sign-out", self._sign_out)

    def _file(self, name: str) -> web.Response:
        found = self._files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(
            body=body,
            headers={
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                **SECURITY_HEADERS,
            },
        )

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        return self._file(request.match_info["name"])

    async def _login_token(self, request: web.Request) -> web.Response:
        """For `allerac console`: a one-time login URL (owner token only)."""
        if not is_owner_token(request):
            raise OwnerRequired(
                "a console login link needs the box owner's token (allerac console sends it)"
            )
        note_caller(request, OWNER)
        token = self.issue_login_token()
        host = _browser_host(request.headers.get("Host", "127.0.0.1"))
        return json_response(
            {"url": f"http://{host}/console/login?token={token}", "expires_in_s": LOGIN_TTL_S}
        )

    async def _login(self, request: web.Request) -> web.Response:
        """The one-time link: a session cookie, and on to `/` (the token leaves the
        address bar and the history)."""
        token = request.query.get("token", "")
        if not token or len(token) > 128 or not self._redeem(token):
            return _redirect("/?login=expired")
        session_id, _ = self._open_session(
            owner=True, user="", authorization=request.app[OWNER_TOKEN].authorization()
        )
        response = _redirect("/")
        self._set_cookie(response, session_id)
        return response

    async def _sign_in(self, request: web.Request) -> web.Response:
        """A person's API key (or the owner token) for a session. JSON only (the guard
        refuses anything else), so no other origin's page can send it."""
        body = await request.read()
        if len(body) > 8192:
            raise InvalidRequest("the sign-in body is too large")
        fields = decode_json_body(body, max_bytes=8192)
        key = fields.get("api_key")
        if not isinstance(key, str) or not key or len(key) > 4096:
            raise InvalidRequest("api_key must be a non-empty string", param="api_key")
        authorization = f"Bearer {key}"
        if request.app[OWNER_TOKEN].matches(key):
            owner, user = True, ""
        else:
            caller = request.app[USERS].caller(authorization, loopback=False)
            note_caller(request, caller)
            owner, user = False, caller.user
        session_id, session = self._open_session(
            owner=owner, user=user, authorization=authorization
        )
        response = json_response(self._describe(session))
        self._set_cookie(response, session_id)
        return response

    async def _session(self, request: web.Request) -> web.Response:
        """The signed-in session and its CSRF token, for this origin's pages only."""
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site not in (None, "same-origin", "none"):
            raise PermissionDenied("the console session is for the console's own pages")
        session = self.session_of(request)
        body = self._describe(session) if session is not None else {"signed_in": False}
        return json_response(body, headers={"Cache-Control": "no-store"})

    async def _sign_out(self, request: web.Request) -> web.Response:
        session_id = request.cookies.get(self.cookie_name, "")
        if self.session_of(request) is None:
            raise OwnerRequired("not signed in")
        self._sessions.pop(_digest(session_id), None)
        response = json_response({"signed_in": False})
        response.del_cookie(self.cookie_name, path="/")
        return response

    @staticmethod
    def _describe(session: Session) -> dict[str, Any]:
        return {
            "signed_in": True,
            "role": "owner" if session.owner else "user",
            "user": session.user,
            "csrf": session.csrf,
        }


def _browser_host(host: str) -> str:
    """The `Host` the CLI reached the node by, as a browser can open it: a node bound to
    every address (0.0.0.0, [::]) is reached on loopback."""
    name, _, port = host.rpartition(":")
    if name in ("0.0.0.0", "[::]"):  # noqa: S104 (recognising it, not binding to it)
        return f"127.0.0.1:{port}"
    return host


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The console's files, read once: name -> (bytes, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    folder = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR)
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files
