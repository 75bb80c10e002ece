"""Prometheus metrics of the control plane: reconcile-step durations and pool sizes.

They live in this process's `REGISTRY`, served on `ControlPlaneConfig.metrics_port` (routers serve
their own on theirs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
"""The control plane process's metrics."""

STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""A reconcile step takes microseconds when nothing changes and seconds when it starts actors."""


@dataclass(kw_only=True, frozen=True)
class PoolSize:
    """One pool's desired replicas against the workers it has."""

    deployment: str
    """Deployment the pool belongs to."""
    role: str
    """The pool's role: prefill, decode or mixed."""
    num_desired: int
    """Replicas the deployment asks for."""
    num_by_state: Mapping[str, int] = field(default_factory=dict)
    """Workers per state (starting, healthy, dead)."""


class ControlPlaneMetrics:
    """The control plane's metrics in one registry. One per registry: metric names register only once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.step_duration = Histogram(
            "raylane_reconcile_step_duration_seconds",
            "Duration of each reconcile sub-step (pools, health, adapters, rebalance).",
            ("step",),
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.step_errors = Counter(
            "raylane_reconcile_step_errors",
            "Reconcile sub-steps that raised (logged and retried).",
            ("step",),
            registry=registry,
        )
        self._pools = _PoolCollector()
        registry.register(self._pools)

    def on_step(self, step: str, duration_s: float, *, is_failed: bool) -> None:
        self.step_duration.labels(step).observe(duration_s)
        if is_failed:
            self.step_errors.labels(step).inc()

    def set_pools(self, sizes: Iterable[PoolSize]) -> None:
        """The pool sizes to export until the next call (the reconcile loop's latest pass)."""
        self._pools.sizes = tuple(sizes)


class _PoolCollector(Collector):
    def __init__(self) -> None:
        self.sizes: tuple[PoolSize, ...] = ()

    def collect(self) -> Iterable[Metric]:
        desired = GaugeMetricFamily(
            "raylane_pool_desired_workers", "Replicas a pool's deployment asks for.", labels=("deployment", "pool")
        )
        workers = GaugeMetricFamily(
            "raylane_pool_workers", "Workers a pool has, by state.", labels=("deployment", "pool", "state")
        )
        for size in self.sizes:
            desired.add_metric([size.deployment, size.role], size.num_desired)
            for state, num in sorted(size.num_by_state.items()):
                workers.add_metric([size.deployment, size.role, state], num)
        return [desired, workers]


_process_metrics: ControlPlaneMetrics | None = None


def process_metrics() -> ControlPlaneMetrics:
    """This process's `ControlPlaneMetrics` on `REGISTRY`, created on first use."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = ControlPlaneMetrics(REGISTRY)
    return _process_metrics
