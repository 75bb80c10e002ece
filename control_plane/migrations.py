"""Live-migration triggers in the control plane: move one request, drain a worker, rebalance periodically.

The workers do the moving (`LLMWorker.migrate_out`, a multi-stage KV pre-copy); this module decides
what moves where and when. Routers follow a moved stream by themselves (`router/dispatch.py`), so
nothing here talks to them: a draining worker simply leaves the routing state, and a worker stopped
with requests still on it is failed over by the routers.

Runs in the control plane's threads (the admin servicer and the reconcile loop), so Ray calls block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from control_plane.migration_policy import (
    MigrationHistory,
    MigrationPolicyConfig,
    WorkerView,
    plan_drain,
    plan_rebalance,
)
from control_plane.pools import HEALTHY, PoolKey, PoolManager
from control_plane.state import NotFoundError
from workers.messages import MigrationConfig, MigrationReport, RunningRequestInfo, WorkerStats

logger = logging.getLogger(__name__)

MIGRATABLE_ROLES = ("decode", "mixed")
"""Roles whose workers hold decoding requests (a prefill worker keeps nothing between calls)."""


@dataclass(kw_only=True, frozen=True)
class MigrationTriggerConfig:
    """How the control plane's migration triggers run."""

    migration: MigrationConfig = field(default_factory=MigrationConfig)
    """Passed to every `migrate_out` (stages, last-stage size, timeouts)."""
    policy: MigrationPolicyConfig = field(default_factory=MigrationPolicyConfig)
    """What the rebalancer and drains move where (`control_plane/migration_policy.py`), and its rate limits."""
    call_timeout_s: float = 5.0
    """Limit on one `stats`/`running_requests` call to a worker."""
    migrate_timeout_s: float = 120.0
    """Limit on one whole `migrate_out`; past it the migration counts as aborted here."""
    drain_timeout_s: float = 120.0
    """Default time a drain keeps moving requests before it stops the worker anyway."""
    drain_poll_s: float = 0.1
    """Pause between drain rounds while requests are still waiting (they move once running)."""
    drain_stop_grace_s: float = 0.5
    """Pause after a drained worker's last stream ended before it is killed, so that stream's last chunk
    (the hand-over to the migration destination) is surely at its router."""

    def __post_init__(self) -> None:
        if self.drain_stop_grace_s < 0:
            raise ValueError(f"drain_stop_grace_s must be >= 0, got {self.drain_stop_grace_s}")
        for name in ("call_timeout_s", "migrate_timeout_s", "drain_timeout_s", "drain_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True, frozen=True)
class DrainReport:
    """What a drain did."""

    worker_id: str
    """The drained worker."""
    migrations: tuple[MigrationReport, ...] = ()
    """Every migration tried, committed or not."""
    num_remaining: int = 0
    """Requests (running or waiting) still on the worker when it was stopped; the routers fail them over."""
    stopped: bool = False
    """The worker was stopped."""


@dataclass(kw_only=True, frozen=True)
class WorkerRef:
    """A live worker the triggers may move requests from or to."""

    worker_id: str
    key: PoolKey
    handle: Any


class MigrationTriggers:
    """Moves requests between the workers of `pools()`; `stop_worker` removes a drained worker for good."""

    def __init__(
        self,
        pools: Callable[[], Mapping[PoolKey, PoolManager]],
        *,
        stop_worker: Callable[[WorkerRef, bool], None],
        config: MigrationTriggerConfig | None = None,
    ) -> None:
        self._pools = pools
        self._stop_worker = stop_worker
        self.config = config or MigrationTriggerConfig()
        self.draining: set[str] = set()
        """Workers being drained: out of the routing state, never a migration destination."""
        self._last_started: dict[str, float] = {}
        """Worker id -> `time.monotonic()` of the last rebalancing migration touching it (the rate limit)."""

    # ---- queries ------------------------------------------------------------------------------

    def workers(self, *, roles: tuple[str, ...] = MIGRATABLE_ROLES) -> dict[str, WorkerRef]:
        """Live, healthy workers in `roles`, by id."""
        found = {}
        for key, pool in list(self._pools().items()):
            if key.role not in roles:
                continue
            states = pool.worker_states()
            for worker_id, handle in pool.workers().items():
                if states.get(worker_id) == HEALTHY:
                    found[worker_id] = WorkerRef(worker_id=worker_id, key=key, handle=handle)
        return found

    def worker(self, worker_id: str, *, roles: tuple[str, ...] = MIGRATABLE_ROLES) -> WorkerRef:
        """The live worker `worker_id`; `NotFoundError` or `ValueError` (wrong role) otherwise."""
        every = self.workers(roles=("prefill", *MIGRATABLE_ROLES))
        ref = every.get(worker_id)
        if ref is None:
            # Never list the others: an error message is no inventory of the cluster.
            raise NotFoundError(f"no healthy worker {worker_id!r}")
        if ref.key.role not in roles:
            raise ValueError(f"worker {worker_id} has role {ref.key.role!r}; this needs one of {roles}")
        return ref

    def running_requests(self, workers: Mapping[str, WorkerRef]) -> dict[str, list[RunningRequestInfo]]:
        """Each worker's running requests; a worker that does not answer in time is left out."""
        return self._gather(workers, lambda ref: ref.handle.running_requests.remote())

    def stats(self, workers: Mapping[str, WorkerRef]) -> dict[str, WorkerStats]:
        """Each worker's load; a worker that does not answer in time is left out."""
        return self._gather(workers, lambda ref: ref.handle.stats.remote())

    def locate(self, request_id: str) -> WorkerRef:
        """The worker running `request_id` (a request id as routers name it: `tenant/id`)."""
        workers = self.workers()
        for worker_id, requests in self.running_requests(workers).items():
            if any(r.request_id == request_id for r in requests):
                return workers[worker_id]
        raise NotFoundError(f"request {request_id!r} is not running on any worker (finished, waiting, or unknown)")

    # ---- actions ------------------------------------------------------------------------------

    def migrate(self, request_id: str, destination_id: str = "", *, reason: str = "admin") -> MigrationReport:
        """Move `request_id` live to `destination_id` (empty: the least-loaded other worker of its pool)."""
        source = self.locate(request_id)
        if destination_id:
            destination = self.worker(destination_id)
            if destination.key != source.key:
                raise ValueError(
                    f"worker {destination_id} serves {destination.key.deployment}/{destination.key.role}; request "
                    f"{request_id!r} runs in {source.key.deployment}/{source.key.role} and can only move within it"
                )
            if destination_id == source.worker_id:
                raise ValueError(f"request {request_id!r} already runs on {destination_id}")
            if destination_id in self.draining:
                raise ValueError(f"worker {destination_id} is draining; pick another destination")
        else:
            destination = self._least_loaded(source)
        return self._migrate_one(source, destination, request_id, reason=reason)

    def drain(self, worker_id: str, *, scale_down: bool = False, timeout_s: float = 0.0) -> DrainReport:
        """Move every request off `worker_id` (live), then stop it; see `DrainReport`.

        Requests still waiting on the worker are moved once they run. After `timeout_s` (default
        `drain_timeout_s`), or when no destination is left, the worker is stopped anyway.
        """
        ref = self.worker(worker_id, roles=("prefill", *MIGRATABLE_ROLES))
        if worker_id in self.draining:
            raise ValueError(f"worker {worker_id} is already draining")
        deadline = time.monotonic() + (timeout_s or self.config.drain_timeout_s)
        self.draining.add(worker_id)
        migrations: list[MigrationReport] = []
        remaining = 0
        try:
            logger.info("drain started worker_id=%s scale_down=%s", worker_id, scale_down)
            while True:
                stats = self.stats({worker_id: ref}).get(worker_id)
                if stats is None:
                    logger.warning("drain lost the worker worker_id=%s; stopping it", worker_id)
                    break
                remaining = stats.num_running + stats.num_waiting
                if remaining == 0 or time.monotonic() >= deadline:
                    break
                moved = self._move_all(ref, migrations) if ref.key.role in MIGRATABLE_ROLES else 0
                if moved is None:
                    break  # nowhere to go
                if not moved:
                    time.sleep(self.config.drain_poll_s)
            self._wait_streams_closed(ref, deadline)
            self._stop_worker(ref, scale_down)
        finally:
            self.draining.discard(worker_id)
        report = DrainReport(worker_id=worker_id, migrations=tuple(migrations), num_remaining=remaining, stopped=True)
        logger.info(
            "drain finished worker_id=%s migrations=%d committed=%d remaining=%d scale_down=%s",
            worker_id,
            len(migrations),
            sum(m.outcome == "committed" for m in migrations),
            report.num_remaining,
            scale_down,
        )
        return report

    def rebalance_once(self) -> list[MigrationReport]:
        """One rebalancer pass: per pool, the policy's `plan_rebalance` moves, run one after another.

        Draining workers take no part. The policy's rate limit sees when each worker last moved a request.
        """
        pools: dict[PoolKey, dict[str, WorkerRef]] = {}
        for worker_id, ref in self.workers().items():
            if worker_id not in self.draining:
                pools.setdefault(ref.key, {})[worker_id] = ref
        reports = []
        for refs in pools.values():
            if len(refs) < 2:
                continue
            history = MigrationHistory(last_started=dict(self._last_started))
            decisions = plan_rebalance(
                self._views(refs), history=history, now=time.monotonic(), config=self.config.policy
            )
            for decision in decisions:
                source, destination = refs[decision.source_id], refs[decision.destination_id]
                started = time.monotonic()
                self._last_started[source.worker_id] = self._last_started[destination.worker_id] = started
                reports.append(self._migrate_one(source, destination, decision.request_id, reason=decision.reason))
        return reports

    # ---- internals ----------------------------------------------------------------------------

    def _wait_streams_closed(self, ref: WorkerRef, deadline: float) -> None:
        """Until the worker's streams ended (a moved request's stream ends with its hand-over chunk; killing the
        worker before that chunk left would make the router fail the request over instead), or the deadline."""
        while time.monotonic() < deadline:
            num_open = self._gather({ref.worker_id: ref}, lambda r: r.handle.num_open_streams.remote())
            if num_open.get(ref.worker_id, 0) == 0:
                break
            time.sleep(self.config.drain_poll_s)
        time.sleep(self.config.drain_stop_grace_s)

    def _views(self, refs: Mapping[str, WorkerRef]) -> list[WorkerView]:
        """The policy's view of `refs`: load and running requests; workers that did not answer are left out."""
        stats, running = self.stats(refs), self.running_requests(refs)
        return [
            WorkerView(
                worker_id=wid,
                kv_blocks_total=stats[wid].kv_blocks_total,
                kv_blocks_used=stats[wid].kv_blocks_used,
                block_size=stats[wid].kv_block_size,
                requests=tuple(running[wid]),
                accepting=wid not in self.draining,
            )
            for wid in refs
            if wid in stats and wid in running and stats[wid].kv_blocks_total > 0
        ]

    def _move_all(self, source: WorkerRef, migrations: list[MigrationReport]) -> int | None:
        """Move what the policy's `plan_drain` finds room for; the number committed, or None with no peer."""
        peers = {
            wid: ref
            for wid, ref in self.workers().items()
            if ref.key == source.key and (wid == source.worker_id or wid not in self.draining)
        }
        views = self._views(peers)
        if source.worker_id not in {v.worker_id for v in views}:
            return 0  # it did not answer this time
        if len(views) < 2:
            logger.warning("drain has no destination worker_id=%s pool=%s", source.worker_id, source.key)
            return None
        committed = 0
        for decision in plan_drain(source.worker_id, views, config=self.config.policy):
            report = self._migrate_one(source, peers[decision.destination_id], decision.request_id, reason="drain")
            migrations.append(report)
            committed += report.outcome == "committed"
        return committed

    def _least_loaded(self, source: WorkerRef) -> WorkerRef:
        peers = {
            wid: ref
            for wid, ref in self.workers().items()
            if ref.key == source.key and wid != source.worker_id and wid not in self.draining
        }
        loads = self.stats(peers)
        if not loads:
            raise NotFoundError(f"no other healthy worker in {source.key.deployment}/{source.key.role} to move to")
        best = min(loads, key=lambda wid: (loads[wid].kv_usage, loads[wid].num_running + loads[wid].num_waiting, wid))
        return peers[best]

    def _migrate_one(
        self, source: WorkerRef, destination: WorkerRef, request_id: str, *, reason: str
    ) -> MigrationReport:
        ref = source.handle.migrate_out.remote(
            request_id, destination.handle, destination.worker_id, self.config.migration
        )
        try:
            report: MigrationReport = ray.get(ref, timeout=self.config.migrate_timeout_s)
        except Exception as exc:  # the source died or hung: the routers fail its requests over
            report = MigrationReport(
                request_id=request_id,
                source_id=source.worker_id,
                destination_id=destination.worker_id,
                outcome="aborted",
                reason=f"migrate_out failed: {type(exc).__name__}",
            )
        logger.info(
            "migration %s request_id=%s source=%s destination=%s trigger=%s reason=%s stages=%d blocks=%d bytes=%d "
            "downtime_ms=%.1f total_ms=%.1f",
            report.outcome,
            request_id,
            source.worker_id,
            destination.worker_id,
            reason,
            report.reason or "-",
            report.num_stages,
            report.num_blocks_copied,
            report.bytes_moved,
            report.downtime_ms,
            report.total_ms,
        )
        return report

    def _gather(self, workers: Mapping[str, WorkerRef], call: Callable[[WorkerRef], Any]) -> dict[str, Any]:
        refs = {wid: call(ref) for wid, ref in workers.items()}
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.config.call_timeout_s)
        ready_set = set(ready)
        results = {}
        for wid, ref in refs.items():
            if ref in ready_set:
                try:
                    results[wid] = ray.get(ref)
                except Exception:
                    logger.debug("worker call failed worker_id=%s", wid, exc_info=True)
        return results
