"""RouterCore's request path, then the same path through a real `grpc.aio` server and the client SDK.

Workers are in-process `AsyncEngine`s on the tiny Llama behind a static `Directory`: no Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inprocess_workers import EngineWorkerClient

from protos.raylane.v1 import router_pb2, router_pb2_grpc
from router import client as sdk
from router.core import FORCED_REFRESH_INTERVAL_S, GenerateInput, RouterCore
from router.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from router.length_predictor import LengthPredictor, LengthPredictorConfig
from router.policy import ClusterView, Decision, LeastLoadedPolicy, RouteRequest, WorkerView
from router.quota import QuotaLimits, QuotaTracker
from router.server import RouterConfig
from router.servicer import RouterServicer, start_router_server
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.messages import GenerateCall, TokenChunk

PROMPT = (5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66)
KEYS = {"acme": "key-acme", "globex": "key-globex", "busy": "key-busy", "thrifty": "key-thrifty"}
LIMITS = {
    "acme": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000),
    "globex": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000),
    "busy": QuotaLimits(max_concurrent=1, tokens_per_minute=1_000_000),
    "thrifty": QuotaLimits(max_concurrent=8, tokens_per_minute=60),
}
TRACEBACK_MARKERS = ("Traceback", 'File "', ".py")


class CrashingWorkerClient(EngineWorkerClient):
    """A worker whose call fails with an internal error the client must never see."""

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        raise RuntimeError("secret internal detail at /srv/worker.py")
        yield  # pragma: no cover - makes this an async generator


@dataclass
class StaticDirectory:
    """A fixed cluster: `chat` with two mixed workers, `broken` with a crashing one, `empty` with none."""

    routing_table: RoutingTable
    cluster: ClusterView
    worker_clients: Mapping[str, Any] = field(default_factory=dict)

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return self.cluster

    def clients(self) -> Mapping[str, Any]:
        return self.worker_clients


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def engines(tiny_llama) -> Iterator[dict[str, AsyncEngine]]:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB)
    built = {wid: AsyncEngine(Engine(config)) for wid in ("chat-0", "chat-1")}
    yield built
    for engine in built.values():
        engine.shutdown()


def make_directory(engines: Mapping[str, AsyncEngine]) -> StaticDirectory:
    table = RoutingTable(
        version=1,
        deployments={name: DeploymentRoute(name=name) for name in ("chat", "broken", "empty")},
        tenants=LIMITS,
        key_hashes={hash_api_key(key): tenant for tenant, key in KEYS.items()},
        adapter_owners={("chat", "globex-legal"): "globex"},
    )
    workers = {
        "chat": [WorkerView(worker_id=wid, deployment="chat", role="mixed") for wid in engines],
        "broken": [WorkerView(worker_id="broken-0", deployment="broken", role="mixed")],
    }
    clients: dict[str, Any] = {wid: EngineWorkerClient(wid, engine) for wid, engine in engines.items()}
    clients["broken-0"] = CrashingWorkerClient("broken-0", engines["chat-0"])
    return StaticDirectory(routing_table=table, cluster=ClusterView(workers=workers), worker_clients=clients)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def core(engines, clock) -> RouterCore:
    return RouterCore(make_directory(engines), quotas=QuotaTracker(clock=clock))


def request(**overrides: Any) -> GenerateInput:
    values: dict[str, Any] = {"deployment": "chat", "prompt_token_ids": PROMPT, "max_tokens": 6, "ignore_eos": True}
    values.update(overrides)
    return GenerateInput(**values)


def run_request(core: RouterCore, api_key: str | None, inp: GenerateInput) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [chunk async for chunk in core.generate(api_key, inp)]

    return asyncio.run(run())


# ---- RouterCore ---------------------------------------------------------------------------------


def test_a_valid_request_streams_every_token_in_order_and_frees_its_quota(core):
    chunks = run_request(core, KEYS["acme"], request(request_id="r1"))
    assert [c.seq for c in chunks] == list(range(6))
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert {c.request_id for c in chunks} == {"acme/r1"}
    assert core.quotas.inflight("acme") == 0


class RefreshingDirectory(StaticDirectory):
    """Learns a key only when asked to refresh, like a router whose periodic refresh has not run yet."""

    def __init__(self, base: StaticDirectory, late_key: str) -> None:
        super().__init__(routing_table=base.routing_table, cluster=base.cluster, worker_clients=base.worker_clients)
        self.late_key = late_key
        self.num_refreshes = 0

    async def refresh_table(self) -> None:
        self.num_refreshes += 1
        hashes = {**self.routing_table.key_hashes, hash_api_key(self.late_key): "acme"}
        self.routing_table = dataclasses.replace(self.routing_table, key_hashes=hashes)


def test_a_key_issued_after_the_last_refresh_works_on_its_first_request(engines, clock):
    directory = RefreshingDirectory(make_directory(engines), late_key="key-just-issued")
    core = RouterCore(directory, quotas=QuotaTracker(clock=clock))
    chunks = run_request(core, "key-just-issued", request())
    assert chunks[-1].finished and directory.num_refreshes == 1
    run_request(core, "key-just-issued", request())
    assert directory.num_refreshes == 1  # known now: no second refresh


class SlowRefreshingDirectory(RefreshingDirectory):
    async def refresh_table(self) -> None:
        await asyncio.sleep(0.05)  # a real refresh is a round trip to the control plane
        await super().refresh_table()


def test_a_burst_on_a_new_key_waits_for_one_shared_refresh(engines, clock):
    directory = SlowRefreshingDirectory(make_directory(engines), late_key="key-just-issued")
    core = RouterCore(directory, quotas=QuotaTracker(clock=clock))

    async def burst() -> list[list[TokenChunk]]:
        async def one() -> list[TokenChunk]:
            return [chunk async for chunk in core.generate("key-just-issued", request(max_tokens=2))]

        return await asyncio.gather(*(one() for _ in range(6)))

    results = asyncio.run(burst())
    assert all(chunks[-1].finished for chunks in results) and directory.num_refreshes == 1


def test_forced_refreshes_are_rate_limited(engines, clock):
    directory = RefreshingDirectory(make_directory(engines), late_key="unrelated")
    core = RouterCore(directory, quotas=QuotaTracker(clock=clock))
    start = time.monotonic()
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            run_request(core, "key-never-issued", request())
    # One refresh per miss, but never two within the interval: bad keys cost the control plane <= 10 calls/s.
    assert directory.num_refreshes == 5
    assert time.monotonic() - start >= 4 * FORCED_REFRESH_INTERVAL_S


def test_a_key_issued_just_after_a_forced_refresh_still_works_on_its_first_request(engines, clock):
    directory = RefreshingDirectory(make_directory(engines), late_key="unrelated")
    core = RouterCore(directory, quotas=QuotaTracker(clock=clock))
    with pytest.raises(Unauthenticated):
        run_request(core, "key-just-issued", request())  # a forced refresh ran: the key did not exist yet
    directory.late_key = "key-just-issued"  # issued now, within the rate limit's interval
    assert run_request(core, "key-just-issued", request())[-1].finished
    assert directory.num_refreshes == 2


class RecordingPolicy(LeastLoadedPolicy):
    def __init__(self) -> None:
        self.routes: list[RouteRequest] = []

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        self.routes.append(request)
        return super().route(request, view)


def test_the_length_predictor_learns_from_completed_requests_and_informs_placement(engines, clock):
    policy = RecordingPolicy()
    predictor = LengthPredictor(LengthPredictorConfig(min_observations=4))
    core = RouterCore(make_directory(engines), policy=policy, quotas=QuotaTracker(clock=clock), predictor=predictor)
    for _ in range(6):
        run_request(core, KEYS["acme"], request(max_tokens=6))
    assert all(r.predicted_output_p50 is not None for r in policy.routes)  # the policy sees every prediction
    roomy = dataclasses.replace(policy.routes[-1], max_tokens=400)  # predictions are clipped to max_tokens
    assert LengthPredictor().predict(roomy).p50 > 100  # the prior, before learning
    learned = predictor.predict(roomy)
    assert learned.p50 == pytest.approx(6, rel=0.25) and learned.p90 >= learned.p50


def test_a_text_prompt_is_accepted(core):
    chunks = run_request(core, KEYS["acme"], request(prompt_token_ids=(), prompt="hello there"))
    assert sum(len(c.token_ids) for c in chunks) == 6


@pytest.mark.parametrize("api_key", [None, "", "key-nobody"])
def test_a_missing_or_unknown_key_is_unauthenticated(core, api_key):
    with pytest.raises(Unauthenticated):
        run_request(core, api_key, request())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deployment": "nope"}, "unknown deployment 'nope'"),
        ({"deployment": ""}, "deployment is required"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi"}, "exactly one of prompt or prompt_token_ids"),
        ({"prompt_token_ids": ()}, "exactly one of prompt or prompt_token_ids"),
        ({"adapter": "nope"}, "unknown adapter 'nope'"),
    ],
)
def test_bad_input_is_an_invalid_argument(core, overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        run_request(core, KEYS["acme"], request(**overrides))
    assert core.quotas.inflight("acme") == 0


def test_a_prompt_the_engine_refuses_is_an_invalid_argument_with_the_engine_message(core):
    too_long = tuple(3 + i % 500 for i in range(600))  # the tiny Llama's context is 512 tokens
    with pytest.raises(InvalidArgument) as info:
        run_request(core, KEYS["acme"], request(prompt_token_ids=too_long))
    assert "600" in info.value.message
    assert core.quotas.inflight("acme") == 0


def test_another_tenants_adapter_is_permission_denied(core):
    with pytest.raises(PermissionDenied, match="globex-legal"):
        run_request(core, KEYS["acme"], request(adapter="globex-legal"))


def test_over_the_token_budget_is_resource_exhausted_with_the_refill_time(core):
    core.quotas.acquire("thrifty", LIMITS["thrifty"], 60)  # empties the bucket; it refills 1 token/s
    with pytest.raises(ResourceExhausted) as info:
        run_request(core, KEYS["thrifty"], request())
    # The request reserves its prompt (18) plus max_tokens (6).
    assert info.value.retry_after_s == pytest.approx(24.0)


def test_over_the_concurrency_cap_is_resource_exhausted(core):
    core.quotas.acquire("busy", LIMITS["busy"], 1)
    with pytest.raises(ResourceExhausted, match="max_concurrent=1") as info:
        run_request(core, KEYS["busy"], request())
    assert info.value.retry_after_s == 1.0


def test_a_deployment_without_workers_is_unavailable_with_a_retry_hint(core):
    with pytest.raises(Unavailable) as info:
        run_request(core, KEYS["acme"], request(deployment="empty"))
    assert info.value.retry_after_s == 2.0


def test_a_crashing_worker_is_unavailable_without_its_internals_and_frees_the_quota(core):
    with pytest.raises(Unavailable) as info:
        run_request(core, KEYS["acme"], request(deployment="broken"))
    assert "secret" not in info.value.message
    assert info.value.retry_after_s == 0.5
    assert core.quotas.inflight("acme") == 0


def test_a_request_in_flight_steers_the_next_one_to_the_other_worker(core):
    async def run() -> tuple[str, str]:
        async with aclosing(core.generate(KEYS["acme"], request(max_tokens=60))) as first:
            first_chunk = await anext(first)
            second = [c async for c in core.generate(KEYS["acme"], request())]
            # Read the first stream to its end: a stream left open would outlive this event loop.
            assert [c async for c in first][-1].finished
        return first_chunk.worker_id, second[0].worker_id

    first_worker, second_worker = asyncio.run(run())
    assert {first_worker, second_worker} == {"chat-0", "chat-1"}


# ---- through gRPC -------------------------------------------------------------------------------


@dataclass
class RouterServer:
    """A `grpc.aio` router on its own event-loop thread, so blocking clients can call it from the test."""

    address: str
    core: RouterCore
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine) -> Any:
        """Run `coroutine` on the server's loop (where async clients and the core live) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)


