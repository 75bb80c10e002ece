"""Placement and lifecycle of one pool of worker actors (one deployment in one role).

Placement: every replica runs in its own placement-group bundle `{"CPU": num_cpus, "GPU": num_gpus}`.
The first `ensure_replicas(n)` reserves one group of `n` bundles, so PACK/SPREAD apply to the whole
pool. A later scale-up reuses bundles freed by an earlier scale-down first and reserves one more group
for the rest: a placement group cannot grow, and one group per scale-up keeps the bundles that were
started together placed together. A group is removed (its resources returned) once none of its
bundles holds a replica.

Not thread-safe: the control plane's reconcile loop owns a `PoolManager`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from control_plane.adoption import WorkerRecord, WorkerRegistry, find_actor, kill_and_release
from workers.actors import LLMWorker, WorkerConfig

logger = logging.getLogger(__name__)

NAMESPACE = "raylane"
"""Ray namespace of every raylane actor."""
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
STARTING, HEALTHY, DEAD = "starting", "healthy", "dead"


def actor_name(worker_id: str) -> str:
    """The Ray actor name of a worker, in namespace `raylane`."""
    return f"raylane:worker:{worker_id}"


@dataclass(kw_only=True, frozen=True)
class PoolKey:
    """Names one pool: a deployment in one role."""

    deployment: str
    """Deployment name."""
    role: str
    """`prefill`, `decode` or `mixed`."""

    def __post_init__(self) -> None:
        if not self.deployment or not self.role:
            raise ValueError(f"deployment and role must be non-empty, got {self.deployment!r}, {self.role!r}")

    def worker_id(self, index: int) -> str:
        return f"{self.deployment}-{self.role}-{index}"


@dataclass(frozen=True)
class _Slot:
    """One placement-group bundle a replica can run in."""

    group: PlacementGroup
    bundle_index: int
    group_name: str
    """The group's name, recorded so a restarted control plane finds the group again."""


@dataclass
class _Replica:
    worker_id: str
    index: int
    """The `n` in the id; higher is newer."""
    slot: _Slot
    handle: ActorHandle
    state: str
    started_at: float
    """`time.monotonic()` of the (re)start, for the startup grace period."""
    answered_at: float | None = None
    """`time.monotonic()` of its last successful ping: a healthy worker is declared dead only long after it."""


