"""No single request can hurt the router or its tenants: bad values are refused at the edge, before quota.

RouterCore runs real in-process engines on the tiny Llama (context 512) behind a static directory; the gRPC
tests go through a real `grpc.aio` server and the client SDK.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from inprocess_workers import EngineWorkerClient

from protos.raylane.v1 import router_pb2, router_pb2_grpc
from router import client as sdk
from router.core import MAX_PROMPT_TOKENS, TOKENIZE_INLINE_MAX_CHARS, GenerateInput, RouterCore
from router.errors import InvalidArgument
from router.policy import ClusterView, WorkerView
from router.quota import QuotaExceededError, QuotaLimits
from router.server import RouterConfig
from router.servicer import RouterServicer, start_router_server
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.tokenizer import Tokenizer
from workers.messages import TokenChunk

PROMPT = (5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66)
CONTEXT = 512
"""The tiny Llama's `max_position_embeddings`."""
KEY = "key-small"
LIMITS = QuotaLimits(max_concurrent=8, tokens_per_minute=1_000)
TOO_LONG = tuple(3 + i % 500 for i in range(600))


@dataclass
class Directory:
    """`sized` knows the model's context (as the control plane's table now says); `unsized` does not."""

    engines: Mapping[str, AsyncEngine]
    tokenizer: Tokenizer
    tokenize_threads: list[threading.Thread]

    def table(self) -> RoutingTable:
        return RoutingTable(
            deployments={
                "sized": DeploymentRoute(name="sized", max_model_len=CONTEXT),
                "unsized": DeploymentRoute(name="unsized"),
            },
            tenants={"small": LIMITS},
            key_hashes={hash_api_key(KEY): "small"},
        )

    def view(self) -> ClusterView:
        return ClusterView(
            workers={
                # Worker ids are unique across a cluster: each deployment gets its own ids for the shared engines.
                dep: [WorkerView(worker_id=f"{dep}-{wid}", deployment=dep, role="mixed") for wid in self.engines]
                for dep in ("sized", "unsized")
            }
        )

    def clients(self) -> Mapping[str, Any]:
        return {
            f"{dep}-{wid}": EngineWorkerClient(f"{dep}-{wid}", engine)
            for wid, engine in self.engines.items()
            for dep in ("sized", "unsized")
        }

    def tokenize(self, deployment: str, text: str) -> tuple[int, ...]:
        self.tokenize_threads.append(threading.current_thread())
        return tuple(self.tokenizer.encode(text))


@pytest.fixture(scope="module")
def engines(tiny_llama) -> Iterator[dict[str, AsyncEngine]]:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB)
    built = {wid: AsyncEngine(Engine(config)) for wid in ("w-0", "w-1")}
    yield built
    for engine in built.values():
        engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama) -> Tokenizer:
    return Tokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture
def core(engines, tokenizer) -> RouterCore:
    return RouterCore(Directory(engines, tokenizer, []))


def request(**overrides: Any) -> GenerateInput:
    values: dict[str, Any] = {"deployment": "sized", "prompt_token_ids": PROMPT, "max_tokens": 6, "ignore_eos": True}
    values.update(overrides)
    return GenerateInput(**values)


def run(core: RouterCore, inp: GenerateInput) -> list[TokenChunk]:
    async def go() -> list[TokenChunk]:
        return [chunk async for chunk in core.generate(KEY, inp)]

    return asyncio.run(go())


def assert_full_bucket(core: RouterCore) -> None:
    """The tenant was charged nothing: its whole per-minute budget is still there."""
    try:
        reservation = core.quotas.acquire("small", LIMITS, LIMITS.tokens_per_minute)
    except QuotaExceededError as exc:
        raise AssertionError(f"the refused request was charged: {exc}") from None
    core.quotas.release(reservation, LIMITS, 0)
    assert core.quotas.inflight("small") == 0


# ---- floats are finite -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan)]
)
def test_a_non_finite_float_is_an_invalid_argument_and_costs_nothing(core, field, value):
    with pytest.raises(InvalidArgument, match=f"{field} must be a finite number"):
        run(core, request(**{field: value}))
    assert_full_bucket(core)


# ---- lengths are checked before quota ----------------------------------------------------------


def test_a_prompt_over_the_known_context_is_refused_before_it_reserves_quota(core):
    with pytest.raises(InvalidArgument, match=r"600 tokens .* context of 512") as info:
        run(core, request(prompt_token_ids=TOO_LONG, max_tokens=400))
    assert "'sized'" in info.value.message
    assert_full_bucket(core)


