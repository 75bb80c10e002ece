"""The OpenAI-compatible HTTP front end to end: the official `openai` client against a real local cluster.

One cluster for the module: the control plane with its router (HTTP on a free port), one mixed worker on the
tiny Llama, two tenants, each with a LoRA adapter; `bob` may run one request at a time.
"""

from __future__ import annotations

import time

import openai
import pytest

from control_plane.admin_client import admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.config import RouterConfig

pytestmark = pytest.mark.slow

DEPLOYMENT = "chat"
NO_EOS = {"ignore_eos": True}
"""The tiny model is random: without this it may stop at EOS after any token."""


def _wait(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama, tiny_loras, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane

    config = ControlPlaneConfig(
        state_dir=str(tmp_path_factory.mktemp("openai-state")),
        admin_port=0,
        router=RouterConfig(port=0, http_port=-1),
        reconcile_interval_s=0.5,
    )
    handle, info = start_control_plane(config, detached=False)
    admin = admin_client_for(config, info.admin_address)
    admin.create_tenant(TenantSpec(name="alice", quota=Quota(max_concurrent=8, tokens_per_minute=1_000_000)))
    admin.create_tenant(TenantSpec(name="bob", quota=Quota(max_concurrent=1, tokens_per_minute=1_000_000)))
    keys = {name: admin.issue_key(name)[1] for name in ("alice", "bob")}
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=128, max_num_seqs=16)
    pools = (PoolSpec(role="mixed", replicas=1),)
    admin.apply_deployment(DeploymentSpec(name=DEPLOYMENT, model=str(tiny_llama), pools=pools, engine=engine))
    for tenant, adapter in (("alice", "a"), ("bob", "b")):
        spec = AdapterSpec(name=f"{tenant}-lora", path=str(tiny_loras[adapter]), tenant=tenant, deployment=DEPLOYMENT)
        admin.register_adapter(spec)
    _wait(lambda: admin.status().num_healthy_workers >= 1, timeout_s=120, what="a healthy worker")
    [http_address] = info.router_http_addresses
    state = {"admin": admin, "keys": keys, "base_url": f"http://{http_address}/v1"}
    # The router refreshes its table in the background: wait until it serves this deployment.
    api = openai.OpenAI(base_url=state["base_url"], api_key=keys["alice"], max_retries=0, timeout=60)
    _wait(lambda: DEPLOYMENT in {m.id for m in api.models.list()}, what="the router to learn the deployment")
    yield state
    admin.close()
    stop_control_plane()
    del handle


def _client(cluster, tenant: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster["base_url"], api_key=cluster["keys"][tenant], max_retries=0, timeout=60)


def _kv_blocks_used(cluster) -> int:
    return sum(w.kv_blocks_used for pool in cluster["admin"].list_pools(DEPLOYMENT) for w in pool.workers)


def test_completions_whole_and_streamed_with_usage(cluster):
    api = _client(cluster)
    completion = api.completions.create(
        model=DEPLOYMENT, prompt="The cluster scheduler", max_tokens=5, temperature=0, extra_body=NO_EOS
    )
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    chunks = list(
        api.completions.create(
            model=DEPLOYMENT,
            prompt="The cluster scheduler",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
    )
    # Exactly one usage chunk, last, with no choices; `usage: null` on every other chunk.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == completion.choices[0].text  # greedy: same text


def test_chat_whole_and_streamed(cluster):
    api = _client(cluster)
    messages = [{"role": "user", "content": "Tell me about the river"}]
    chat = api.chat.completions.create(model=DEPLOYMENT, messages=messages, max_tokens=4, extra_body=NO_EOS)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    chunks = list(
        api.chat.completions.create(
            model=DEPLOYMENT, messages=messages, max_completion_tokens=4, stream=True, extra_body=NO_EOS
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_logprobs_and_stop_strings(cluster):
    api = _client(cluster)
    two = api.completions.create(
        model=DEPLOYMENT, prompt="Once upon a time", n=2, seed=3, temperature=1.0, max_tokens=6, extra_body=NO_EOS
    )
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 12
    with_logprobs = api.completions.create(
        model=DEPLOYMENT, prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=2, extra_body=NO_EOS
    )
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(len(top) <= 2 for top in logprobs.top_logprobs)
    chat = api.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=3,
        extra_body=NO_EOS,
    )
    assert [len(item.top_logprobs) for item in chat.choices[0].logprobs.content] == [3, 3]
    text = api.completions.create(
        model=DEPLOYMENT, prompt="Once upon a time", max_tokens=10, temperature=0, extra_body=NO_EOS
    )
    stop = text.choices[0].text.strip()[:2]
    assert stop, "the tiny model produced no text to pick a stop string from"
    stopped = api.completions.create(
        model=DEPLOYMENT, prompt="Once upon a time", max_tokens=10, temperature=0, stop=stop, extra_body=NO_EOS
    )
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_an_adapter_by_model_name_and_the_error_statuses(cluster):
    alice = _client(cluster)
    tuned = alice.completions.create(model=f"{DEPLOYMENT}:alice-lora", prompt="hello", max_tokens=2, extra_body=NO_EOS)
    assert tuned.usage.completion_tokens == 2
    assert f"{DEPLOYMENT}:alice-lora" in {m.id for m in alice.models.list()}
    wrong_key = openai.OpenAI(base_url=cluster["base_url"], api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.completions.create(model=DEPLOYMENT, prompt="hello", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        alice.completions.create(model=f"{DEPLOYMENT}:bob-lora", prompt="hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        alice.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        alice.completions.create(model=DEPLOYMENT, prompt="hello", top_p=0)


def test_a_quota_overrun_is_429_with_retry_after(cluster):
    bob = _client(cluster, "bob")
    stream = bob.completions.create(model=DEPLOYMENT, prompt="hello", max_tokens=500, stream=True, extra_body=NO_EOS)
    try:
        next(iter(stream))  # bob's one concurrent request is running
        with pytest.raises(openai.RateLimitError) as refused:
            bob.completions.create(model=DEPLOYMENT, prompt="hello", max_tokens=2)
        assert int(refused.value.response.headers["retry-after"]) >= 1
    finally:
        stream.close()


def test_a_client_that_disconnects_mid_stream_frees_the_workers_kv_blocks(cluster):
    import ray

    from control_plane.pools import actor_name
    from router.server import NAMESPACE

    [worker_id] = [w.worker_id for pool in cluster["admin"].list_pools(DEPLOYMENT) for w in pool.workers]
    worker = ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
    _wait(lambda: ray.get(worker.stats.remote()).kv_blocks_used == 0, what="an idle worker")
    before = ray.get(worker.stats.remote()).num_generated_tokens
    max_tokens = 450  # the deployment's context is 512
    stream = _client(cluster).completions.create(
        model=DEPLOYMENT, prompt="The cluster", max_tokens=max_tokens, stream=True, extra_body=NO_EOS
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert ray.get(worker.stats.remote()).kv_blocks_used > 0
    stream.close()  # drops the connection mid-stream
    _wait(lambda: ray.get(worker.stats.remote()).kv_blocks_used == 0, timeout_s=30, what="the KV blocks to be freed")
    # Aborted, not run to the end: the worker stopped well short of max_tokens.
    assert ray.get(worker.stats.remote()).num_generated_tokens - before < max_tokens
