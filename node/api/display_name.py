"""`PUT /allerac/display-name {display_name}`: the owner renames this box (the console's Mesh
page does). The name is kept in the data dir and shown to peers with the box's re-signed
card; a name set in the config file wins, so the API refuses then (409) and says where to
change it."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from mesh.api.openai_api import decode_json_body
from mesh.errors import InvalidRequest, NameSetInConfig
from mesh.trust.names import MAX_NAME_CHARS, clean_name
from node.api.http_api import json_response, require_owner


def add_display_name_route(
    app: web.Application, *, rename: Callable[[str], None], set_in_config: bool
) -> None:
    async def put_display_name(request: web.Request) -> web.Response:
        require_owner(request, "box")
        fields = decode_json_body(await request.read(), max_bytes=4096)
        name = clean_name(fields.get("display_name"))
        if name is None:
            raise InvalidRequest(
                f"display_name must be 1 to {MAX_NAME_CHARS} printable characters",
                param="display_name",
            )
        if set_in_config:
            raise NameSetInConfig(
                "this box's display name is set in its config file (display_name); change "
                "it there and restart the node"
            )
        rename(name)
        return json_response({"display_name": name})

    app.router.add_put("/allerac/display-name", put_display_name)
