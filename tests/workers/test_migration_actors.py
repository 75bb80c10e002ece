"""Live migration between real LLMWorker actors: stream hand-over, abort paths, the watchdog and a drain."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
import ray

from workers.actors import LLMWorker, WorkerConfig
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall, MigrationConfig, MigrationReport, TokenChunk

PROMPT = [5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66]
GREEDY = SamplingParams(max_tokens=160, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=160, ignore_eos=True, temperature=0.9, top_k=50, seed=4321)
CONFIG = MigrationConfig(max_stages=3, last_stage_max_blocks=1, reserve_timeout_s=1.0, stage_timeout_s=10.0)


def _engine_config(model, kv_cache_bytes: int = 8 * MiB) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", block_size=4, kv_cache_bytes=kv_cache_bytes)


@pytest.fixture(scope="module")
def workers(ray_cluster, tiny_llama):
    """Two mixed workers, and one whose KV pool is too small to take any migration."""
    configs = [
        WorkerConfig(worker_id="m-mixed-0", deployment="m", role="mixed", engine=_engine_config(tiny_llama)),
        WorkerConfig(worker_id="m-mixed-1", deployment="m", role="mixed", engine=_engine_config(tiny_llama)),
        WorkerConfig(worker_id="m-small-0", deployment="m", role="mixed", engine=_engine_config(tiny_llama, 16 * 1024)),
    ]
    handles = {c.worker_id: LLMWorker.options(num_cpus=1).remote(c) for c in configs}
    ray.get([h.ping.remote() for h in handles.values()])
    yield handles
    for handle in handles.values():
        ray.kill(handle)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """Unmigrated outputs per (sampling, prompt offset), from an in-process engine."""
    engine = Engine(_engine_config(tiny_llama))
    cache: dict[tuple[str, int], list[int]] = {}

    def get(params: SamplingParams, offset: int = 0) -> list[int]:
        key = (repr(params), offset)
        if key not in cache:
            cache[key] = engine.generate([[t + offset for t in PROMPT]], params)[0].output_token_ids
        return cache[key]

    return get


def _call(request_id: str, params: SamplingParams, offset: int = 0) -> GenerateCall:
    return GenerateCall(request_id=request_id, prompt_token_ids=[t + offset for t in PROMPT], sampling=params)


async def _follow(workers, worker_id: str, call: GenerateCall, progress: asyncio.Event, at: int) -> list[TokenChunk]:
    """Read a request's stream like the router does: on `migrated_to`, attach to the destination at that seq."""
    chunks: list[TokenChunk] = []
    stream = workers[worker_id].generate.remote(call)
    while True:
        last = None
        async for ref in stream:
            last = await ref
            chunks.append(last)
            if sum(len(c.token_ids) for c in chunks) >= at:
                progress.set()
        assert last is not None
        if not last.migrated_to:
            return chunks
        assert not last.finished and not last.token_ids
        stream = workers[last.migrated_to].attach.remote(call.request_id, last.seq)


def _tokens(chunks: list[TokenChunk]) -> list[int]:
    expected_seq = 0
    tokens = []
    for chunk in chunks:
        assert chunk.seq == expected_seq, "a gap or a duplicate in the stream"
        expected_seq += len(chunk.token_ids)
        tokens.extend(chunk.token_ids)
    assert chunks[-1].finished
    return tokens