class PoolManager:
    """Starts, health-checks, replaces and stops the worker actors of one pool."""

    def __init__(
        self,
        key: PoolKey,
        *,
        num_cpus: float,
        num_gpus: float,
        make_config: Callable[[str], WorkerConfig],
        placement_strategy: str = "PACK",
        startup_timeout_s: float = 300.0,
        registry: WorkerRegistry | None = None,
    ) -> None:
        """`make_config(worker_id)` builds the config of a new replica; a starting replica that has not
        answered a ping for `startup_timeout_s` (loading a model takes a while) is declared dead.

        With a `registry`, every replica's placement is recorded there, and the workers it lists that
        still run are adopted now (a restarted control plane takes over the pool instead of restarting it).
        """
        self._init_options(num_cpus, num_gpus, placement_strategy, startup_timeout_s)
        self.key = key
        self._make_config = make_config
        self._registry = registry
        self._init_state()
        self._init_adopted()

    def _init_options(self, num_cpus: float, num_gpus: float, strategy: str, startup_timeout_s: float) -> None:
        if num_cpus < 0 or num_gpus < 0 or num_cpus + num_gpus == 0:
            raise ValueError(f"a replica needs num_cpus >= 0 and num_gpus >= 0, not both 0; got {num_cpus}, {num_gpus}")
        if strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {strategy!r}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be positive, got {startup_timeout_s}")
        self._num_cpus = float(num_cpus)
        self._num_gpus = float(num_gpus)
        self._bundle = {name: value for name, value in (("CPU", self._num_cpus), ("GPU", self._num_gpus)) if value}
        self._strategy = strategy
        self._startup_timeout_s = startup_timeout_s

    def _init_state(self) -> None:
        self._replicas: dict[str, _Replica] = {}
        self._groups: list[PlacementGroup] = []
        self._free_slots: list[_Slot] = []
        self._next_index = 0
        self._num_groups_created = 0

    def _init_adopted(self) -> None:
        """Take over the recorded workers that still run, in their bundles; forget the ones that are gone."""
        if self._registry is None:
            return
        groups: dict[str, PlacementGroup] = {}
        for record in self._registry.for_pool(self.key.deployment, self.key.role):
            self._next_index = max(self._next_index, record.index + 1)
            group_number = record.group.rpartition(":")[2]
            if group_number.isdigit():
                self._num_groups_created = max(self._num_groups_created, int(group_number) + 1)
            group = groups.get(record.group) or _find_group(record.group)
            if group is None:
                logger.info("worker not adopted pool=%s worker_id=%s reason=no_group", self._label, record.worker_id)
                kill_and_release(actor_name(record.worker_id))  # an actor without its bundle cannot be placed again
                self._forget(record.worker_id)
                continue
            groups[record.group] = group
            handle = find_actor(actor_name(record.worker_id))
            if handle is None:  # its bundle stays, free for the next scale-up
                logger.info("worker not adopted pool=%s worker_id=%s reason=no_actor", self._label, record.worker_id)
                self._forget(record.worker_id)
                continue
            slot = _Slot(group, record.bundle_index, record.group)
            # Starting until its first ping: a dead one is then replaced in its bundle like any other.
            self._replicas[record.worker_id] = _Replica(
                worker_id=record.worker_id,
                index=record.index,
                slot=slot,
                handle=handle,
                state=STARTING,
                started_at=time.monotonic(),
            )
            logger.info("worker adopted pool=%s worker_id=%s group=%s", self._label, record.worker_id, record.group)
        self._groups = list(groups.values())
        used = {(r.slot.group_name, r.slot.bundle_index) for r in self._replicas.values()}
        self._free_slots = [
            _Slot(g, i, name) for name, g in groups.items() for i in range(g.bundle_count) if (name, i) not in used
        ]

    # ---- queries ------------------------------------------------------------------------------

    def workers(self) -> dict[str, ActorHandle]:
        """Live workers (starting or healthy), by id."""
        return {wid: r.handle for wid, r in self._replicas.items() if r.state != DEAD}

    def worker_states(self) -> dict[str, str]:
        """Every replica's state: starting, healthy or dead."""
        return {wid: r.state for wid, r in self._replicas.items()}

    # ---- lifecycle ----------------------------------------------------------------------------

    def ensure_replicas(self, replicas: int) -> list[str]:
        """Start or stop actors until the pool has `replicas` of them; returns the ids started.

        Dead replicas count until `replace` or a scale-down removes them (so a reconcile loop that
        replaces the dead never double-starts). Scale-down stops dead replicas first, then starting
        ones, then the newest; draining them first is the caller's job.
        """
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an integer >= 0, got {replicas!r}")
        current = len(self._replicas)
        if replicas < current:
            stopped = self._scale_down(current - replicas)
            logger.info("pool scale pool=%s from=%d to=%d stopped=%s", self._label, current, replicas, stopped)
            return []
        if replicas == current:
            return []
        slots = self._take_slots(replicas - current)
        started = [self._start(self._claim_index(), slot) for slot in slots]
        logger.info("pool scale pool=%s from=%d to=%d started=%s", self._label, current, replicas, started)
        return started

    def check_health(self, timeout_s: float = 2.0, unresponsive_timeout_s: float = 30.0) -> list[str]:
        """Ping every live worker at once; mark and return the ids that failed or stopped answering.

        A ping that fails (the actor died, or `ping` says its engine loop died) marks the worker dead at once. One
        that is merely late does not: a loaded machine answers late, and a slow worker is not a dead one. A healthy
        worker is dead once it has not answered for `unresponsive_timeout_s`; a starting one, after
        `startup_timeout_s`.
        """
        live = {wid: r for wid, r in self._replicas.items() if r.state != DEAD}
        if not live:
            return []
        pings = {r.handle.ping.remote(): wid for wid, r in live.items()}
        ready, pending = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
        failed = []
        for ref in ready:
            replica = live[pings[ref]]
            try:
                ray.get(ref)
            except Exception as exc:
                self._mark_dead(replica, reason=type(exc).__name__)
                failed.append(replica.worker_id)
                continue
            replica.answered_at = time.monotonic()
            if replica.state != HEALTHY:
                replica.state = HEALTHY
                logger.info(
                    "worker healthy pool=%s worker_id=%s startup_s=%.1f",
                    self._label,
                    replica.worker_id,
                    time.monotonic() - replica.started_at,
                )
        now = time.monotonic()
        for ref in pending:
            replica = live[pings[ref]]
            if replica.state == STARTING and now - replica.started_at < self._startup_timeout_s:
                continue  # still loading its model
            silent_s = now - (replica.answered_at or replica.started_at)
            if replica.state == HEALTHY and silent_s < unresponsive_timeout_s:
                logger.info("worker slow pool=%s worker_id=%s silent_s=%.1f", self._label, replica.worker_id, silent_s)
                continue
            self._mark_dead(replica, reason=f"no answer for {silent_s:.1f}s")
            failed.append(replica.worker_id)
        return failed

    def replace(self, worker_id: str) -> None:
        """Kill the replica (dead or not) and start a fresh one with the same id in the same bundle."""
        replica = self._replicas.get(worker_id)
        if replica is None:
            raise ValueError(f"pool {self._label} has no worker {worker_id!r}; it has {sorted(self._replicas)}")
        was = replica.state
        self._kill(replica)
        del self._replicas[worker_id]
        self._start(replica.index, replica.slot)
        logger.info("worker replaced pool=%s worker_id=%s was=%s", self._label, worker_id, was)

    def remove(self, worker_id: str) -> None:
        """Stop one replica for good (after a drain): the pool shrinks by one until the next `ensure_replicas`."""
        replica = self._replicas.pop(worker_id, None)
        if replica is None:
            raise ValueError(f"pool {self._label} has no worker {worker_id!r}; it has {sorted(self._replicas)}")
        self._kill(replica)
        self._free_slots.append(replica.slot)
        self._release_empty_groups()
        logger.info("worker removed pool=%s worker_id=%s", self._label, worker_id)

    def shutdown(self) -> None:
        """Kill every actor and remove every placement group of the pool."""
        for replica in self._replicas.values():
            self._kill(replica)
        for group in self._groups:
            remove_placement_group(group)
        logger.info(
            "pool shut down pool=%s workers=%d placement_groups=%d",
            self._label,
            len(self._replicas),
            len(self._groups),
        )
        self._init_state()

    # ---- internals ----------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return f"{self.key.deployment}/{self.key.role}"

    def _claim_index(self) -> int:
        # Ids are never reused within a pool (replace keeps its id), so a new actor never waits for a dead one's name.
        index = self._next_index
        self._next_index += 1
        return index

    def _take_slots(self, count: int) -> list[_Slot]:
        """Reuse free bundles first, then reserve one new placement group for the rest."""
        reused, self._free_slots = self._free_slots[:count], self._free_slots[count:]
        missing = count - len(reused)
        if not missing:
            return reused
        name = f"raylane:pool:{self.key.deployment}:{self.key.role}:{self._num_groups_created}"
        self._num_groups_created += 1
        # Detached: the bundles must outlive the control plane, as the workers in them do.
        group = placement_group(
            [dict(self._bundle) for _ in range(missing)], strategy=self._strategy, name=name, lifetime="detached"
        )
        self._groups.append(group)
        logger.info(
            "placement group created pool=%s name=%s bundles=%d bundle=%s strategy=%s reused_bundles=%d",
            self._label,
            name,
            missing,
            self._bundle,
            self._strategy,
            len(reused),
        )
        return reused + [_Slot(group, i, name) for i in range(missing)]

    def _start(self, index: int, slot: _Slot) -> str:
        worker_id = self.key.worker_id(index)
        config = self._make_config(worker_id)
        if config.worker_id != worker_id:
            raise ValueError(f"make_config({worker_id!r}) returned a config for {config.worker_id!r}")
        # A worker this pool does not know (its record was lost) would hold the name forever.
        kill_and_release(actor_name(worker_id))
        handle = LLMWorker.options(
            name=actor_name(worker_id),
            namespace=NAMESPACE,
            lifetime="detached",  # serves on while the control plane restarts
            num_cpus=self._num_cpus,
            num_gpus=self._num_gpus,
            max_restarts=0,  # the pool replaces dead workers itself, in the same bundle
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=slot.group, placement_group_bundle_index=slot.bundle_index
            ),
        ).remote(config)
        self._replicas[worker_id] = _Replica(
            worker_id=worker_id, index=index, slot=slot, handle=handle, state=STARTING, started_at=time.monotonic()
        )
        record = WorkerRecord(
            worker_id=worker_id,
            deployment=self.key.deployment,
            role=self.key.role,
            index=index,
            group=slot.group_name,
            bundle_index=slot.bundle_index,
        )
        self._record(record)
        return worker_id

    def _record(self, record: WorkerRecord) -> None:
        if self._registry is None:
            return
        try:
            self._registry.put(record)
        except Exception:  # the worker serves regardless; only a restart's adoption would miss it
            logger.warning("worker record not saved worker_id=%s", record.worker_id, exc_info=True)

    def _forget(self, worker_id: str) -> None:
        if self._registry is None:
            return
        try:
            self._registry.remove(worker_id)
        except Exception:  # a stale record is dropped by the next adoption, which finds no actor
            logger.warning("worker record not removed worker_id=%s", worker_id, exc_info=True)

    def _scale_down(self, count: int) -> list[str]:
        order = {DEAD: 0, STARTING: 1, HEALTHY: 2}
        victims = sorted(self._replicas.values(), key=lambda r: (order[r.state], -r.index))[:count]
        for replica in victims:
            self._kill(replica)
            del self._replicas[replica.worker_id]
            self._free_slots.append(replica.slot)
        self._release_empty_groups()
        return [r.worker_id for r in victims]

    def _release_empty_groups(self) -> None:
        in_use = {id(r.slot.group) for r in self._replicas.values()}
        for group in [g for g in self._groups if id(g) not in in_use]:
            remove_placement_group(group)
            self._groups.remove(group)
            self._free_slots = [s for s in self._free_slots if s.group is not group]
            logger.info("placement group removed pool=%s group_id=%s", self._label, group.id.hex())

    def _mark_dead(self, replica: _Replica, *, reason: str) -> None:
        replica.state = DEAD
        logger.warning("worker dead pool=%s worker_id=%s reason=%s", self._label, replica.worker_id, reason)

    def _kill(self, replica: _Replica) -> None:
        try:
            ray.kill(replica.handle, no_restart=True)
        except Exception:  # already gone is what we wanted
            logger.debug("kill of %s failed; it is already gone", replica.worker_id, exc_info=True)
        replica.state = DEAD
        self._forget(replica.worker_id)


def _find_group(name: str) -> PlacementGroup | None:
    """The named placement group, or None when it was removed (or never created)."""
    try:
        return get_placement_group(name)
    except ValueError:
        return None
