"""One request's bad values fail that request alone; a loop that dies says so instead of dying silently."""

from __future__ import annotations

import asyncio
import math

import pytest

from tests.workers.engine.calls import make_call
from workers.engine.async_engine import AsyncEngine
from workers.engine.engine import Engine
from workers.engine.errors import EngineDeadError, InvalidSamplingParamsError, RequestFailedError
from workers.engine.sampling_params import SamplingParams

PROMPT = [5, 17, 42, 99, 7, 23, 61, 88]


def _poisoned() -> SamplingParams:
    """Params with a NaN temperature, as an unvalidated caller (or an older router) could send them."""
    params = SamplingParams(max_tokens=8, temperature=0.7, seed=3)
    object.__setattr__(params, "temperature", math.nan)
    return params


@pytest.fixture
def engine(tiny_llama) -> Engine:
    return Engine.from_pretrained(str(tiny_llama), dtype="float32")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": math.nan},
        {"top_p": -math.inf},
    ],
)
def test_non_finite_sampling_values_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InvalidSamplingParamsError, match=f"{name} must be a finite number"):
        SamplingParams(**kwargs)


def test_a_request_whose_sampling_fails_fails_alone(engine):
    engine.add_request(make_call("poisoned", PROMPT, _poisoned()))
    engine.add_request(
        make_call("fine", PROMPT, SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True))
    )
    outputs = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    (failed,) = outputs["poisoned"]
    assert failed.finished and failed.finish_reason == "abort" and "sampling failed" in failed.error
    fine = outputs["fine"]
    assert fine[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in fine) == 8
    assert not any(o.error for o in fine)
    assert engine.stats().num_kv_blocks_used == 0


def test_the_async_engine_fails_the_stream_of_a_failing_request_and_keeps_serving(engine):
    async def run(aengine: AsyncEngine) -> list[int]:
        async def collect(request_id: str, params: SamplingParams) -> list[int]:
            return [
                t async for out in aengine.generate(make_call(request_id, PROMPT, params)) for t in out.new_token_ids
            ]

        poisoned = asyncio.ensure_future(collect("poisoned", _poisoned()))
        fine = await collect("fine", SamplingParams(max_tokens=6, ignore_eos=True))
        with pytest.raises(RequestFailedError, match="'poisoned' failed: sampling failed"):
            await poisoned
        return fine

    with AsyncEngine(engine) as aengine:
        assert len(asyncio.run(run(aengine))) == 6
        aengine.check_alive(stall_timeout_s=60.0)


def test_a_dead_loop_fails_its_streams_and_every_later_call_and_says_so(engine):
    async def generate(aengine: AsyncEngine) -> None:
        async for _ in aengine.generate(make_call("r", PROMPT, SamplingParams(max_tokens=4))):
            pass

    with AsyncEngine(engine) as aengine:
        aengine.check_alive(stall_timeout_s=60.0)
        engine.runner = None  # the next step fails for no single request's fault
        with pytest.raises(EngineDeadError, match="engine loop died"):
            asyncio.run(generate(aengine))
        with pytest.raises(EngineDeadError, match="AttributeError"):
            aengine.check_alive(stall_timeout_s=60.0)
        with pytest.raises(EngineDeadError):
            aengine.call(lambda e: e.stats())
