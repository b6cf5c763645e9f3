"""The box's owner: who may administer this node, and how a request proves it.

A web page the owner opens can send requests to `127.0.0.1` (a "simple" POST needs no
CORS preflight) and, through DNS rebinding, even read the answers: being on loopback
proves nothing. The owner is whoever can read the node's files, so the proof is a
secret in them: a random token written at every start to `run/owner.token` (0600, in
a 0700 directory), sent as `Authorization: Bearer TOKEN`. The `allerac` commands read
it; a web page cannot.

`HostGuard` is the other half, as Jupyter and Ollama do it: every request's `Host`
must name this box (a loopback name or address, the address the API is bound to, or
a name the owner allowed), which defeats DNS rebinding; and a request sent by a page
(it carries `Origin`) is refused unless that origin is the node's own or one the
owner listed for CORS.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ConfigError, MeshError
from node.store.files import read_owner_only, write_private
from node.store.home import Home

# "allerac owner token": recognisable in a log or a shell history.
TOKEN_PREFIX = "aot_"  # noqa: S105 (a prefix, not a secret)
MAX_TOKEN_FILE_BYTES = 256


class OwnerToken:
    """The secret that makes a request the owner's; a new one at every start."""

    def __init__(self, token: str) -> None:
        self._token = token

    @classmethod
    def issue(cls, home: Home) -> OwnerToken:
        """Make a fresh token and write it to HOME/run/owner.token (0600)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        home.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(home.owner_token_file, (token + "\n").encode("ascii"))
        return cls(token)

    def matches(self, presented: str | None) -> bool:
        """Constant-time: a wrong guess learns nothing about how close it was."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self._token.encode("ascii"))

    def authorization(self) -> str:
        """The `Authorization` value this token makes (the console's owner session stands
        for it inside the node; it never leaves the node)."""
        return f"Bearer {self._token}"

    @staticmethod
    def clear(home: Home, token: OwnerToken) -> None:
        """Remove the token file when it is still this node's."""
        if read_token(home.owner_token_file) == token._token:
            home.owner_token_file.unlink(missing_ok=True)


def read_token(path: Path) -> str | None:
    """The token a running node wrote, or None when there is none (or it is unreadable)."""
    try:
        data = read_owner_only(
            path, what="owner token", max_bytes=MAX_TOKEN_FILE_BYTES, error=ConfigError
        )
    except MeshError:
        return None
    if data is None:
        return None
    token = data.decode("ascii", "replace").strip()
    return token or None


def _strip_port(host: str) -> str:
    """`Host` without its port: 'a.b:8470' -> 'a.b', '[::1]:8470' -> '::1'."""
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name
    return host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class HostGuard:
    """Which `Host` and `Origin` values this node answers (RFC 9110 sections 7.2,
    RFC 6454)."""

    bound_host: str
    allowed_hosts: frozenset[str] = frozenset()
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls, *, bound_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]
    ) -> HostGuard:
        return cls(
            bound_host=bound_host.lower(),
            allowed_hosts=frozenset(h.lower().rstrip(".") for h in allowed_hosts),
            cors_origins=frozenset(o.lower().rstrip("/") for o in cors_origins),
        )

    def host_allowed(self, host_header: str) -> bool:
        """A loopback name or address, the bound address (any address of this machine
        when bound to all of them: an IP literal cannot be rebound), or an allowed name."""
        host = _strip_port(host_header.strip().lower()).rstrip(".")
        if not host:
            return False
        if host == "localhost" or host in self.allowed_hosts:
            return True
        address = _ip(host)
        if address is None:
            return False
        if address.is_loopback:
            return True
        bound = _ip(self.bound_host)
        if bound is None:
            return False
        return bound.is_unspecified or bound == address

    def is_loopback_host(self, host_header: str) -> bool:
        host = _strip_port(host_header.strip().lower()).rstrip(".")
        if host == "localhost":
            return True
        address = _ip(host)
        return address is not None and address.is_loopback

    def own_origin(self, origin: str, host_header: str) -> bool:
        """The node's own pages: an origin naming the very host the request was sent to."""
        normalized = origin.strip().lower().rstrip("/")
        return normalized == f"http://{host_header.strip().lower()}" and self.host_allowed(
            host_header
        )

    def cors_allowed(self, origin: str) -> bool:
        normalized = origin.strip().lower().rstrip("/")
        return "*" in self.cors_origins or normalized in self.cors_origins
