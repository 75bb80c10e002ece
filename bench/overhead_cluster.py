"""The one-worker cluster the overhead benchmarks measure on: real control plane, its router, one mixed worker.

`single_worker_cluster` starts an in-process Ray cluster (never one another process on this machine started),
a tiny Llama on one `mixed` worker with prefix caching (so repeated 1-token requests do the same engine work on
every path), a tenant with a key, and tears it all down on exit. The router's HTTP front binds a free port.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEPLOYMENT = "bench"
TENANT = "bench"


@dataclass(kw_only=True, frozen=True)
class BenchCluster:
    """What a benchmark needs to reach the worker through each path."""

    router_address: str
    """The router's gRPC `host:port`."""
    http_address: str
    """The router's OpenAI-compatible HTTP `host:port`."""
    api_key: str
    worker: Any
    """The worker's Ray actor handle (the direct path)."""
    worker_id: str


def log(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def single_worker_cluster(*, num_cpus: int, ready_timeout_s: float, name: str) -> Iterator[BenchCluster]:
    """Start the cluster, wait until its router serves the deployment, yield it, stop everything."""
    import ray

    from control_plane.admin_client import admin_client_for
    from control_plane.cluster import start_control_plane, stop_control_plane
    from control_plane.config import ControlPlaneConfig
    from control_plane.pools import actor_name
    from control_plane.spec import DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
    from router.config import RouterConfig
    from router.server import NAMESPACE
    from workers.engine.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix=f"raylane-{name}-") as tmp:
        work = Path(tmp)
        log(name, "making a tiny Llama")
        model = make_tiny_model("llama", work / "tiny-llama", seed=0, dtype="float32")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
        try:
            log(name, "starting the control plane and its router")
            config = ControlPlaneConfig(
                state_dir=str(work / "state"),
                admin_port=0,
                router=RouterConfig(port=0, http_port=-1, metrics_port=0),
            )
            control_plane, info = start_control_plane(config, detached=False)  # alive while we hold the handle
            with admin_client_for(config, info.admin_address) as admin:
                quota = Quota(max_concurrent=64, tokens_per_minute=100_000_000)
                admin.create_tenant(TenantSpec(name=TENANT, quota=quota))
                _, api_key = admin.issue_key(TENANT)
                engine = EngineOptions(kv_cache_bytes=16 << 20, enable_prefix_caching=True)
                pools = (PoolSpec(role="mixed", replicas=1),)
                admin.apply_deployment(DeploymentSpec(name=DEPLOYMENT, model=str(model), pools=pools, engine=engine))
                log(name, "waiting for the worker and the router")
                deadline = time.monotonic() + ready_timeout_s
                while admin.status().num_healthy_workers < 1:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no healthy worker after {ready_timeout_s:.0f}s; see `ray logs`")
                    time.sleep(0.2)
                worker_id = next(w.worker_id for p in admin.list_pools(DEPLOYMENT) for w in p.workers)
                cluster = BenchCluster(
                    router_address=info.router_addresses[0],
                    http_address=info.router_http_addresses[0],
                    api_key=api_key,
                    worker=ray.get_actor(actor_name(worker_id), namespace=NAMESPACE),
                    worker_id=worker_id,
                )
                _wait_until_routed(cluster, deadline)
                yield cluster
            log(name, "shutting down")
            stop_control_plane()
            del control_plane
        finally:
            ray.shutdown()


def _wait_until_routed(cluster: BenchCluster, deadline: float) -> None:
    """The router refreshes its table in the background: wait until a request gets through."""
    from router.client import Client, RaylaneError

    with Client(cluster.router_address, cluster.api_key, timeout_s=60) as client:
        while True:
            try:
                client.complete(DEPLOYMENT, [3, 5, 7], max_tokens=1)
                return
            except RaylaneError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the router did not serve in time: {exc}") from None
                time.sleep(0.2)


def latency_stats(samples_ms: list[float]) -> dict[str, float]:
    from router.replay import percentile

    return {
        "p50": round(percentile(samples_ms, 50), 3),
        "p99": round(percentile(samples_ms, 99), 3),
        "mean": round(statistics.fmean(samples_ms), 3),
        "min": round(min(samples_ms), 3),
    }


def machine_info() -> dict[str, Any]:
    import ray
    import torch

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "num_cores": os.cpu_count(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }
