"""Chaos on a real local cluster: a process dies (or a poisoned request arrives) under 8 live streams.

Every scenario then checks the same promise: each stream completed exactly once, token-identical to a fault-free
run, after at most retryable failures (UNAVAILABLE / RESOURCE_EXHAUSTED with a message) that the harness retried;
nothing hung; the desired state came back; no KV block or quota reservation leaked (`assert_recovered`).
"""

from __future__ import annotations

import math
import os
import signal
import time

import grpc
import pytest
import ray
from chaos_cluster import PROMPTS, SUMMARIES, ChaosCluster, assert_recovered, desired_state, specs, wait_for

from control_plane.pools import actor_name
from control_plane.redis_server import DATA_SUBDIR, _is_alive, registered_pid
from control_plane.spec import TenantSpec
from protos.raylane.v1 import router_pb2, router_pb2_grpc
from router.client import Client, RaylaneError, UnavailableError, build_request
from router.core import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from router.server import NAMESPACE
from workers.faults import Fault

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

BOTH = ("pd", "mix")
CONTEXT = 512
"""The tiny Llama's context length."""


def _worker(worker_id: str):
    return ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)


def _busiest(cluster: ChaosCluster, deployment: str, role: str) -> tuple[str, int]:
    """The worker with the most open token streams, and how many: asked of the workers, not a cached view (the
    engine may have finished a request whose paced stream still delivers)."""
    ids = [w.worker_id for pool in cluster.admin.list_pools(deployment) if pool.role == role for w in pool.workers]
    open_streams = {wid: ray.get(_worker(wid).num_open_streams.remote(), timeout=30) for wid in ids}
    victim = max(open_streams, key=open_streams.__getitem__)
    return victim, open_streams[victim]


def _named_actor_ids() -> dict[str, str]:
    return {
        entry["name"]: ray.get_actor(entry["name"], namespace=NAMESPACE)._actor_id.hex()
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(("raylane:router:", "raylane:worker:"))
    }


def _finish(cluster: ChaosCluster, load, scenario: str, run: int, baseline: dict, *, max_retried=None) -> None:
    report = load.join()
    SUMMARIES.append({"scenario": scenario, "run": run, **report.summary()})
    report.assert_exactly_once(cluster.reference, max_retried=max_retried)
    assert_recovered(cluster, baseline, f"{scenario}-{run}")


def test_kill_a_decode_worker(chaos, run):
    baseline = desired_state(chaos.admin)
    load = chaos.load(specs(("pd",)), f"decode-{run}")
    load.wait_started()
    victim, num_streams = _busiest(chaos, "pd", "decode")
    assert num_streams > 0, "the decode worker about to be killed serves no stream"
    ray.kill(_worker(victim))
    assert load.num_finished() == 0, "the kill landed after the streams ended"
    # The router resumes each lost stream on the other decode worker: the client sees no failure.
    _finish(chaos, load, "kill-decode", run, baseline, max_retried=0)


def test_kill_the_prefill_worker_mid_handoff(chaos, run):
    baseline = desired_state(chaos.admin)
    chaos.set_faults(pd_handoff=Fault(delay_s=4.0))
    try:
        load = chaos.load(specs(("pd",)), f"prefill-{run}")
        # The first token comes from the prefill worker; the hold starts right after it.
        load.wait_started(num_chunks=1)
        ray.kill(_worker(_busiest(chaos, "pd", "prefill")[0]))
        # Every stream has its first token and nothing more: all are held between prefill and decode.
        assert all(r.chunks_seen == 1 for r in load.results), [r.chunks_seen for r in load.results]
    finally:
        chaos.set_faults()
    # Held requests own their exported KV (the router holds it), so they decode on; a request caught in the dead
    # prefill fails retryably until the replacement serves.
    _finish(chaos, load, "kill-prefill-mid-handoff", run, baseline)


def _control_plane_info(handle):
    try:
        return ray.get(handle.cluster_info.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def test_kill_the_control_plane_actor(chaos, run):
    baseline = desired_state(chaos.admin)
    actors = _named_actor_ids()
    old_pid = ray.get(chaos.handle.pid.remote(), timeout=30)
    load = chaos.load(specs(BOTH), f"control-plane-{run}")
    load.wait_started()
    ray.kill(chaos.handle, no_restart=False)
    assert load.num_finished() == 0, "the kill landed after the streams ended"
    # The data plane does not need the control plane: no stream even notices.
    report = load.join()
    SUMMARIES.append({"scenario": "kill-control-plane", "run": run, **report.summary()})
    report.assert_exactly_once(chaos.reference, max_retried=0)
    wait_for(lambda: _control_plane_info(chaos.handle), 120, "the control plane to restart by itself")
    assert ray.get(chaos.handle.pid.remote(), timeout=30) != old_pid
    # Re-adopted, not started anew: the same router and worker actors.
    assert _named_actor_ids() == actors
    assert_recovered(chaos, baseline, f"control-plane-{run}")


def _wait_dead(pid: int, timeout_s: float = 10.0) -> None:
    # Polled tightly: the admin call that must meet the outage has to come before the supervisor's next check.
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid):
        assert time.monotonic() < deadline, f"redis-server {pid} survived SIGKILL"
        time.sleep(0.005)


