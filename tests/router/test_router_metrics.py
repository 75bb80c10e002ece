"""Router metrics: what `RouterCore` records per request, and the per-worker metrics built from `WorkerStats`.

Requests run on real in-process engines (tiny Llama) behind a static directory; every test reads its own
fresh `CollectorRegistry`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest
from inprocess_workers import EngineWorkerClient
from prometheus_client import CollectorRegistry

from router.admission import AdmissionConfig, AdmissionController
from router.core import GenerateInput, RouterCore
from router.errors import ResourceExhausted, Unauthenticated, Unavailable
from router.metrics import RouterMetrics, render
from router.policy import ClusterView, WorkerView
from router.quota import QuotaLimits
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.messages import MigrationStats, TokenChunk, WorkerStats

PROMPT = (5, 17, 42, 99, 7, 23, 61, 88, 12, 30)
KEYS = {"acme": "key-acme", "thrifty": "key-thrifty"}
LIMITS = {
    "acme": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000),
    "thrifty": QuotaLimits(max_concurrent=8, tokens_per_minute=60),
}


@dataclass
class StaticDirectory:
    """`chat` with one mixed worker; `empty` with none."""

    routing_table: RoutingTable
    cluster: ClusterView
    worker_clients: Mapping[str, Any]

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return self.cluster

    def clients(self) -> Mapping[str, Any]:
        return self.worker_clients


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Iterator[AsyncEngine]:
    built = AsyncEngine(Engine(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=4 * MiB)))
    yield built
    built.shutdown()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make_core(engine: AsyncEngine, registry: CollectorRegistry, **kwargs: Any) -> RouterCore:
    table = RoutingTable(
        version=1,
        deployments={name: DeploymentRoute(name=name) for name in ("chat", "empty")},
        tenants=LIMITS,
        key_hashes={hash_api_key(key): tenant for tenant, key in KEYS.items()},
    )
    view = ClusterView(workers={"chat": [WorkerView(worker_id="chat-0", deployment="chat", role="mixed")]})
    directory = StaticDirectory(table, view, {"chat-0": EngineWorkerClient("chat-0", engine)})
    return RouterCore(directory, metrics=RouterMetrics(registry), **kwargs)


def request(**overrides: Any) -> GenerateInput:
    values: dict[str, Any] = {"deployment": "chat", "prompt_token_ids": PROMPT, "max_tokens": 5, "ignore_eos": True}
    values.update(overrides)
    return GenerateInput(**values)


def run(core: RouterCore, inp: GenerateInput, api_key: str = KEYS["acme"]) -> list[TokenChunk]:
    async def go() -> list[TokenChunk]:
        return [chunk async for chunk in core.generate(api_key, inp)]

    return asyncio.run(go())


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_finished_requests_move_every_request_metric_by_the_right_amount(engine, registry):
    core = make_core(engine, registry)
    streams = [run(core, request()) for _ in range(2)]
    chat = {"deployment": "chat"}
    acme = {"deployment": "chat", "tenant": "acme"}
    num_chunks = sum(len([c for c in s if c.token_ids]) for s in streams)
    assert value(registry, "raylane_prompt_tokens_total", **acme) == sum(s[-1].num_prompt_tokens for s in streams)
    assert value(registry, "raylane_prompt_tokens_total", **acme) == 2 * len(PROMPT)
    assert value(registry, "raylane_generation_tokens_total", **acme) == 2 * 5
    assert value(registry, "raylane_time_to_first_token_seconds_count", **chat) == 2
    # One gap per chunk after each stream's first.
    assert value(registry, "raylane_inter_token_latency_seconds_count", **chat) == num_chunks - 2
    assert value(registry, "raylane_e2e_request_latency_seconds_count", **chat) == 2
    assert value(registry, "raylane_request_queue_time_seconds_count", **chat) == 2
    assert value(registry, "raylane_request_success_total", **acme, finished_reason="length") == 2
    assert value(registry, "raylane_requests_total", **acme, status="OK") == 2
    decisions = {"policy": "least_loaded", "deployment": "chat", "pool": "mixed", "term": "none"}
    assert value(registry, "raylane_routing_decisions_total", **decisions) == 2
    # Latencies are real durations: the whole request took at least as long as its first token.
    e2e = value(registry, "raylane_e2e_request_latency_seconds_sum", **chat)
    assert 0 < value(registry, "raylane_time_to_first_token_seconds_sum", **chat) <= e2e


def test_refusals_are_counted_by_status_and_rejection_reason(engine, registry):
    core = make_core(engine, registry)
    with pytest.raises(Unauthenticated):
        run(core, request(), api_key="wrong")
    core.quotas.acquire("thrifty", LIMITS["thrifty"], 60)  # empties its token bucket
    with pytest.raises(ResourceExhausted):
        run(core, request(), api_key=KEYS["thrifty"])
    with pytest.raises(Unavailable):
        run(core, request(deployment="empty"))
    # Before validation nothing is known: deployment and tenant stay empty (an unknown name is never a label).
    assert value(registry, "raylane_requests_total", deployment="", tenant="", status="UNAUTHENTICATED") == 1
    thrifty = {"deployment": "chat", "tenant": "thrifty"}
    assert value(registry, "raylane_requests_total", **thrifty, status="RESOURCE_EXHAUSTED") == 1
    assert value(registry, "raylane_admission_rejections_total", **thrifty, reason="quota") == 1
    empty = {"deployment": "empty", "tenant": "acme"}
    assert value(registry, "raylane_requests_total", **empty, status="UNAVAILABLE") == 1
    assert value(registry, "raylane_admission_rejections_total", **empty, reason="no_capacity") == 1
    assert value(registry, "raylane_time_to_first_token_seconds_count", deployment="chat") == 0


def test_a_client_leaving_mid_stream_is_cancelled_and_one_leaving_after_the_end_is_ok(engine, registry):
    core = make_core(engine, registry)

    async def leave_after(num_chunks: int, max_tokens: int) -> None:
        async with aclosing(core.generate(KEYS["acme"], request(max_tokens=max_tokens))) as stream:
            for _ in range(num_chunks):
                await anext(stream)

    asyncio.run(leave_after(1, max_tokens=20))
    asyncio.run(leave_after(1, max_tokens=1))  # its only chunk is the finished one
    acme = {"deployment": "chat", "tenant": "acme"}
    assert value(registry, "raylane_requests_total", **acme, status="CANCELLED") == 1
    assert value(registry, "raylane_requests_total", **acme, status="OK") == 1
    assert value(registry, "raylane_time_to_first_token_seconds_count", deployment="chat") == 2


def test_an_admission_queue_overflow_is_a_queue_full_rejection(engine, registry):
    # No queue at all: a request that does not fit at once is refused (a nearly full 4-block pool).
    admission = AdmissionController(AdmissionConfig(max_queued_per_tenant=0))
    core = make_core(engine, registry, admission=admission)
    full = dataclasses.replace(core.directory.cluster.workers["chat"][0], kv_blocks_total=4, kv_blocks_used=3)
    core.directory.cluster = ClusterView(workers={"chat": [full]})
    with pytest.raises(ResourceExhausted):
        run(core, request(max_tokens=1000))
    labels = {"deployment": "chat", "tenant": "acme"}
    assert value(registry, "raylane_admission_rejections_total", **labels, reason="queue_full") == 1


def worker_stats(worker_id: str, role: str, **overrides: Any) -> WorkerStats:
    values: dict[str, Any] = dict(
        worker_id=worker_id,
        deployment="chat",
        role=role,
        num_running=3,
        num_waiting=1,
        kv_blocks_used=5,
        kv_blocks_total=20,
        kv_usage=0.25,
        output_tokens_per_s=10.0,
        num_generated_tokens=100,
        prefix_cache_hit_rate=0.5,
        num_prefix_cache_queries=64,
        num_prefix_cache_hits=32,
        num_preemptions=2,
        adapters=["a", "b"],
        resident_adapters=["a"],
        expert_counts={},
        kv_bytes_per_block=1024,
        migration=MigrationStats(num_started=4, num_committed=3, num_aborted=1, bytes_moved=4096),
    )
    values.update(overrides)
    return WorkerStats(**values)


def test_worker_stats_become_per_worker_gauges_and_counters_at_scrape_time(registry):
    metrics = RouterMetrics(registry)
    reported: list[WorkerStats] = []
    metrics.watch_workers(lambda: reported)
    assert value(registry, "raylane_num_requests_running", deployment="chat", pool="mixed", worker="w0") == 0
    reported[:] = [worker_stats("w0", "mixed"), worker_stats("w1", "decode", num_running=0, resident_adapters=None)]
    w0 = {"deployment": "chat", "pool": "mixed", "worker": "w0"}
    w1 = {"deployment": "chat", "pool": "decode", "worker": "w1"}
    assert value(registry, "raylane_num_requests_running", **w0) == 3
    assert value(registry, "raylane_num_requests_running", **w1) == 0
    assert value(registry, "raylane_num_requests_waiting", **w0) == 1
    assert value(registry, "raylane_kv_cache_usage_perc", **w0) == 0.25
    assert value(registry, "raylane_prefix_cache_queries_total", **w0) == 64
    assert value(registry, "raylane_prefix_cache_hits_total", **w0) == 32
    assert value(registry, "raylane_num_preemptions_total", **w0) == 2
    assert value(registry, "raylane_lora_adapters_loaded", **w0) == 1
    assert value(registry, "raylane_lora_adapters_loaded", **w1) == 2  # no slot report: the registered ones
    assert value(registry, "raylane_migrations_total", **w0, outcome="committed") == 3
    assert value(registry, "raylane_migrations_total", **w0, outcome="aborted") == 1
    assert value(registry, "raylane_migration_bytes_total", **w0) == 4096
    text, content_type = render(registry)
    assert content_type.startswith("text/plain")
    assert re.search(rb"^# TYPE raylane_prefix_cache_hits(_total)? counter$", text, re.MULTILINE)
