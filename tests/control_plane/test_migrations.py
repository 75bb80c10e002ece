"""The control plane's migration triggers (migrate, drain, rebalance) against fake worker actors on real Ray.

The fake workers keep a list of running requests and "migrate" one by handing it to the destination
actor, so these tests check the triggers' decisions and bookkeeping (which request goes where, when a
drained worker stops, how the pool and the desired state change), not the KV copy, which
`tests/workers/` and `tests/e2e/test_cluster_failover.py` cover.
"""

from __future__ import annotations

import pytest
import ray

from control_plane.controller import Controller
from control_plane.migrations import MigrationTriggerConfig, MigrationTriggers
from control_plane.pools import HEALTHY, PoolKey
from control_plane.spec import DeploymentSpec, PoolSpec
from control_plane.state import NotFoundError, StateStore
from workers.messages import MigrationReport, RunningRequestInfo, WorkerStats


def _info(request_id: str, num_blocks: int = 2) -> RunningRequestInfo:
    return RunningRequestInfo(
        request_id=request_id,
        num_prompt_tokens=10,
        num_output_tokens=3,
        max_tokens=50,
        priority=0,
        num_blocks=num_blocks,
    )


@ray.remote(num_cpus=0)
class FakeWorker:
    """Running requests in a list; `migrate_out` hands one to the destination unless told to refuse."""

    def __init__(self, worker_id: str, deployment: str = "d", role: str = "mixed") -> None:
        self.worker_id, self.deployment, self.role = worker_id, deployment, role
        self.running: list[RunningRequestInfo] = []
        self.waiting: list[RunningRequestInfo] = []
        self.refuse = False
        self.kv_usage = 0.0

    def setup(self, running=(), waiting=(), refuse=False, kv_usage=0.0) -> None:
        self.running, self.waiting = list(running), list(waiting)
        self.refuse, self.kv_usage = refuse, kv_usage

    def stats(self) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id,
            deployment=self.deployment,
            role=self.role,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=sum(r.num_blocks for r in self.running),
            kv_blocks_total=100,
            kv_usage=self.kv_usage,
            output_tokens_per_s=0.0,
            num_generated_tokens=0,
            prefix_cache_hit_rate=0.0,
            num_preemptions=0,
            adapters=[],
            expert_counts={},
            kv_bytes_per_block=1024,
        )

    def num_open_streams(self) -> int:
        return len(self.running) + len(self.waiting)

    def running_requests(self) -> list[RunningRequestInfo]:
        if self.waiting:  # a queued request starts running by the next look
            self.running.append(self.waiting.pop(0))
        return list(self.running)

    def receive(self, info: RunningRequestInfo) -> None:
        self.running.append(info)

    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.running + self.waiting]

    def migrate_out(self, request_id, destination, destination_id, config) -> MigrationReport:
        request = next(r for r in self.running if r.request_id == request_id)
        if self.refuse:
            return MigrationReport(
                request_id=request_id,
                source_id=self.worker_id,
                destination_id=destination_id,
                outcome="aborted",
                reason="destination has no free blocks",
            )
        ray.get(destination.receive.remote(request))
        self.running.remove(request)
        return MigrationReport(
            request_id=request_id,
            source_id=self.worker_id,
            destination_id=destination_id,
            outcome="committed",
            num_stages=2,
            num_blocks_copied=request.num_blocks,
            bytes_moved=request.num_blocks * 1024,
            downtime_ms=1.0,
            total_ms=3.0,
        )


class FakePool:
    """A `PoolManager` look-alike over `FakeWorker` actors."""

    def __init__(self, key: PoolKey, **_: object) -> None:
        self.key = key
        self.handles: dict[str, object] = {}
        self.removed: list[str] = []
        self._next = 0

    def workers(self) -> dict:
        return dict(self.handles)

    def worker_states(self) -> dict[str, str]:
        return {wid: HEALTHY for wid in self.handles}

    def ensure_replicas(self, replicas: int) -> list[str]:
        started = []
        while len(self.handles) < replicas:
            wid = self.key.worker_id(self._next)
            self._next += 1
            self.handles[wid] = FakeWorker.remote(wid, self.key.deployment, self.key.role)
            started.append(wid)
        return started

    def check_health(self) -> list[str]:
        return []

    def remove(self, worker_id: str) -> None:
        ray.kill(self.handles.pop(worker_id))
        self.removed.append(worker_id)

    def shutdown(self) -> None:
        for handle in self.handles.values():
            ray.kill(handle)
        self.handles = {}


CONFIG = MigrationTriggerConfig(drain_timeout_s=5.0, drain_poll_s=0.01, call_timeout_s=5.0, drain_stop_grace_s=0.0)


@pytest.fixture
def pools(ray_cluster):
    mixed = FakePool(PoolKey(deployment="d", role="mixed"))
    other = FakePool(PoolKey(deployment="e", role="mixed"))
    prefill = FakePool(PoolKey(deployment="d", role="prefill"))
    mixed.ensure_replicas(3)
    other.ensure_replicas(1)
    prefill.ensure_replicas(1)
    built = {p.key: p for p in (mixed, other, prefill)}
    yield built
    for pool in built.values():
        pool.shutdown()


