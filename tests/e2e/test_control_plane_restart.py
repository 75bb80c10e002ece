"""The data plane outlives the control plane, and the embedded Redis is supervised.

One small cluster (a router and one mixed worker on the tiny Llama) serves the module. The control
plane's process is killed with SIGKILL mid-stream: streams finish, new requests succeed, and the
control plane comes back by itself with the same router and worker actors. Then its Redis is killed:
admin calls answer UNAVAILABLE with a retry hint until the supervisor restarts it from the AOF.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray

from control_plane.admin_client import connect_admin
from control_plane.config import ControlPlaneConfig
from control_plane.redis_server import DATA_SUBDIR, _is_alive, registered_pid, stop_orphan
from control_plane.spec import DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.client import AuthenticationError, Client, UnavailableError
from router.config import RouterConfig

pytestmark = pytest.mark.slow

NUM_STREAMS = 4
STREAM_TOKENS = 48


def _wait(predicate, timeout_s: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _actor_ids(handle) -> dict[str, str]:
    state = ray.get(handle.routing_state.remote(), timeout=30)
    return {wid: entry.handle._actor_id.hex() for wid, entry in state.workers.items()}


def _started(handle):
    try:
        return ray.get(handle.cluster_info.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def _complete_or_none(client: Client):
    try:
        return client.complete("chat", "with a new key", max_tokens=2, ignore_eos=True)
    except AuthenticationError:
        return None  # the router's table does not have the key yet


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane

    state_dir = tmp_path_factory.mktemp("restart-state")
    config = ControlPlaneConfig(
        state_dir=str(state_dir),
        admin_port=0,
        router=RouterConfig(port=0, http_port=-1),
        reconcile_interval_s=0.5,
        # Slow enough that an admin call right after a Redis kill meets the outage, not the restart.
        redis_check_interval_s=3.0,
    )
    handle, info = start_control_plane(config, detached=False)
    admin = connect_admin(info.admin_address, state_dir)
    admin.create_tenant(TenantSpec(name="acme", quota=Quota(max_concurrent=16, tokens_per_minute=1_000_000)))
    _, key = admin.issue_key("acme")
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=128, max_num_seqs=16)
    pools = (PoolSpec(role="mixed", replicas=1),)
    admin.apply_deployment(DeploymentSpec(name="chat", model=str(tiny_llama), pools=pools, engine=engine))
    _wait(lambda: admin.status().num_healthy_workers == 1, what="a healthy worker")
    yield {"handle": handle, "info": info, "admin": admin, "key": key, "state_dir": state_dir}
    admin.close()
    try:
        stop_control_plane()
    finally:
        stop_orphan(state_dir)  # a control plane that failed mid-restart never attached to its Redis


def test_killing_the_control_plane_process_keeps_the_data_plane_serving(cluster):
    handle, info = cluster["handle"], cluster["info"]
    router_address = info.router_addresses[0]
    workers_before = _actor_ids(handle)
    router_before = ray.get_actor("raylane:router:0", namespace="raylane")._actor_id.hex()
    assert list(workers_before) == ["chat-mixed-0"]

    # Streams in flight across the kill: each has its first token before the control plane dies.
    first_tokens = threading.Barrier(NUM_STREAMS + 1, timeout=60)
    results: list[object] = [None] * NUM_STREAMS

    def stream(i: int) -> None:
        chunks = []
        try:
            with Client(router_address, cluster["key"], timeout_s=120) as client:
                for chunk in client.generate(
                    "chat", f"stream {i} across a restart", max_tokens=STREAM_TOKENS, ignore_eos=True
                ):
                    chunks.append(chunk)
                    if len(chunks) == 1:
                        first_tokens.wait()
            results[i] = chunks
        except Exception as exc:  # reported by the assertion below
            results[i] = exc
            first_tokens.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(NUM_STREAMS)]
    for thread in threads:
        thread.start()
    first_tokens.wait()
    old_pid = ray.get(handle.pid.remote())
    os.kill(old_pid, signal.SIGKILL)

    # New requests go through the router while the control plane is dead or restarting.
    with Client(router_address, cluster["key"], timeout_s=60) as client:
        for i in range(3):
            completion = client.complete("chat", f"while the control plane is down {i}", max_tokens=4, ignore_eos=True)
            assert completion.usage.completion_tokens == 4

    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        assert isinstance(result, list), f"a stream failed across the control-plane kill: {result!r}"
        assert sum(len(c.token_ids) for c in result) == STREAM_TOKENS and result[-1].finish_reason

    # It comes back by itself, in a new process, serving admin where the cluster file says.
    restarted = _wait(lambda: _started(handle), what="the control plane to restart by itself")
    assert ray.get(handle.pid.remote()) != old_pid
    assert restarted.admin_address == info.admin_address
    assert restarted.router_addresses == info.router_addresses
    # ...with the same actors: adopted, not started anew.
    assert _actor_ids(handle) == workers_before
    assert ray.get_actor("raylane:router:0", namespace="raylane")._actor_id.hex() == router_before
    # The token too survives the restart: the restarted control plane reads it back from the state dir.
    with connect_admin(info.admin_address, cluster["state_dir"]) as fresh_admin:
        _wait(lambda: fresh_admin.status().num_healthy_workers == 1, what="the adopted worker to be healthy")
        status = fresh_admin.status()
        assert status.num_workers == 1 and status.reconcile.num_workers_replaced == 0
        _, new_key = fresh_admin.issue_key("acme")
    # The adopted router follows the restarted control plane: a key issued after the restart works through it.
    with Client(router_address, new_key, timeout_s=60) as client:
        completion = _wait(lambda: _complete_or_none(client), what="the router to accept the new key")
        assert completion.usage.completion_tokens == 2
    with Client(router_address, cluster["key"], timeout_s=60) as client:
        assert client.complete("chat", "after the restart", max_tokens=4, ignore_eos=True).usage.completion_tokens == 4


def test_a_killed_embedded_redis_is_restarted_from_its_aof(cluster):
    admin = cluster["admin"]
    admin.create_tenant(TenantSpec(name="before-the-kill"))
    data_dir = cluster["state_dir"] / DATA_SUBDIR
    pid = registered_pid(data_dir)
    assert _is_alive(pid)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _is_alive(pid), timeout_s=10, what="redis-server to die")

    with pytest.raises(UnavailableError) as refused:
        admin.list_tenants()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.retry_after_s

    def tenants():
        try:
            return {t.name for t in admin.list_tenants()}
        except UnavailableError:
            return None

    names = _wait(tenants, timeout_s=60, what="the supervisor to restart redis")
    assert "before-the-kill" in names and "acme" in names
    assert registered_pid(data_dir) != pid
    # The data plane never needed it, and serves on.
    with Client(cluster["info"].router_addresses[0], cluster["key"], timeout_s=60) as client:
        completion = client.complete("chat", "after redis came back", max_tokens=3, ignore_eos=True)
    assert completion.usage.completion_tokens == 3
