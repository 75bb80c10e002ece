"""The chaos tests' cluster handle and the checks every scenario ends with (see conftest.py for the cluster)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos_load import Load, StreamSpec

from control_plane.admin_client import AdminClient
from router.client import Client, RaylaneError
from workers import faults
from workers.faults import Fault

NUM_RUNS = int(os.environ.get("RAYLANE_CHAOS_RUNS", "1"))
"""Times each scenario runs in a row (`RAYLANE_CHAOS_RUNS`, default 1)."""
BETA_MAX_CONCURRENT = 2
PROMPTS = ("The cluster scheduler", "Once upon a time in a data center", "a b c d e f g", "KV blocks move")
PACING = {"worker_chunk": Fault(delay_s=0.06)}
"""Each worker holds every chunk a moment, so a 24-token stream is still running when the fault lands."""
SUMMARIES: list[dict[str, Any]] = []
"""One line per scenario run, printed at the end of the session."""


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except RaylaneError:
            value = None  # e.g. admin answering UNAVAILABLE while the control plane restarts
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class ChaosCluster:
    """The running cluster and what a scenario needs to hurt it and check it healed."""

    admin: AdminClient
    handle: Any
    """The control-plane actor."""
    router_addresses: list[str]
    keys: dict[str, str]
    """Tenant -> API key."""
    plan_path: Path
    state_dir: Path
    references: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    """(deployment, prompt, max_tokens) -> tokens of a fault-free run."""

    def set_faults(self, **extra: Fault) -> None:
        """Pacing plus `extra`, in every process of the cluster from its next hook on."""
        faults.write_plan(self.plan_path, {**PACING, **extra})

    def reference(self, spec: StreamSpec) -> list[int]:
        return self.references[(spec.deployment, spec.prompt, spec.max_tokens)]

    def load(self, specs: list[StreamSpec], prefix: str, **kwargs: Any) -> Load:
        return Load(specs, lambda: self.router_addresses, self.keys, prefix=prefix, **kwargs)


def specs(deployments: tuple[str, ...], num_streams: int = 8) -> list[StreamSpec]:
    """K streams round-robin over `deployments` and the prompts; the last `BETA_MAX_CONCURRENT` are tenant beta's."""
    return [
        StreamSpec(
            deployment=deployments[i % len(deployments)],
            prompt=PROMPTS[i % len(PROMPTS)],
            tenant="beta" if i >= num_streams - BETA_MAX_CONCURRENT else "alpha",
        )
        for i in range(num_streams)
    ]


def worker_infos(admin: AdminClient) -> list[Any]:
    return [w for pool in admin.list_pools() for w in pool.workers]


def pools_at_desired(admin: AdminClient) -> bool:
    pools = admin.list_pools()
    return bool(pools) and all(
        len(p.workers) == p.desired_replicas and all(w.state == "healthy" for w in p.workers) for p in pools
    )


def assert_recovered(cluster: ChaosCluster, baseline: dict[str, Any], prefix: str) -> None:
    """The desired state came back, and nothing leaked: KV blocks, quota reservations, keys."""
    admin = cluster.admin
    wait_for(lambda: pools_at_desired(admin), 180, "every pool at its desired healthy count")
    assert desired_state(admin) == baseline
    # The control plane's view of worker stats lags a refresh: wait for idle, bounded.
    wait_for(lambda: all(w.kv_blocks_used == 0 for w in worker_infos(admin)), 60, "every worker's KV blocks freed")
    for address in cluster.router_addresses:
        for tenant, key in cluster.keys.items():
            with Client(address, key, timeout_s=60) as client:
                assert client.complete("mix", PROMPTS[0], max_tokens=1).usage.completion_tokens == 1, tenant
        # beta can again hold `max_concurrent` streams at once on this router: no reservation leaked.
        beta = [StreamSpec(deployment="mix", prompt=PROMPTS[1], tenant="beta")] * BETA_MAX_CONCURRENT
        load = Load(beta, lambda a=address: [a], cluster.keys, prefix=f"{prefix}-quota", deadline_s=60)
        load.wait_started(num_chunks=1)
        assert load.num_finished() == 0, "the quota check's streams did not overlap"
        load.join().assert_exactly_once(cluster.reference, max_retried=0)


def desired_state(admin: AdminClient) -> dict[str, Any]:
    return {
        "deployments": sorted((d.name, tuple((p.role, p.replicas) for p in d.pools)) for d in admin.list_deployments()),
        "tenants": sorted((t.name, t.quota.max_concurrent if t.quota else 0) for t in admin.list_tenants()),
    }


def references(cluster: ChaosCluster) -> None:
    """Fault-free outputs of every (deployment, prompt), in parallel."""
    wanted = [(d, p, 24) for d in ("pd", "mix") for p in PROMPTS]
    errors: list[BaseException] = []

    def one(key: tuple[str, str, int]) -> None:
        try:
            with Client(cluster.router_addresses[0], cluster.keys["alpha"], timeout_s=120) as client:
                cluster.references[key] = client.complete(key[0], key[1], max_tokens=key[2], ignore_eos=True).token_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(key,)) for key in wanted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors and len(cluster.references) == len(wanted), f"reference run failed: {errors[:1]}"