def _wait_idle(worker, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        stats = ray.get(worker.stats.remote())
        if (stats.num_running, stats.kv_blocks_used) == (0, 0) or time.monotonic() > deadline:
            return stats


async def _migrate_while_streaming(workers, source: str, dest: str, call: GenerateCall, at: int):
    progress = asyncio.Event()
    reader = asyncio.create_task(_follow(workers, source, call, progress, at))
    await progress.wait()
    report = await workers[source].migrate_out.remote(call.request_id, workers[dest], dest, CONFIG)
    return report, await reader


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("at", [1, 60], ids=["first-decode", "mid-way"])
def test_migrated_stream_equals_unmigrated(workers, expected, params, at):
    call = _call(f"mig-{params.seed}-{at}", params)
    report, chunks = asyncio.run(_migrate_while_streaming(workers, "m-mixed-0", "m-mixed-1", call, at))
    assert isinstance(report, MigrationReport)
    assert report.outcome == "committed", report.reason
    assert report.num_stages >= 1 and report.bytes_moved > 0 and 0 < report.downtime_ms <= report.total_ms
    assert _tokens(chunks) == expected(params)
    assert {c.worker_id for c in chunks} == {"m-mixed-0", "m-mixed-1"}
    for worker in ("m-mixed-0", "m-mixed-1"):
        assert _wait_idle(workers[worker]).kv_blocks_used == 0
    stats = ray.get(workers["m-mixed-0"].stats.remote()).migration
    assert stats.num_committed >= 1 and stats.bytes_moved >= report.bytes_moved and stats.last_downtime_ms > 0


def test_destination_refuses_for_lack_of_blocks(workers, expected):
    call = _call("refused", GREEDY, offset=1)
    report, chunks = asyncio.run(_migrate_while_streaming(workers, "m-mixed-0", "m-small-0", call, 40))
    assert report.outcome == "aborted" and "NoKVCapacityError" in report.reason
    assert _tokens(chunks) == expected(GREEDY, 1)
    assert {c.worker_id for c in chunks} == {"m-mixed-0"}
    assert _wait_idle(workers["m-mixed-0"]).kv_blocks_used == 0
    assert _wait_idle(workers["m-small-0"]).kv_blocks_used == 0


def test_source_aborts_when_the_request_is_gone(workers):
    report = ray.get(workers["m-mixed-0"].migrate_out.remote("never-ran", workers["m-mixed-1"], "m-mixed-1", CONFIG))
    assert report.outcome == "aborted" and "not in the source" in report.reason
    assert _wait_idle(workers["m-mixed-1"]).kv_blocks_used == 0


@ray.remote(max_concurrency=16)
class _DyingDestination:
    """Forwards to a real destination, then its process dies in the middle of the first stage."""

    def __init__(self, real) -> None:
        self.real = real

    async def ping(self) -> bool:
        return True

    async def migration_reserve(self, request_id, num_blocks, timeout_s):
        await self.real.migration_reserve.remote(request_id, num_blocks, timeout_s)

    async def migration_stage(self, export, timeout_s):
        await self.real.migration_stage.remote(export, timeout_s)
        os._exit(1)

    async def migration_abort(self, request_id):
        await self.real.migration_abort.remote(request_id)


def test_destination_dies_mid_copy(workers, expected):
    dying = _DyingDestination.remote(workers["m-mixed-1"])
    ray.get(dying.ping.remote())  # started, so the migration reaches its first stage while the request decodes
    call = _call("dies", GREEDY, offset=2)

    async def main():
        progress = asyncio.Event()
        reader = asyncio.create_task(_follow(workers, "m-mixed-0", call, progress, 40))
        await progress.wait()
        report = await workers["m-mixed-0"].migrate_out.remote(call.request_id, dying, "m-mixed-1", CONFIG)
        return report, await reader

    report, chunks = asyncio.run(main())
    assert report.outcome == "aborted" and "stage failed" in report.reason
    assert _tokens(chunks) == expected(GREEDY, 2)
    assert _wait_idle(workers["m-mixed-0"]).kv_blocks_used == 0
    # The abort went to the dead process; the real destination's watchdog frees what it reserved.
    assert _wait_idle(workers["m-mixed-1"], timeout_s=5 * CONFIG.reserve_timeout_s).kv_blocks_used == 0


def test_watchdog_frees_a_reservation_when_the_source_goes_quiet(workers):
    dest = workers["m-mixed-1"]
    ray.get(dest.migration_reserve.remote("orphan", 6, 0.3))
    assert ray.get(dest.stats.remote()).kv_blocks_used == 6
    assert _wait_idle(dest, timeout_s=5).kv_blocks_used == 0


def test_attach_needs_a_committed_migration(workers):
    with pytest.raises(ValueError, match="no migrated request"):
        _collect = [ray.get(ref) for ref in workers["m-mixed-1"].attach.remote("nothing-here", 0)]
        del _collect


def test_drain_moves_eight_running_requests(workers, expected):
    source, dest = "m-mixed-0", "m-mixed-1"
    # Long enough that the eighth request is still running when the migrations before it (one at a time, as a
    # drain does) have finished, also on a loaded machine.
    greedy, seeded = (dataclasses.replace(p, max_tokens=480) for p in (GREEDY, SEEDED))
    calls = [_call(f"drain-{i}", greedy if i % 2 else seeded, offset=10 + i) for i in range(8)]

    async def main():
        events = [asyncio.Event() for _ in calls]
        readers = [
            asyncio.create_task(_follow(workers, source, call, event, 10))
            for call, event in zip(calls, events, strict=True)
        ]
        for event in events:
            await event.wait()
        running = await workers[source].running_requests.remote()
        assert {r.request_id for r in running} == {c.request_id for c in calls}
        reports = []
        for info in running:  # one at a time, as a drain does
            reports.append(await workers[source].migrate_out.remote(info.request_id, workers[dest], dest, CONFIG))
        return reports, [await r for r in readers]

    before = ray.get(workers[source].stats.remote()).migration
    reports, outputs = asyncio.run(main())
    assert [r.outcome for r in reports] == ["committed"] * 8, [r.reason for r in reports]
    assert ray.get(workers[source].running_requests.remote()) == []
    for call, chunks in zip(calls, outputs, strict=True):
        offset = int(call.request_id.split("-")[1]) + 10
        assert _tokens(chunks) == expected(call.sampling, offset)
    after = ray.get(workers[source].stats.remote()).migration
    assert after.num_committed - before.num_committed == 8
    assert after.num_started - before.num_started == 8
    for worker in (source, dest):
        assert _wait_idle(workers[worker]).kv_blocks_used == 0
