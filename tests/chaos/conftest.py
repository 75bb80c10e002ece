"""One real local cluster for the chaos scenarios, the checks every scenario ends with, and the run count.

The cluster: two router replicas; `pd` (1 prefill + 2 decode workers) and `mix` (2 mixed workers) on the tiny
Llama; tenants `alpha` (roomy quota) and `beta` (`max_concurrent=BETA_MAX_CONCURRENT`, to catch a leaked
reservation). Its actors inherit `RAYLANE_FAULTS` from the control plane's `runtime_env`, so a test turns fault
points on and off by rewriting one plan file (see `workers/faults.py`).

`RAYLANE_CHAOS_RUNS=N` runs every scenario N times in a row (default 1).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from chaos_cluster import (
    BETA_MAX_CONCURRENT,
    NUM_RUNS,
    SUMMARIES,
    ChaosCluster,
    pools_at_desired,
    references,
    wait_for,
    worker_infos,
)

from control_plane.admin_client import admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.config import RouterConfig
from workers import faults


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", range(NUM_RUNS), ids=[f"run{i}" for i in range(NUM_RUNS)])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARIES:
        terminalreporter.section("chaos scenarios")
        for line in SUMMARIES:
            terminalreporter.write_line(json.dumps(line))


@pytest.fixture(scope="module")
def chaos(ray_cluster, tiny_llama, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane
    from control_plane.control_plane import ControlPlane
    from control_plane.redis_server import stop_orphan
    from router.server import CONTROL_PLANE_ACTOR, NAMESPACE

    state_dir = tmp_path_factory.mktemp("chaos-state")
    plan_path = state_dir / "faults.json"
    config = ControlPlaneConfig(
        state_dir=str(state_dir),
        admin_port=0,
        metrics_port=0,
        router=RouterConfig(port=0, http_port=0, metrics_port=0),
        num_routers=2,
        reconcile_interval_s=0.5,
        # Slow enough that an admin call right after a Redis kill meets the outage, not the restart.
        redis_check_interval_s=5.0,
    )
    # Created here only to give it the fault plan: routers and workers inherit its runtime_env.
    env = {"env_vars": {faults.ENV_VAR: str(plan_path)}}
    # Keep this handle, the creator's: a non-detached actor dies with its creator's last reference.
    handle = ControlPlane.options(name=CONTROL_PLANE_ACTOR, namespace=NAMESPACE, runtime_env=env).remote(config)
    _, info = start_control_plane(config, detached=False)
    admin = admin_client_for(config, info.admin_address, timeout_s=60)
    try:
        admin.create_tenant(TenantSpec(name="alpha", quota=Quota(max_concurrent=64, tokens_per_minute=50_000_000)))
        beta_quota = Quota(max_concurrent=BETA_MAX_CONCURRENT, tokens_per_minute=50_000_000)
        admin.create_tenant(TenantSpec(name="beta", quota=beta_quota))
        keys = {tenant: admin.issue_key(tenant)[1] for tenant in ("alpha", "beta")}
        engine = EngineOptions(kv_cache_bytes=4 << 20, max_num_batched_tokens=128, max_num_seqs=16)
        pd = (PoolSpec(role="prefill", replicas=1, num_cpus=0.5), PoolSpec(role="decode", replicas=2, num_cpus=0.5))
        mix = (PoolSpec(role="mixed", replicas=2, num_cpus=0.5),)
        for name, pools in (("pd", pd), ("mix", mix)):
            admin.apply_deployment(DeploymentSpec(name=name, model=str(tiny_llama), pools=pools, engine=engine))
        wait_for(lambda: pools_at_desired(admin) and len(worker_infos(admin)) == 5, 240, "5 healthy workers")
        cluster = ChaosCluster(
            admin=admin,
            handle=handle,
            router_addresses=list(info.router_addresses),
            keys=keys,
            plan_path=plan_path,
            state_dir=state_dir,
        )
        references(cluster)
        cluster.set_faults()
        yield cluster
    finally:
        admin.close()
        try:
            stop_control_plane()
        finally:
            stop_orphan(state_dir)
