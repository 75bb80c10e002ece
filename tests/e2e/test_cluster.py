"""End to end on a local Ray cluster: control plane, embedded Redis, router, worker pools, client SDK.

One cluster serves the whole module (starting workers is the slow part): a disaggregated
deployment (prefill + decode pools) and a mixed one, both on the tiny Llama, two tenants with
their own adapters, and a tight quota on one of them.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray

from control_plane.admin_auth import admin_token_for
from control_plane.admin_client import AdminClient, admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.client import (
    AuthenticationError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    QuotaExceededError,
    RaylaneError,
)
from router.config import RouterConfig
from router.length_predictor import LengthPredictor

pytestmark = pytest.mark.slow

PROMPTS = ["The cluster scheduler", "Once upon a time in a data center", "a b c d e f g"]


def _wait(predicate, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _workers(admin: AdminClient, deployment: str) -> list:
    return [w for pool in admin.list_pools(deployment) for w in pool.workers]


def _idle(admin: AdminClient, deployment: str) -> bool:
    workers = _workers(admin, deployment)
    return bool(workers) and all(w.num_running == 0 and w.kv_blocks_used == 0 for w in workers)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama, tiny_loras, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane

    state_dir = tmp_path_factory.mktemp("cluster-state")
    config = ControlPlaneConfig(
        state_dir=str(state_dir), admin_port=0, router=RouterConfig(port=0, http_port=-1), reconcile_interval_s=0.5
    )
    handle, info = start_control_plane(config, detached=False)
    admin = admin_client_for(config, info.admin_address)
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=128, max_num_seqs=16)
    admin.create_tenant(TenantSpec(name="alice", quota=Quota(max_concurrent=8, tokens_per_minute=1_000_000)))
    admin.create_tenant(TenantSpec(name="bob", quota=Quota(max_concurrent=1, tokens_per_minute=1_000_000)))
    keys = {name: admin.issue_key(name) for name in ("alice", "bob")}
    for name, pools in (
        ("pd", (PoolSpec(role="prefill", replicas=1), PoolSpec(role="decode", replicas=1))),
        ("mixed", (PoolSpec(role="mixed", replicas=1),)),
    ):
        admin.apply_deployment(DeploymentSpec(name=name, model=str(tiny_llama), pools=pools, engine=engine))
        admin.register_adapter(
            AdapterSpec(name="alice-lora", path=str(tiny_loras["a"]), tenant="alice", deployment=name)
        )
    admin.register_adapter(AdapterSpec(name="bob-lora", path=str(tiny_loras["b"]), tenant="bob", deployment="mixed"))
    _wait(lambda: admin.status().num_healthy_workers >= 3, timeout_s=120, what="3 healthy workers")
    state = {"handle": handle, "info": info, "admin": admin, "keys": keys, "config": config}
    yield state
    admin.close()
    stop_control_plane()
    del state["handle"]


@pytest.fixture(scope="module")
def alice(cluster):
    with Client(cluster["info"].router_addresses[0], cluster["keys"]["alice"][1], timeout_s=60) as client:
        # Routers learn about adapters registered after start within a refresh; wait for the first success.
        _wait(lambda: _succeeds(client, "mixed", adapter="alice-lora"), what="adapter routable")
        yield client


@pytest.fixture(scope="module")
def bob(cluster):
    with Client(cluster["info"].router_addresses[0], cluster["keys"]["bob"][1], timeout_s=60) as client:
        yield client


def _succeeds(client: Client, deployment: str, **kwargs) -> bool:
    try:
        client.complete(deployment, "hi", max_tokens=1, **kwargs)
        return True
    except RaylaneError:
        return False


def test_streaming_and_unary_agree(alice):
    chunks = list(alice.generate("mixed", PROMPTS[0], max_tokens=12))
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # one token per chunk, no gap, no duplicate
    assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 12
    tokens = [t for c in chunks for t in c.token_ids]
    completion = alice.complete("mixed", PROMPTS[0], max_tokens=12)
    assert completion.token_ids == tokens
    assert completion.text == "".join(c.text for c in chunks)
    assert completion.finish_reason == "length" and completion.ttft_ms > 0


@pytest.mark.parametrize("adapter", [None, "alice-lora"])
def test_prefill_decode_equals_mixed_greedy(alice, adapter):
    for prompt in PROMPTS:
        pd = alice.complete("pd", prompt, max_tokens=20, adapter=adapter, ignore_eos=True)
        mixed = alice.complete("mixed", prompt, max_tokens=20, adapter=adapter, ignore_eos=True)
        assert pd.token_ids == mixed.token_ids and len(pd.token_ids) == 20
        assert pd.text == mixed.text


def test_prefill_decode_equals_mixed_seeded_sampling(alice):
    kwargs = {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    pd = alice.complete("pd", PROMPTS[1], **kwargs)
    assert pd.token_ids == alice.complete("mixed", PROMPTS[1], **kwargs).token_ids
    assert pd.token_ids != alice.complete("mixed", PROMPTS[1], **{**kwargs, "seed": 99}).token_ids


@pytest.mark.parametrize("deployment", ["mixed", "pd"])
def test_cancel_mid_stream_frees_blocks(cluster, alice, deployment):
    admin = cluster["admin"]
    stream = alice.generate(deployment, PROMPTS[2] * 20, max_tokens=400, ignore_eos=True)
    received = [next(stream) for _ in range(3)]
    assert [c.seq for c in received] == [0, 1, 2]
    assert any(w.kv_blocks_used > 0 for w in _workers(admin, deployment))
    stream.close()  # cancels the RPC; the router cancels the worker's stream
    _wait(lambda: _idle(admin, deployment), timeout_s=20, what=f"{deployment} workers idle after cancel")


def test_deadline_aborts_on_the_worker(cluster, alice):
    with pytest.raises(DeadlineExceededError):
        alice.complete("mixed", PROMPTS[0], max_tokens=400, ignore_eos=True, timeout_s=0.3)
    _wait(lambda: _idle(cluster["admin"], "mixed"), timeout_s=20, what="worker idle after deadline")


def test_tenants_only_use_their_own_adapters(alice, bob):
    with pytest.raises(PermissionDeniedError, match="another tenant"):
        bob.complete("mixed", "hi", adapter="alice-lora", max_tokens=2)
    with pytest.raises(PermissionDeniedError):
        alice.complete("mixed", "hi", adapter="bob-lora", max_tokens=2)
    assert len(bob.complete("mixed", "hi", adapter="bob-lora", max_tokens=2).token_ids) == 2


def test_quota_limits_concurrency(cluster, bob):
    stream = bob.generate("mixed", PROMPTS[0], max_tokens=300, ignore_eos=True)
    next(stream)  # bob's only slot is now in use
    with pytest.raises(QuotaExceededError) as info:
        bob.complete("mixed", "hi", max_tokens=2)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    stream.close()
    _wait(lambda: _succeeds(bob, "mixed"), timeout_s=10, what="bob's slot released")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"deployment": "nope"}, InvalidArgumentError, "unknown deployment"),
        ({"adapter": "no-such-lora"}, InvalidArgumentError, "unknown adapter"),
        ({"top_p": 1.5}, InvalidArgumentError, "top_p"),
        ({"prompt": [5 + i % 500 for i in range(600)]}, InvalidArgumentError, "context"),
        ({"prompt": [100_000]}, InvalidArgumentError, "vocabulary"),
        ({"prompt": ""}, InvalidArgumentError, "prompt"),
    ],
)
def test_bad_requests_get_invalid_argument(alice, kwargs, error, match):
    kwargs = {"deployment": "mixed", "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(error, match=match) as info:
        alice.complete(kwargs.pop("deployment"), kwargs.pop("prompt"), **kwargs)
    assert "Traceback" not in info.value.message


def test_missing_wrong_and_revoked_keys_are_unauthenticated(cluster):
    address = cluster["info"].router_addresses[0]
    for key in ("", "rl-not-a-key"):
        with Client(address, key) as client, pytest.raises(AuthenticationError):
            client.complete("mixed", "hi", max_tokens=1)
    admin = cluster["admin"]
    key_id, key = admin.issue_key("alice")
    with Client(address, key) as client:
        _wait(lambda: _succeeds(client, "mixed"), what="new key accepted")
        assert admin.revoke_key(key_id)
        _wait(lambda: not _succeeds(client, "mixed"), what="revoked key refused")
        with pytest.raises(AuthenticationError, match="revoked"):
            client.complete("mixed", "hi", max_tokens=1)


def test_invalid_deployment_is_refused_with_the_field_named(cluster, tiny_llama):
    bad = DeploymentSpec(name="broken", model=str(tiny_llama), pools=(PoolSpec(role="mixed"),))
    from control_plane import convert

    message = convert.deployment_to_proto(bad)
    message.pools[0].role = "decoder"
    import grpc

    from protos.raylane.v1 import control_pb2, control_pb2_grpc

    token = admin_token_for(cluster["config"])
    with grpc.insecure_channel(cluster["info"].admin_address) as channel:
        stub = control_pb2_grpc.ControlPlaneStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            request = control_pb2.ApplyDeploymentRequest(spec=message)
            stub.ApplyDeployment(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pools[0].role" in info.value.details() and "decoder" in info.value.details()


def test_concurrent_requests_all_finish(cluster, alice):
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            result = alice.complete("pd" if i % 2 else "mixed", PROMPTS[i % 3], max_tokens=8, ignore_eos=True)
            assert len(result.token_ids) == 8
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_killed_worker_is_replaced_and_serves(ray_cluster, cluster, alice):
    admin = cluster["admin"]
    before = admin.status().reconcile.num_workers_replaced
    (worker,) = _workers(admin, "mixed")
    from control_plane.pools import actor_name

    ray_cluster.kill(ray_cluster.get_actor(actor_name(worker.worker_id), namespace="raylane"))
    _wait(lambda: admin.status().reconcile.num_workers_replaced > before, what="replacement")
    _wait(lambda: _succeeds(alice, "mixed"), timeout_s=60, what="requests succeed on the replacement")
    # The router may route to the replacement before the next reconcile loop marks it healthy in status.
    _wait(lambda: admin.status().num_healthy_workers == 3, what="status to count the replacement healthy")


def test_state_survives_a_control_plane_restart(cluster):
    """Last in the module: stops the control plane and starts a new one on the same state directory."""
    from control_plane.cluster import start_control_plane, stop_control_plane

    stop_control_plane()
    handle, info = start_control_plane(cluster["config"], detached=False)
    cluster["handle"], cluster["info"] = handle, info
    cluster["admin"].close()
    cluster["admin"] = admin = admin_client_for(cluster["config"], info.admin_address)
    assert {d.name for d in admin.list_deployments()} == {"pd", "mixed"}
    assert {t.name for t in admin.list_tenants()} == {"alice", "bob"}
    _wait(lambda: admin.status().num_healthy_workers >= 3, timeout_s=120, what="workers back")
    with Client(info.router_addresses[0], cluster["keys"]["alice"][1], timeout_s=60) as client:
        _wait(lambda: _succeeds(client, "pd", adapter="alice-lora"), what="old key and adapter work after restart")
    # The router saved its length predictor at stop; the new router starts from it, not from the prior.
    snapshot = ray.get(handle.load_learned.remote("length_predictor"))
    assert snapshot is not None and LengthPredictor.from_dict(snapshot).num_keys > 0
    described = ray.get(ray.get_actor("raylane:router:0", namespace="raylane").describe.remote())
    assert described["policy"] == "raylane" and described["predictor_keys"] > 0
