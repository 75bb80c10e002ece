"""Dispatch keeps one stream alive while its workers die or migrate it: in-process engines, fake failures.

Each fake wraps a real in-process worker (`EngineWorkerClient`) and fails the way a Ray actor does:
`WorkerLost` mid-stream or during prefill, a stream that ends early, or a live migration's last chunk.
The client-side output must equal an unfailed run, with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import pytest
from inprocess_workers import EngineWorkerClient, idle_stats

from router.core import GenerateInput, RouterCore
from router.dispatch import FailoverConfig, run_placed
from router.errors import Unavailable, WorkerLost
from router.policy import ClusterView, Decision, WorkerView
from router.quota import QuotaLimits
from router.table import DeploymentRoute, RoutingTable, hash_api_key
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall, PrefillResult, TokenChunk

PROMPT = (5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66)
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=77, ignore_eos=True)


class DyingClient(EngineWorkerClient):
    """Dies (raises `WorkerLost`) after streaming `die_after` chunks, or in prefill when `die_in_prefill`."""

    def __init__(self, worker_id: str, engine: AsyncEngine, *, die_after: int = 3, die_in_prefill: bool = False):
        super().__init__(worker_id, engine)
        self.die_after = die_after
        self.die_in_prefill = die_in_prefill

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        async with aclosing(super().generate(call)) as chunks:
            async for chunk in self._until_death(chunks):
                yield chunk

    async def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        async with aclosing(super().decode(kv, call)) as chunks:
            async for chunk in self._until_death(chunks):
                yield chunk

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        if self.die_in_prefill:
            self.calls.append("prefill")
            raise WorkerLost(self.worker_id, f"actor {self.worker_id} died")
        return await super().prefill(call)

    async def _until_death(self, chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
        count = 0
        async for chunk in chunks:
            if count == self.die_after:
                raise WorkerLost(self.worker_id, f"actor {self.worker_id} died")
            count += 1
            yield chunk


class TruncatingClient(EngineWorkerClient):
    """Ends its stream after `num_chunks` chunks without a final chunk (a broken worker)."""

    def __init__(self, worker_id: str, engine: AsyncEngine, num_chunks: int) -> None:
        super().__init__(worker_id, engine)
        self.num_chunks = num_chunks

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        async with aclosing(super().generate(call)) as chunks:
            count = 0
            async for chunk in chunks:
                yield chunk
                count += 1
                if count == self.num_chunks:
                    return


class MigratingClient(EngineWorkerClient):
    """After `migrate_after` chunks, ends its stream the way a committed migration does.

    The "destination" state (the tokens so far) goes to `handoffs`, where `AttachableClient` picks it up.
    """

    def __init__(self, worker_id: str, engine: AsyncEngine, *, migrate_after: int, to: str, handoffs: dict):
        super().__init__(worker_id, engine)
        self.migrate_after = migrate_after
        self.to = to
        self.handoffs = handoffs

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        produced: list[int] = []
        text = ""
        async with aclosing(super().generate(call)) as chunks:
            async for chunk in chunks:
                produced.extend(chunk.token_ids)
                text += chunk.text
                yield chunk
                if chunk.finished:
                    return
                if len(produced) >= self.migrate_after:
                    break
        self.handoffs[call.request_id] = (call, produced, text)
        yield TokenChunk(
            request_id=call.request_id, seq=len(produced), token_ids=[], worker_id=self.worker_id, migrated_to=self.to
        )


class AttachableClient(EngineWorkerClient):
    """Serves `attach` by continuing a handed-off request, re-sending `overlap` tokens the client already has."""

    def __init__(self, worker_id: str, engine: AsyncEngine, *, handoffs: dict, overlap: int = 0) -> None:
        super().__init__(worker_id, engine)
        self.handoffs = handoffs
        self.overlap = overlap
        self.attached_from: list[int] = []

    async def attach(self, request_id: str, from_seq: int) -> AsyncIterator[TokenChunk]:
        self.attached_from.append(from_seq)
        call, produced, text = self.handoffs.pop(request_id)
        start = max(from_seq - self.overlap, 1)
        chars = len(text) if start == len(produced) else 0
        resume = GenerateCall(
            request_id=call.request_id,
            prompt_token_ids=call.prompt_token_ids,
            sampling=call.sampling,
            resume_output_token_ids=tuple(produced[:start]),
            resume_num_text_chars=chars,
        )
        async with aclosing(super().generate(resume)) as chunks:
            async for chunk in chunks:
                yield chunk


@pytest.fixture(scope="module")
def engines(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB)
    built = {name: AsyncEngine(Engine(config)) for name in ("a", "b", "c")}
    yield built
    for engine in built.values():
        engine.shutdown()


def call(request_id: str, sampling: SamplingParams = GREEDY) -> GenerateCall:
    return GenerateCall(request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling)


def collect(decision: Decision, generate_call: GenerateCall, clients, **kwargs) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [c async for c in run_placed(decision, generate_call, clients, **kwargs)]

    return asyncio.run(run())


def tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_one_clean_stream(chunks: list[TokenChunk]) -> None:
    expected = 0
    for c in chunks:
        assert c.seq == expected, "gap or duplicate in the client's stream"
        expected += len(c.token_ids)
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def reference(engines, sampling: SamplingParams, request_id: str) -> list[TokenChunk]:
    return collect(Decision(worker_id="c"), call(request_id, sampling), {"c": EngineWorkerClient("c", engines["c"])})


def replan_to(decision: Decision, clients: Mapping[str, Any], seen: list[frozenset[str]]):
    def replan(lost: frozenset[str]):
        seen.append(lost)
        return decision, clients

    return replan


async def _idle(engine: AsyncEngine) -> bool:
    for _ in range(200):
        if not await engine.acall(lambda e: e.has_unfinished()) and engine.engine.stats().num_kv_blocks_used == 0:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("die_after", [1, 4, 11])
def test_a_mixed_worker_dying_mid_stream_resumes_elsewhere_with_the_same_output(engines, sampling, die_after, caplog):
    expected = reference(engines, sampling, f"ref-{die_after}")
    clients = {
        "a": DyingClient("a", engines["a"], die_after=die_after),
        "b": EngineWorkerClient("b", engines["b"]),
    }
    seen: list[frozenset[str]] = []
    with caplog.at_level(logging.WARNING, logger="router.dispatch"):
        chunks = collect(
            Decision(worker_id="a"),
            call(f"die-{die_after}", sampling),
            clients,
            replan=replan_to(Decision(worker_id="b"), clients, seen),
        )
    assert tokens(chunks) == tokens(expected)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in expected)
    assert_one_clean_stream(chunks)
    assert seen == [frozenset({"a"})]
    assert {c.worker_id for c in chunks[:die_after]} == {"a"} and {c.worker_id for c in chunks[die_after:]} == {"b"}
    failovers = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failover ")]
    assert len(failovers) == 1
    assert f"lost_worker=a attempt=1 max_failovers=3 resume_tokens={die_after}" in failovers[0]
    assert asyncio.run(_idle(engines["a"])), "the lost worker's request still holds blocks"


def test_prefill_worker_death_before_the_handoff_retries_the_prefill_elsewhere(engines):
    expected = reference(engines, GREEDY, "ref-pd-prefill")
    clients = {
        "a": DyingClient("a", engines["a"], die_in_prefill=True),
        "b": EngineWorkerClient("b", engines["b"]),
        "c": EngineWorkerClient("c", engines["c"]),
    }
    seen: list[frozenset[str]] = []
    replan = replan_to(Decision(worker_id="b", prefill_worker_id="c"), clients, seen)
    chunks = collect(Decision(worker_id="b", prefill_worker_id="a"), call("pd-prefill-dies"), clients, replan=replan)
    assert tokens(chunks) == tokens(expected)
    assert_one_clean_stream(chunks)
    assert seen == [frozenset({"a"})]
    assert clients["a"].calls == ["prefill"]
    assert clients["c"].calls == ["prefill"] and clients["b"].calls == ["decode"]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_decode_worker_death_resumes_through_a_new_prefill_and_decode(engines, sampling):
    expected = reference(engines, sampling, "ref-pd-decode")
    clients = {
        "a": EngineWorkerClient("a", engines["a"]),
        "b": DyingClient("b", engines["b"], die_after=3),
        "c": EngineWorkerClient("c", engines["c"]),
    }
    seen: list[frozenset[str]] = []
    replan = replan_to(Decision(worker_id="c", prefill_worker_id="a"), clients, seen)
    chunks = collect(
        Decision(worker_id="b", prefill_worker_id="a"), call("pd-decode-dies", sampling), clients, replan=replan
    )
    assert tokens(chunks) == tokens(expected)
    assert_one_clean_stream(chunks)
    assert seen == [frozenset({"b"})]
    assert clients["a"].calls == ["prefill", "prefill"] and clients["c"].calls == ["decode"]


def test_retries_are_bounded_and_then_the_client_gets_a_clear_unavailable(engines):
    clients = {name: DyingClient(name, engines[name], die_after=2) for name in ("a", "b", "c")}
    order = iter(["b", "c", "a", "b"])
    seen: list[frozenset[str]] = []

    def replan(lost: frozenset[str]):
        seen.append(lost)
        return Decision(worker_id=next(order)), clients

    received: list[TokenChunk] = []

    async def run() -> None:
        stream = run_placed(
            Decision(worker_id="a"),
            call("always-dies"),
            clients,
            replan=replan,
            failover=FailoverConfig(max_failovers=2),
        )
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(Unavailable, match=r"lost 3 time\(s\).*giving up after 2 failover") as info:
        asyncio.run(run())
    assert info.value.status.name == "UNAVAILABLE" and info.value.retry_after_s
    assert len(seen) == 2
    assert_one_clean_stream(
        [*received, TokenChunk(request_id="x", seq=len(tokens(received)), token_ids=[], finished=True)]
    )
    assert len(tokens(received)) == 6  # 2 tokens from each of the three workers, none twice
    for name in ("a", "b", "c"):
        assert asyncio.run(_idle(engines[name]))


def test_without_replan_a_lost_worker_is_unavailable():
    class Dead:
        worker_id = "a"

        async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
            raise WorkerLost("a")
            yield  # pragma: no cover

    with pytest.raises(Unavailable, match="lost 1 time"):
        collect(Decision(worker_id="a"), call("no-replan"), {"a": Dead()})


def test_a_stream_that_ends_without_finishing_is_treated_as_a_lost_worker(engines):
    expected = reference(engines, GREEDY, "ref-truncated")
    clients = {"a": TruncatingClient("a", engines["a"], 5), "b": EngineWorkerClient("b", engines["b"])}
    seen: list[frozenset[str]] = []
    chunks = collect(
        Decision(worker_id="a"), call("truncated"), clients, replan=replan_to(Decision(worker_id="b"), clients, seen)
    )
    assert tokens(chunks) == tokens(expected)
    assert_one_clean_stream(chunks)
    assert seen == [frozenset({"a"})]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize(("migrate_after", "overlap"), [(1, 0), (6, 2), (11, 1)])
def test_the_stream_follows_a_migration_without_gap_or_duplicate(engines, sampling, migrate_after, overlap):
    expected = reference(engines, sampling, f"ref-mig-{migrate_after}")
    handoffs: dict = {}
    clients = {
        "a": MigratingClient("a", engines["a"], migrate_after=migrate_after, to="b", handoffs=handoffs),
        "b": AttachableClient("b", engines["b"], handoffs=handoffs, overlap=overlap),
    }
    placed: list[Decision] = []
    chunks = collect(Decision(worker_id="a"), call(f"mig-{migrate_after}", sampling), clients, on_placed=placed.append)
    assert tokens(chunks) == tokens(expected)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in expected)
    assert_one_clean_stream(chunks)
    assert not any(c.migrated_to for c in chunks)  # the switch is invisible to the client
    assert clients["b"].attached_from == [migrate_after]
    assert [d.worker_id for d in placed] == ["b"]


def test_a_migration_to_an_unknown_worker_fails_over_by_recompute(engines):
    expected = reference(engines, GREEDY, "ref-mig-unknown")
    clients = {
        "a": MigratingClient("a", engines["a"], migrate_after=4, to="nowhere", handoffs={}),
        "b": EngineWorkerClient("b", engines["b"]),
    }
    seen: list[frozenset[str]] = []
    chunks = collect(
        Decision(worker_id="a"), call("mig-unknown"), clients, replan=replan_to(Decision(worker_id="b"), clients, seen)
    )
    assert tokens(chunks) == tokens(expected)
    assert_one_clean_stream(chunks)
    assert seen == [frozenset({"nowhere"})]


# ---- through RouterCore: the lost worker is marked unhealthy and the policy places the resume -----------


class FailoverDirectory:
    """Two mixed workers; the first dies mid-stream. Records `mark_unhealthy` calls."""

    def __init__(self, engines: Mapping[str, AsyncEngine]) -> None:
        self.routing_table = RoutingTable(
            version=1,
            deployments={"chat": DeploymentRoute(name="chat")},
            tenants={"acme": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000)},
            key_hashes={hash_api_key("key-acme"): "acme"},
        )
        self.worker_clients = {
            "w-0": DyingClient("w-0", engines["a"], die_after=3),
            "w-1": EngineWorkerClient("w-1", engines["b"]),
        }
        self.unhealthy: list[str] = []

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return ClusterView(
            workers={
                "chat": [
                    WorkerView(worker_id=w, deployment="chat", role="mixed", is_healthy=w not in self.unhealthy)
                    for w in self.worker_clients
                ]
            }
        )

    def clients(self) -> Mapping[str, Any]:
        return self.worker_clients

    def mark_unhealthy(self, worker_id: str) -> None:
        self.unhealthy.append(worker_id)


def test_router_core_fails_over_to_another_healthy_worker_and_keeps_accounting(engines):
    directory = FailoverDirectory(engines)
    core = RouterCore(directory)
    inp = GenerateInput(deployment="chat", prompt_token_ids=PROMPT, max_tokens=12, ignore_eos=True)
    expected = reference(engines, GREEDY, "ref-core")

    async def run() -> list[TokenChunk]:
        return [c async for c in core.generate("key-acme", inp)]

    chunks = asyncio.run(run())  # least-loaded picks w-0 first (ties go to the first worker)
    assert tokens(chunks) == tokens(expected)
    assert_one_clean_stream(chunks)
    assert directory.unhealthy == ["w-0"]
    assert {c.worker_id for c in chunks[3:]} == {"w-1"}
    assert not +core._inflight and len(core.kv_ledger) == 0


# ---- the Ray-backed directory: a lost worker stays out of placement until it answers again -------------


class _Remote:
    """`handle.method.remote(...)` for a fake actor: an awaitable of `fn(...)`, optionally held by `gate`."""

    def __init__(self, fn, gate: asyncio.Event | None = None) -> None:
        self.fn, self.gate = fn, gate

    def remote(self, *args):
        async def run():
            if self.gate is not None:
                await self.gate.wait()
            return self.fn(*args)

        return asyncio.ensure_future(run())


def _stats(worker_id: str):
    return idle_stats(worker_id)


def test_ray_directory_keeps_a_lost_worker_unhealthy_until_a_later_stats_answer():
    from router.server import RayDirectory, RouterConfig, RoutingState, WorkerEntry

    gate = asyncio.Event()
    gate.set()

    class Handle:
        stats = _Remote(lambda: _stats("w-0"), gate)

    state = RoutingState(
        table=RoutingTable(deployments={"chat": DeploymentRoute(name="chat")}),
        workers={"w-0": WorkerEntry(worker_id="w-0", deployment="chat", role="mixed", handle=Handle())},
    )

    class ControlPlane:
        routing_state = _Remote(lambda: state)

    def healthy(directory: RayDirectory) -> bool:
        return directory.view().workers["chat"][0].is_healthy

    async def run() -> None:
        directory = RayDirectory(RouterConfig(), ControlPlane())
        await directory.refresh_table()
        clients = directory.clients()
        await directory.refresh_stats()
        assert healthy(directory)
        # A stats call in flight when the worker is lost must not make it healthy again.
        gate.clear()
        pending = asyncio.ensure_future(directory.refresh_stats())
        for _ in range(5):  # let the stats call go out
            await asyncio.sleep(0)
        directory.mark_unhealthy("w-0")
        gate.set()
        await pending
        assert not healthy(directory)
        await directory.refresh_stats()  # asked after the loss, answered: healthy again (e.g. a replacement)
        assert healthy(directory)
        await directory.refresh_table()
        assert directory.clients() is clients and set(clients) == {"w-0"}  # updated in place for live dispatches

    asyncio.run(run())
