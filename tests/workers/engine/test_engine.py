"""Engine API behaviour: bad input, abort, stats, sampling through the engine, streaming."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.workers.engine.calls import make_call
from workers.engine.async_engine import AsyncEngine
from workers.engine.engine import Engine
from workers.engine.errors import (
    DuplicateRequestError,
    EmptyPromptError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    UnknownAdapterError,
)
from workers.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine.from_pretrained(str(tiny_llama), dtype="float32")


def _drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        ([], EmptyPromptError, "empty"),
        ("", EmptyPromptError, "empty"),
        ([1] * 5000, PromptTooLongError, "context"),
        ([10**9], InvalidRequestError, "vocabulary"),
    ],
)
def test_bad_prompts_are_refused(engine, prompt, error, match):
    with pytest.raises(error, match=match):
        engine.add_request(make_call("bad", prompt))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidSamplingParamsError, match=match):
        SamplingParams(**kwargs)


def test_unknown_adapter_and_duplicate_id(engine):
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.add_request(make_call("a", [1, 2, 3], lora_name="nope"))
    engine.add_request(make_call("dup", [1, 2, 3], SamplingParams(max_tokens=2)))
    with pytest.raises(DuplicateRequestError):
        engine.add_request(make_call("dup", [4, 5, 6]))
    _drain(engine)


def test_bad_request_does_not_disturb_others(engine):
    engine.add_request(make_call("good", [5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True)))
    engine.step()
    with pytest.raises(PromptTooLongError):
        engine.add_request(make_call("too-long", [1] * 5000))
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.num_output_tokens) for o in finished] == [("good", 6)]


def test_abort_frees_blocks(engine):
    free = engine.stats().num_kv_blocks_free
    engine.add_request(make_call("long", list(range(3, 60)), SamplingParams(max_tokens=100, ignore_eos=True)))
    engine.step()
    assert engine.stats().num_kv_blocks_free < free
    assert engine.abort("long")
    assert not engine.abort("long")
    assert engine.stats().num_kv_blocks_free == free
    assert not engine.has_unfinished()


def test_stats_report_load(engine):
    engine.add_request(make_call("s1", list(range(3, 40)), SamplingParams(max_tokens=4, ignore_eos=True)))
    engine.add_request(make_call("s2", list(range(3, 10)), SamplingParams(max_tokens=4, ignore_eos=True)))
    stats = engine.stats()
    assert stats.num_waiting == 2 and stats.num_running == 0
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2
    assert stats.num_kv_blocks_used >= 3
    assert 0 < stats.kv_usage < 1
    _drain(engine)
    stats = engine.stats()
    assert stats.output_tokens_per_s > 0 and stats.num_generated_tokens >= 8


def test_seed_reproducible_and_top_k1_is_greedy(engine):
    prompt = list(range(20, 35))
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    a = engine.generate([prompt], sampled)[0].output_token_ids
    b = engine.generate([prompt, list(range(3, 9))], [sampled, sampled])[0].output_token_ids
    assert a == b
    greedy = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].output_token_ids
    top1 = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.3, top_k=1, seed=3, ignore_eos=True))
    assert top1[0].output_token_ids == greedy


def test_max_tokens_and_stop_token(engine):
    prompt = list(range(40, 52))
    free = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(free.output_token_ids) == 8 and free.finish_reason == "length"
    stop_at = free.output_token_ids[3]
    stopped = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.output_token_ids == free.output_token_ids[: free.output_token_ids.index(stop_at) + 1]


def test_stop_string_cuts_text(engine):
    full = engine.generate(["The cluster is"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    text = full.text
    assert text, "the tiny model should produce some text"
    stop = text[len(text) // 2 : len(text) // 2 + 2].strip() or text[-1]
    out = engine.generate(["The cluster is"], SamplingParams(max_tokens=16, stop=(stop,), ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert text.startswith(out.text)


def test_logprobs_are_returned(engine):
    out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    for token, lp in zip(out.output_token_ids, out.logprobs, strict=True):
        assert token in lp and all(v <= 0 for v in lp.values())


def test_async_engine_streams_and_cancels(tiny_llama):
    engine = Engine.from_pretrained(str(tiny_llama), dtype="float32")

    async def main():
        with AsyncEngine(engine) as aengine:
            tokens = []
            params = SamplingParams(max_tokens=10, ignore_eos=True)
            async for out in aengine.generate(make_call("a", [3, 4, 5, 6], params)):
                tokens.extend(out.new_token_ids)
            assert len(tokens) == 10 and out.finished

            stream = aengine.generate(make_call("b", [3, 4, 5, 6], SamplingParams(max_tokens=500, ignore_eos=True)))
            async for _ in stream:
                break
            await stream.aclose()  # a client cancel: the request must be aborted
            await asyncio.sleep(0.1)
            stats = await aengine.acall(lambda e: e.stats())
            assert stats.num_running == 0 and stats.num_kv_blocks_used == 0

            with pytest.raises(EmptyPromptError):
                async for _ in aengine.generate(make_call("c", [])):
                    pass

    asyncio.run(main())


def test_the_call_enters_the_engine_as_it_is_and_outputs_carry_only_new_tokens(engine):
    """The router's `GenerateCall` is the engine's request (no re-packing), and a step reports only its own
    tokens: the whole output is never copied per step, yet the outputs add up to it exactly."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
    call = make_call("flat", list(range(3, 40)), params)
    engine.add_request(call)
    assert engine.scheduler.get_request("flat").sampling_params is call.sampling
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == "flat"]
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert [len(o.new_token_ids) for o in outputs] == [1] * 12
    assert [o.num_output_tokens for o in outputs] == list(range(1, 13))
    assert [len(o.logprobs) for o in outputs] == [1] * 12
    whole = engine.generate([list(range(3, 40))], params)[0]
    assert tokens == whole.output_token_ids and len(whole.logprobs) == 12
    assert "".join(o.text_delta for o in outputs) == whole.text and whole.finish_reason == "length"


