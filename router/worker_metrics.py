"""Per-worker metrics built at scrape time from the `WorkerStats` a router already pulls (no extra RPCs).

Every router replica exports the same workers, so dashboards take `max by (deployment, pool, worker)`
before summing across workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.messages import WorkerStats

WORKER_LABELS = ("deployment", "pool", "worker")
"""`pool` is the worker's role (prefill, decode or mixed); workers are bounded by the deployments' replicas."""


class WorkerStatsCollector(Collector):
    """Gauges and counters of every worker in `source()`, vLLM's names with the `raylane_` prefix.

    Counters come from the workers' cumulative totals (they restart at 0 with a replaced worker, which
    Prometheus' `rate` treats as a reset).
    """

    def __init__(self, source: Callable[[], Iterable[WorkerStats]] | None = None) -> None:
        self.source = source
        """The latest stats of every worker; None exports no worker metrics (a router not yet started)."""

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering never calls `source` (a router has no stats before it starts).
        return list(_families())

    def collect(self) -> Iterable[Metric]:
        families = _families()
        by_name = {f.name: f for f in families}
        for stats in [] if self.source is None else list(self.source()):
            labels = [stats.deployment, stats.role, stats.worker_id]
            by_name["raylane_num_requests_running"].add_metric(labels, stats.num_running)
            by_name["raylane_num_requests_waiting"].add_metric(labels, stats.num_waiting)
            by_name["raylane_kv_cache_usage_perc"].add_metric(labels, stats.kv_usage)
            by_name["raylane_prefix_cache_queries"].add_metric(labels, stats.num_prefix_cache_queries)
            by_name["raylane_prefix_cache_hits"].add_metric(labels, stats.num_prefix_cache_hits)
            by_name["raylane_num_preemptions"].add_metric(labels, stats.num_preemptions)
            resident = stats.adapters if stats.resident_adapters is None else stats.resident_adapters
            by_name["raylane_lora_adapters_loaded"].add_metric(labels, len(resident))
            migrations = by_name["raylane_migrations"]
            migrations.add_metric([*labels, "committed"], stats.migration.num_committed)
            migrations.add_metric([*labels, "aborted"], stats.migration.num_aborted)
            by_name["raylane_migration_bytes"].add_metric(labels, stats.migration.bytes_moved)
        return families


def _families() -> list[Metric]:
    """Fresh, empty families (a collector builds new ones per scrape)."""
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return [
        gauge("raylane_num_requests_running", "Requests in the worker's running batch.", labels=WORKER_LABELS),
        gauge("raylane_num_requests_waiting", "Requests queued or preempted on the worker.", labels=WORKER_LABELS),
        gauge("raylane_kv_cache_usage_perc", "Share of the worker's KV blocks held by requests.", labels=WORKER_LABELS),
        counter("raylane_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=WORKER_LABELS),
        counter("raylane_prefix_cache_hits", "Prompt tokens served from the prefix cache.", labels=WORKER_LABELS),
        counter("raylane_num_preemptions", "Preemptions (by recompute).", labels=WORKER_LABELS),
        gauge(
            "raylane_lora_adapters_loaded",
            "LoRA adapters resident in a slot of the worker (registered ones when it reports no slots).",
            labels=WORKER_LABELS,
        ),
        counter(
            "raylane_migrations",
            "Live migrations this worker sent, by outcome (committed or aborted).",
            labels=(*WORKER_LABELS, "outcome"),
        ),
        counter("raylane_migration_bytes", "KV bytes this worker sent in live migrations.", labels=WORKER_LABELS),
    ]