def test_a_prompt_the_worker_refuses_is_refunded(core):
    # The router does not know this deployment's context: the worker refuses, and the reservation comes back.
    with pytest.raises(InvalidArgument, match="600 tokens"):
        run(core, request(deployment="unsized", prompt_token_ids=TOO_LONG, max_tokens=400))
    assert_full_bucket(core)
    assert len(run(core, request(deployment="unsized", max_tokens=400))) == 400


def test_max_tokens_above_the_context_is_refused_naming_the_limit(core):
    with pytest.raises(InvalidArgument, match=r"max_tokens is 100000 .* context of 512"):
        run(core, request(max_tokens=100_000))
    assert_full_bucket(core)


def test_prompt_token_ids_are_capped_where_the_context_is_unknown(core):
    with pytest.raises(InvalidArgument, match=f"the limit is {MAX_PROMPT_TOKENS}"):
        run(core, request(deployment="unsized", prompt_token_ids=(5,) * (MAX_PROMPT_TOKENS + 1)))
    assert_full_bucket(core)


# ---- a long prompt is tokenized off the event loop ---------------------------------------------


def test_a_long_text_prompt_is_tokenized_off_the_event_loop_and_length_checked(core):
    long_text = "the paged cache " * (TOKENIZE_INLINE_MAX_CHARS // 8)
    with pytest.raises(InvalidArgument, match="context of 512"):
        run(core, request(prompt_token_ids=(), prompt=long_text))
    short = run(core, request(prompt_token_ids=(), prompt="the paged cache"))
    threads = core.directory.tokenize_threads
    assert len(threads) == 2
    assert threads[0] is not threading.main_thread(), "a long prompt was tokenized on the event loop"
    assert threads[1] is threading.main_thread()  # a short one costs less than a thread hop
    assert short[-1].finished


# ---- one request id, one request ---------------------------------------------------------------


def test_a_request_id_already_in_flight_is_refused_and_free_again_once_done(core):
    async def go() -> None:
        async with aclosing(core.generate(KEY, request(request_id="same", max_tokens=40))) as first:
            await anext(first)
            with pytest.raises(InvalidArgument, match="'same' is already in flight"):
                await anext(core.generate(KEY, request(request_id="same")))
            assert [c async for c in first][-1].finished
        again = [c async for c in core.generate(KEY, request(request_id="same"))]
        assert again[-1].finished

    asyncio.run(go())


def test_an_unknown_deployment_is_refused_without_listing_the_others(core):
    with pytest.raises(InvalidArgument) as info:
        run(core, request(deployment="nope"))
    assert info.value.message == "unknown deployment 'nope'"


# ---- through gRPC and the SDK ------------------------------------------------------------------


@pytest.fixture(scope="module")
def address(engines, tokenizer) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="edge-router", daemon=True)
    thread.start()
    core = RouterCore(Directory(engines, tokenizer, []))

    async def start() -> tuple[grpc.aio.Server, int]:
        return await start_router_server(RouterServicer(core), RouterConfig(host="127.0.0.1", port=0))

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


METADATA = (("authorization", f"Bearer {KEY}"),)


@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_malformed_request_bytes_are_an_invalid_argument_without_internals(address, method):
    with grpc.insecure_channel(address) as channel:
        call = getattr(channel, "unary_unary" if method == "Complete" else "unary_stream")(
            f"/raylane.v1.Router/{method}", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            response = call(b"\xff\xff\xff\xff\xff", metadata=METADATA, timeout=30)
            if method == "Generate":
                list(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "the request body is not a valid raylane.v1.GenerateRequest message"


def test_a_nan_sent_around_the_sdk_is_an_invalid_argument(address):
    request = router_pb2.GenerateRequest(deployment="sized", prompt_token_ids=PROMPT)
    request.sampling.temperature = math.nan
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        router_pb2_grpc.RouterStub(channel).Complete(request, metadata=METADATA, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature must be a finite number" in info.value.details()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"top_p": math.inf}, "top_p must be a finite number"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"max_tokens": -1}, "max_tokens must be an integer >= 0, got -1"),
        ({"top_k": -2}, "top_k must be an integer >= 0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be integers >= 0"),
    ],
)
def test_the_sdk_refuses_bad_values_before_sending(address, kwargs, match):
    with sdk.Client(address, KEY, timeout_s=30) as client:
        for call in (client.complete, lambda *a, **k: list(client.generate(*a, **k))):
            with pytest.raises(sdk.RequestValidationError, match=match) as info:
                call("sized", list(PROMPT), **kwargs)
            assert isinstance(info.value, ValueError) and isinstance(info.value, sdk.InvalidArgumentError)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.complete("sized", list(PROMPT), max_tokens=2, ignore_eos=True).token_ids
