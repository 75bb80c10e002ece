"""In-process workers for router tests: a `WorkerClient` over an `AsyncEngine`, so placement runs real engines
without Ray."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from router.policy import ClusterView
from router.table import RoutingTable
from workers.engine.async_engine import AsyncEngine
from workers.engine.request import RequestOutput
from workers.messages import GenerateCall, PrefillResult, TokenChunk, WorkerStats, chunk_from_output


class EngineWorkerClient:
    """A `WorkerClient` over an in-process `AsyncEngine`; records which calls reached it."""

    def __init__(self, worker_id: str, engine: AsyncEngine) -> None:
        self.worker_id = worker_id
        self.engine = engine
        self.calls: list[str] = []

    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        self.calls.append("generate")
        async with aclosing(self.engine.generate(call)) as outputs:
            async for output in outputs:
                yield self._chunk(output)

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        self.calls.append("prefill")
        output, export = await self.engine.prefill(call)
        kv_bytes = 0 if export is None else export.nbytes
        first = self._chunk(output)
        return PrefillResult(first=first, prefill_ms=0.0, kv_bytes=kv_bytes), export

    async def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        self.calls.append("decode")
        async with aclosing(self.engine.resume(kv)) as outputs:
            async for output in outputs:
                yield self._chunk(output)

    async def stats(self) -> WorkerStats:
        raise NotImplementedError("dispatch never asks for stats")

    def _chunk(self, output: RequestOutput) -> TokenChunk:
        return chunk_from_output(output, worker_id=self.worker_id)


@dataclass
class TableOnly:
    """A router `Directory` with a routing table and no workers: enough for auth, quota and validation paths."""

    routing_table: RoutingTable

    def table(self) -> RoutingTable:
        return self.routing_table

    def view(self) -> ClusterView:
        return ClusterView()

    def clients(self) -> dict:
        return {}


def idle_stats(worker_id: str = "w-0", *, num_running: int = 0) -> WorkerStats:
    """A mixed `chat` worker's stats report: 100 free KV blocks, `num_running` requests, nothing else going on."""
    return WorkerStats(
        worker_id=worker_id,
        deployment="chat",
        role="mixed",
        num_running=num_running,
        num_waiting=0,
        kv_blocks_used=0,
        kv_blocks_total=100,
        kv_usage=0.0,
        output_tokens_per_s=0.0,
        num_generated_tokens=0,
        prefix_cache_hit_rate=0.0,
        num_preemptions=0,
        adapters=[],
        expert_counts={},
        kv_bytes_per_block=1024,
    )