@pytest.fixture
def triggers(pools) -> MigrationTriggers:
    stopped: list[tuple[str, bool]] = []

    def stop(ref, scale_down: bool) -> None:
        stopped.append((ref.worker_id, scale_down))
        pools[ref.key].remove(ref.worker_id)

    built = MigrationTriggers(lambda: pools, stop_worker=stop, config=CONFIG)
    built.stopped = stopped
    return built


def _handle(pools, worker_id: str):
    return next(p.handles[worker_id] for p in pools.values() if worker_id in p.handles)


def _ids(pools, worker_id: str) -> list[str]:
    return ray.get(_handle(pools, worker_id).request_ids.remote())


def test_locate_and_migrate_to_a_named_worker(pools, triggers):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a"), _info("t/b")]))
    assert triggers.locate("t/b").worker_id == "d-mixed-0"
    report = triggers.migrate("t/b", "d-mixed-2")
    assert (report.outcome, report.source_id, report.destination_id) == ("committed", "d-mixed-0", "d-mixed-2")
    assert _ids(pools, "d-mixed-0") == ["t/a"] and _ids(pools, "d-mixed-2") == ["t/b"]
    with pytest.raises(NotFoundError, match="not running on any worker"):
        triggers.locate("t/nope")


def test_migrate_without_a_destination_picks_the_least_loaded_peer(pools, triggers):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a")]))
    ray.get(_handle(pools, "d-mixed-1").setup.remote(kv_usage=0.9))
    ray.get(_handle(pools, "d-mixed-2").setup.remote(kv_usage=0.1))
    assert triggers.migrate("t/a").destination_id == "d-mixed-2"


@pytest.mark.parametrize(
    ("destination", "error", "match"),
    [
        ("e-mixed-0", ValueError, "can only move within"),
        ("d-mixed-0", ValueError, "already runs on"),
        ("d-prefill-0", ValueError, "role 'prefill'"),
        ("zz-mixed-9", NotFoundError, "no healthy worker"),
    ],
)
def test_migrate_refuses_a_destination_it_cannot_use(pools, triggers, destination, error, match):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a")]))
    with pytest.raises(error, match=match):
        triggers.migrate("t/a", destination)


def test_an_unknown_worker_is_not_found_without_naming_the_others(pools, triggers):
    with pytest.raises(NotFoundError) as info:
        triggers.drain("zz-mixed-9", scale_down=False, timeout_s=1.0)
    assert str(info.value) == "no healthy worker 'zz-mixed-9'"


def test_an_aborted_migration_is_reported_and_leaves_the_request_in_place(pools, triggers):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a")], refuse=True))
    report = triggers.migrate("t/a", "d-mixed-1")
    assert report.outcome == "aborted" and "no free blocks" in report.reason
    assert _ids(pools, "d-mixed-0") == ["t/a"]


def test_drain_moves_running_and_later_waiting_requests_then_stops_the_worker(pools, triggers):
    running = [_info(f"t/r{i}", num_blocks=i + 1) for i in range(8)]
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=running, waiting=[_info("t/w0"), _info("t/w1")]))
    ray.get(_handle(pools, "d-mixed-2").setup.remote(kv_usage=0.5))
    report = triggers.drain("d-mixed-0")
    assert report.stopped and report.num_remaining == 0
    assert sorted(m.request_id for m in report.migrations) == sorted([*(r.request_id for r in running), "t/w0", "t/w1"])
    assert all(m.outcome == "committed" and m.destination_id in ("d-mixed-1", "d-mixed-2") for m in report.migrations)
    assert triggers.stopped == [("d-mixed-0", False)]
    assert "d-mixed-0" not in pools[PoolKey(deployment="d", role="mixed")].handles
    assert sorted(_ids(pools, "d-mixed-1") + _ids(pools, "d-mixed-2")) == sorted(
        m.request_id for m in report.migrations
    )
    assert not triggers.draining


def test_a_worker_being_drained_is_never_a_destination(pools, triggers):
    triggers.draining.add("d-mixed-1")
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a")]))
    with pytest.raises(ValueError, match="draining"):
        triggers.migrate("t/a", "d-mixed-1")
    assert triggers.migrate("t/a").destination_id == "d-mixed-2"


def test_drain_with_no_peer_left_stops_the_worker_and_reports_what_remained(pools, triggers):
    ray.get(_handle(pools, "e-mixed-0").setup.remote(running=[_info("t/a"), _info("t/b")]))
    report = triggers.drain("e-mixed-0")
    assert report.stopped and report.num_remaining == 2 and report.migrations == ()
    assert triggers.stopped == [("e-mixed-0", False)]


def test_drain_gives_up_at_its_timeout_when_migrations_keep_aborting(pools, triggers):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info("t/a")], refuse=True))
    report = triggers.drain("d-mixed-0", scale_down=True, timeout_s=0.3)
    assert report.stopped and report.num_remaining == 1
    assert report.migrations and {m.outcome for m in report.migrations} == {"aborted"}
    assert triggers.stopped == [("d-mixed-0", True)]


