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
        outputs = self.engine.generate(
            call.request_id, call.engine_prompt, call.sampling, lora_name=call.adapter, **call.resume_kwargs
        )
        async with aclosing(self._chunks(outputs, first_seq=len(call.resume_output_token_ids))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        self.calls.append("prefill")
        output, export = await self.engine.prefill(
            call.request_id, call.engine_prompt, call.sampling, lora_name=call.adapter, **call.resume_kwargs
        )
        kv_bytes = 0 if export is None else export.nbytes
        first = self._chunk(len(call.resume_output_token_ids), output)
        return PrefillResult(first=first, prefill_ms=0.0, kv_bytes=kv_bytes), export

    async def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        self.calls.append("decode")
        async with aclosing(self._chunks(self.engine.resume(kv), first_seq=len(kv.output_token_ids))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def stats(self) -> WorkerStats:
        raise NotImplementedError("dispatch never asks for stats")

    async def _chunks(self, outputs: AsyncIterator[RequestOutput], *, first_seq: int) -> AsyncIterator[TokenChunk]:
        seq = first_seq
        async with aclosing(outputs):
            async for output in outputs:
                yield self._chunk(seq, output)
                seq += len(output.new_token_ids)

    def _chunk(self, seq: int, output: RequestOutput) -> TokenChunk:
        return chunk_from_output(output, seq=seq, worker_id=self.worker_id)


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
