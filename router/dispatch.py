"""Running a placed request on its workers: one mixed worker, or a prefill worker then a decode worker.

Workers are reached through `WorkerClient`, so this flow is plain asyncio: the Ray-backed client
lives in `router/server.py`, an in-process one in `tests/router/inprocess_workers.py`.

The client sees one stream however the request moves underneath it:
- a live migration ends the source's stream with a chunk naming `migrated_to`; the stream then
  `attach`es to the destination from the next sequence number;
- a worker that dies mid-call raises `WorkerLost`; the request is placed again (without the lost
  workers) and resumed by recompute from the tokens the client already has, at most
  `FailoverConfig.max_failovers` times.
`SequenceGuard` drops anything the client has already seen, whichever worker sends it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from router.errors import Unavailable, WorkerLost
from router.policy import Decision
from workers import faults
from workers.messages import GenerateCall, PrefillResult, TokenChunk, WorkerStats

logger = logging.getLogger(__name__)


class WorkerClient(Protocol):
    """How the router talks to one worker. Leaving a stream early must abort the request on the worker.

    Every call raises `WorkerLost` when the worker dies or cannot be reached while it runs.
    """

    worker_id: str

    def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Prefill and decode on this worker, streaming every output token from `len(call.resume_output_token_ids)`."""
        ...

    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, Any]:
        """Run the prompt to its first token; returns the result and an opaque handle to the exported KV."""
        ...

    def decode(self, kv: Any, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Import the KV behind `kv` (from a prefill worker) and stream the tokens after the first."""
        ...

    def attach(self, request_id: str, from_seq: int) -> AsyncIterator[TokenChunk]:
        """Stream a request migrated to this worker, from output index `from_seq` on."""
        ...

    async def stats(self) -> WorkerStats: ...


Replan = Callable[[frozenset[str]], tuple[Decision, Mapping[str, WorkerClient]]]
"""Places a request again avoiding the given lost worker ids; returns the decision and the clients to use.

Raises a `RouterError` (e.g. `Unavailable`) when no worker can take it."""


@dataclass(kw_only=True, frozen=True)
class FailoverConfig:
    """How hard dispatch tries to keep a request alive when its workers die."""

    max_failovers: int = 3
    """Workers a request may lose before it fails with `UNAVAILABLE`; 0 turns failover off."""

    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")


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
            chunk.logprobs = None if chunk.logprobs is None else chunk.logprobs[skip:]
            chunk.seq = self.next_seq
        self.next_seq = max(self.next_seq, end)
        return chunk


@dataclass
class _Sent:
    """What the client holds so far: the state a recompute resumes from."""

    token_ids: list[int] = dataclasses.field(default_factory=list)
    num_text_chars: int = 0

    def resume_call(self, call: GenerateCall) -> GenerateCall:
        return dataclasses.replace(
            call, resume_output_token_ids=tuple(self.token_ids), resume_num_text_chars=self.num_text_chars
        )


async def run_placed(
    decision: Decision,
    call: GenerateCall,
    clients: Mapping[str, WorkerClient],
    *,
    replan: Replan | None = None,
    failover: FailoverConfig | None = None,
    on_placed: Callable[[Decision], None] | None = None,
) -> AsyncIterator[TokenChunk]:
    """Stream `call`'s tokens from the workers `decision` chose, sequence-checked, following migrations.

    With `replan`, a lost worker triggers a resume elsewhere (see the module docstring); `on_placed`
    hears every later placement (failover or migration), e.g. to move load accounting.
    """
    failover = failover or FailoverConfig()
    guard = SequenceGuard(call.request_id)
    sent = _Sent()
    lost: list[str] = []
    source: AsyncIterator[TokenChunk] = _stream(decision, call, clients)
    current = decision.worker_id
    while True:
        migrated_to = ""
        try:
            # aclosing: leaving early closes the worker streams now, not when they are garbage-collected.
            async with aclosing(source) as chunks:
                async for chunk in chunks:
                    if chunk.migrated_to:
                        migrated_to = chunk.migrated_to
                        continue
                    admitted = guard.admit(chunk)
                    if admitted is None:
                        continue
                    sent.token_ids.extend(admitted.token_ids)
                    sent.num_text_chars += len(admitted.text)
                    yield admitted
                    if admitted.finished:
                        return
            if not migrated_to:
                # A worker stream always ends with a finished or a migrated chunk; anything else is a lost worker.
                raise WorkerLost(current, f"worker {current} ended the stream of {call.request_id} early")
        except WorkerLost as exc:
            lost.append(exc.worker_id)
            decision, clients = _replace(call, exc, lost, sent, replan, failover)
            current = decision.worker_id
            source = _stream(decision, sent.resume_call(call), clients)
            if on_placed is not None:
                on_placed(decision)
            continue
        logger.info(
            "stream follows migration request_id=%s source=%s destination=%s from_seq=%d",
            call.request_id,
            current,
            migrated_to,
            guard.next_seq,
        )
        destination = clients.get(migrated_to)
        if destination is None:
            source = _raise_lost(migrated_to, f"migration destination {migrated_to} is unknown to this router")
        else:
            source = destination.attach(call.request_id, guard.next_seq)
        current = migrated_to
        if on_placed is not None:
            on_placed(Decision(worker_id=migrated_to, reason="migration"))


def _replace(
    call: GenerateCall,
    exc: WorkerLost,
    lost: list[str],
    sent: _Sent,
    replan: Replan | None,
    failover: FailoverConfig,
) -> tuple[Decision, Mapping[str, WorkerClient]]:
    """The next placement after losing `exc.worker_id`, or `Unavailable` once the retries are spent."""
    if replan is None or len(lost) > failover.max_failovers:
        logger.warning(
            "failover exhausted request_id=%s lost=%s num_lost=%d max_failovers=%d sent_tokens=%d",
            call.request_id,
            ",".join(lost),
            len(lost),
            failover.max_failovers,
            len(sent.token_ids),
        )
        raise Unavailable(
            f"request {call.request_id}: the worker serving it was lost {len(lost)} time(s) "
            f"(last: {exc.worker_id}: {exc.message}); giving up after {failover.max_failovers} failover(s)",
            retry_after_s=1.0,
        ) from None
    decision, clients = replan(frozenset(lost))
    logger.warning(
        "failover request_id=%s lost_worker=%s attempt=%d max_failovers=%d resume_tokens=%d resume_chars=%d "
        "worker=%s prefill=%s reason=%s",
        call.request_id,
        exc.worker_id,
        len(lost),
        failover.max_failovers,
        len(sent.token_ids),
        sent.num_text_chars,
        decision.worker_id,
        decision.prefill_worker_id or "-",
        exc.message,
    )
    return decision, clients


async def _raise_lost(worker_id: str, message: str) -> AsyncIterator[TokenChunk]:
    raise WorkerLost(worker_id, message)
    yield  # pragma: no cover - makes this an async generator


def _stream(decision: Decision, call: GenerateCall, clients: Mapping[str, WorkerClient]) -> AsyncIterator[TokenChunk]:
    """The worker stream of `call`: the mixed worker's own, or a prefill-then-decode one."""
    worker = _client(clients, decision.worker_id)
    if decision.prefill_worker_id is None:
        return worker.generate(call)
    return _disaggregated(_client(clients, decision.prefill_worker_id), worker, call)


async def _disaggregated(prefill: WorkerClient, worker: WorkerClient, call: GenerateCall) -> AsyncIterator[TokenChunk]:
    """Prefill `call` on one worker, then decode it on another from the exported KV; logs the handoff's cost."""
    start = time.perf_counter()
    result, kv = await prefill.prefill(call)
    prefill_ms = (time.perf_counter() - start) * 1e3
    yield result.first
    if result.first.finished:
        return
    await faults.hit_async("pd_handoff")
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
