"""The reconcile logic: make the worker pools match the desired state in the store.

`Controller` is plain Python over a `StateStore` and `PoolManager`s; the `ControlPlane` actor runs
`reconcile_once` in a loop that never dies. Each sub-step is wrapped on its own, so a failing
step (a dead Redis, an actor that will not start) is logged, counted and retried next loop while
the other steps still run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from prometheus_client import CollectorRegistry

from control_plane.adoption import WorkerRegistry
from control_plane.metrics import ControlPlaneMetrics, PoolSize
from control_plane.migrations import MigrationTriggerConfig, MigrationTriggers, WorkerRef
from control_plane.pools import PoolKey, PoolManager
from control_plane.spec import DeploymentSpec, PoolSpec
from control_plane.state import StateSnapshot, StateStore
from router.complexity import TierGroup
from router.quota import QuotaLimits
from router.server import RoutingState, WorkerEntry
from router.table import DeploymentRoute, RoutingTable
from workers.actors import WorkerConfig
from workers.engine.config import EngineConfig, ModelConfig
from workers.messages import WorkerStats

logger = logging.getLogger(__name__)


@dataclass
class ReconcileStats:
    """Counters of the reconcile loop, reported by `raylane status`."""

    num_loops: int = 0
    num_errors: int = 0
    num_workers_replaced: int = 0
    num_rebalance_migrations: int = 0
    """Migrations the periodic rebalancer started."""
    num_rebalance_committed: int = 0
    """Of those, committed."""
    last_loop_ms: float = 0.0
    step_ms: dict[str, float] = field(default_factory=dict)
    """Duration of each sub-step in the last loop."""


@dataclass(kw_only=True, frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    state: str
    stats: WorkerStats | None = None
    is_draining: bool = False


@dataclass(kw_only=True, frozen=True)
class PoolInfo:
    deployment: str
    role: str
    desired_replicas: int
    workers: tuple[WorkerInfo, ...] = ()


def engine_config(spec: DeploymentSpec) -> EngineConfig:
    """The engine every worker of `spec` runs."""
    return spec.engine.engine_config(model=spec.model, dtype=spec.dtype, num_threads=1)


def pool_fingerprint(spec: DeploymentSpec, pool: PoolSpec) -> tuple:
    """What, when changed, means a pool's workers must be restarted (replica count alone does not)."""
    return (spec.model, spec.dtype, spec.engine, pool.num_cpus, pool.num_gpus)


def routing_table(snapshot: StateSnapshot) -> RoutingTable:
    """The router's view of the desired state."""
    return RoutingTable(
        version=snapshot.version,
        deployments={
            name: DeploymentRoute(
                name=name, is_disaggregated=spec.is_disaggregated, max_model_len=model_context(spec.model)
            )
            for name, spec in snapshot.deployments.items()
        },
        tenants={
            name: QuotaLimits(
                max_concurrent=t.quota.max_concurrent,
                tokens_per_minute=t.quota.tokens_per_minute,
                burst_tokens=t.quota.burst_tokens,
            )
            for name, t in snapshot.tenants.items()
        },
        key_hashes=dict(snapshot.key_hashes),
        adapter_owners={key: adapter.tenant for key, adapter in snapshot.adapters.items()},
        groups=tier_groups(snapshot.deployments),
    )


def model_context(model: str) -> int | None:
    """The context the deployment's engines run with (`EngineConfig.max_model_len` unset: the model's own), read
    from its `config.json`, so routers refuse over-long requests before charging quota; None where unreadable."""
    try:
        return ModelConfig.from_pretrained(model).max_position_embeddings
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("model context unknown model=%s error=%s (workers check lengths alone)", model, exc)
        return None


def tier_groups(deployments: Mapping[str, DeploymentSpec]) -> dict[str, TierGroup]:
    """Groups with exactly one small and one large deployment; any other shape is logged and left unroutable."""
    members: dict[str, dict[str, list[str]]] = {}
    for name, spec in sorted(deployments.items()):
        if spec.group:
            members.setdefault(spec.group, {"small": [], "large": []})[spec.tier].append(name)
    groups = {}
    for group, tiers in members.items():
        if group in deployments or len(tiers["small"]) != 1 or len(tiers["large"]) != 1:
            logger.warning(
                "tier group not routable group=%s small=%s large=%s (needs one of each, and a name no deployment has)",
                group,
                tiers["small"],
                tiers["large"],
            )
            continue
        groups[group] = TierGroup(small=tiers["small"][0], large=tiers["large"][0])
    return groups


