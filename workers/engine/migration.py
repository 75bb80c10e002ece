"""Live migration of a running request between engines: multi-stage KV pre-copy, then a short paused commit.

The source drives (`migrate`); the destination is anything with the four `MigrationDestination`
calls (the Ray actor in `workers/actors.py`, or `LocalDestination` for two engines in one process).

1. The destination reserves blocks for the request (`Engine.reserve_kv`).
2. Pre-copy stages copy the FULL blocks added since the previous stage while the request keeps
   decoding on the source (a partly filled block still changes, so it waits for the last stage).
3. Once at most `last_stage_max_blocks` remain, or after `max_stages`, the source pauses the request
   (no more steps, blocks kept), exports the rest, partial block included, and the destination commits
   it (`Engine.import_kv(export, reserved=True)`): from then on it decodes there.
4. The source frees its blocks and ends the request's stream with a `migrated_to` output.

Any failure before the hand-over aborts: the source unpauses the request, the destination frees its
reservation (or drops the committed copy), and the request goes on at the source as if nothing happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from workers.engine.async_engine import AsyncEngine
from workers.engine.block_manager import cdiv
from workers.engine.engine import Engine
from workers.engine.errors import InvalidRequestError, UnknownRequestError
from workers.engine.kv_transfer import KVExport
from workers.engine.request import RequestOutput, RequestStatus

logger = logging.getLogger(__name__)


class MigrationAborted(Exception):
    """An ordinary reason to give up a migration; the request keeps running on the source."""


class MigrationDestination(Protocol):
    """The destination's side of the protocol, as the source calls it."""

    async def reserve(self, request_id: str, num_blocks: int) -> None: ...

    async def stage(self, export: KVExport) -> None: ...

    async def commit(self, export: KVExport) -> None: ...

    async def abort(self, request_id: str) -> None: ...


@dataclass
class MigrationResult:
    """How one migration went (the actor turns it into a `MigrationReport`)."""

    committed: bool = False
    reason: str = ""
    num_stages: int = 0
    """Copies made, the final paused one included."""
    num_blocks_copied: int = 0
    bytes_moved: int = 0
    downtime_ms: float = 0.0
    """Pause on the source until the commit on the destination returned (runnable there)."""
    total_ms: float = 0.0
    stage_ms: list[float] = field(default_factory=list)
    """Wall time of each pre-copy stage (export plus the destination's write)."""


@dataclass
class _Progress:
    num_full_blocks: int
    num_blocks: int
    num_preemptions: int


def _progress(engine: Engine, request_id: str) -> _Progress:
    """Where the request stands on the source; MigrationAborted when it cannot (or need not) move."""
    request = engine.scheduler.get_request(request_id)
    if request is None:
        raise MigrationAborted(f"request {request_id!r} is not in the source engine (finished or aborted)")
    if request.status is not RequestStatus.RUNNING or request.num_computed_tokens == 0:
        raise MigrationAborted(f"request {request_id!r} is {request.status.value} on the source, not decoding")
    if request_id in engine.scheduler.paused:
        raise MigrationAborted(f"request {request_id!r} is already being migrated")
    block_size = engine.config.block_size
    return _Progress(
        num_full_blocks=request.num_computed_tokens // block_size,
        num_blocks=cdiv(request.num_computed_tokens, block_size),
        num_preemptions=request.num_preemptions,
    )


def _stage_export(engine: Engine, request_id: str, from_block: int, num_preemptions: int) -> KVExport:
    # A preemption recomputes the KV into other blocks, so blocks copied earlier may no longer match.
    if _progress(engine, request_id).num_preemptions != num_preemptions:
        raise MigrationAborted(f"request {request_id!r} was preempted on the source during the migration")
    return engine.export_kv(request_id, from_block, full_blocks_only=True)


def _pause_and_export(engine: Engine, request_id: str, from_block: int, num_preemptions: int) -> tuple[KVExport, float]:
    """The final copy; also returns when the request stopped decoding (the start of its downtime)."""
    if _progress(engine, request_id).num_preemptions != num_preemptions:
        raise MigrationAborted(f"request {request_id!r} was preempted on the source during the migration")
    paused_at = time.perf_counter()
    engine.pause(request_id)
    try:
        return engine.export_kv(request_id, from_block), paused_at
    except BaseException:
        engine.unpause(request_id)
        raise


