"""PoolManager on a real local Ray cluster: scaling, placement groups, health checks and replacement."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table

from control_plane.pools import NAMESPACE, PoolKey, PoolManager, actor_name
from workers.actors import WorkerConfig
from workers.engine.config import EngineConfig, MiB
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall


@pytest.fixture
def pool(ray_cluster, tiny_llama):
    key = PoolKey(deployment="p", role="mixed")
    engine = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB, max_loras=0)

    def make_config(worker_id: str) -> WorkerConfig:
        return WorkerConfig(worker_id=worker_id, deployment=key.deployment, role=key.role, engine=engine)

    manager = PoolManager(key, num_cpus=1, num_gpus=0, make_config=make_config)
    yield manager
    manager.shutdown()


def _wait_healthy(pool: PoolManager, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while set(pool.worker_states().values()) != {"healthy"}:
        assert time.monotonic() < deadline, f"workers never became healthy: {pool.worker_states()}"
        assert pool.check_health(timeout_s=5.0) == []


def _serves(handle) -> bool:
    call = GenerateCall(request_id=f"r-{time.monotonic_ns()}", prompt_token_ids=(3, 4, 5), sampling=SamplingParams())
    chunks = [ray.get(ref) for ref in handle.generate.remote(call)]
    return chunks[-1].finished and len(chunks) > 0


def _group_states(pool: PoolManager) -> list[str]:
    return [placement_group_table(g)["state"] for g in pool._groups]


def test_ensure_replicas_up_and_down(pool):
    assert pool.ensure_replicas(2) == ["p-mixed-0", "p-mixed-1"]
    assert pool.ensure_replicas(2) == []
    assert set(pool.worker_states().values()) <= {"starting", "healthy"}
    _wait_healthy(pool)
    assert ray.get_actor(actor_name("p-mixed-0"), namespace=NAMESPACE) is not None
    assert _group_states(pool) == ["CREATED"]

    # Scaling up past the first group reserves a second group for the extra bundle.
    assert pool.ensure_replicas(3) == ["p-mixed-2"]
    _wait_healthy(pool)
    assert len(pool._groups) == 2

    # Scaling down stops the newest; the emptied second group goes back to Ray.
    assert pool.ensure_replicas(1) == []
    assert sorted(pool.workers()) == ["p-mixed-0"]
    assert len(pool._groups) == 1
    # The freed bundle of the first group is reused before a new group is made.
    assert pool.ensure_replicas(2) == ["p-mixed-3"]
    assert len(pool._groups) == 1
    _wait_healthy(pool)
    assert all(_serves(h) for h in pool.workers().values())

    pool.ensure_replicas(0)
    assert pool.workers() == {} and pool._groups == []


def test_killed_worker_is_detected_and_replaced(pool):
    pool.ensure_replicas(2)
    _wait_healthy(pool)
    victim = pool.workers()["p-mixed-1"]
    ray.kill(victim)
    deadline = time.monotonic() + 30
    dead: list[str] = []
    while not dead and time.monotonic() < deadline:
        dead = pool.check_health(timeout_s=2.0)
    assert dead == ["p-mixed-1"]
    assert pool.worker_states() == {"p-mixed-0": "healthy", "p-mixed-1": "dead"}
    assert sorted(pool.workers()) == ["p-mixed-0"]
    assert pool.check_health() == []  # a dead worker is reported once, then left to `replace`

    pool.replace("p-mixed-1")
    assert pool.worker_states()["p-mixed-1"] == "starting"
    _wait_healthy(pool)
    assert _serves(pool.workers()["p-mixed-1"])
    assert len(pool._groups) == 1


def test_bad_arguments_raise_value_error(pool):
    with pytest.raises(ValueError, match="replicas"):
        pool.ensure_replicas(-1)
    with pytest.raises(ValueError, match="no worker"):
        pool.replace("p-mixed-99")
    with pytest.raises(ValueError, match="placement_strategy"):
        PoolManager(pool.key, num_cpus=1, num_gpus=0, make_config=lambda _: None, placement_strategy="NEAR")
    with pytest.raises(ValueError, match="num_cpus"):
        PoolManager(pool.key, num_cpus=0, num_gpus=0, make_config=lambda _: None)


async def _stream_through_the_router(handle) -> None:
    from router.server import RayWorkerClient

    call = GenerateCall(request_id="via-router", prompt_token_ids=(3, 4, 5), sampling=SamplingParams())
    async for _ in RayWorkerClient("p-mixed-0", handle).generate(call):
        pass


def test_a_worker_whose_engine_loop_died_reports_dead_and_is_replaced(pool):
    from router.errors import WorkerLost
    from workers.engine.errors import EngineDeadError

    pool.ensure_replicas(1)
    _wait_healthy(pool)
    handle = pool.workers()["p-mixed-0"]
    # Break the model runner under the running loop: the next step fails for no one request's fault.
    ray.get(handle.__ray_call__.remote(lambda worker: setattr(worker.engine.engine, "runner", None)))
    with pytest.raises(EngineDeadError):
        _serves(handle)
    # The actor still answers calls, but its health report says the loop is dead.
    with pytest.raises(EngineDeadError, match="engine loop died"):
        ray.get(handle.ping.remote())
    with pytest.raises(EngineDeadError):
        ray.get(handle.stats.remote())
    # The router treats it as a lost worker, so dispatch resumes its requests elsewhere by recompute.
    with pytest.raises(WorkerLost, match="EngineDeadError"):
        asyncio.run(_stream_through_the_router(handle))
    assert pool.check_health(timeout_s=5.0) == ["p-mixed-0"]
    pool.replace("p-mixed-0")
    _wait_healthy(pool)
    assert _serves(pool.workers()["p-mixed-0"])


def test_a_worker_that_answers_late_is_slow_not_dead(pool):
    pool.ensure_replicas(1)
    _wait_healthy(pool)
    handle = pool.workers()["p-mixed-0"]
    # Block the actor's event loop, as a starved machine would: its pings wait until this returns.
    blocked = handle.__ray_call__.remote(lambda worker: time.sleep(3.0))
    assert pool.check_health(timeout_s=0.2) == []
    assert pool.worker_states() == {"p-mixed-0": "healthy"}
    ray.get(blocked)
    assert pool.check_health(timeout_s=5.0) == []
    assert _serves(handle)