class Controller:
    """Desired state (the store) versus actual state (the pools), and the views derived from both."""

    def __init__(
        self,
        store: StateStore,
        *,
        make_pool: Callable[..., PoolManager] = PoolManager,
        rebalance_interval_s: float = 0.0,
        triggers: MigrationTriggerConfig | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        """`rebalance_interval_s` > 0 runs the migration rebalancer at most that often (0: never)."""
        if rebalance_interval_s < 0:
            raise ValueError(f"rebalance_interval_s must be >= 0 (0 disables), got {rebalance_interval_s}")
        self.store = store
        self._make_pool = make_pool
        # Pools record their workers here and adopt the ones a previous control plane left running.
        self._registry = WorkerRegistry(store)
        # Reconcile passes and a drain's final stop both change pools; they take turns.
        self._lock = threading.RLock()
        self.triggers = MigrationTriggers(lambda: self.pools, stop_worker=self._stop_drained, config=triggers)
        self.rebalance_interval_s = rebalance_interval_s
        self._last_rebalance = 0.0
        self.pools: dict[PoolKey, PoolManager] = {}
        self._fingerprints: dict[PoolKey, tuple] = {}
        self._desired_replicas: dict[PoolKey, int] = {}
        self._loaded_adapters: dict[str, set[str]] = {}
        self._deployment_adapters: dict[str, tuple[tuple[str, str], ...]] = {}
        self._routing_cache: tuple[int, RoutingTable, dict[str, str]] | None = None
        self.stats = ReconcileStats()
        # A private registry by default: only the control plane process's one is served.
        self.metrics = metrics or ControlPlaneMetrics(CollectorRegistry())

    # ---- the loop body ------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        """One pass; never raises."""
        start = time.perf_counter()
        with self._lock:
            for name, step in (("pools", self._sync_pools), ("health", self._heal), ("adapters", self._sync_adapters)):
                self._run_step(name, step)
            self.metrics.set_pools(self._pool_sizes())
        # Outside the lock: a rebalance waits on migrations, and a drain's stop must not wait on it.
        if self.rebalance_interval_s and time.monotonic() - self._last_rebalance >= self.rebalance_interval_s:
            self._last_rebalance = time.monotonic()
            self._run_step("rebalance", self._rebalance)
        self.stats.num_loops += 1
        self.stats.last_loop_ms = (time.perf_counter() - start) * 1e3

    def _run_step(self, name: str, step: Callable[[], None]) -> None:
        step_start = time.perf_counter()
        is_failed = False
        try:
            step()
        except Exception:
            is_failed = True
            self.stats.num_errors += 1
            logger.exception("reconcile step failed step=%s", name)
        finally:
            duration_s = time.perf_counter() - step_start
            self.stats.step_ms[name] = duration_s * 1e3
            self.metrics.on_step(name, duration_s, is_failed=is_failed)

    def _pool_sizes(self) -> list[PoolSize]:
        """Desired against actual workers per pool (under the lock: the pools do not change meanwhile)."""
        return [
            PoolSize(
                deployment=key.deployment,
                role=key.role,
                num_desired=self._desired_replicas.get(key, 0),
                num_by_state=collections.Counter(pool.worker_states().values()),
            )
            for key, pool in self.pools.items()
        ]

    def _sync_pools(self) -> None:
        desired = {
            PoolKey(deployment=spec.name, role=pool.role): (spec, pool)
            for spec in self.store.list_deployments()
            for pool in spec.pools
        }
        for key in list(self.pools):
            if key not in desired:
                self._remove_pool(key, reason="deployment deleted")
        adapters = self.store.list_adapters()
        for key, (spec, pool) in desired.items():
            fingerprint = pool_fingerprint(spec, pool)
            deployment_adapters = tuple((a.name, a.path) for a in adapters if a.deployment == spec.name)
            self._deployment_adapters[spec.name] = deployment_adapters
            if key in self.pools and self._fingerprints[key] != fingerprint:
                self._remove_pool(key, reason="spec changed")
            if key not in self.pools:
                self.pools[key] = self._make_pool(
                    key,
                    num_cpus=pool.num_cpus,
                    num_gpus=pool.num_gpus,
                    make_config=self._config_factory(spec, pool.role),
                    registry=self._registry,
                )
                self._fingerprints[key] = fingerprint
                logger.info("pool created deployment=%s role=%s replicas=%d", key.deployment, key.role, pool.replicas)
            if self._desired_replicas.get(key) != pool.replicas:
                logger.info(
                    "pool scaled deployment=%s role=%s from=%s to=%d",
                    key.deployment,
                    key.role,
                    self._desired_replicas.get(key),
                    pool.replicas,
                )
            self._desired_replicas[key] = pool.replicas
            started = self.pools[key].ensure_replicas(pool.replicas)
            for worker_id in started:
                self._loaded_adapters[worker_id] = {name for name, _ in deployment_adapters}

    def _heal(self) -> None:
        for key, pool in list(self.pools.items()):
            for worker_id in pool.check_health():
                logger.warning("worker dead deployment=%s role=%s worker_id=%s", key.deployment, key.role, worker_id)
                pool.replace(worker_id)
                self._loaded_adapters.pop(worker_id, None)
                self.stats.num_workers_replaced += 1
                self.store.append_event("worker_replaced", worker_id=worker_id, deployment=key.deployment)

    def _sync_adapters(self) -> None:
        """Adapters registered after a worker started are pushed to it."""
        adapters = self.store.list_adapters()
        for key, pool in list(self.pools.items()):
            wanted = {a.name: a.path for a in adapters if a.deployment == key.deployment}
            for worker_id, handle in pool.workers().items():
                loaded = self._loaded_adapters.setdefault(worker_id, set(wanted))
                for name in sorted(set(wanted) - loaded):
                    ray.get(handle.add_lora.remote(name, wanted[name]), timeout=30)
                    loaded.add(name)
                    logger.info("adapter pushed worker_id=%s adapter=%s", worker_id, name)

    def _rebalance(self) -> None:
        reports = self.triggers.rebalance_once()
        self.stats.num_rebalance_migrations += len(reports)
        self.stats.num_rebalance_committed += sum(r.outcome == "committed" for r in reports)

    def _stop_drained(self, ref: WorkerRef, scale_down: bool) -> None:
        """Stop a drained worker; with `scale_down`, its pool's desired replicas drop by one so none replaces it."""
        with self._lock:
            if scale_down:
                self._lower_replicas(ref.key)
            pool = self.pools.get(ref.key)
            if pool is not None and ref.worker_id in pool.workers():
                pool.remove(ref.worker_id)
                self._loaded_adapters.pop(ref.worker_id, None)
            self.store.append_event("worker_drained", worker_id=ref.worker_id, scale_down=int(scale_down))

    def _lower_replicas(self, key: PoolKey) -> None:
        found = self.store.get_deployment(key.deployment)
        if found is None:
            return
        spec, version = found
        pools = tuple(
            dataclasses.replace(p, replicas=max(p.replicas - 1, 0)) if p.role == key.role else p for p in spec.pools
        )
        self.store.put_deployment(dataclasses.replace(spec, pools=pools), expected_version=version)
        desired = next(p.replicas for p in pools if p.role == key.role)
        self._desired_replicas[key] = desired
        logger.info("pool scaled deployment=%s role=%s to=%d reason=drain", key.deployment, key.role, desired)

    def _remove_pool(self, key: PoolKey, *, reason: str) -> None:
        pool = self.pools.pop(key)
        for worker_id in pool.workers():
            self._loaded_adapters.pop(worker_id, None)
        pool.shutdown()
        self._fingerprints.pop(key, None)
        self._desired_replicas.pop(key, None)
        logger.info("pool removed deployment=%s role=%s reason=%s", key.deployment, key.role, reason)

    def _config_factory(self, spec: DeploymentSpec, role: str) -> Callable[[str], WorkerConfig]:
        engine = engine_config(spec)

        def make(worker_id: str) -> WorkerConfig:
            # A (re)started worker loads the adapters registered as of the last `_sync_pools`.
            adapters = self._deployment_adapters.get(spec.name, ())
            return WorkerConfig(worker_id=worker_id, deployment=spec.name, role=role, engine=engine, adapters=adapters)

        return make

    # ---- views --------------------------------------------------------------------------------

    def routing_state(self) -> RoutingState:
        # Every router asks twice a second; the desired state changes rarely, so re-read it only on a new version.
        cached = self._routing_cache
        if cached is None or cached[0] != self.store.version():
            snapshot = self.store.snapshot()
            models = {name: spec.model for name, spec in snapshot.deployments.items()}
            cached = self._routing_cache = (snapshot.version, routing_table(snapshot), models)
        _, table, models = cached
        workers: dict[str, WorkerEntry] = {}
        for key, pool in list(self.pools.items()):
            for worker_id, handle in pool.workers().items():
                if worker_id in self.triggers.draining:
                    continue  # routers place nothing new on it; its streams keep their own handles
                workers[worker_id] = WorkerEntry(
                    worker_id=worker_id, deployment=key.deployment, role=key.role, handle=handle
                )
        return RoutingState(table=table, workers=workers, models=models)

    def pool_infos(self, deployment: str = "", timeout_s: float = 2.0) -> list[PoolInfo]:
        """Every pool (or one deployment's) with its workers' live stats."""
        pools = [(k, p) for k, p in list(self.pools.items()) if not deployment or k.deployment == deployment]
        refs: dict[str, Any] = {}
        for _, pool in pools:
            for worker_id, handle in pool.workers().items():
                refs[worker_id] = handle.stats.remote()
        stats: dict[str, WorkerStats] = {}
        if refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
            ready_set = set(ready)
            for worker_id, ref in refs.items():
                if ref in ready_set:
                    try:
                        stats[worker_id] = ray.get(ref)
                    except Exception:
                        logger.debug("stats failed worker_id=%s", worker_id)
        infos = []
        for key, pool in pools:
            workers = tuple(
                WorkerInfo(
                    worker_id=wid,
                    role=key.role,
                    state=state,
                    stats=stats.get(wid),
                    is_draining=wid in self.triggers.draining,
                )
                for wid, state in sorted(pool.worker_states().items())
            )
            infos.append(
                PoolInfo(
                    deployment=key.deployment,
                    role=key.role,
                    desired_replicas=self._desired_replicas.get(key, 0),
                    workers=workers,
                )
            )
        return infos

    def shutdown(self) -> None:
        for key in list(self.pools):
            self._remove_pool(key, reason="shutdown")