def test_kill_the_redis_server(chaos, run):
    admin = chaos.admin
    baseline = desired_state(admin)
    data_dir = chaos.state_dir / DATA_SUBDIR
    pid = registered_pid(data_dir)
    load = chaos.load(specs(BOTH), f"redis-{run}")
    load.wait_started()
    os.kill(pid, signal.SIGKILL)
    assert load.num_finished() == 0, "the kill landed after the streams ended"
    _wait_dead(pid)
    with pytest.raises(UnavailableError) as refused:
        admin.list_tenants()
    assert refused.value.retry_after_s and "retry" in refused.value.message
    wait_for(lambda: admin.list_tenants(), 60, "the supervisor to restart redis")
    assert registered_pid(data_dir) != pid
    _finish(chaos, load, "kill-redis", run, baseline, max_retried=0)
    # A failing Redis write, injected: admin answers UNAVAILABLE, and nothing was half-written.
    chaos.set_faults(state_write=Fault(fail=True))
    try:
        with pytest.raises(UnavailableError):
            admin.create_tenant(TenantSpec(name=f"never-{run}"))
    finally:
        chaos.set_faults()
    assert desired_state(admin) == baseline


def _poisoned_requests(deployment: str) -> list[tuple[str, router_pb2.GenerateRequest]]:
    requests = []
    for name, field, value in (
        ("nan-temperature", "temperature", math.nan),
        ("inf-temperature", "temperature", math.inf),
        ("nan-top-p", "top_p", math.nan),
    ):
        request = build_request(deployment, PROMPTS[0], max_tokens=8)
        setattr(request.sampling, field, value)  # set around the SDK, which refuses these itself
        requests.append((name, request))
    requests.append(("huge-max-tokens", build_request(deployment, PROMPTS[0], max_tokens=1 << 30)))
    requests.append(("huge-prompt", build_request(deployment, "x" * (MAX_PROMPT_CHARS + 1), max_tokens=4)))
    requests.append(("huge-token-prompt", build_request(deployment, [1] * (MAX_PROMPT_TOKENS + 1), max_tokens=4)))
    requests.append(("over-the-context", build_request(deployment, [1] * CONTEXT, max_tokens=4)))
    # Refused by the worker, not the edge: after quota was reserved, which must come back.
    requests.append(("out-of-vocabulary", build_request(deployment, [1, 10**9], max_tokens=4)))
    return requests


def _refusals(stub: router_pb2_grpc.RouterStub, request: router_pb2.GenerateRequest, metadata) -> list[grpc.RpcError]:
    """The errors the unary and the streaming call answer `request` with (each must fail)."""
    errors = []
    for send in (
        lambda: stub.Complete(request, metadata=metadata, timeout=30),
        lambda: list(stub.Generate(request, metadata=metadata, timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            send()
        errors.append(refused.value)
    return errors


def test_poisoned_requests_mixed_into_the_load(chaos, run):
    baseline = desired_state(chaos.admin)
    replaced = chaos.admin.status().reconcile.num_workers_replaced
    actors = _named_actor_ids()
    load = chaos.load(specs(BOTH), f"poison-{run}")
    load.wait_started()
    # Tenant beta's key: any reservation a refused request kept would show in beta's concurrency check after.
    metadata = (("authorization", f"Bearer {chaos.keys['beta']}"),)
    for address in chaos.router_addresses:
        with grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for deployment in BOTH:
                for name, request in _poisoned_requests(deployment):
                    for error in _refusals(stub, request, metadata):
                        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error)
                        assert error.details(), name
    _finish(chaos, load, "poison", run, baseline, max_retried=0)
    # No worker died or was replaced on account of the poison.
    assert chaos.admin.status().reconcile.num_workers_replaced == replaced
    assert _named_actor_ids() == actors


def test_kill_a_router_replica(chaos, run):
    baseline = desired_state(chaos.admin)
    load = chaos.load(specs(BOTH), f"router-{run}")
    load.wait_started()
    ray.kill(ray.get_actor("raylane:router:0", namespace=NAMESPACE))
    assert load.num_finished() == 0, "the kill landed after the streams ended"
    report = load.join()
    SUMMARIES.append({"scenario": "kill-router", "run": run, **report.summary()})
    report.assert_exactly_once(chaos.reference)
    # Exactly the streams on the dead replica (stream i starts on router i % 2) failed, retryably, and were retried.
    assert [bool(r.failures) for r in report.results] == [i % 2 == 0 for i in range(len(report.results))]
    assert set(report.failure_codes) == {"UNAVAILABLE"}
    wait_for(lambda: _router_serves(chaos, 0), 120, "router replica 0 to be replaced")
    assert_recovered(chaos, baseline, f"router-{run}")


def _router_serves(cluster: ChaosCluster, index: int) -> bool:
    try:
        with Client(cluster.router_addresses[index], cluster.keys["alpha"], timeout_s=10) as client:
            return client.complete("mix", PROMPTS[0], max_tokens=1).usage.completion_tokens == 1
    except RaylaneError:
        return False
