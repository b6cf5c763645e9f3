"""Applying a new configuration to a running node: the one path for SIGHUP and for
`allerac models add/remove` (through `/allerac/models`).

`Reconfigurer.apply(new)` asks `mesh.config_changes` what changed and applies it while the
node serves:
- models: new and changed ones are loaded first, off to the side; if one fails to load
  (a broken or non-GGUF file) nothing changes and the error says why. Then the served set
  is swapped in one step (`LocalModels.swap`), the cards are re-signed (peers see the new
  card at their next heartbeat, within seconds), and every model taken out is unloaded
  once its answers in flight have finished;
- static peers, relays (sessions opened and closed), the scheduler's settings, and the
  HTTP API's per-request limits and allow-lists apply to the next request;
- what needs sockets rebound (ports, addresses, connection totals, mDNS) is logged as
  waiting for the next start.
Changes are serialised (one lock), and each is logged, one line per change.

`reload()` reads the file again (SIGHUP): a file that does not validate changes nothing
and is logged with the key and value at fault. `change_models(edit)` edits the file's
text, validates and applies the result, and writes the file only once the node serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mesh.config import ModelConfig, NodeConfig
from mesh.config_changes import ConfigChanges, config_changes, effective_config
from mesh.errors import ConfigError, InvalidRequest, MeshError
from mesh.inference import ModelInfo
from mesh.profiles import Profile, apply_profile
from mesh.routing.scheduler import Privacy
from node.api.http_api import HttpLimits
from node.api.owner import HostGuard
from node.serving.backends import create_backend
from node.serving.backends.base import Backend
from node.serving.entry import EntrySide
from node.serving.models import LocalModels
from node.serving.plans import PlanGate
from node.store.config_file import ConfigSource
from node.store.model_files import check_memory
from node.tasks import Tasks
from node.transport.http_guard import HttpConnectionGuard
from node.transport.listeners import ListenerSettings
from node.transport.peering import Peering

logger = logging.getLogger(__name__)


class CardSigner(Protocol):
    def refresh(self) -> None: ...


class ReconfigurableNode(Protocol):
    """What a new configuration changes in a running node (`node.daemon.RunningNode`)."""

    config: NodeConfig
    models: LocalModels
    peering: Peering
    entry: EntrySide
    plans: PlanGate
    profile: Profile
    http_limits: HttpLimits
    http_guard: HttpConnectionGuard
    listeners: ListenerSettings

    @property
    def cards(self) -> CardSigner: ...

    async def start_relay(self, address: str) -> None: ...

    async def stop_relay(self, address: str) -> None: ...


class Reconfigurer:
    def __init__(self, node: ReconfigurableNode, source: ConfigSource | None) -> None:
        self._node = node
        self.source = source
        self._lock = asyncio.Lock()
        self._unloads = Tasks("model unloads")

    async def aclose(self) -> None:
        """The node is stopping: models still finishing are unloaded with it."""
        await self._unloads.aclose()

    # --- what starts a change -------------------------------------------------------------

    async def reload(self) -> ConfigChanges:
        """Read the configuration again and apply it (SIGHUP, `POST /allerac/reload`)."""
        source = self._require_source()
        async with self._lock:
            return await self._apply(source.load())

    async def reload_logged(self) -> None:
        """SIGHUP: reload, and say in the log what happened; the node never stops for it."""
        try:
            await self.reload()
        except MeshError as exc:
            logger.error("configuration not reloaded (nothing changed): %s", exc.message)
        except Exception:  # a failure of ours must not stop a node that was serving
            logger.exception("configuration not reloaded (nothing changed)")

    async def change_models(self, edit: Callable[[str], str]) -> ConfigChanges:
        """Edit the config file's text, serve what it then says, and write it."""
        source = self._require_source()
        if source.models_pinned:
            raise InvalidRequest(
                "this node was started with --model, which chooses its models whatever the "
                f"config file says; restart it without --model to manage models in {source.path}"
            )
        async with self._lock:
            text = edit(source.read_text())
            changes = await self._apply(source.load(text))
            try:
                source.write_text(text)
            except OSError as exc:
                raise ConfigError(
                    f"the change is served, but {source.path} could not be written "
                    f"({exc.strerror}): it is lost at the next start unless the file is fixed"
                ) from exc
            return changes

    async def apply(self, new: NodeConfig) -> ConfigChanges:
        async with self._lock:
            return await self._apply(new)

    def served_models(self) -> list[ModelInfo]:
        return self._node.models.models()

    def served_names(self) -> set[str]:
        return {name for m in self.served_models() for name in (m.name, *m.aliases)}

    def config_path(self) -> Path:
        return self._require_source().path

    def file_models(self, text: str) -> tuple[ModelConfig, ...]:
        """The models the config file's `text` names, in its order."""
        return self._require_source().file_models(text)

    def _require_source(self) -> ConfigSource:
        if self.source is None:
            raise InvalidRequest("this node was not started from a configuration it can re-read")
        return self.source

    # --- applying -------------------------------------------------------------------------

    async def _apply(self, new: NodeConfig) -> ConfigChanges:
        node = self._node
        old = node.config
        new = apply_profile(new, node.profile)  # the defaults of the profile it started with
        changes = config_changes(old, new)
        loaded = await self._load(
            [*changes.models_added, *(after for _, after in changes.models_changed)]
        )
        models = node.models
        leaving: list[Backend] = []
        for model in [*changes.models_removed, *(before for before, _ in changes.models_changed)]:
            backend = models.resolve(model.name)
            if backend is not None:
                leaving.append(backend)
        models.swap(add=loaded, remove=leaving)
        for backend in leaving:
            self._unloads.start(models.retire(backend), f"unload {backend.info.name}")
        node.config = effective_config(old, new)
        if changes.peers_added or changes.peers_removed:
            node.peering.set_static_peers(new.peers)
        for address in changes.relays_removed:
            await node.stop_relay(address)
        for address in changes.relays_added:
            await node.start_relay(address)
        if changes.settings:
            self._apply_settings(node.config)
        if changes.models:
            node.cards.refresh()
            check_memory(node.config.models, node.profile)
        lines = changes.describe()
        logger.info("configuration reloaded: %s", "; ".join(lines) if lines else "nothing changed")
        return changes

    async def _load(self, configs: list[ModelConfig]) -> list[Backend]:
        """Load these models beside the ones serving; all or none."""
        loaded: list[Backend] = []
        try:
            for model in configs:
                backend = create_backend(model)
                try:
                    await backend.start()
                except BaseException:
                    await backend.aclose()
                    raise
                loaded.append(backend)
        except BaseException:
            for backend in loaded:
                await backend.aclose()
            raise
        return loaded

    def _apply_settings(self, config: NodeConfig) -> None:
        node = self._node
        node.entry.reschedule(
            max_wait_ms=config.max_wait_ms,
            default_privacy=Privacy(config.privacy),
            cache_aware=config.cache_aware,
        )
        node.plans.configure(config.plans)
        limits = node.http_limits
        limits.max_request_bytes = config.max_request_bytes
        limits.guard = HostGuard.build(
            bound_host=config.http_host,
            allowed_hosts=config.http_allowed_hosts,
            cors_origins=config.http_cors_origins,
        )
        # The environment's variables still win over the file, as at start.
        settings = ListenerSettings.from_environment(node.listeners.budget.nofile, config=config)
        node.http_guard.header_timeout_s = settings.http_header_timeout_s
        node.http_guard.body_idle_s = settings.http_body_idle_s
