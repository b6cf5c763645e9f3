"""`/metrics`: the node in Prometheus text format (prometheus-client).

Counters and histograms move with every request the HTTP API answers (fed by the
request log's middleware, `node.api.request_log`): requests by endpoint, route, model,
status and user class; prompt and completion tokens; time to first token and duration.
Gauges are read when scraped (`LiveState`, from the daemon): queue and slots, peers by
state, relay sessions, ledger records held and how long ago each peer's ledger was last
pulled. Labels never carry a user's name, a key or a prompt: the user class is owner,
user or anonymous; a model label is set only for answered requests (a model that
exists), so a client cannot grow the label set with made-up names.

Who may read it: from the box itself (a loopback address and a loopback `Host`, no web
page's marks) without a credential, as Prometheus exporters are; from elsewhere with the
owner token or the scraper token set in config (`[metrics] token`). An API key is a 403.
Each node has its own registry, so several nodes in one process never mix figures.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from mesh.errors import MeshError, OwnerRequired, PermissionDenied
from mesh.quota.users import KEY_PREFIX, bearer_key
from node.api.http_api import cannot_be_a_page, is_owner_token
from node.api.request_log import RequestFacts

# Seconds; from a cached short answer to a long generation on a small box.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


@dataclass(frozen=True, kw_only=True)
class LiveState:
    """What the gauges show, read by the daemon at each scrape."""

    active_streams: int = 0
    queued: int = 0
    slots: int = 0
    peers_by_state: dict[str, int] = field(default_factory=dict)
    relays_connected: int = 0
    relays_configured: int = 0
    ledger_records: int = 0
    ledger_sync_age_s: dict[str, float] = field(default_factory=dict)  # peer node ID -> age


class _Live(Collector):
    def __init__(self) -> None:
        self.state = LiveState()

    def collect(self) -> Iterator[Metric]:
        s = self.state
        for name, doc, value in (
            ("allerac_active_streams", "Answers being generated on this box.", s.active_streams),
            ("allerac_queue_depth", "Requests waiting for a slot on this box.", s.queued),
            ("allerac_slots", "Generation slots of this box's models.", s.slots),
            ("allerac_ledger_records", "Usage records held (all nodes' chains).", s.ledger_records),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        peers = GaugeMetricFamily("allerac_peers", "Peers known, by state.", labels=["state"])
        for state in ("up", "suspect", "down"):
            peers.add_metric([state], s.peers_by_state.get(state, 0))
        yield peers
        relays = GaugeMetricFamily(
            "allerac_relay_sessions", "Relay sessions, by state.", labels=["state"]
        )
        relays.add_metric(["connected"], s.relays_connected)
        relays.add_metric(["disconnected"], s.relays_configured - s.relays_connected)
        yield relays
        lag = GaugeMetricFamily(
            "allerac_ledger_sync_age_seconds",
            "Seconds since this box last pulled each peer's ledger.",
            labels=["peer"],
        )
        for peer, age in sorted(s.ledger_sync_age_s.items()):
            lag.add_metric([peer], age)
        yield lag


class Metrics:
    """One node's figures; `request_done` is called by the request log for every request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "allerac_http_requests",
            "HTTP requests answered, by endpoint, route, model, status and user class.",
            ["endpoint", "route", "model", "status", "user_class"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "allerac_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["model", "route"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "allerac_completion_tokens",
            "Completion tokens of answered requests.",
            ["model", "route"],
            registry=r,
        )
        self.first_token = Histogram(
            "allerac_time_to_first_token_seconds",
            "From the request's arrival to its first token leaving.",
            ["model", "route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "allerac_request_duration_seconds",
            "From the request's arrival to its answer's end.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.quota_refusals = Counter(
            "allerac_quota_refusals", "Requests refused because a quota was used up.", registry=r
        )
        self._live = _Live()
        r.register(self._live)

    def request_done(self, endpoint: str, facts: RequestFacts) -> None:
        self.requests.labels(
            endpoint, facts.route, facts.model, str(facts.status), facts.user_class
        ).inc()
        self.duration.labels(endpoint).observe(facts.duration_s)
        if facts.model:
            self.prompt_tokens.labels(facts.model, facts.route).inc(facts.prompt_tokens)
            self.completion_tokens.labels(facts.model, facts.route).inc(facts.completion_tokens)
            if facts.first_token_s is not None:
                self.first_token.labels(facts.model, facts.route).observe(facts.first_token_s)
        if facts.error_code == "quota_exceeded":
            self.quota_refusals.inc()

    def exposition(self, live: LiveState) -> bytes:
        self._live.state = live
        return generate_latest(self.registry)


def _may_scrape(request: web.Request, scraper_token: str | None) -> None:
    if cannot_be_a_page(request) or is_owner_token(request):
        return
    authorization = request.headers.get("Authorization")
    try:
        key = bearer_key(authorization)
    except MeshError:
        key = None
    if key and scraper_token and hmac.compare_digest(key.encode(), scraper_token.encode()):
        return
    if key and key.startswith(KEY_PREFIX):
        raise PermissionDenied("/metrics is for the box's owner and its scraper, not API keys")
    raise OwnerRequired(
        "/metrics needs the owner token or the scraper token ([metrics] token) from beyond this box"
    )


def add_metrics_route(
    app: web.Application,
    metrics: Metrics,
    live: Callable[[], Awaitable[LiveState]],
    *,
    scraper_token: str | None,
) -> None:
    async def serve(request: web.Request) -> web.Response:
        _may_scrape(request, scraper_token)
        body = metrics.exposition(await live())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve)
