"""Models without restarts, for the box's owner: `POST /allerac/models` adds a GGUF file,
`DELETE /allerac/models/NAME` removes a model, `POST /allerac/reload` reads the
configuration again (what SIGHUP does). What `allerac models add/remove/pull` call.

Owner token only, like the rest of administration (`node.api.http_api.require_owner`);
the Host/Origin guard and the JSON content type are checked before these handlers run.
Each change edits the config file (keeping the owner's comments) and goes through the
node's one path for configuration changes (`node.reconfigure`): the model is loaded
before the file is written, so a broken file is a clear 400 and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from mesh.config import MODEL_NAME_RE, ModelConfig
from mesh.config_changes import ConfigChanges
from mesh.errors import ConfigError, InvalidRequest, ModelExists, ModelNotFound
from mesh.inference import ModelInfo
from node.api.http_api import _json_fields, json_response, require_owner
from node.store.config_edit import add_model, remove_model
from node.store.model_files import check_gguf


class Reconfigurer(Protocol):
    """The node's one path for configuration changes (`node.reconfigure.Reconfigurer`)."""

    async def reload(self) -> ConfigChanges: ...

    async def change_models(self, edit: Callable[[str], str]) -> ConfigChanges: ...

    def served_models(self) -> list[ModelInfo]: ...

    def served_names(self) -> set[str]: ...

    def config_path(self) -> Path: ...

    def file_models(self, text: str) -> tuple[ModelConfig, ...]: ...


RECONFIGURER: web.AppKey[Reconfigurer] = web.AppKey("reconfigurer")
MAX_ALIASES = 16


def _reconfigurer(request: web.Request) -> Reconfigurer:
    require_owner(request, "model")
    return request.app[RECONFIGURER]


def _model_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not MODEL_NAME_RE.match(value):
        raise InvalidRequest(
            f"{key} must be a model name: 1-128 letters, digits or . _ : / - characters",
            param=key,
        )
    return value


def _answer(changes: ConfigChanges, reconfigurer: Reconfigurer, **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "changes": changes.describe(),
        "models": [m.name for m in reconfigurer.served_models()],
    }


async def _change(reconfigurer: Reconfigurer, edit: Callable[[str], str]) -> ConfigChanges:
    try:
        return await reconfigurer.change_models(edit)
    except ConfigError as exc:  # the model did not load, or the result does not validate
        raise InvalidRequest(exc.message, param="path") from exc


async def models_add(request: web.Request) -> web.Response:
    reconfigurer = _reconfigurer(request)
    body = await _json_fields(request)
    raw_path = body.get("path")
    if not isinstance(raw_path, str) or not raw_path or len(raw_path) > 4096:
        raise InvalidRequest("path must be the model file's absolute path", param="path")
    path = Path(raw_path)
    check_gguf(path)
    name = _model_name(body["name"], "name") if body.get("name") is not None else None
    aliases = body.get("aliases", [])
    if not isinstance(aliases, list) or len(aliases) > MAX_ALIASES:
        raise InvalidRequest(
            f"aliases must be a list of at most {MAX_ALIASES} names", param="aliases"
        )
    aliases = tuple(_model_name(a, "aliases") for a in aliases)
    served = reconfigurer.served_names()
    for wanted in (name, *aliases):
        if wanted is not None and wanted in served:
            raise ModelExists(f"this node already serves a model called {wanted!r}", param="name")
    source = reconfigurer.config_path()
    changes = await _change(
        reconfigurer,
        lambda text: add_model(
            text, path=path, name=name, aliases=aliases, source=str(source), keep_embedded=True
        ),
    )
    if not changes.models_added:
        raise ModelExists(f"{path} is already served under the same name", param="path")
    added = changes.models_added[-1].name
    return json_response(_answer(changes, reconfigurer, name=added), status=201)


async def models_remove(request: web.Request) -> web.Response:
    reconfigurer = _reconfigurer(request)
    name = request.match_info["name"]
    if name not in reconfigurer.served_names():
        raise ModelNotFound(f"this node serves no model called {name!r}")
    source = reconfigurer.config_path()

    def edit(text: str) -> str:
        in_file = reconfigurer.file_models(text)
        if len(in_file) <= 1:
            raise InvalidRequest(
                f"{name!r} is the only model in {source}: a node serves at least one; "
                "add another first",
                param="name",
            )
        return remove_model(text, name=name, served=in_file, source=str(source))

    changes = await _change(reconfigurer, edit)
    return json_response(_answer(changes, reconfigurer, removed=name))


async def reload_config(request: web.Request) -> web.Response:
    reconfigurer = _reconfigurer(request)
    try:
        changes = await reconfigurer.reload()
    except ConfigError as exc:
        raise InvalidRequest(exc.message) from exc
    return json_response(_answer(changes, reconfigurer))


def register_models_admin(app: web.Application, reconfigurer: Reconfigurer) -> None:
    app[RECONFIGURER] = reconfigurer
    app.router.add_post("/allerac/models", models_add)
    app.router.add_delete("/allerac/models/{name}", models_remove)
    app.router.add_post("/allerac/reload", reload_config)
