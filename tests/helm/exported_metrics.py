"""The metrics raylane really exports, as Prometheus reads them: the production metrics objects on fresh registries,
fed one of everything they count, written by `generate_latest` and read back by prometheus_client's parser.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.metrics import ControlPlaneMetrics, PoolSize
from router.auth_limit import AuthFailureLimiter, auth_limit_metrics
from router.errors import ResourceExhausted
from router.metrics import RouterMetrics
from workers.messages import MigrationStats, WorkerStats

PROMETHEUS_OPERATOR_LABELS = frozenset({"namespace", "service", "pod", "container", "endpoint", "job", "instance"})
"""Labels the Prometheus Operator puts on every series a ServiceMonitor scrapes."""
CHART_RELABELLED = frozenset({"component", "worker_group"})
"""Labels the chart's ServiceMonitor adds with its relabelings (test_dashboard_metrics checks the rendered ones)."""
SCRAPE_LABELS = PROMETHEUS_OPERATOR_LABELS | CHART_RELABELLED
"""Labels every scraped series carries besides its own; a metric's own label of the same name would be renamed
`exported_<name>` by Prometheus, so raylane's metrics must not use them."""


@dataclass(frozen=True)
class Exposition:
    """What `/metrics` of a router and of the control plane hold together."""

    samples: dict[str, frozenset[str]]
    """Sample name (`x_total`, `x_bucket`, `x_sum`, `x_count`, `x_created`, or the gauge's name) -> its labels."""
    families: dict[str, tuple[str, ...]]
    """Family name (the `# TYPE` line's) -> the names of its samples; empty when nothing fed it."""


@functools.cache
def exposition() -> Exposition:
    router_registry, control_plane_registry = CollectorRegistry(), CollectorRegistry()
    _feed_router(RouterMetrics(router_registry), router_registry)
    _feed_control_plane(ControlPlaneMetrics(control_plane_registry))
    samples: dict[str, set[str]] = {}
    families: dict[str, tuple[str, ...]] = {}
    for registry in (router_registry, control_plane_registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            families[family.name] = tuple(dict.fromkeys(s.name for s in family.samples))
            for sample in family.samples:
                samples.setdefault(sample.name, set()).update(sample.labels)
    return Exposition(samples={k: frozenset(v) for k, v in samples.items()}, families=families)


def _feed_router(metrics: RouterMetrics, registry: CollectorRegistry) -> None:
    """One streamed request (two chunks), one refused, one placement, one worker's stats, one auth lockout."""
    request = metrics.start_request()
    request.bind("chat", "acme")
    request.on_placed()
    request.on_tokens(1)
    request.on_tokens(2)
    request.on_finished("stop", num_prompt_tokens=5)
    request.on_end(None)
    refused = metrics.start_request()
    refused.bind("chat", "acme")
    refused.on_rejected("quota")
    refused.on_end(ResourceExhausted("tokens per minute exceeded"))
    metrics.on_routed("least_loaded", "chat", ["mixed"])
    stats = WorkerStats(
        worker_id="chat-mixed-0",
        deployment="chat",
        role="mixed",
        num_running=1,
        num_waiting=1,
        kv_blocks_used=2,
        kv_blocks_total=8,
        kv_usage=0.25,
        output_tokens_per_s=1.0,
        num_generated_tokens=3,
        prefix_cache_hit_rate=0.5,
        num_prefix_cache_queries=4,
        num_prefix_cache_hits=2,
        num_preemptions=1,
        adapters=["support"],
        expert_counts={},
        kv_bytes_per_block=1024,
        migration=MigrationStats(num_started=1, num_committed=1, bytes_moved=2048),
    )
    metrics.watch_workers(lambda: [stats])
    limiter = AuthFailureLimiter(metrics=auth_limit_metrics(registry))
    for _ in range(limiter.config.max_failures):
        limiter.record_failure("10.0.0.1")


def _feed_control_plane(metrics: ControlPlaneMetrics) -> None:
    metrics.on_step("pools", 0.002, is_failed=True)
    metrics.set_pools([PoolSize(deployment="chat", role="mixed", num_desired=2, num_by_state={"healthy": 1})])