@pytest.fixture(scope="module")
def router_server(engines) -> Iterator[RouterServer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-router", daemon=True)
    thread.start()
    core = RouterCore(make_directory(engines))

    async def start() -> tuple[grpc.aio.Server, int]:
        return await start_router_server(RouterServicer(core), RouterConfig(host="127.0.0.1", port=0))

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield RouterServer(address=f"127.0.0.1:{port}", core=core, loop=loop)
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture(scope="module")
def acme(router_server) -> Iterator[sdk.Client]:
    with sdk.Client(router_server.address, KEYS["acme"], timeout_s=30) as client:
        yield client


def assert_no_traceback(error: sdk.RaylaneError) -> None:
    for marker in TRACEBACK_MARKERS:
        assert marker not in error.message


def test_client_complete_returns_the_tokens_text_and_usage(acme):
    completion = acme.complete("chat", list(PROMPT), max_tokens=5, ignore_eos=True, request_id="c1")
    assert completion.request_id == "acme/c1"
    assert len(completion.token_ids) == 5
    assert completion.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(PROMPT), 5)
    assert completion.ttft_ms > 0


def test_client_generate_streams_the_same_tokens_as_complete(acme):
    completion = acme.complete("chat", list(PROMPT), max_tokens=5, ignore_eos=True)
    chunks = list(acme.generate("chat", list(PROMPT), max_tokens=5, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == completion.token_ids
    assert [c.seq for c in chunks] == list(range(5))
    assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize(
    ("api_key", "deployment", "kwargs", "error", "retry_after_s"),
    [
        ("", "chat", {}, sdk.AuthenticationError, None),
        ("key-nobody", "chat", {}, sdk.AuthenticationError, None),
        ("key-acme", "nope", {}, sdk.InvalidArgumentError, None),
        ("key-acme", "chat", {"temperature": -1.0}, sdk.InvalidArgumentError, None),
        ("key-acme", "chat", {"adapter": "globex-legal"}, sdk.PermissionDeniedError, None),
        ("key-acme", "empty", {}, sdk.UnavailableError, 2.0),
        ("key-acme", "broken", {}, sdk.UnavailableError, 0.5),
    ],
)
def test_each_refusal_arrives_as_its_typed_error_without_a_traceback(
    router_server, api_key, deployment, kwargs, error, retry_after_s
):
    with sdk.Client(router_server.address, api_key, timeout_s=30) as client:
        with pytest.raises(error) as complete_info:
            client.complete(deployment, list(PROMPT), max_tokens=4, **kwargs)
        with pytest.raises(error) as generate_info:
            list(client.generate(deployment, list(PROMPT), max_tokens=4, **kwargs))
    for info in (complete_info, generate_info):
        assert_no_traceback(info.value)
        assert info.value.retry_after_s == retry_after_s


def test_both_prompt_forms_are_an_invalid_argument(router_server):
    request = sdk.build_request("chat", "hello", max_tokens=4)
    request.prompt_token_ids.extend(PROMPT)
    with grpc.insecure_channel(router_server.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Complete(request, metadata=(("authorization", f"Bearer {KEYS['acme']}"),), timeout=30)
    error = sdk.translate_error(info.value)
    assert isinstance(error, sdk.InvalidArgumentError)
    assert "exactly one of prompt or prompt_token_ids" in error.message


def test_over_quota_arrives_as_quota_exceeded_with_the_retry_hint(router_server):
    async def hold_the_only_slot() -> None:
        router_server.core.quotas.acquire("busy", LIMITS["busy"], 1)

    router_server.run(hold_the_only_slot())
    with (
        sdk.Client(router_server.address, KEYS["busy"], timeout_s=30) as client,
        pytest.raises(sdk.QuotaExceededError) as info,
    ):
        client.complete("chat", list(PROMPT), max_tokens=4)
    assert info.value.retry_after_s == 1.0
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_no_traceback(info.value)


def test_async_client_completes_streams_and_raises_typed_errors(router_server):
    async def run() -> tuple[sdk.Completion, list[sdk.Chunk], sdk.RaylaneError]:
        async with sdk.AsyncClient(router_server.address, KEYS["acme"], timeout_s=30) as client:
            completion = await client.complete("chat", list(PROMPT), max_tokens=3, ignore_eos=True)
            chunks = [c async for c in client.generate("chat", list(PROMPT), max_tokens=3, ignore_eos=True)]
            try:
                await client.complete("chat", list(PROMPT), adapter="globex-legal")
            except sdk.RaylaneError as exc:
                return completion, chunks, exc
        raise AssertionError("another tenant's adapter was accepted")

    completion, chunks, error = router_server.run(run())
    assert len(completion.token_ids) == 3
    assert [t for c in chunks for t in c.token_ids] == completion.token_ids
    assert isinstance(error, sdk.PermissionDeniedError)
    assert_no_traceback(error)


def test_count_tokens_without_a_tokenizer_service_is_unavailable(acme, router_server):
    with pytest.raises(sdk.UnavailableError):
        acme.count_tokens("chat", "hello")
    with (
        sdk.Client(router_server.address, "key-nobody", timeout_s=30) as stranger,
        pytest.raises(sdk.AuthenticationError),
    ):
        stranger.count_tokens("chat", "hello")


def test_health_check_answers_serving_for_the_server_and_the_router_service(router_server):
    with grpc.insecure_channel(router_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "raylane.v1.Router"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_router_service(router_server):
    with grpc.insecure_channel(router_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        response = next(iter(stub.ServerReflectionInfo(requests, timeout=10)))
    names = {s.name for s in response.list_services_response.service}
    assert "raylane.v1.Router" in names
    assert "grpc.health.v1.Health" in names
    assert router_pb2.DESCRIPTOR.services_by_name["Router"].full_name == "raylane.v1.Router"


def test_router_over_tls_serves_a_trusting_client_and_refuses_plaintext(router_server, self_signed_tls):
    cert, key = self_signed_tls
    config = RouterConfig(host="127.0.0.1", port=0, tls_cert_file=cert, tls_key_file=key)
    start = start_router_server(RouterServicer(router_server.core), config)
    server, port = asyncio.run_coroutine_threadsafe(start, router_server.loop).result(timeout=30)
    try:
        with sdk.Client(f"127.0.0.1:{port}", KEYS["acme"], timeout_s=30, tls_ca_file=cert) as client:
            assert len(client.complete("chat", list(PROMPT), max_tokens=3, ignore_eos=True).token_ids) == 3
        plaintext = sdk.Client(f"127.0.0.1:{port}", KEYS["acme"], timeout_s=5)
        with plaintext, pytest.raises(sdk.UnavailableError):
            plaintext.complete("chat", list(PROMPT), max_tokens=3)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), router_server.loop).result(timeout=30)
