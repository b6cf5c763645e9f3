"""Changing the `[[models]]` of a node's config file without losing anything else in it.

The file is the owner's: `allerac models add/remove` must keep their comments, order and
formatting. `tomlkit` edits TOML as a document (comments and layout included) where
`tomllib` only reads it. Each function takes the file's text and returns the new text;
validation is the caller's (the text goes through `mesh.config` before it is written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from mesh.config import EMBEDDED_MODEL_NAME, ModelConfig
from mesh.errors import ConfigError, InvalidRequest


def _document(text: str, source: str) -> Any:
    try:
        return tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def add_model(
    text: str,
    *,
    path: Path,
    name: str | None,
    aliases: tuple[str, ...],
    source: str,
    keep_embedded: bool,
) -> str:
    """`text` with one more `[[models]]` table. `keep_embedded`: the node serves the
    embedded default only because the file names no model, so the first table added
    names the embedded model first (by name: `mesh.config` finds its file), or adding a
    model would silently drop it."""
    doc = _document(text, source)
    models = doc.get("models")
    if models is None:
        models = tomlkit.aot()
        if keep_embedded:
            embedded = tomlkit.table()
            embedded["name"] = EMBEDDED_MODEL_NAME
            models.append(embedded)
        doc["models"] = models
    elif not isinstance(models, list):
        raise ConfigError(f"{source}: models must be an array of tables ([[models]])")
    entry = tomlkit.table()
    if name is not None:
        entry["name"] = name
    entry["path"] = str(path)
    if aliases:
        entry["aliases"] = list(aliases)
    models.append(entry)
    return str(tomlkit.dumps(doc))


def remove_model(text: str, *, name: str, served: tuple[ModelConfig, ...], source: str) -> str:
    """`text` without the `[[models]]` table of model `name` (or alias). `served` are the
    models the file configures, in its order (`mesh.config` read them), which tells which
    table is whose when a table takes its name from its file."""
    doc = _document(text, source)
    models = doc.get("models")
    if not isinstance(models, list) or len(models) != len(served):
        raise InvalidRequest(
            f"model {name!r} is not in {source}; only models in the config file can be removed",
            param="name",
        )
    for index, model in enumerate(served):
        if name in model.names:
            del models[index]
            if not models:
                del doc["models"]
            return str(tomlkit.dumps(doc))
    raise InvalidRequest(f"model {name!r} is not in {source}", param="name")
