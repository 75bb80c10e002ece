"""Prometheus metrics of a router process, named after vLLM's (`vllm:x` -> `raylane_x`).

Every metric lives in `REGISTRY`, one per process; `render()` is what `/metrics` serves.
`RouterMetrics` records the request path (`RouterCore` calls it); the worker gauges and counters
come from the stats the router already pulls, read at scrape time by `WorkerStatsCollector`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server

from router.errors import RouterError, Status
from router.worker_metrics import WorkerStatsCollector
from workers.messages import WorkerStats

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's metrics (not prometheus_client's global registry, so tests can build their own)."""

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
"""Time-to-first-token buckets: vLLM's, down to a millisecond (tiny models answer that fast)."""
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
"""Gap between two token chunks of one stream."""
REQUEST_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0)
"""Whole-request and queueing durations."""

OK_STATUS = "OK"
"""`raylane_requests_total{status}` of a request whose stream ended normally; failures carry their gRPC code name."""


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class _Children:
    """One (deployment, tenant)'s labelled children, looked up once so the token path does no label lookups."""

    ttft: Any
    itl: Any
    e2e: Any
    queue_time: Any
    prompt_tokens: Any
    generation_tokens: Any


class RouterMetrics:
    """The router's request metrics in one registry. One per registry: metric names register only once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._init_request_metrics(registry)
        self._init_routing_metrics(registry)
        self.workers = WorkerStatsCollector()
        registry.register(self.workers)
        self._children: dict[tuple[str, str], _Children] = {}
        """(deployment, tenant) -> its children; bounded because both come from validated config."""

    def _init_request_metrics(self, registry: CollectorRegistry) -> None:
        by_deployment = ("deployment",)
        by_tenant = ("deployment", "tenant")
        self.ttft = Histogram(
            "raylane_time_to_first_token_seconds",
            "From arrival at the router to the first token chunk.",
            by_deployment,
            buckets=TTFT_BUCKETS_S,
            registry=registry,
        )
        self.itl = Histogram(
            "raylane_inter_token_latency_seconds",
            "Gap between consecutive token chunks of one stream.",
            by_deployment,
            buckets=ITL_BUCKETS_S,
            registry=registry,
        )
        self.e2e = Histogram(
            "raylane_e2e_request_latency_seconds",
            "From arrival at the router to the finished chunk.",
            by_deployment,
            buckets=REQUEST_BUCKETS_S,
            registry=registry,
        )
        self.queue_time = Histogram(
            "raylane_request_queue_time_seconds",
            "From arrival to placement on a worker: authentication, quota and the admission queue.",
            by_deployment,
            buckets=REQUEST_BUCKETS_S,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "raylane_prompt_tokens", "Prompt tokens of finished requests (their usage).", by_tenant, registry=registry
        )
        self.generation_tokens = Counter(
            "raylane_generation_tokens", "Tokens streamed to clients.", by_tenant, registry=registry
        )
        self.success = Counter(
            "raylane_request_success",
            "Requests whose stream finished, by finish reason (stop, length, abort).",
            (*by_tenant, "finished_reason"),
            registry=registry,
        )
        self.requests = Counter(
            "raylane_requests",
            "Requests by the gRPC status they ended with (OK, INVALID_ARGUMENT, CANCELLED, ...); deployment and "
            "tenant are empty when the request failed before validation.",
            (*by_tenant, "status"),
            registry=registry,
        )

    def _init_routing_metrics(self, registry: CollectorRegistry) -> None:
        self.routing_decisions = Counter(
            "raylane_routing_decisions",
            "Placements made by the routing policy, per pool role placed on (failover re-placements included), by "
            "the policy term that most separated the chosen worker from the runner-up (only_candidate, tie, or "
            "none for policies without terms).",
            ("policy", "deployment", "pool", "term"),
            registry=registry,
        )
        self.admission_rejections = Counter(
            "raylane_admission_rejections",
            "Requests refused before placement: quota, queue_full (admission queue), wait_timeout (no KV capacity "
            "in time), no_capacity (no healthy worker).",
            ("deployment", "tenant", "reason"),
            registry=registry,
        )

    def start_request(self) -> RequestMetrics:
        """A new request arrived now; the returned tracker records the rest of its life."""
        return RequestMetrics(self, time.perf_counter())

    def children(self, deployment: str, tenant: str) -> _Children:
        key = (deployment, tenant)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(
                ttft=self.ttft.labels(deployment),
                itl=self.itl.labels(deployment),
                e2e=self.e2e.labels(deployment),
                queue_time=self.queue_time.labels(deployment),
                prompt_tokens=self.prompt_tokens.labels(deployment, tenant),
                generation_tokens=self.generation_tokens.labels(deployment, tenant),
            )
        return children

    def on_routed(
        self, policy: str, deployment: str, roles: Iterable[str], terms: Mapping[str, str] | None = None
    ) -> None:
        """The policy placed a request of `deployment` on workers of `roles`; `terms`: role -> deciding term."""
        for role in roles:
            self.routing_decisions.labels(policy, deployment, role, (terms or {}).get(role, "none")).inc()

    def on_rejected(self, reason: str, deployment: str, tenant: str) -> None:
        self.admission_rejections.labels(deployment, tenant, reason).inc()

    def watch_workers(self, source: Callable[[], Iterable[WorkerStats]]) -> None:
        """Export the worker stats `source` returns at each scrape (replaces the previous source)."""
        self.workers.source = source


class RequestMetrics:
    """One request's timestamps and labelled children; `RouterCore.generate` drives it."""

    __slots__ = ("_arrival", "_children", "_is_finished", "_last_chunk", "_metrics", "deployment", "tenant")

    def __init__(self, metrics: RouterMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last_chunk = 0.0
        self._children: _Children | None = None
        self._is_finished = False
        self.deployment = ""
        self.tenant = ""

    def bind(self, deployment: str, tenant: str) -> None:
        """The request passed validation: from now on it is counted under its deployment and tenant."""
        self.deployment, self.tenant = deployment, tenant
        self._children = self._metrics.children(deployment, tenant)

    def on_placed(self) -> None:
        assert self._children is not None, "bind() first"
        self._children.queue_time.observe(time.perf_counter() - self._arrival)

    def on_tokens(self, num_tokens: int) -> None:
        """A chunk with `num_tokens` (> 0) tokens is about to reach the client."""
        now = time.perf_counter()
        children = self._children
        assert children is not None, "bind() first"
        if self._last_chunk:
            children.itl.observe(now - self._last_chunk)
        else:
            children.ttft.observe(now - self._arrival)
        self._last_chunk = now
        children.generation_tokens.inc(num_tokens)

    def on_finished(self, finish_reason: str, num_prompt_tokens: int) -> None:
        children = self._children
        assert children is not None, "bind() first"
        self._is_finished = True
        children.e2e.observe(time.perf_counter() - self._arrival)
        children.prompt_tokens.inc(num_prompt_tokens)
        self._metrics.success.labels(self.deployment, self.tenant, finish_reason).inc()

    def on_rejected(self, reason: str) -> None:
        self._metrics.on_rejected(reason, self.deployment, self.tenant)

    def on_end(self, error: BaseException | None) -> None:
        """The request is over: its stream ended, or `error` ended it (a client leaving after the finished
        chunk still counts as OK)."""
        self._metrics.requests.labels(self.deployment, self.tenant, self._status(error)).inc()

    def _status(self, error: BaseException | None) -> str:
        if error is None or self._is_finished:
            return OK_STATUS
        if isinstance(error, RouterError):
            return error.status.value
        if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
            return Status.CANCELLED.value
        return Status.UNAVAILABLE.value  # what the servicer answers for an unexpected failure


_process_metrics: RouterMetrics | None = None


def process_metrics() -> RouterMetrics:
    """This process's `RouterMetrics` on `REGISTRY`, created on first use (what `/metrics` serves)."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = RouterMetrics(REGISTRY)
    return _process_metrics


class MetricsServer:
    """A `/metrics` HTTP endpoint for one registry on its own port, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        """Binds now; raises `OSError` when the port is taken."""
        self._server, self._thread = _start_http_server(port, host, registry=registry)
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int, *, what: str) -> MetricsServer | None:
    """Serve `registry` on `host:port` (0: a free port); a taken port is logged, never fatal (metrics are optional)."""
    try:
        server = MetricsServer(registry, host, port)
    except OSError as exc:
        logger.warning("metrics endpoint not started what=%s host=%s port=%d error=%s", what, host, port, exc)
        return None
    logger.info("metrics endpoint started what=%s address=%s:%d", what, host, server.port)
    return server