def test_drain_refuses_an_unknown_worker(triggers):
    with pytest.raises(NotFoundError, match="no healthy worker"):
        triggers.drain("nope-0")


# ---- through the Controller: routing state, desired replicas ---------------------------------------------


@pytest.fixture
def controller(ray_cluster, redis_server_url):
    store = StateStore.from_url(redis_server_url)
    store.client.flushdb()
    spec = DeploymentSpec(name="d", model="/models/tiny", pools=(PoolSpec(role="mixed", replicas=2),))
    store.put_deployment(spec)
    built = Controller(store, make_pool=FakePool, triggers=CONFIG)
    built.reconcile_once()
    yield built
    built.shutdown()
    store.client.flushdb()


def test_a_drained_worker_leaves_routing_and_is_replaced_by_default(controller):
    pool = controller.pools[PoolKey(deployment="d", role="mixed")]
    ray.get(pool.handles["d-mixed-0"].setup.remote(running=[_info("t/a")]))
    controller.triggers.draining.add("d-mixed-0")
    assert set(controller.routing_state().workers) == {"d-mixed-1"}
    assert [w.is_draining for w in controller.pool_infos()[0].workers] == [True, False]
    controller.triggers.draining.clear()
    report = controller.triggers.drain("d-mixed-0")
    assert report.num_remaining == 0 and pool.removed == ["d-mixed-0"]
    assert ray.get(pool.handles["d-mixed-1"].request_ids.remote()) == ["t/a"]
    controller.reconcile_once()  # the desired state still says 2: a fresh worker starts
    assert sorted(pool.handles) == ["d-mixed-1", "d-mixed-2"]
    assert controller.store.get_deployment("d")[0].pools[0].replicas == 2


def test_drain_with_scale_down_lowers_the_desired_replicas(controller):
    pool = controller.pools[PoolKey(deployment="d", role="mixed")]
    controller.triggers.drain("d-mixed-1", scale_down=True)
    assert controller.store.get_deployment("d")[0].pools[0].replicas == 1
    controller.reconcile_once()
    assert sorted(pool.handles) == ["d-mixed-0"]


# ---- the periodic rebalancer ------------------------------------------------------------------------------


def test_rebalance_moves_load_from_the_busiest_to_the_emptiest_worker_within_a_pool(pools, triggers):
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info(f"t/r{i}", num_blocks=4) for i in range(8)]))
    ray.get(_handle(pools, "d-mixed-1").setup.remote(running=[_info("t/x", num_blocks=4)]))
    ray.get(_handle(pools, "e-mixed-0").setup.remote(running=[_info(f"t/e{i}", num_blocks=4) for i in range(8)]))
    reports = triggers.rebalance_once()
    assert [(r.source_id, r.destination_id, r.outcome) for r in reports] == [("d-mixed-0", "d-mixed-2", "committed")]
    assert len(_ids(pools, "d-mixed-0")) == 7 and len(_ids(pools, "d-mixed-2")) == 1
    assert len(_ids(pools, "e-mixed-0")) == 8  # alone in its pool: nowhere to go
    # The policy's per-worker rate limit holds the next pass back.
    assert triggers.rebalance_once() == []


def test_a_balanced_pool_or_a_draining_worker_is_left_alone(pools, triggers):
    for wid in ("d-mixed-0", "d-mixed-1", "d-mixed-2"):
        ray.get(_handle(pools, wid).setup.remote(running=[_info(f"t/{wid}", num_blocks=4)]))
    assert triggers.rebalance_once() == []
    ray.get(_handle(pools, "d-mixed-0").setup.remote(running=[_info(f"t/r{i}", num_blocks=4) for i in range(8)]))
    triggers.draining.add("d-mixed-0")
    assert triggers.rebalance_once() == []


def test_the_reconcile_loop_runs_the_rebalancer_only_when_enabled(ray_cluster, redis_server_url):
    store = StateStore.from_url(redis_server_url)
    store.client.flushdb()
    store.put_deployment(DeploymentSpec(name="d", model="/models/tiny", pools=(PoolSpec(role="mixed", replicas=2),)))
    for interval, expected in ((0.0, 0), (0.01, 1)):
        controller = Controller(store, make_pool=FakePool, triggers=CONFIG, rebalance_interval_s=interval)
        try:
            controller.reconcile_once()
            pool = controller.pools[PoolKey(deployment="d", role="mixed")]
            running = [_info(f"t/r{i}", num_blocks=4) for i in range(8)]
            ray.get(pool.handles["d-mixed-0"].setup.remote(running=running))
            controller.reconcile_once()
            assert controller.stats.num_rebalance_migrations == expected
            assert controller.stats.num_rebalance_committed == expected
            assert ("rebalance" in controller.stats.step_ms) == bool(expected)
        finally:
            controller.shutdown()
    with pytest.raises(ValueError, match="rebalance_interval_s"):
        Controller(store, make_pool=FakePool, rebalance_interval_s=-1)
    store.client.flushdb()
