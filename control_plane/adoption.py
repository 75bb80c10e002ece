"""Re-adopting the data plane: what a restarted control plane needs to find its routers and workers again.

Routers and workers are detached, named actors, so they outlive the control-plane actor. Each worker's
placement (pool, index, placement-group bundle) is recorded in the state store as it starts; a new
`PoolManager` reads those records back and takes over the actors that still run instead of starting
new ones. The admin port is recorded too, so a restarted control plane listens where the cluster file
says it does.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray

from control_plane.state import StateStore

logger = logging.getLogger(__name__)

NAMESPACE = "raylane"
"""Ray namespace of every raylane actor."""
_NAME_RELEASE_TIMEOUT_S = 30.0
"""How long to wait for Ray to release a killed actor's name before reusing it."""


@dataclass(kw_only=True, frozen=True)
class WorkerRecord:
    """Where one worker actor runs, so a restarted control plane can take it over."""

    worker_id: str
    """The worker's id (its actor is `raylane:worker:<worker_id>`)."""
    deployment: str
    """Deployment of its pool."""
    role: str
    """Role of its pool."""
    index: int
    """The `n` in the id; a pool never reuses one."""
    group: str
    """Name of the (detached) placement group it runs in."""
    bundle_index: int
    """Its bundle in that group."""


class WorkerRegistry:
    """Worker records in the state store: one hash, `<prefix>workers`, worker id -> JSON record."""

    def __init__(self, store: StateStore) -> None:
        self._client = store.client
        self._key = f"{store.prefix}workers"

    def put(self, record: WorkerRecord) -> None:
        self._client.hset(self._key, record.worker_id, json.dumps(asdict(record)))

    def remove(self, worker_id: str) -> None:
        self._client.hdel(self._key, worker_id)

    def for_pool(self, deployment: str, role: str) -> list[WorkerRecord]:
        records = [WorkerRecord(**json.loads(raw)) for raw in self._client.hgetall(self._key).values()]
        return sorted((r for r in records if r.deployment == deployment and r.role == role), key=lambda r: r.index)


def find_actor(name: str) -> Any | None:
    """The named actor in namespace `raylane`, or None (its handle may still point at a dead actor)."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def answers(handle: Any, timeout_s: float = 5.0) -> Any | None:
    """What `handle.ping()` returns, or None when the actor is dead or does not answer in time."""
    try:
        return ray.get(handle.ping.remote(), timeout=timeout_s)
    except Exception as exc:  # dead, restarting or hung: none of them can be adopted
        logger.info("actor did not answer a ping reason=%s", type(exc).__name__)
        return None


def kill_and_release(name: str) -> None:
    """Kill the named actor (if any) and wait until Ray frees its name for a new one."""
    handle = find_actor(name)
    if handle is None:
        return
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone is what we wanted
        logger.debug("kill of %s failed; it is already gone", name, exc_info=True)
    # ray.kill returns before the GCS frees the name; a new actor with that name would be refused.
    deadline = time.monotonic() + _NAME_RELEASE_TIMEOUT_S
    while find_actor(name) is not None:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"Ray did not release the actor name {name!r} within {_NAME_RELEASE_TIMEOUT_S}s")
        time.sleep(0.05)


def save_admin_address(store: StateStore, address: str) -> None:
    store.client.set(f"{store.prefix}admin_address", address)


def load_admin_port(store: StateStore) -> int:
    """The port the previous life of the control plane served admin on (0 if none was recorded)."""
    address = store.client.get(f"{store.prefix}admin_address") or ""
    _, _, port = str(address).rpartition(":")
    return int(port) if port.isdigit() else 0
