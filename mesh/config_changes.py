"""What changed between two configurations, and which changes a running node applies.

A node reloads its configuration on SIGHUP and when its models are added or removed
(`allerac models add/remove`); both go through one path (`node.reconfigure`), which asks
this module what changed. Models, static peers, relays, the scheduler's settings and the
HTTP API's per-request limits and allow-lists are applied at once; everything else (ports,
addresses, connection totals, mDNS, the display name, the cloud plan) is reported as
waiting for the next start, since applying it means rebinding sockets or re-announcing the
node. Pure: two `NodeConfig` values in, a `ConfigChanges` value out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mesh.config import ModelConfig, NodeConfig
from mesh.quota.plans import Plan

# NodeConfig fields a running node applies at once (beyond models, peers and relays).
LIVE_FIELDS = (
    "max_wait_ms",
    "privacy",
    "cache_aware",
    "max_request_bytes",
    "http_allowed_hosts",
    "http_cors_origins",
    "http_header_timeout_s",
    "http_body_idle_timeout_s",
    "plans",
    "prices",  # read by `allerac usage --cost`, not by the node
    "currency",
)
_LISTS = ("models", "peers", "relays")


def config_key(field_name: str) -> str:
    """The config file's name for a NodeConfig field: `http_port` -> `http.port`."""
    if field_name in ("max_wait_ms", "privacy", "cache_aware"):
        return f"scheduler.{field_name}"
    for table in ("http", "grpc"):
        if field_name.startswith(f"{table}_"):
            return f"{table}.{field_name[len(table) + 1 :]}"
    if field_name == "max_request_bytes":
        return "http.max_request_bytes"
    return field_name


@dataclass(frozen=True, kw_only=True)
class ConfigChanges:
    models_added: tuple[ModelConfig, ...] = ()
    models_removed: tuple[ModelConfig, ...] = ()
    models_changed: tuple[tuple[ModelConfig, ModelConfig], ...] = ()  # (old, new)
    peers_added: tuple[str, ...] = ()
    peers_removed: tuple[str, ...] = ()
    relays_added: tuple[str, ...] = ()
    relays_removed: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # applied: "scheduler.max_wait_ms: 0 -> 250"
    at_next_start: tuple[str, ...] = ()  # changed in the file, applied when the node restarts

    @property
    def models(self) -> bool:
        return bool(self.models_added or self.models_removed or self.models_changed)

    @property
    def applied(self) -> bool:
        return bool(
            self.models
            or self.peers_added
            or self.peers_removed
            or self.relays_added
            or self.relays_removed
            or self.settings
        )

    def describe(self) -> list[str]:
        """One line per change, as the log and the admin answer say it."""
        lines = [f"model {m.name} added ({m.where})" for m in self.models_added]
        lines += [f"model {m.name} removed" for m in self.models_removed]
        lines += [
            f"model {new.name} changed ({_model_diff(old, new)})"
            for old, new in self.models_changed
        ]
        lines += [f"peer {p} added" for p in self.peers_added]
        lines += [f"peer {p} removed" for p in self.peers_removed]
        lines += [f"relay {r} added" for r in self.relays_added]
        lines += [f"relay {r} removed" for r in self.relays_removed]
        lines += list(self.settings)
        lines += [f"{line} (applies at the next start)" for line in self.at_next_start]
        return lines


def _model_diff(old: ModelConfig, new: ModelConfig) -> str:
    keys = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if getattr(old, f.name) != getattr(new, f.name)
    ]
    return ", ".join(keys) or "nothing"


def _show(value: object) -> str:
    if isinstance(value, tuple):
        shown = (v.describe() if isinstance(v, Plan) else str(v) for v in value)
        return "[" + ", ".join(shown) + "]"
    return "default" if value is None else str(value)


def config_changes(old: NodeConfig, new: NodeConfig) -> ConfigChanges:
    """What `new` changes in `old`."""
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    settings: list[str] = []
    later: list[str] = []
    for f in dataclasses.fields(NodeConfig):
        if f.name in _LISTS:
            continue
        was, now = getattr(old, f.name), getattr(new, f.name)
        if was == now:
            continue
        line = f"{config_key(f.name)}: {_show(was)} -> {_show(now)}"
        (settings if f.name in LIVE_FIELDS else later).append(line)
    return ConfigChanges(
        models_added=tuple(m for name, m in after.items() if name not in before),
        models_removed=tuple(m for name, m in before.items() if name not in after),
        models_changed=tuple(
            (before[name], m) for name, m in after.items() if name in before and before[name] != m
        ),
        peers_added=tuple(p for p in new.peers if p not in old.peers),
        peers_removed=tuple(p for p in old.peers if p not in new.peers),
        relays_added=tuple(r for r in new.relays if r not in old.relays),
        relays_removed=tuple(r for r in old.relays if r not in new.relays),
        settings=tuple(settings),
        at_next_start=tuple(later),
    )


def effective_config(old: NodeConfig, new: NodeConfig) -> NodeConfig:
    """What a running node holds after applying `new`: its live parts, and `old`'s values
    for what waits for the next start."""
    kept = {
        f.name: getattr(old, f.name)
        for f in dataclasses.fields(NodeConfig)
        if f.name not in _LISTS and f.name not in LIVE_FIELDS
    }
    return dataclasses.replace(new, **kept)