async def migrate(
    source: AsyncEngine,
    destination: MigrationDestination,
    request_id: str,
    *,
    destination_id: str,
    max_stages: int,
    last_stage_max_blocks: int,
    call_timeout_s: float,
) -> MigrationResult:
    """Move a running request from `source` to `destination`; never raises for an ordinary abort."""
    result = MigrationResult()
    start = time.perf_counter()
    paused = False
    reserved = False

    async def call(awaitable, what: str) -> None:
        try:
            await asyncio.wait_for(awaitable, call_timeout_s)
        except TimeoutError:
            raise MigrationAborted(f"destination {what} took over {call_timeout_s}s") from None
        except Exception as exc:  # the destination refused or died: the request stays here
            raise MigrationAborted(f"destination {what} failed: {type(exc).__name__}: {exc}") from exc

    def count(export: KVExport) -> None:
        result.num_stages += 1
        result.num_blocks_copied += export.num_blocks
        result.bytes_moved += export.nbytes

    try:
        progress = await source.acall(lambda e: _progress(e, request_id))
        preemptions = progress.num_preemptions
        reserved = True  # from here on the destination may hold blocks, so an abort must tell it
        # One block beyond the current tokens: the request usually grows into it before the commit.
        await call(destination.reserve(request_id, progress.num_blocks + 1), "reserve")
        sent = 0
        for _ in range(max_stages):
            progress = await source.acall(lambda e: _progress(e, request_id))
            if progress.num_blocks - sent <= last_stage_max_blocks or progress.num_full_blocks == sent:
                break
            stage_start = time.perf_counter()
            export = await source.acall(lambda e, sent=sent: _stage_export(e, request_id, sent, preemptions))
            await call(destination.stage(export), "stage")
            result.stage_ms.append((time.perf_counter() - stage_start) * 1e3)
            count(export)
            sent += export.num_blocks
        # Paused on the engine thread between two steps: the final copy sees every token sampled so far.
        final, paused_at = await source.acall(lambda e: _pause_and_export(e, request_id, sent, preemptions))
        paused = True
        await call(destination.commit(final), "commit")
        result.downtime_ms = (time.perf_counter() - paused_at) * 1e3
        count(final)
        if not await source.hand_over(request_id, destination_id):
            paused = False
            raise MigrationAborted(f"request {request_id!r} ended on the source during the final copy")
        result.committed = True
    except (MigrationAborted, UnknownRequestError, InvalidRequestError) as exc:
        result.reason = str(exc)
        await _undo(source, destination, request_id, paused=paused, reserved=reserved, timeout_s=call_timeout_s)
    except asyncio.CancelledError:
        # No await is safe now; the destination's watchdog frees its reservation.
        if paused:
            source.call(lambda e: e.unpause(request_id))
        raise
    result.total_ms = (time.perf_counter() - start) * 1e3
    _log(result, request_id, destination_id)
    return result


async def _undo(
    source: AsyncEngine,
    destination: MigrationDestination,
    request_id: str,
    *,
    paused: bool,
    reserved: bool,
    timeout_s: float,
) -> None:
    if paused:
        await source.acall(lambda e: e.unpause(request_id))
    if reserved:
        try:
            await asyncio.wait_for(destination.abort(request_id), timeout_s)
        except Exception as exc:  # a dead destination frees nothing, and needs to free nothing
            logger.warning(
                "migration abort not delivered request_id=%s error=%s: %s", request_id, type(exc).__name__, exc
            )


def _log(result: MigrationResult, request_id: str, destination_id: str) -> None:
    if result.committed:
        logger.info(
            "migration committed request_id=%s destination=%s stages=%d blocks=%d bytes=%d downtime_ms=%.2f "
            "total_ms=%.1f",
            request_id,
            destination_id,
            result.num_stages,
            result.num_blocks_copied,
            result.bytes_moved,
            result.downtime_ms,
            result.total_ms,
        )
    else:
        logger.info(
            "migration aborted request_id=%s destination=%s stages=%d blocks=%d reason=%r total_ms=%.1f",
            request_id,
            destination_id,
            result.num_stages,
            result.num_blocks_copied,
            result.reason,
            result.total_ms,
        )


class LocalDestination:
    """A destination engine in this process (tests, benchmarks); committed streams wait in `streams`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.streams: dict[str, AsyncIterator[RequestOutput]] = {}

    async def reserve(self, request_id: str, num_blocks: int) -> None:
        await self.engine.acall(lambda e: e.reserve_kv(request_id, num_blocks))

    async def stage(self, export: KVExport) -> None:
        await self.engine.acall(lambda e: e.stage_kv(export))

    async def commit(self, export: KVExport) -> None:
        try:
            self.streams[export.request_id] = await self.engine.commit_migration(export)
        except BaseException:
            await self.engine.acall(lambda e: e.release_reservation(export.request_id))
            raise

    async def abort(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        await self.engine.acall(lambda e: (e.release_reservation(request_id), e.abort(request_id)))
