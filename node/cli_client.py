"""How the CLI reaches the running node: its HTTP API, as the box's owner (the token the
node wrote in its data dir). Shared by every command module (`cli.py`, `cli_models.py`)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from mesh.errors import MeshError
from node.store.home import Home

HTTP_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class NodeAddress:
    """A running node as its owner reaches it: its API and the owner token it wrote."""

    url: str
    owner_token: str | None


class NodeRefused(click.ClickException):
    """The node answered with an error: its status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.code = code
        self.reason = message


def node_at(home_dir: Path | None) -> NodeAddress:
    """The node running with this data dir (its run file), or a clear error."""
    from node.api.owner import read_token

    home = Home.resolve(home_dir)
    try:
        url = str(home.read_run_info()["http_url"])
    except MeshError as exc:
        raise click.ClickException(exc.message) from exc
    return NodeAddress(url=url, owner_token=read_token(home.owner_token_file))


@contextlib.contextmanager
def node_request(
    node: NodeAddress, method: str, path: str, body: dict[str, Any] | None = None
) -> Iterator[http.client.HTTPResponse]:
    url = urllib.parse.urlsplit(node.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=HTTP_TIMEOUT_S)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if node.owner_token is not None:  # the box's owner: whoever can read the node's files
            headers["Authorization"] = f"Bearer {node.owner_token}"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            raise click.ClickException(
                f"cannot reach the node at {node.url} ({exc}); is `allerac up` running?"
            ) from exc
        if response.status >= 400:
            raw = response.read()
            try:
                error = json.loads(raw)["error"]
                message, code = str(error["message"]), str(error.get("code") or "")
            except (ValueError, KeyError, TypeError):
                message, code = raw.decode("utf-8", "replace")[:500], ""
            raise NodeRefused(response.status, code, message)
        yield response
    finally:
        conn.close()


def node_json(node: NodeAddress, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    with node_request(node, method, path, body) as response:
        return json.loads(response.read())
