"""The Ray actor that serves one engine in a prefill, decode or mixed role.

Only this module (in `workers/`) imports Ray. Streams are Ray streaming generators of `TokenChunk`;
cancelling one (`ray.cancel`) aborts the request in the engine and frees its KV blocks. Engine
errors reach the caller as their own type (Ray's `RayTaskError` also subclasses the cause).

Prefill/decode handoff::

    first_ref, kv_ref = prefill_worker.prefill.options(num_returns=2).remote(call)
    first = await first_ref                     # PrefillResult, small
    if not first.first.finished:                # the KV goes worker to worker via the object store
        async for ref in decode_worker.decode.remote(kv_ref, call): chunk = await ref   # seq 1, 2, ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace

import ray
import torch

from workers import faults
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.kv_transfer import KVExport
from workers.engine.migration import migrate
from workers.engine.request import RequestOutput
from workers.messages import (
    ROLES,
    GenerateCall,
    MigrationConfig,
    MigrationReport,
    MigrationStats,
    PrefillResult,
    RunningRequestInfo,
    TokenChunk,
    WorkerStats,
    WrongRoleError,
    chunk_from_output,
)

logger = logging.getLogger(__name__)

_MAX_CONCURRENCY = 1000
"""Concurrent calls per actor: every open stream holds one, so this bounds streams, not compute."""
_STREAM_BACKPRESSURE = 16
"""Unconsumed chunks a stream may buffer before its producer waits for the consumer (Ray's generator backpressure)."""


@dataclass(kw_only=True, frozen=True)
class WorkerConfig:
    """Everything one worker actor needs to start."""

    worker_id: str
    """Unique id, `{deployment}-{role}-{n}`; also names the actor."""
    deployment: str
    """Deployment the worker serves."""
    role: str
    """`prefill`, `decode` or `mixed`."""
    engine: EngineConfig
    """The engine this worker runs."""
    adapters: tuple[tuple[str, str], ...] = ()
    """`(name, path)` LoRA adapters registered at start."""
    num_torch_threads: int = 1
    """torch intra-op threads in the actor; 1 so co-located actors do not fight over cores."""
    stream_stall_timeout_s: float = 30.0
    """Abort a request whose consumer left `_STREAM_BACKPRESSURE` chunks unread for this long, freeing its blocks."""
    prefix_summary_limit: int = 4096
    """Cached-block hashes published with each stats report for prefix-aware routing (8 bytes each); 0: none."""
    engine_stall_timeout_s: float = 120.0
    """`ping` and `stats` report the worker dead when its engine loop finished no step (or idle wait) for this
    long: far above any step on a loaded machine, so a slow worker is never declared dead."""

    def __post_init__(self) -> None:
        if not self.worker_id or not self.deployment:
            raise ValueError("worker_id and deployment must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.num_torch_threads < 1:
            raise ValueError(f"num_torch_threads must be >= 1, got {self.num_torch_threads}")
        if self.prefix_summary_limit < 0:
            raise ValueError(f"prefix_summary_limit must be >= 0, got {self.prefix_summary_limit}")
        if self.stream_stall_timeout_s <= 0:
            raise ValueError(f"stream_stall_timeout_s must be positive, got {self.stream_stall_timeout_s}")
        if self.engine_stall_timeout_s <= 0:
            raise ValueError(f"engine_stall_timeout_s must be positive, got {self.engine_stall_timeout_s}")
        object.__setattr__(self, "adapters", tuple((str(n), str(p)) for n, p in self.adapters))
        names = [name for name, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got {names}")


@ray.remote(max_concurrency=_MAX_CONCURRENCY)
class LLMWorker:
    """One engine behind Ray: streams tokens, hands KV off between prefill and decode, reports load."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._init_threads()
        self._init_engine()
        self._is_shut_down = False
        self._background_tasks: set[asyncio.Task] = set()
        self._num_open_streams = 0
        self._migration_stats = MigrationStats()
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}
        """Incoming migrations' reservations: request id -> timer that frees them when the source goes quiet."""
        self._incoming: dict[str, _Incoming] = {}
        """Committed incoming migrations whose stream nobody has `attach`ed to yet."""

    def _init_threads(self) -> None:
        torch.set_num_threads(self.config.num_torch_threads)

    def _init_engine(self) -> None:
        engine = Engine(self.config.engine)
        # Registered before the step loop starts, so the engine is still single-threaded here.
        for name, path in self.config.adapters:
            engine.add_lora(name, path)
        self.kv_bytes_per_block = engine.model_config.kv_bytes_per_token(engine.dtype) * self.config.engine.block_size
        self.engine = AsyncEngine(engine)
        logger.info(
            "worker started worker_id=%s deployment=%s role=%s model=%s adapters=%s",
            self.config.worker_id,
            self.config.deployment,
            self.config.role,
            self.config.engine.model,
            [name for name, _ in self.config.adapters],
        )

    # ---- health and load ----------------------------------------------------------------------

    async def ping(self) -> str:
        """The worker id while the engine loop is alive; raises `EngineDeadError` once it is not (the health check
        then replaces the worker: answering a ping is not being alive)."""
        self._check_alive()
        return self.config.worker_id

    async def stats(self) -> WorkerStats:
        self._check_alive()
        limit = self.config.prefix_summary_limit
        stats, hashes = await self.engine.acall(
            lambda engine: (engine.stats(), engine.prefix_block_hashes(limit) if limit else None)
        )
        return WorkerStats(
            worker_id=self.config.worker_id,
            deployment=self.config.deployment,
            role=self.config.role,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_blocks_used=stats.num_kv_blocks_used,
            kv_blocks_total=stats.num_kv_blocks_total,
            kv_usage=stats.kv_usage,
            output_tokens_per_s=stats.output_tokens_per_s,
            num_generated_tokens=stats.num_generated_tokens,
            prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
            num_prefix_cache_queries=stats.num_prefix_cache_queries,
            num_prefix_cache_hits=stats.num_prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            adapters=list(stats.lora_adapters),
            expert_counts=dict(stats.expert_counts),
            kv_bytes_per_block=self.kv_bytes_per_block,
            kv_block_size=self.config.engine.block_size,
            migration=replace(self._migration_stats),
            prefix_block_hashes=hashes,
            resident_adapters=list(stats.resident_adapters),
            num_pending_prefill_tokens=stats.num_pending_prefill_tokens,
            num_adapter_slots=stats.num_adapter_slots,
        )

    async def num_open_streams(self) -> int:
        """Token streams (generate, decode, attach) not yet ended; a drain stops the worker only at 0, so the
        hand-over chunk of every migrated request has reached its router."""
        return self._num_open_streams

    async def running_requests(self) -> list[RunningRequestInfo]:
        """The running requests (not those paused for a migration), for a migration policy or a drain."""
        self._check_alive()

        def collect(engine: Engine) -> list[RunningRequestInfo]:
            return [
                RunningRequestInfo(
                    request_id=r.request_id,
                    num_prompt_tokens=r.num_prompt_tokens,
                    num_output_tokens=r.num_output_tokens,
                    max_tokens=r.sampling_params.max_tokens,
                    priority=r.priority,
                    num_blocks=len(engine.scheduler.get_block_ids(r.request_id)),
                )
                for r in engine.scheduler.running
            ]

        return await self.engine.acall(collect)

    # ---- serving ------------------------------------------------------------------------------

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=_STREAM_BACKPRESSURE)
    async def generate(self, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Stream the whole output of `call` (seq 0, 1, ..., or on from a failover's resume tokens).

        Roles: mixed, decode.
        """
        self._check_role("generate", ("mixed", "decode"))
        with self._open_stream(call.request_id) as opened:
            async with aclosing(self.engine.generate(call)) as outputs:
                async for output in outputs:
                    chunk = await self._to_chunk(opened, output)
                    with _StallGuard(self, call.request_id):
                        yield chunk

    @ray.method(num_returns=2)
    async def prefill(self, call: GenerateCall) -> tuple[PrefillResult, KVExport | None]:
        """Run `call` to its first token and return it with the exported KV; the engine keeps nothing.

        The export is None when the first token finished the request. Roles: prefill, mixed.
        """
        self._check_role("prefill", ("prefill", "mixed"))
        start = time.perf_counter()
        output, export = await self.engine.prefill(call)
        prefill_ms = (time.perf_counter() - start) * 1e3
        kv_bytes = 0 if export is None else export.nbytes
        logger.info(
            "pd prefill handoff worker_id=%s request_id=%s prompt_tokens=%d blocks=%d bytes=%d prefill_ms=%.1f "
            "finished=%s",
            self.config.worker_id,
            call.request_id,
            output.num_prompt_tokens,
            0 if export is None else export.num_blocks,
            kv_bytes,
            prefill_ms,
            output.finished,
        )
        first = chunk_from_output(output, worker_id=self.config.worker_id)
        return PrefillResult(first=first, prefill_ms=prefill_ms, kv_bytes=kv_bytes), export

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=_STREAM_BACKPRESSURE)
    async def decode(self, export: KVExport, call: GenerateCall) -> AsyncIterator[TokenChunk]:
        """Import the KV a prefill worker exported and stream the rest of the output (seq 1, 2, ...).

        Roles: decode, mixed.
        """
        self._check_role("decode", ("decode", "mixed"))
        if export is None:
            raise ValueError(f"request {call.request_id!r} finished at prefill; there is nothing to decode")
        if export.request_id != call.request_id:
            raise ValueError(f"KV export is for {export.request_id!r}, the call is {call.request_id!r}")
        with self._open_stream(call.request_id) as opened:
            async with aclosing(self.engine.resume(export)) as outputs:
                async for output in outputs:
                    chunk = await self._to_chunk(opened, output)
                    if opened.num_chunks == 1:
                        # Import plus one decode step: the handoff cost the decode side adds.
                        logger.info(
                            "pd decode handoff worker_id=%s request_id=%s blocks=%d bytes=%d tokens=%d "
                            "first_token_ms=%.1f",
                            self.config.worker_id,
                            call.request_id,
                            export.num_blocks,
                            export.nbytes,
                            export.num_computed_tokens,
                            opened.elapsed_ms(),
                        )
                    with _StallGuard(self, call.request_id):
                        yield chunk

    async def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is; an open stream for it ends with finish_reason `abort`."""
        self._check_alive()
        return await self.engine.abort(request_id)

    # ---- live migration: source --------------------------------------------------------------

    async def migrate_out(
        self, request_id: str, destination: ray.actor.ActorHandle, destination_id: str, config: MigrationConfig
    ) -> MigrationReport:
        """Move a running request to `destination` by multi-stage KV pre-copy (see `workers.engine.migration`).

        Never raises for an ordinary abort (refusal, the request ended, the destination died): the report
        says `aborted` and the request keeps running here. On commit, its open stream here ends with a chunk
        whose `migrated_to` is `destination_id`; the rest streams from `destination.attach`.
        """
        self._check_role("migrate_out", ("mixed", "decode"))
        if destination_id == self.config.worker_id:
            raise ValueError(f"cannot migrate {request_id!r} from worker {destination_id} to itself")
        self._migration_stats.num_started += 1
        result = await migrate(
            self.engine,
            _RayDestination(destination, config),
            request_id,
            destination_id=destination_id,
            max_stages=config.max_stages,
            last_stage_max_blocks=config.last_stage_max_blocks,
            call_timeout_s=config.stage_timeout_s,
        )
        stats = self._migration_stats
        stats.bytes_moved += result.bytes_moved
        if result.committed:
            stats.num_committed += 1
            stats.last_downtime_ms = result.downtime_ms
            stats.downtime_ms_total += result.downtime_ms
        else:
            stats.num_aborted += 1
        return MigrationReport(
            request_id=request_id,
            source_id=self.config.worker_id,
            destination_id=destination_id,
            outcome="committed" if result.committed else "aborted",
            reason=result.reason,
            num_stages=result.num_stages,
            num_blocks_copied=result.num_blocks_copied,
            bytes_moved=result.bytes_moved,
            downtime_ms=result.downtime_ms,
            total_ms=result.total_ms,
        )

    # ---- live migration: destination ---------------------------------------------------------

    async def migration_reserve(self, request_id: str, num_blocks: int, timeout_s: float) -> None:
        """Hold `num_blocks` KV blocks for an incoming request; freed if no stage or commit comes for `timeout_s`.

        Raises `NoKVCapacityError` when too few blocks are free (the source then aborts).
        """
        self._check_role("migration_reserve", ("mixed", "decode"))
        await self.engine.acall(lambda engine: engine.reserve_kv(request_id, num_blocks))
        self._arm_watchdog(request_id, timeout_s)
        logger.info(
            "migration reserved worker_id=%s request_id=%s blocks=%d", self.config.worker_id, request_id, num_blocks
        )

    async def migration_stage(self, export: KVExport, timeout_s: float) -> None:
        """Write a pre-copy stage's blocks into the request's reservation."""
        self._check_alive()
        self._arm_watchdog(export.request_id, timeout_s)
        await self.engine.acall(lambda engine: engine.stage_kv(export))

    async def migration_commit(self, export: KVExport, attach_timeout_s: float) -> None:
        """Install the request from its reservation plus the final copy; it decodes here from now on.

        Its outputs buffer until `attach`; nobody attaching within `attach_timeout_s` aborts it.
        """
        self._check_alive()
        request_id = export.request_id
        self._disarm_watchdog(request_id)
        try:
            stream = await self.engine.commit_migration(export)
        except BaseException:
            await self.engine.acall(lambda engine: engine.release_reservation(request_id))
            raise
        loop = asyncio.get_running_loop()
        timer = loop.call_later(attach_timeout_s, self._expire_incoming, request_id)
        self._incoming[request_id] = _Incoming(stream=stream, first_seq=len(export.output_token_ids), timer=timer)
        logger.info(
            "migration committed here worker_id=%s request_id=%s blocks=%d tokens=%d",
            self.config.worker_id,
            request_id,
            export.from_block + export.num_blocks,
            export.num_computed_tokens,
        )

    async def migration_abort(self, request_id: str) -> bool:
        """Drop an incoming migration: free its reservation, or abort it if committed but not attached yet."""
        self._check_alive()
        self._disarm_watchdog(request_id)
        incoming = self._incoming.pop(request_id, None)
        if incoming is not None:
            incoming.timer.cancel()
        freed, aborted = await self.engine.acall(
            lambda engine: (
                engine.release_reservation(request_id),
                incoming is not None and engine.abort(request_id),
            )
        )
        logger.info(
            "migration dropped here worker_id=%s request_id=%s freed_blocks=%d aborted=%s",
            self.config.worker_id,
            request_id,
            freed,
            aborted,
        )
        return bool(freed or aborted)

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=_STREAM_BACKPRESSURE)
    async def attach(self, request_id: str, from_seq: int) -> AsyncIterator[TokenChunk]:
        """Stream a request migrated here from output index `from_seq` on: what was buffered, then live.

        Raises `ValueError` when no committed, unattached migration of `request_id` is here.
        """
        self._check_alive()
        incoming = self._incoming.pop(request_id, None)
        if incoming is None:
            raise ValueError(f"no migrated request {request_id!r} waits for attach on worker {self.config.worker_id}")
        incoming.timer.cancel()
        if from_seq < incoming.first_seq:
            await self.engine.abort(request_id)
            raise ValueError(
                f"attach({request_id!r}, from_seq={from_seq}) but worker {self.config.worker_id} has its output "
                f"from index {incoming.first_seq} on"
            )
        with self._open_stream(request_id) as opened:
            async with aclosing(incoming.stream) as outputs:
                async for output in outputs:
                    chunk = await self._to_chunk(opened, output)
                    if chunk.seq < from_seq:
                        # The caller already has these tokens; their text goes too (it may lag the tokens).
                        skip = min(from_seq - chunk.seq, len(chunk.token_ids))
                        if skip == len(chunk.token_ids) and not chunk.finished:
                            continue
                        logprobs = None if chunk.logprobs is None else chunk.logprobs[skip:]
                        chunk = replace(
                            chunk, seq=chunk.seq + skip, token_ids=chunk.token_ids[skip:], text="", logprobs=logprobs
                        )
                    with _StallGuard(self, request_id):
                        yield chunk

    def _arm_watchdog(self, request_id: str, timeout_s: float) -> None:
        self._disarm_watchdog(request_id)
        loop = asyncio.get_running_loop()
        self._watchdogs[request_id] = loop.call_later(timeout_s, self._expire_reservation, request_id, timeout_s)

    def _disarm_watchdog(self, request_id: str) -> None:
        timer = self._watchdogs.pop(request_id, None)
        if timer is not None:
            timer.cancel()

    def _expire_reservation(self, request_id: str, timeout_s: float) -> None:
        self._watchdogs.pop(request_id, None)
        future = self.engine.call(lambda engine: engine.release_reservation(request_id))
        future.add_done_callback(
            lambda f: logger.warning(
                "migration reservation expired worker_id=%s request_id=%s freed_blocks=%s timeout_s=%.1f",
                self.config.worker_id,
                request_id,
                f.result() if f.exception() is None else f.exception(),
                timeout_s,
            )
        )

    def _expire_incoming(self, request_id: str) -> None:
        if self._incoming.pop(request_id, None) is None:
            return
        logger.warning(
            "migrated request never attached, aborting worker_id=%s request_id=%s", self.config.worker_id, request_id
        )
        self.engine.call(lambda engine: engine.abort(request_id))

    # ---- adapters -----------------------------------------------------------------------------

    async def add_lora(self, name: str, path: str) -> None:
        self._check_alive()
        await self.engine.acall(lambda engine: engine.add_lora(name, path))
        logger.info("lora added worker_id=%s name=%s path=%s", self.config.worker_id, name, path)

    async def remove_lora(self, name: str) -> None:
        self._check_alive()
        await self.engine.acall(lambda engine: engine.remove_lora(name))
        logger.info("lora removed worker_id=%s name=%s", self.config.worker_id, name)

    async def shutdown(self) -> None:
        """Stop the step loop; the actor answers nothing but errors afterwards and waits to be killed."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self.engine.shutdown()
        logger.info("worker shut down worker_id=%s", self.config.worker_id)

    # ---- internals ----------------------------------------------------------------------------

    @contextmanager
    def _open_stream(self, request_id: str) -> Iterator[_OpenStream]:
        """Count a token stream open (a drain waits for 0) and log how it ended."""
        opened = _OpenStream(start=time.perf_counter())
        self._num_open_streams += 1
        try:
            yield opened
        finally:
            self._num_open_streams -= 1
            logger.info(
                "stream closed worker_id=%s request_id=%s tokens=%d finish_reason=%s ms=%.1f",
                self.config.worker_id,
                request_id,
                opened.num_tokens,
                opened.finish_reason or "cancelled",
                opened.elapsed_ms(),
            )

    async def _to_chunk(self, opened: _OpenStream, output: RequestOutput) -> TokenChunk:
        await faults.hit_async("worker_chunk")
        opened.num_chunks += 1
        opened.num_tokens += len(output.new_token_ids)
        migrated = f"migrated:{output.migrated_to}" if output.migrated_to else None
        opened.finish_reason = output.finish_reason or migrated
        return chunk_from_output(output, worker_id=self.config.worker_id)

    def _abort_stalled(self, request_id: str) -> None:
        logger.warning(
            "stream stalled, aborting worker_id=%s request_id=%s stall_timeout_s=%.1f",
            self.config.worker_id,
            request_id,
            self.config.stream_stall_timeout_s,
        )
        # Through AsyncEngine.abort, so the stalled stream ends with an `abort` chunk if it is ever read again.
        task = asyncio.get_running_loop().create_task(self.engine.abort(request_id))
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    def _check_role(self, method: str, roles: tuple[str, ...]) -> None:
        self._check_alive()
        if self.config.role not in roles:
            raise WrongRoleError(
                f"worker {self.config.worker_id} has role {self.config.role!r}; {method} needs one of {roles}"
            )

    def _check_alive(self) -> None:
        if self._is_shut_down:
            raise RuntimeError(f"worker {self.config.worker_id} is shut down")
        self.engine.check_alive(self.config.engine_stall_timeout_s)


@dataclass
class _OpenStream:
    """What one open token stream has sent so far, for its closing log line."""

    start: float
    """`time.perf_counter()` when it opened."""
    num_chunks: int = 0
    num_tokens: int = 0
    finish_reason: str | None = None
    """Set by the last chunk; None when the stream was cancelled."""

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1e3


class _StallGuard:
    """Around a `yield` to Ray: aborts the request when the consumer leaves the chunk unread for too long.

    Ray tells the producer nothing when a consumer stops reading; a yield blocked on backpressure for too
    long is the only sign, so the request is aborted rather than holding blocks forever.
    """

    def __init__(self, worker: LLMWorker, request_id: str) -> None:
        self.worker = worker
        self.request_id = request_id

    def __enter__(self) -> None:
        timeout_s = self.worker.config.stream_stall_timeout_s
        self.timer = asyncio.get_running_loop().call_later(timeout_s, self.worker._abort_stalled, self.request_id)

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


@dataclass
class _Incoming:
    """A committed incoming migration waiting for the router's `attach`."""

    stream: AsyncIterator[RequestOutput]
    first_seq: int
    """Output index of the first token the destination generates."""
    timer: asyncio.TimerHandle
    """Aborts the request when nobody attaches in time."""


class _RayDestination:
    """`MigrationDestination` over a destination worker's actor handle."""

    def __init__(self, handle: ray.actor.ActorHandle, config: MigrationConfig) -> None:
        self.handle = handle
        self.config = config

    async def reserve(self, request_id: str, num_blocks: int) -> None:
        await self.handle.migration_reserve.remote(request_id, num_blocks, self.config.reserve_timeout_s)

    async def stage(self, export: KVExport) -> None:
        await self.handle.migration_stage.remote(export, self.config.reserve_timeout_s)

    async def commit(self, export: KVExport) -> None:
        await self.handle.migration_commit.remote(export, self.config.attach_timeout_s)

    async def abort(self, request_id: str) -> None:
        await self.handle.migration_abort.remote(request_id)
