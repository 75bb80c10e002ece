"""Running a placed request on its workers: one mixed worker, or a prefill worker then a decode worker.

Workers are reached through `WorkerClient`, so this flow is plain asyncio: the Ray-backed client
lives in `router/server.py`, an in-process one in `router/local.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, Protocol

from router.errors import Unavailable
from router.policy import Decision
from workers.messages import GenerateCall, PrefillResult, TokenChunk, WorkerStats

logger = logging.getLogger(__name__)


class WorkerClient(Protocol):
    """How the router talks to one worker. Leaving a stream early must abort the request on the worker."""

    worker_id: str

    def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Prefill and decode on this worker, streaming every output token."""
        ...

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        """Run the prompt to its first token; returns the result and an opaque handle to the exported KV."""
        ...

    def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Import the KV behind `kv` (from a prefill worker) and stream the tokens after the first."""
        ...

    async def stats(self) -> WorkerStats: ...


class SequenceGuard:
    """Enforces the stream contract: tokens arrive in order, with no duplicate and no gap."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_seq = 0

    def admit(self, chunk: TokenChunk) -> TokenChunk | None:
        """The part of `chunk` the client has not seen yet, or None when it is all duplicate."""
        end = chunk.seq + len(chunk.token_ids)
        if chunk.seq > self.next_seq:
            raise Unavailable(f"request {self.request_id}: token stream skipped from {self.next_seq} to {chunk.seq}")
        if end <= self.next_seq and not chunk.finished:
            return None
        skip = self.next_seq - chunk.seq
        if skip > 0:
            chunk.token_ids = chunk.token_ids[skip:]
            chunk.seq = self.next_seq
        self.next_seq = max(self.next_seq, end)
        return chunk


async def run_placed(
    decision: Decision, call: GenerateCall, clients: Mapping[str, WorkerClient]
) -> AsyncIterator[TokenChunk]:
    """Stream `call`'s tokens from the workers `decision` chose, sequence-checked."""
    guard = SequenceGuard(call.request_id)
    # aclosing: leaving early closes the worker streams now, not when they are garbage-collected.
    async with aclosing(_stream(decision, call, clients)) as chunks:
        async for chunk in chunks:
            admitted = guard.admit(chunk)
            if admitted is not None:
                yield admitted


async def _stream(
    decision: Decision, call: GenerateCall, clients: Mapping[str, WorkerClient]
) -> AsyncIterator[TokenChunk]:
    worker = _client(clients, decision.worker_id)
    if decision.prefill_worker_id is None:
        async with aclosing(worker.generate(call)) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    prefill = _client(clients, decision.prefill_worker_id)
    start = time.perf_counter()
    result, kv = await prefill.prefill(call)
    prefill_ms = (time.perf_counter() - start) * 1e3
    yield result.first
    if result.first.finished:
        return
    handoff_start = time.perf_counter()
    first_decode = True
    async with aclosing(worker.decode(kv, call)) as chunks:
        async for chunk in chunks:
            if first_decode:
                first_decode = False
                logger.info(
                    "pd handoff request_id=%s prefill=%s decode=%s kv_bytes=%d prefill_ms=%.1f handoff_ms=%.1f",
                    call.request_id,
                    prefill.worker_id,
                    worker.worker_id,
                    result.kv_bytes,
                    prefill_ms,
                    (time.perf_counter() - handoff_start) * 1e3,
                )
            yield chunk


def _client(clients: Mapping[str, WorkerClient], worker_id: str) -> WorkerClient:
    client = clients.get(worker_id)
    if client is None:
        raise Unavailable(f"worker {worker_id} left the cluster; retry", retry_after_s=0.5)
    return client
