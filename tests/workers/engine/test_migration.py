"""Live migration between two in-process engines: reservations, staged pre-copy, pause, commit, and the async driver."""

from __future__ import annotations

import asyncio

import pytest

from tests.workers.engine.calls import make_call
from workers.engine.async_engine import AsyncEngine
from workers.engine.engine import Engine
from workers.engine.errors import DuplicateRequestError
from workers.engine.migration import LocalDestination, migrate
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler_types import NoKVCapacityError

PROMPT = list(range(10, 31))  # 21 tokens: five full 4-token blocks and a partial one
NEIGHBOUR = list(range(40, 53))
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_k=40, seed=77)
BLOCK = 4


def _engine(model_dir, **kwargs) -> Engine:
    kwargs.setdefault("enable_prefix_caching", False)
    return Engine.from_pretrained(str(model_dir), dtype="float32", block_size=BLOCK, **kwargs)


class _Run:
    """Collects one request's outputs across engines."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def take(self, outputs, request_id: str) -> None:
        for out in outputs:
            if out.request_id == request_id:
                self.tokens.extend(out.new_token_ids)
                self.text += out.text_delta
                if out.finished:
                    self.finish_reason = out.finish_reason

    def step_until(self, engine: Engine, request_id: str, num_tokens: int) -> None:
        while len(self.tokens) < num_tokens and self.finish_reason is None:
            self.take(engine.step(), request_id)

    def run_to_end(self, engine: Engine, request_id: str) -> None:
        while self.finish_reason is None:
            self.take(engine.step(), request_id)


def _unmigrated(model_dir, params: SamplingParams) -> _Run:
    engine = _engine(model_dir)
    engine.add_request(make_call("x", PROMPT, params))
    run = _Run()
    run.run_to_end(engine, "x")
    return run


def _migrated(model_dir, params: SamplingParams, pause_at: int, **dest_kwargs) -> tuple[_Run, Engine, Engine]:
    """Migrate "x" with two pre-copy stages while it decodes, pausing it once it has `pause_at` output tokens."""
    source, dest = _engine(model_dir), _engine(model_dir, **dest_kwargs)
    source.add_request(make_call("x", PROMPT, params))
    source.add_request(make_call("n", NEIGHBOUR, GREEDY))  # a neighbour keeps the source's batch mixed
    run = _Run()
    run.step_until(source, "x", max(1, pause_at - 6))
    dest.reserve_kv("x", 2)  # deliberately small: stages grow the reservation
    sent = 0
    for stage_end in (pause_at - 3, pause_at):
        export = source.export_kv("x", sent, full_blocks_only=True)
        assert export.from_block == sent
        dest.stage_kv(export)
        sent += export.num_blocks
        run.step_until(source, "x", stage_end)
    source.pause("x")
    before = source.stats().num_generated_tokens
    source.step()  # a paused request does not advance
    assert len(source.scheduler.requests["x"].output_token_ids) == pause_at
    assert source.stats().num_generated_tokens - before <= 1  # only the neighbour stepped
    final = source.export_kv("x", sent)
    dest.import_kv(final, reserved=True)
    assert source.release("x")
    run.run_to_end(dest, "x")
    return run, source, dest


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("pause_at", [1, 12, 23], ids=["first-decode", "mid-way", "one-before-max-tokens"])
def test_migrated_output_equals_unmigrated(tiny_llama, params, pause_at):
    expected = _unmigrated(tiny_llama, params)
    run, source, dest = _migrated(tiny_llama, params, pause_at)
    assert run.tokens == expected.tokens
    assert run.text == expected.text
    assert run.finish_reason == expected.finish_reason == "length"
    while source.has_unfinished():
        source.step()
    assert source.stats().num_kv_blocks_used == 0
    assert dest.stats().num_kv_blocks_used == 0


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_migration_one_token_before_a_stop_string(tiny_llama, params):
    # Find a stop string in the free-running text, then migrate just before the token that completes it.
    free = _unmigrated(tiny_llama, params)
    assert len(free.text) > 12, "the tiny model should produce some text"
    mid = len(free.text) // 2
    candidates = (free.text[i : i + 4] for i in range(mid, len(free.text) - 4))
    stop = next(c for c in candidates if free.text.find(c) >= mid)
    stopped_params = SamplingParams(**{**_fields(params), "stop": (stop,)})
    expected = _unmigrated(tiny_llama, stopped_params)
    assert expected.finish_reason == "stop" and len(expected.tokens) >= 8
    run, _, dest = _migrated(tiny_llama, stopped_params, len(expected.tokens) - 1)
    assert (run.tokens, run.text, run.finish_reason) == (expected.tokens, expected.text, "stop")
    assert dest.stats().num_kv_blocks_used == 0


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_reservation_refused_and_released(tiny_llama):
    dest = _engine(tiny_llama, kv_cache_bytes=1 << 20)
    total = dest.stats().num_kv_blocks_total
    with pytest.raises(NoKVCapacityError):
        dest.reserve_kv("x", total + 1)
    assert dest.stats().num_kv_blocks_used == 0
    dest.reserve_kv("x", 3)
    dest.reserve_kv("x", 5)  # grows
    assert dest.stats().num_kv_blocks_used == 5
    with pytest.raises(NoKVCapacityError):
        dest.reserve_kv("x", total + 1)
    assert dest.stats().num_kv_blocks_used == 5  # a refused growth keeps what was held
    assert dest.release_reservation("x") == 5
    assert dest.release_reservation("x") == 0
    assert dest.stats().num_kv_blocks_used == 0


def test_reserved_blocks_are_never_preempted_or_handed_out(tiny_llama):
    dest = _engine(tiny_llama, kv_cache_bytes=1 << 20)
    total = dest.stats().num_kv_blocks_total
    reserved = dest.scheduler.kv.reserve("x", total - 12)
    dest.reserve_kv("x", total - 12)
    # Two requests of 8 blocks each in the 12 blocks left: one is preempted, neither touches the reservation.
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    dest.add_request(make_call("a", PROMPT, params))
    dest.add_request(make_call("b", [t + 1 for t in PROMPT], params))
    runs = {"a": _Run(), "b": _Run()}
    while dest.has_unfinished():
        outputs = dest.step()
        for rid, run in runs.items():
            run.take(outputs, rid)
            assert not set(dest.scheduler.get_block_ids(rid)) & set(reserved)
    assert dest.stats().num_preemptions > 0
    assert [len(r.tokens) for r in runs.values()] == [10, 10]
    assert dest.scheduler.kv.reserved_block_ids("x") == reserved
    assert dest.release_reservation("x") == total - 12
    assert dest.stats().num_kv_blocks_used == 0


def test_stage_and_commit_check_their_order(tiny_llama):
    source, dest = _engine(tiny_llama), _engine(tiny_llama)
    source.add_request(make_call("x", PROMPT, GREEDY))
    _Run().step_until(source, "x", 3)
    with pytest.raises(ValueError, match="expected None"):
        dest.stage_kv(source.export_kv("x", 0, full_blocks_only=True))  # no reservation
    dest.reserve_kv("x", 2)
    with pytest.raises(ValueError, match="expected 0"):
        dest.stage_kv(source.export_kv("x", 1, full_blocks_only=True))
    with pytest.raises(ValueError, match="were staged"):
        dest.import_kv(source.export_kv("x", 2), reserved=True)
    dest.stage_kv(source.export_kv("x", 0, full_blocks_only=True))
    with pytest.raises(DuplicateRequestError):
        source.reserve_kv("x", 1)
    assert dest.release_reservation("x") > 0
    assert dest.stats().num_kv_blocks_used == 0


def test_unpause_resumes_decoding_and_abort_frees_a_paused_request(tiny_llama):
    expected = _unmigrated(tiny_llama, GREEDY)
    engine = _engine(tiny_llama)
    engine.add_request(make_call("x", PROMPT, GREEDY))
    run = _Run()
    run.step_until(engine, "x", 5)
    engine.pause("x")
    assert not engine.has_unfinished()  # nothing to step while the only request is paused
    with pytest.raises(ValueError, match="paused"):
        engine.pause("x")
    assert engine.unpause("x") and not engine.unpause("x")
    run.run_to_end(engine, "x")
    assert run.tokens == expected.tokens
    engine.add_request(make_call("y", PROMPT, GREEDY))
    _Run().step_until(engine, "y", 2)
    engine.pause("y")
    assert engine.abort("y")
    assert engine.stats().num_kv_blocks_used == 0


# ---- the async driver -------------------------------------------------------------------------


async def _consume(stream, tokens: list[int], ready: asyncio.Event, ready_at: int) -> str:
    """Read a stream into `tokens`; returns how it ended ("migrated:<id>" or the finish reason)."""
    async for out in stream:
        tokens.extend(out.new_token_ids)
        if len(tokens) >= ready_at:
            ready.set()
        if out.migrated_to:
            return f"migrated:{out.migrated_to}"
        if out.finished:
            return out.finish_reason
    return "closed"


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_driver_moves_a_decoding_request_and_ends_its_stream(tiny_llama, params):
    expected = _unmigrated(tiny_llama, SamplingParams(**{**_fields(params), "max_tokens": 60}))

    async def main():
        params60 = SamplingParams(**{**_fields(params), "max_tokens": 60})
        with AsyncEngine(_engine(tiny_llama)) as source, AsyncEngine(_engine(tiny_llama)) as dest:
            local = LocalDestination(dest)
            tokens: list[int] = []
            ready = asyncio.Event()
            reader = asyncio.create_task(_consume(source.generate(make_call("x", PROMPT, params60)), tokens, ready, 8))
            await ready.wait()
            result = await migrate(
                source, local, "x", destination_id="d", max_stages=3, last_stage_max_blocks=1, call_timeout_s=10
            )
            assert result.committed, result.reason
            assert result.num_stages >= 2 and result.bytes_moved > 0 and result.downtime_ms > 0
            assert await reader == "migrated:d"
            handed_over_at = len(tokens)
            async for out in local.streams.pop("x"):
                tokens.extend(out.new_token_ids)
            used = await asyncio.gather(*(e.acall(lambda e: e.stats().num_kv_blocks_used) for e in (source, dest)))
            return tokens, handed_over_at, used

    tokens, handed_over_at, used = asyncio.run(main())
    assert tokens == expected.tokens
    assert 8 <= handed_over_at < 60
    assert used == [0, 0]


def test_driver_aborts_cleanly_when_the_destination_refuses_or_the_request_ends(tiny_llama):
    expected = _unmigrated(tiny_llama, GREEDY)

    async def main():
        with (
            AsyncEngine(_engine(tiny_llama)) as source,
            AsyncEngine(_engine(tiny_llama, kv_cache_bytes=1 << 20)) as small,
        ):
            # Another incoming migration holds all but two of the destination's blocks.
            await small.acall(lambda e: e.reserve_kv("other", e.stats().num_kv_blocks_total - 2))
            tokens: list[int] = []
            ready = asyncio.Event()
            reader = asyncio.create_task(_consume(source.generate(make_call("x", PROMPT, GREEDY)), tokens, ready, 3))
            await ready.wait()
            kwargs = {"destination_id": "d", "max_stages": 2, "last_stage_max_blocks": 1, "call_timeout_s": 10}
            refused = await migrate(source, LocalDestination(small), "x", **kwargs)
            missing = await migrate(source, LocalDestination(small), "nope", **kwargs)
            assert await reader == "length"
            await small.acall(lambda e: e.release_reservation("other"))
            used = await asyncio.gather(*(e.acall(lambda e: e.stats().num_kv_blocks_used) for e in (source, small)))
            return refused, missing, tokens, used

    refused, missing, tokens, used = asyncio.run(main())
    assert not refused.committed and "NoKVCapacityError" in refused.reason
    assert not missing.committed and "not in the source" in missing.reason
    assert tokens == expected.tokens
    assert used == [0, 0]


class _EndsRequestDuringStage(LocalDestination):
    """Writes the stage, then the request ends on the source (finished, or the client went away)."""

    def __init__(self, engine: AsyncEngine, source: AsyncEngine) -> None:
        super().__init__(engine)
        self.source = source

    async def stage(self, export) -> None:
        await super().stage(export)
        await self.source.abort(export.request_id)


class _DiesDuringStage(LocalDestination):
    """Writes the stage, then fails as if its process died; it never hears the abort."""

    async def stage(self, export) -> None:
        await super().stage(export)
        raise ConnectionError("destination lost")

    async def abort(self, request_id: str) -> None:
        raise ConnectionError("destination lost")


def test_driver_aborts_when_the_request_ends_or_the_destination_dies_mid_copy(tiny_llama):
    expected = _unmigrated(tiny_llama, GREEDY)
    kwargs = {"destination_id": "d", "max_stages": 2, "last_stage_max_blocks": 0, "call_timeout_s": 10}

    async def main():
        with AsyncEngine(_engine(tiny_llama)) as source, AsyncEngine(_engine(tiny_llama)) as dest:
            ready = asyncio.Event()
            ended = asyncio.create_task(_consume(source.generate(make_call("x", PROMPT, GREEDY)), [], ready, 3))
            await ready.wait()
            gone = await migrate(source, _EndsRequestDuringStage(dest, source), "x", **kwargs)
            assert await ended == "abort"

            tokens: list[int] = []
            ready = asyncio.Event()
            reader = asyncio.create_task(_consume(source.generate(make_call("y", PROMPT, GREEDY)), tokens, ready, 3))
            await ready.wait()
            dead = await migrate(source, _DiesDuringStage(dest), "y", **kwargs)
            assert await reader == "length"
            dest_held = await dest.acall(lambda e: e.stats().num_kv_blocks_used)
            await dest.acall(lambda e: e.release_reservation("y"))  # what the destination's watchdog does
            used = await asyncio.gather(*(e.acall(lambda e: e.stats().num_kv_blocks_used) for e in (source, dest)))
            return gone, dead, tokens, dest_held, used

    gone, dead, tokens, dest_held, used = asyncio.run(main())
    assert not gone.committed and "not in the source" in gone.reason and gone.num_stages == 1
    assert not dead.committed and "ConnectionError" in dead.reason
    assert tokens == expected.tokens  # the request finished on the source, untouched
    assert dest_held > 0  # the dead destination kept its reservation until its watchdog ran
    assert used == [0, 0]
