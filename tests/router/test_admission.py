"""Predictive admission: admit while the KV forecast fits, queue per tenant, drain fairly, reject and time out.

The unit tests reason in tokens (one token per block) on hand-built views fed by a real `KvLedger`; the last
test drives `RouterCore` over in-process `AsyncEngine`s on the tiny Llama with an overload burst.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import pytest

from router.admission import AdmissionConfig, AdmissionController, admissible_view, estimate_retry_after_s, fits
from router.core import GenerateInput, RouterCore
from router.errors import ResourceExhausted, Unavailable
from router.kv_forecast import KvLedger
from router.policy import DEFAULT_KV_BLOCK_SIZE, ClusterView, Decision, LeastLoadedPolicy, RouteRequest, WorkerView
from router.quota import QuotaLimits
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.messages import GenerateCall, TokenChunk, chunk_from_output

# Each request holds 10 prompt tokens and runs 40 more: 50 tokens at its peak, so a 100-token worker takes two.
PROMPT_TOKENS = 10
MAX_TOKENS = 40


class Cluster:
    """Workers whose KV this test controls through the ledger, placed by `LeastLoadedPolicy`."""

    def __init__(self, capacities: Mapping[str, int], *, prefill: tuple[str, ...] = ()) -> None:
        self.capacities = dict(capacities)
        self.prefill = prefill
        self.ledger = KvLedger()
        self.policy = LeastLoadedPolicy()
        self.admitted: list[str] = []

    def view(self) -> ClusterView:
        role = "decode" if self.prefill else "mixed"
        workers = [
            WorkerView(
                worker_id=wid,
                deployment="chat",
                role=role,
                num_running=self.ledger.num_tracked(wid),
                kv_blocks_total=total,
                kv_blocks_used=self.ledger.snapshot(wid).current_blocks(1),
                kv_block_size=1,
                kv_ledger=self.ledger.snapshot(wid),
            )
            for wid, total in self.capacities.items()
        ]
        workers += [WorkerView(worker_id=wid, deployment="chat", role="prefill") for wid in self.prefill]
        return ClusterView(workers={"chat": workers})

    def placer(self, request: RouteRequest):
        def place(view: ClusterView) -> Decision:
            decision = self.policy.route(request, view)
            self.ledger.place(
                request.request_id,
                worker_id=decision.worker_id,
                num_prompt_tokens=request.num_prompt_tokens_estimate,
                max_tokens=request.max_tokens,
            )
            self.admitted.append(request.request_id)
            return decision

        return place

    async def admit(self, controller: AdmissionController, request: RouteRequest) -> Decision:
        return await controller.admit(request, view=self.view, place=self.placer(request))

    def finish(self, controller: AdmissionController, request_id: str) -> None:
        assert self.ledger.finish(request_id)
        controller.notify_capacity_freed()


def req(request_id: str, tenant: str = "t", **overrides: Any) -> RouteRequest:
    values: dict[str, Any] = {"num_prompt_tokens_estimate": PROMPT_TOKENS, "max_tokens": MAX_TOKENS}
    values.update(overrides)
    return RouteRequest(request_id=request_id, deployment="chat", tenant=tenant, **values)


def controller(**overrides: Any) -> AdmissionController:
    values: dict[str, Any] = {"headroom": 1.0, "max_queued_per_tenant": 8, "max_wait_s": 10.0}
    values.update(overrides)
    return AdmissionController(AdmissionConfig(**values))


async def settle() -> None:
    for _ in range(10):  # a resolved waiter wakes through shield and wait_for: a few loop turns
        await asyncio.sleep(0)


def test_requests_are_admitted_while_the_forecast_fits():
    async def run() -> list[Decision]:
        cluster, admission = Cluster({"w0": 100, "w1": 100}), controller()
        return [await cluster.admit(admission, req(f"r{i}")) for i in range(4)]

    decisions = asyncio.run(run())
    assert Counter(d.worker_id for d in decisions) == {"w0": 2, "w1": 2}


def test_an_over_capacity_request_queues_and_goes_when_a_finish_frees_room():
    async def run() -> None:
        cluster, admission = Cluster({"w0": 100}), controller()
        await cluster.admit(admission, req("r0"))
        await cluster.admit(admission, req("r1"))
        waiting = asyncio.create_task(cluster.admit(admission, req("r2")))
        await settle()
        assert not waiting.done() and admission.num_queued() == 1 and admission.num_queued("t") == 1
        cluster.finish(admission, "r0")
        assert (await waiting).worker_id == "w0"
        assert admission.num_queued() == 0

    asyncio.run(run())


def test_finishes_release_waiters_fifo_per_tenant_and_round_robin_across_tenants():
    async def run() -> list[str]:
        cluster, admission = Cluster({"w0": 100}), controller()
        await cluster.admit(admission, req("x0", tenant="z"))
        await cluster.admit(admission, req("x1", tenant="z"))
        names = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
        tasks = []
        for name, tenant in names:
            tasks.append(asyncio.create_task(cluster.admit(admission, req(name, tenant=tenant))))
            await settle()
        assert admission.num_queued() == 6
        cluster.admitted.clear()
        cluster.finish(admission, "x0")
        for _ in range(len(names)):
            await settle()
            cluster.finish(admission, cluster.admitted[-1])  # room for exactly one more each time
        await asyncio.gather(*tasks)
        return cluster.admitted

    assert asyncio.run(run()) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_a_full_tenant_queue_is_resource_exhausted_with_a_forecast_retry_hint():
    async def run() -> None:
        cluster, admission = Cluster({"w0": 100}), controller(max_queued_per_tenant=2)
        await cluster.admit(admission, req("r0"))
        await cluster.admit(admission, req("r1"))
        waiters = [asyncio.create_task(cluster.admit(admission, req(f"q{i}"))) for i in range(2)]
        await settle()
        with pytest.raises(ResourceExhausted, match="2 requests waiting") as info:
            await cluster.admit(admission, req("overflow"))
        # The queue head needs 50 tokens; the first completion (r0, 40 steps away) frees them: 40 / 20 steps/s.
        assert info.value.retry_after_s == pytest.approx(2.0)
        other_tenant = asyncio.create_task(cluster.admit(admission, req("other", tenant="u")))
        await settle()
        assert admission.num_queued() == 3  # the bound is per tenant
        for task in (*waiters, other_tenant):
            task.cancel()
        await asyncio.gather(*waiters, other_tenant, return_exceptions=True)
        assert admission.num_queued() == 0

    asyncio.run(run())


def test_a_waiter_past_its_deadline_is_unavailable_and_leaves_the_queue(caplog):
    async def run() -> None:
        cluster = Cluster({"w0": 100})
        admission = controller(max_wait_s=0.05, recheck_interval_s=0.01)
        await cluster.admit(admission, req("r0"))
        await cluster.admit(admission, req("r1"))
        with pytest.raises(Unavailable, match="KV capacity") as info:
            await cluster.admit(admission, req("late"))
        assert info.value.retry_after_s > 0
        assert admission.num_queued() == 0 and "late" not in cluster.ledger

    with caplog.at_level(logging.INFO, logger="router.admission"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "router.admission"]
    assert [line.split()[1] for line in lines] == [
        "decision=admit",
        "decision=admit",
        "decision=queue",
        "decision=timeout",
    ]
    assert "request_id=late" in lines[2] and "peak_blocks=w0:150/100" in lines[2]


def test_a_head_that_does_not_fit_blocks_its_own_tenant_only_until_it_is_cancelled():
    async def run() -> list[str]:
        cluster, admission = Cluster({"w0": 100}), controller()
        await cluster.admit(admission, req("r0"))
        await cluster.admit(admission, req("r1", max_tokens=10))  # peaks at 20 tokens, so 30 are left
        cluster.admitted.clear()
        big = asyncio.create_task(cluster.admit(admission, req("big", max_tokens=200)))
        await settle()
        small = asyncio.create_task(cluster.admit(admission, req("small")))
        await settle()
        assert not small.done()  # it would fit, but FIFO within a tenant keeps it behind `big`
        other = asyncio.create_task(cluster.admit(admission, req("other", tenant="u", max_tokens=10)))
        await settle()
        assert other.done()  # another tenant is not held back by this tenant's head
        big.cancel()
        await settle()
        assert small.done() and admission.num_queued() == 0
        return cluster.admitted

    assert asyncio.run(run()) == ["other", "small"]


def test_an_idle_worker_or_an_unknown_pool_always_fits():
    idle = WorkerView(worker_id="w", deployment="chat", role="mixed", kv_blocks_total=10, kv_block_size=1)
    huge = req("huge", max_tokens=10_000)
    config = AdmissionConfig()
    assert fits(huge, idle, config)  # refusing it everywhere would only make it wait forever
    assert not fits(huge, dataclasses.replace(idle, kv_blocks_used=1), config)
    assert fits(huge, WorkerView(worker_id="u", deployment="chat", role="mixed", kv_blocks_used=5), config)


def test_the_admissible_view_filters_decode_workers_and_leaves_prefill_alone():
    cluster = Cluster({"d0": 100, "d1": 100}, prefill=("p0",))
    cluster.ledger.place("r0", worker_id="d0", num_prompt_tokens=20, max_tokens=80)
    filtered = admissible_view(req("x"), cluster.view(), AdmissionConfig(headroom=1.0))
    assert sorted(w.worker_id for w in filtered.workers["chat"]) == ["d1", "p0"]
    decision = LeastLoadedPolicy().route(req("x"), filtered)
    assert (decision.prefill_worker_id, decision.worker_id) == ("p0", "d1")


def test_the_retry_hint_uses_the_workers_own_decode_rate():
    cluster = Cluster({"w0": 100})
    for key in ("r0", "r1"):
        cluster.ledger.place(key, worker_id="w0", num_prompt_tokens=10, max_tokens=40)
    (worker,) = cluster.view().workers["chat"]
    fast = dataclasses.replace(worker, output_tokens_per_s=400.0, num_running=2)  # 200 steps/s
    assert estimate_retry_after_s(req("x"), [fast], AdmissionConfig(headroom=1.0)) == pytest.approx(0.2)


def test_a_deployment_without_serving_workers_fails_at_once_instead_of_waiting():
    async def run() -> None:
        admission = controller()
        with pytest.raises(Unavailable, match="no workers"):
            await admission.admit(req("x"), view=ClusterView, place=lambda view: _route_unavailable(view))

    asyncio.run(run())


def _route_unavailable(view: ClusterView) -> Decision:
    raise Unavailable("deployment 'chat' has no workers yet", retry_after_s=2.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"headroom": 0.0}, "headroom"),
        ({"headroom": 2.5}, "headroom"),
        ({"max_queued_per_tenant": -1}, "max_queued_per_tenant"),
        ({"max_wait_s": -1.0}, "max_wait_s"),
        ({"recheck_interval_s": 0.0}, "recheck_interval_s"),
        ({"fallback_decode_steps_per_s": float("nan")}, "fallback_decode_steps_per_s"),
    ],
)
def test_bad_config_is_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdmissionConfig(**overrides)


# ---- through RouterCore, over real engines --------------------------------------------------------

BURST_PROMPT = tuple(range(3, 21))  # 18 tokens
BURST_MAX_TOKENS = 30
# 18 prompt + 30 output, padded to blocks of 16, forecasts 3 blocks alone and 7 for two started together: an
# 8-block pool starts two at once, and a third only when one of them is about to finish.
ROUTER_BELIEVED_BLOCKS = 8


class CountingClient:
    """An in-process mixed worker that records the most KV blocks its running streams held at once."""

    def __init__(self, worker_id: str, engine: AsyncEngine) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.held_tokens: dict[str, int] = {}
        self.peak_blocks = 0

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        self.held_tokens[call.request_id] = len(call.prompt_token_ids or ())
        self._measure()
        try:
            outputs = self.engine.generate(call)
            async with aclosing(outputs):
                async for output in outputs:
                    self.held_tokens[call.request_id] += len(output.new_token_ids)
                    self._measure()
                    if output.finished:  # its KV is freed now, whenever the generator itself is closed
                        self.held_tokens.pop(call.request_id)
                    yield chunk_from_output(output, worker_id=self.worker_id)
        finally:
            self.held_tokens.pop(call.request_id, None)

    def _measure(self) -> None:
        # Whole blocks per request, as the engine allocates them (ignoring prefix sharing, which only helps).
        blocks = sum(-(-tokens // DEFAULT_KV_BLOCK_SIZE) for tokens in self.held_tokens.values())
        self.peak_blocks = max(self.peak_blocks, blocks)


@dataclass
class BurstDirectory:
    clients_by_id: Mapping[str, CountingClient]
    routing_table: RoutingTable = field(
        default_factory=lambda: RoutingTable(
            version=1,
            deployments={"chat": DeploymentRoute(name="chat")},
            tenants={"acme": QuotaLimits(max_concurrent=100, tokens_per_minute=10_000_000)},
            key_hashes={hash_api_key("key-acme"): "acme"},
        )
    )

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        workers = [
            WorkerView(worker_id=wid, deployment="chat", role="mixed", kv_blocks_total=ROUTER_BELIEVED_BLOCKS)
            for wid in self.clients_by_id
        ]
        return ClusterView(workers={"chat": workers})

    def clients(self) -> Mapping[str, Any]:
        return self.clients_by_id


@pytest.fixture(scope="module")
def burst_engines(tiny_llama) -> Iterator[dict[str, AsyncEngine]]:
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB)
    built = {wid: AsyncEngine(Engine(config)) for wid in ("chat-0", "chat-1")}
    yield built
    for engine in built.values():
        engine.shutdown()


def test_an_overload_burst_is_resource_exhausted_while_every_admitted_request_completes(burst_engines):
    clients = {wid: CountingClient(wid, engine) for wid, engine in burst_engines.items()}
    admission = AdmissionController(AdmissionConfig(headroom=1.0, max_queued_per_tenant=3, max_wait_s=60.0))
    core = RouterCore(BurstDirectory(clients), admission=admission)
    inp = GenerateInput(deployment="chat", prompt_token_ids=BURST_PROMPT, max_tokens=BURST_MAX_TOKENS, ignore_eos=True)

    async def one() -> list[TokenChunk] | ResourceExhausted:
        try:
            return [chunk async for chunk in core.generate("key-acme", inp)]
        except ResourceExhausted as exc:
            return exc

    async def burst() -> list[list[TokenChunk] | ResourceExhausted]:
        return await asyncio.gather(*(one() for _ in range(12)))

    results = asyncio.run(burst())
    rejected = [r for r in results if isinstance(r, ResourceExhausted)]
    completed = [r for r in results if not isinstance(r, ResourceExhausted)]
    # Two per worker run, three wait in the tenant's queue, the other five are turned away.
    assert len(completed) == 7 and len(rejected) == 5
    for error in rejected:
        assert "waiting for KV capacity" in error.message and error.retry_after_s > 0
    for chunks in completed:
        assert sum(len(c.token_ids) for c in chunks) == BURST_MAX_TOKENS
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    # The forecast never let a worker's KV pass the pool the router believes it has.
    assert 0 < max(c.peak_blocks for c in clients.values()) <= ROUTER_BELIEVED_BLOCKS
    assert len(core.kv_ledger) == 0 and admission.num_queued() == 0
    assert core.quotas.inflight("acme") == 0


def test_a_cancelled_stream_releases_its_ledger_entry(burst_engines):
    clients = {wid: CountingClient(wid, engine) for wid, engine in burst_engines.items()}
    core = RouterCore(BurstDirectory(clients), admission=AdmissionController(AdmissionConfig(headroom=1.0)))
    inp = GenerateInput(deployment="chat", prompt_token_ids=BURST_PROMPT, max_tokens=BURST_MAX_TOKENS)

    async def run() -> int:
        async with aclosing(core.generate("key-acme", inp)) as stream:
            await anext(stream)
            tracked = len(core.kv_ledger)
        return tracked

    assert asyncio.run(run()) == 1
    assert len(core.kv_ledger) == 0
