"""The cluster `bench/soak.py` runs against, and the probes it reads: process ids, RSS, open fds, KV in use.

`soak_cluster` starts (or joins, when this process already has one) a local Ray cluster, the control plane with
its router (gRPC and the HTTP front on free ports), a tiny Llama with two tiny LoRAs, a 2-replica `mixed`
deployment and a prefill/decode one, and three tenants (`carol` on a tight tokens-per-minute quota, so 429s and
RESOURCE_EXHAUSTED happen). On exit it stops the control plane (routers, workers, embedded Redis) and the Ray
cluster it started, and makes sure no embedded redis-server is left.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.overhead_cluster import log

MIXED = "soak-mixed"
PD = "soak-pd"
DEPLOYMENTS = (MIXED, PD)
TIGHT_TENANT = "carol"
TIGHT_TOKENS_PER_MINUTE = 1500
ADAPTERS = {"alice": "alice-lora", "bob": "bob-lora"}
"""Tenant -> its LoRA adapter on the mixed deployment."""
TENANTS = ("alice", "bob", TIGHT_TENANT)


@dataclass(kw_only=True, frozen=True)
class SoakCluster:
    """Where the soak's clients connect, and what it watches."""

    router_address: str
    """The router's gRPC `host:port`."""
    http_base_url: str
    """The HTTP front's OpenAI base URL, `http://host:port/v1`."""
    api_keys: dict[str, str]
    """Tenant name -> API key."""
    state_dir: Path
    """The control plane's state directory (its embedded Redis lives under it)."""
    name: str
    """Prefix of the progress lines."""


@contextmanager
def soak_cluster(*, num_cpus: int, ready_timeout_s: float, name: str) -> Iterator[SoakCluster]:
    """Start everything, wait until both deployments answer through the router, yield, stop everything."""
    import ray

    from control_plane.admin_client import admin_client_for
    from control_plane.cluster import start_control_plane, stop_control_plane
    from control_plane.config import ControlPlaneConfig
    from control_plane.redis_server import stop_orphan
    from router.config import RouterConfig
    from router.server import NAMESPACE
    from workers.engine.tiny import make_tiny_lora, make_tiny_model

    with tempfile.TemporaryDirectory(prefix=f"raylane-{name}-") as tmp:
        work = Path(tmp)
        log(name, "making a tiny Llama and two tiny LoRAs")
        model = make_tiny_model("llama", work / "tiny-llama", seed=0, dtype="float32")
        loras = {
            "alice": make_tiny_lora(model, work / "lora-a", rank=8, alpha=16, seed=1),
            "bob": make_tiny_lora(model, work / "lora-b", rank=4, alpha=4, seed=2),
        }
        # A pytest session may already hold a Ray cluster (its `ray_cluster` fixture): use it, leave it running.
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False
            )
        state_dir = work / "state"
        try:
            log(name, "starting the control plane and its router")
            config = ControlPlaneConfig(
                state_dir=str(state_dir),
                admin_port=0,
                router=RouterConfig(port=0, http_port=-1),
                reconcile_interval_s=0.5,
            )
            control_plane, info = start_control_plane(config, detached=False)  # alive while we hold the handle
            try:
                with admin_client_for(config, info.admin_address, timeout_s=120) as admin:
                    keys = _make_tenants(admin)
                    _apply_deployments(admin, model, loras)
                    log(name, "waiting for 4 healthy workers and the router")
                    deadline = time.monotonic() + ready_timeout_s
                    _wait(lambda: _num_healthy(admin) >= 4, deadline, "4 healthy workers")
                cluster = SoakCluster(
                    router_address=info.router_addresses[0],
                    http_base_url=f"http://{info.router_http_addresses[0]}/v1",
                    api_keys=keys,
                    state_dir=state_dir,
                    name=name,
                )
                _wait(lambda: _routable(cluster), deadline, "both deployments to be routable")
                yield cluster
            finally:
                log(name, "shutting down")
                stop_control_plane()
                del control_plane
        finally:
            if owns_ray:
                ray.shutdown()
            if stop_orphan(state_dir):
                log(name, "an embedded redis-server outlived the control plane; stopped it")


def _make_tenants(admin: Any) -> dict[str, str]:
    from control_plane.spec import Quota, TenantSpec

    for tenant in TENANTS:
        if tenant == TIGHT_TENANT:
            quota = Quota(max_concurrent=4, tokens_per_minute=TIGHT_TOKENS_PER_MINUTE)
        else:
            quota = Quota(max_concurrent=64, tokens_per_minute=100_000_000)
        admin.create_tenant(TenantSpec(name=tenant, quota=quota))
    return {tenant: admin.issue_key(tenant)[1] for tenant in TENANTS}