def test_a_stream_cancelled_while_it_registers_leaves_nothing_running(tiny_llama):
    """Cancelling the first `anext` while the request enters the engine must not leave it running unread."""
    engine = Engine.from_pretrained(str(tiny_llama), dtype="float32")
    add_request = engine.add_request

    def slow_add_request(call, **kwargs):
        time.sleep(0.05)  # on the engine thread: the cancel below lands while the add runs
        add_request(call, **kwargs)

    engine.add_request = slow_add_request

    async def main():
        with AsyncEngine(engine) as aengine:
            params = SamplingParams(max_tokens=400, ignore_eos=True)
            for i, cancel_after_s in enumerate([0.0, 0.02, 0.03, 0.1]):  # before, during (twice) and after the add
                stream = aengine.generate(make_call(f"c{i}", [3, 4, 5], params))
                first = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(cancel_after_s)
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                await stream.aclose()
                # Commands run in order, so any abort the cancel queued has run before this one.
                assert not await aengine.acall(lambda e: e.has_unfinished()), f"c{i} runs with nobody reading it"
            stats = await aengine.acall(lambda e: e.stats())
            assert stats.num_running == stats.num_waiting == 0 and stats.num_kv_blocks_used == 0

    asyncio.run(main())


def test_async_engine_survives_a_consumer_whose_event_loop_closed(tiny_llama):
    """A caller that exits its event loop mid-stream must cost only its own request, never the engine."""
    aengine = AsyncEngine(Engine.from_pretrained(str(tiny_llama), dtype="float32"))
    try:

        async def read_one_token_and_leave():
            stream = aengine.generate(make_call("gone", [3, 4, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True)))
            await stream.__anext__()

        for _ in range(3):  # the engine may publish to the closed loop before or after the abort lands
            asyncio.run(read_one_token_and_leave())
            aengine.call(lambda e: e.abort("gone")).result(timeout=10)

        async def full():
            return [out async for out in aengine.generate(make_call("next", [3, 4, 5], SamplingParams(max_tokens=4)))]

        outputs = asyncio.run(full())
        assert outputs[-1].finished and [len(o.new_token_ids) for o in outputs] == [1] * 4
        stats = aengine.call(lambda e: e.stats()).result(timeout=10)
        assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    finally:
        aengine.shutdown()


def test_moe_stats_count_tokens_per_expert(tiny_models):
    engine = Engine.from_pretrained(str(tiny_models["mixtral"]), dtype="float32")
    engine.generate([list(range(3, 20))], SamplingParams(max_tokens=5, ignore_eos=True))
    counts = engine.stats().expert_counts
    assert sorted(counts) == [0, 1]  # both layers are MoE
    # 17 prompt tokens + 4 decoded (the 5th token is sampled, never fed back), top-2 routing.
    assert all(sum(per_expert) == (17 + 4) * 2 for per_expert in counts.values())


def test_adapters_add_and_remove_at_runtime(tiny_llama, tiny_loras):
    engine = Engine.from_pretrained(str(tiny_llama), dtype="float32", max_loras=1)
    engine.add_lora("a", str(tiny_loras["a"]))
    engine.add_request(make_call("x", [3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True), lora_name="a"))
    with pytest.raises(InvalidRequestError, match="in use"):
        engine.remove_lora("a")
    _drain(engine)
    engine.remove_lora("a")
    assert engine.list_loras() == []
    with pytest.raises(UnknownAdapterError):
        engine.add_request(make_call("y", [3, 4, 5], lora_name="a"))
    with pytest.raises(UnknownAdapterError):
        engine.remove_lora("a")


def test_preemption_by_recompute_keeps_greedy_outputs(tiny_llama):
    """A pool too small for the batch forces preemptions; recomputed requests still produce the same tokens."""
    prompts = [list(range(3 + i, 30 + 3 * i)) for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, detokenize=False)
    roomy = Engine.from_pretrained(str(tiny_llama), dtype="float32")
    expected = [o.output_token_ids for o in roomy.generate(prompts, params)]
    # tiny Llama: 2 layers x 2 KV heads x 16 dims x 2 (K,V) x 4 bytes = 512 bytes per token, 8 KiB per block.
    tight = Engine.from_pretrained(str(tiny_llama), dtype="float32", kv_cache_bytes=12 * 8192)
    priorities = [0, 1, 0, 2, 1, 0]
    for i, (prompt, priority) in enumerate(zip(prompts, priorities, strict=True)):
        tight.add_request(make_call(f"r{i}", prompt, params, priority=priority))
    finished: dict[str, list[int]] = {}
    while tight.has_unfinished():
        for o in tight.step():
            finished.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert tight.stats().num_preemptions > 0
    assert [finished[f"r{i}"] for i in range(6)] == expected
    assert tight.stats().num_kv_blocks_used == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_agree_with_fp32(tiny_models, dtype):
    prompts = [[3, 4, 5, 6, 7] * 5, [9, 10]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    fp32 = Engine.from_pretrained(str(tiny_models["mixtral"]), dtype="float32").generate(prompts, params)
    half = Engine.from_pretrained(str(tiny_models["mixtral"]), dtype=dtype)
    assert str(half.runner.kv_cache.dtype) == f"torch.{dtype}"
    # Logits are well separated in the tiny models, so the half-precision argmax agrees.
    assert [o.output_token_ids for o in half.generate(prompts, params)] == [o.output_token_ids for o in fp32]
