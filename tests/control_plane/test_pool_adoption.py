"""A new PoolManager takes over the workers a previous one recorded, as a restarted control plane does.

Real Ray (the session cluster) and a real redis-server; the workers run the tiny Llama.
"""

from __future__ import annotations

import time
import uuid

import pytest
import ray
import redis

from control_plane.adoption import WorkerRegistry
from control_plane.pools import PoolKey, PoolManager
from control_plane.state import StateStore
from workers.actors import WorkerConfig
from workers.engine.config import EngineConfig, MiB


@pytest.fixture
def registry(redis_server_url) -> WorkerRegistry:
    # A prefix of its own: the session's Redis is shared by every control-plane test.
    store = StateStore(redis.Redis.from_url(redis_server_url, decode_responses=True), prefix=f"t{uuid.uuid4().hex}:")
    return WorkerRegistry(store)


@pytest.fixture
def make_pool(ray_cluster, tiny_llama, registry):
    key = PoolKey(deployment="adopt", role="mixed")
    engine = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB, max_loras=0)

    def make_config(worker_id: str) -> WorkerConfig:
        return WorkerConfig(worker_id=worker_id, deployment=key.deployment, role=key.role, engine=engine)

    made: list[PoolManager] = []

    def make() -> PoolManager:
        made.append(PoolManager(key, num_cpus=1, num_gpus=0, make_config=make_config, registry=registry))
        return made[-1]

    yield make
    made[-1].shutdown()


def _healthy(pool: PoolManager, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while set(pool.worker_states().values()) != {"healthy"}:
        assert time.monotonic() < deadline, f"workers never became healthy: {pool.worker_states()}"
        pool.check_health(timeout_s=5.0)


def _actor_ids(pool: PoolManager) -> dict[str, str]:
    return {wid: handle._actor_id.hex() for wid, handle in pool.workers().items()}


def test_a_new_pool_adopts_the_running_workers_and_refills_a_lost_one(make_pool, registry):
    first = make_pool()
    assert first.ensure_replicas(2) == ["adopt-mixed-0", "adopt-mixed-1"]
    _healthy(first)
    before = _actor_ids(first)
    assert [r.worker_id for r in registry.for_pool("adopt", "mixed")] == ["adopt-mixed-0", "adopt-mixed-1"]

    # The old manager is gone without stopping anything (its control plane died); one worker died meanwhile.
    ray.kill(first.workers()["adopt-mixed-1"], no_restart=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get_actor("raylane:worker:adopt-mixed-1", namespace="raylane")
        except ValueError:
            break
        assert time.monotonic() < deadline, "Ray never released the killed worker's name"
        time.sleep(0.05)

    second = make_pool()
    assert _actor_ids(second) == {"adopt-mixed-0": before["adopt-mixed-0"]}
    assert [r.worker_id for r in registry.for_pool("adopt", "mixed")] == ["adopt-mixed-0"]
    # The lost one's bundle is reused, under a new id (ids are never reused), and nothing else starts.
    assert second.ensure_replicas(2) == ["adopt-mixed-2"]
    _healthy(second)
    assert _actor_ids(second)["adopt-mixed-0"] == before["adopt-mixed-0"]
    assert len(second._groups) == 1