def _apply_deployments(admin: Any, model: Path, loras: dict[str, Path]) -> None:
    from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, PoolSpec

    # Small KV pools and batches: the soak is about loss and leaks, and the machine is a shared 2-core one.
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=128, max_num_seqs=16)
    mixed = (PoolSpec(role="mixed", replicas=2, num_cpus=0.5),)
    pd = (PoolSpec(role="prefill", replicas=1, num_cpus=0.5), PoolSpec(role="decode", replicas=1, num_cpus=0.5))
    for deployment, pools in ((MIXED, mixed), (PD, pd)):
        admin.apply_deployment(DeploymentSpec(name=deployment, model=str(model), pools=pools, engine=engine))
    for tenant, adapter in ADAPTERS.items():
        admin.register_adapter(AdapterSpec(name=adapter, path=str(loras[tenant]), tenant=tenant, deployment=MIXED))


def _num_healthy(admin: Any) -> int:
    return sum(w.state == "healthy" for d in DEPLOYMENTS for p in admin.list_pools(d) for w in p.workers)


def _routable(cluster: SoakCluster) -> bool:
    import openai

    from router.client import Client, RaylaneError

    with Client(cluster.router_address, cluster.api_keys["alice"], timeout_s=60) as client:
        try:
            for deployment in DEPLOYMENTS:
                client.complete(deployment, "hi", max_tokens=1)
            client.complete(MIXED, "hi", max_tokens=1, adapter=ADAPTERS["alice"])
        except RaylaneError:
            return False
    api = openai.OpenAI(base_url=cluster.http_base_url, api_key=cluster.api_keys["alice"], max_retries=0, timeout=60)
    try:
        return set(DEPLOYMENTS) <= {m.id for m in api.models.list()}
    except openai.APIError:
        return False
    finally:
        api.close()


def _wait(predicate: Any, deadline: float, what: str) -> None:
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; see `ray logs`")
        time.sleep(0.5)


# ---- probes -------------------------------------------------------------------------------------------


def _actor_pid(handle: Any) -> int:
    import ray

    # `__ray_call__` runs a function inside any actor: no actor needs a pid() method for the soak.
    return int(ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))


def worker_handles() -> dict[str, Any]:
    """Worker id -> actor handle, for every worker of the soak's deployments, found by their Ray names."""
    import ray

    from router.server import NAMESPACE

    prefix = "raylane:worker:"
    return {
        entry["name"][len(prefix) :]: ray.get_actor(entry["name"], namespace=NAMESPACE)
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix)
    }


def process_pids(cluster: SoakCluster) -> dict[str, int]:
    """Name -> pid of every process the soak watches: driver, control plane, routers, workers, redis-server."""
    import ray

    from control_plane.redis_server import DATA_SUBDIR, registered_pid
    from router.server import CONTROL_PLANE_ACTOR, NAMESPACE

    pids = {"driver": os.getpid()}
    control_plane = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    pids["control_plane"] = int(ray.get(control_plane.pid.remote(), timeout=30))
    for entry in sorted(ray.util.list_named_actors(all_namespaces=True), key=lambda e: e["name"]):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith("raylane:router:"):
            name = "router:" + entry["name"].rsplit(":", 1)[1]
            pids[name] = _actor_pid(ray.get_actor(entry["name"], namespace=NAMESPACE))
    for worker_id, handle in sorted(worker_handles().items()):
        pids[f"worker:{worker_id}"] = _actor_pid(handle)
    redis_pid = registered_pid(cluster.state_dir / DATA_SUBDIR)
    if redis_pid:
        pids["redis-server"] = redis_pid
    return pids


@dataclass(kw_only=True, frozen=True)
class ProcessSample:
    """One process's memory and descriptors at one instant."""

    rss_mb: float
    """Resident set size in MiB."""
    num_fds: int
    """Open file descriptors."""


def sample_processes(pids: dict[str, int]) -> dict[str, ProcessSample | None]:
    """RSS and fd count of each process; None for one that is gone (a replaced worker, a restarted Redis)."""
    samples: dict[str, ProcessSample | None] = {}
    for name, pid in pids.items():
        try:
            process = psutil.Process(pid)
            samples[name] = ProcessSample(rss_mb=process.memory_info().rss / 2**20, num_fds=process.num_fds())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            samples[name] = None
    return samples


def kv_blocks_in_use() -> tuple[int, int]:
    """(KV blocks held by requests, token streams still open), summed over every worker, asked directly."""
    import ray

    handles = list(worker_handles().values())
    stats = ray.get([h.stats.remote() for h in handles], timeout=60)
    streams = ray.get([h.num_open_streams.remote() for h in handles], timeout=60)
    return sum(s.kv_blocks_used for s in stats), sum(streams)
