"""LLMWorker behind Ray: streaming, the prefill/decode handoff, cancellation, errors, stats and adapters."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from workers.actors import LLMWorker, WorkerConfig
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.errors import PromptTooLongError, UnknownAdapterError
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall, TokenChunk, WorkerStats, WrongRoleError

PROMPT = [5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66]
"""18 tokens: more than one KV block, so the handoff moves a full block and a partial one."""
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_k=50, seed=1234)


def _engine_config(model) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", kv_cache_bytes=8 * MiB, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def workers(ray_cluster, tiny_llama, tiny_loras):
    """One worker per role on the tiny Llama (the mixed one loads adapter `a` from its config), and an impatient one."""
    engine = _engine_config(tiny_llama)
    configs = {
        "mixed": WorkerConfig(
            worker_id="t-mixed-0",
            deployment="t",
            role="mixed",
            engine=engine,
            adapters=(("a", str(tiny_loras["a"])),),
        ),
        "prefill": WorkerConfig(worker_id="t-prefill-0", deployment="t", role="prefill", engine=engine),
        "decode": WorkerConfig(worker_id="t-decode-0", deployment="t", role="decode", engine=engine),
        # A whole tiny-model stream takes about a second, so only a short stall timeout can catch one.
        "impatient": WorkerConfig(
            worker_id="t-mixed-1", deployment="t", role="mixed", engine=engine, stream_stall_timeout_s=0.2
        ),
    }
    handles = {role: LLMWorker.options(num_cpus=1).remote(config) for role, config in configs.items()}
    ray.get([h.ping.remote() for h in handles.values()])
    yield handles
    for handle in handles.values():
        ray.kill(handle)


def _call(request_id: str, sampling: SamplingParams = GREEDY, **kwargs) -> GenerateCall:
    kwargs.setdefault("prompt_token_ids", PROMPT)
    return GenerateCall(request_id=request_id, sampling=sampling, **kwargs)


def _collect(stream) -> list[TokenChunk]:
    return [ray.get(ref) for ref in stream]


def _tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _assert_contiguous(chunks: list[TokenChunk], first_seq: int) -> None:
    expected = first_seq
    for chunk in chunks:
        assert chunk.seq == expected
        expected += len(chunk.token_ids)


def _wait_idle(worker, timeout_s: float = 10.0) -> WorkerStats:
    """Poll until no request holds KV: aborts run on the engine thread a moment after the cancel."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = ray.get(worker.stats.remote())
        if (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _pd(workers, call: GenerateCall) -> tuple[list[TokenChunk], str]:
    result_ref, kv_ref = workers["prefill"].prefill.options(num_returns=2).remote(call)
    result = ray.get(result_ref)
    assert result.first.seq == 0 and len(result.first.token_ids) == 1 and not result.first.finished
    assert result.kv_bytes > 0 and result.prefill_ms > 0
    rest = _collect(workers["decode"].decode.remote(kv_ref, call))
    _assert_contiguous(rest, first_seq=1)
    chunks = [result.first, *rest]
    return chunks, "".join(c.text for c in chunks)


def test_mixed_worker_streams_contiguous_chunks(workers):
    chunks = _collect(workers["mixed"].generate.remote(_call("stream")))
    _assert_contiguous(chunks, first_seq=0)
    assert len(_tokens(chunks)) == GREEDY.max_tokens
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    assert not any(c.finished for c in chunks[:-1])
    assert all(c.worker_id == "t-mixed-0" and c.num_prompt_tokens == len(PROMPT) for c in chunks)
    assert "".join(c.text for c in chunks)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_decode_equals_mixed(workers, sampling):
    mixed = _collect(workers["mixed"].generate.remote(_call(f"mixed-{sampling.temperature}", sampling)))
    pd, pd_text = _pd(workers, _call(f"pd-{sampling.temperature}", sampling))
    assert _tokens(pd) == _tokens(mixed)
    assert pd_text == "".join(c.text for c in mixed)
    assert pd[-1].finished and pd[-1].finish_reason == "length"
    # The prefill worker kept nothing after the handoff; the decode worker freed the request at the end.
    assert _wait_idle(workers["prefill"]).kv_blocks_used == 0
    assert _wait_idle(workers["decode"]).kv_blocks_used == 0


def test_prefill_decode_from_asyncio(workers):
    """The router's path: await the small result, hand the KV ref on, `async for` over the stream."""

    async def run() -> list[TokenChunk]:
        call = _call("pd-async")
        result_ref, kv_ref = workers["prefill"].prefill.options(num_returns=2).remote(call)
        chunks = [(await result_ref).first]
        async for ref in workers["decode"].decode.remote(kv_ref, call):
            chunks.append(await ref)
        return chunks

    chunks = asyncio.run(run())
    _assert_contiguous(chunks, first_seq=0)
    assert _tokens(chunks) == _tokens(_collect(workers["mixed"].generate.remote(_call("mixed-async"))))


def test_prefill_that_finishes_at_first_token_exports_nothing(workers):
    call = _call("one-token", SamplingParams(max_tokens=1))
    result_ref, kv_ref = workers["prefill"].prefill.options(num_returns=2).remote(call)
    result = ray.get(result_ref)
    assert result.first.finished and result.first.finish_reason == "length" and result.kv_bytes == 0
    assert ray.get(kv_ref) is None


def test_kv_bytes_match_blocks(workers):
    stats = ray.get(workers["prefill"].stats.remote())
    result_ref, _ = workers["prefill"].prefill.options(num_returns=2).remote(_call("sized"))
    num_blocks = -(-len(PROMPT) // _engine_config("unused").block_size)
    assert ray.get(result_ref).kv_bytes == num_blocks * stats.kv_bytes_per_block


def test_cancel_mid_stream_frees_blocks(workers):
    worker = workers["mixed"]
    num_generated_before = ray.get(worker.stats.remote()).num_generated_tokens
    stream = worker.generate.remote(_call("cancel-me", SamplingParams(max_tokens=400, ignore_eos=True)))
    first = ray.get(next(stream))
    assert first.seq == 0
    assert ray.get(worker.stats.remote()).kv_blocks_used > 0
    ray.cancel(stream)
    stats = _wait_idle(worker)
    # kv_blocks_used counts blocks some request holds; prefix-cached blocks nobody holds count as free.
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert stats.num_generated_tokens - num_generated_before < 400


def test_stalled_consumer_is_aborted(workers):
    worker = workers["impatient"]
    stream = worker.generate.remote(_call("stalled", SamplingParams(max_tokens=490, ignore_eos=True)))
    ray.get(next(stream))
    # Not reading: after the backpressure window fills, the worker gives up after stream_stall_timeout_s.
    stats = _wait_idle(worker, timeout_s=15.0)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    rest = _collect(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert len(_tokens(rest)) < 489


def test_abort_ends_the_stream(workers):
    worker = workers["mixed"]
    stream = worker.generate.remote(_call("abort-me", SamplingParams(max_tokens=400, ignore_eos=True)))
    ray.get(next(stream))
    assert ray.get(worker.abort.remote("abort-me"))
    rest = _collect(stream)
    assert rest[-1].finished and rest[-1].finish_reason == "abort"
    assert not ray.get(worker.abort.remote("abort-me"))
    assert _wait_idle(worker).kv_blocks_used == 0


def test_engine_errors_keep_their_type(workers):
    too_long = _call("too-long", prompt_token_ids=list(range(3, 503)) * 2)
    with pytest.raises(PromptTooLongError):
        _collect(workers["mixed"].generate.remote(too_long))
    result_ref, kv_ref = workers["prefill"].prefill.options(num_returns=2).remote(too_long)
    with pytest.raises(PromptTooLongError):
        ray.get(result_ref)
    with pytest.raises(PromptTooLongError):  # a decode worker handed this ref fails the same way
        ray.get(kv_ref)
    with pytest.raises(UnknownAdapterError):
        _collect(workers["mixed"].generate.remote(_call("no-adapter", adapter="nope")))
    with pytest.raises(WrongRoleError):
        _collect(workers["prefill"].generate.remote(_call("wrong-role")))


def test_stats_are_sane(workers):
    _collect(workers["mixed"].generate.remote(_call("for-stats")))
    stats = ray.get(workers["mixed"].stats.remote())
    assert (stats.worker_id, stats.deployment, stats.role) == ("t-mixed-0", "t", "mixed")
    assert stats.kv_blocks_total > 0 and 0 <= stats.kv_blocks_used <= stats.kv_blocks_total
    assert stats.kv_usage == pytest.approx(stats.kv_blocks_used / stats.kv_blocks_total)
    assert stats.num_generated_tokens >= GREEDY.max_tokens and stats.output_tokens_per_s > 0
    assert 0.0 <= stats.prefix_cache_hit_rate <= 1.0 and stats.num_preemptions == 0
    assert stats.adapters == ["a"] and stats.expert_counts == {}
    assert stats.kv_bytes_per_block > 0


def test_adapters_from_config_and_at_runtime_are_used(workers, tiny_llama, tiny_loras):
    worker = workers["mixed"]
    local = Engine(_engine_config(tiny_llama))
    local.add_lora("a", str(tiny_loras["a"]))
    local.add_lora("b", str(tiny_loras["b"]))
    base, with_a, with_b = local.generate([PROMPT] * 3, GREEDY, lora_names=[None, "a", "b"])

    remote_a = _tokens(_collect(worker.generate.remote(_call("lora-a", adapter="a"))))
    assert remote_a == with_a.output_token_ids != base.output_token_ids

    ray.get(worker.add_lora.remote("b", str(tiny_loras["b"])))
    assert _tokens(_collect(worker.generate.remote(_call("lora-b", adapter="b")))) == with_b.output_token_ids
    ray.get(worker.remove_lora.remote("b"))
    with pytest.raises(UnknownAdapterError):
        _collect(worker.generate.remote(_call("lora-b-gone", adapter="b")))


def test_stats_publish_the_prefix_cache_summary_the_router_hashes(workers):
    from router.prefix_affinity import PrefixAffinityConfig, cacheable_prefix_hashes

    prompt = list(range(300, 300 + 3 * 16 + 5))
    _collect(workers["mixed"].generate.remote(_call("prefix-summary", prompt_token_ids=prompt)))
    stats: WorkerStats = ray.get(workers["mixed"].stats.remote())
    expected = cacheable_prefix_hashes(prompt, stats.kv_block_size, None, PrefixAffinityConfig())
    assert len(expected) == 3 and set(expected) <= set(stats.prefix_block_hashes)
    # The same tokens under an adapter are other blocks: the router must not count them as cached.
    adapted = cacheable_prefix_hashes(prompt, stats.kv_block_size, "a", PrefixAffinityConfig())
    assert not set(adapted) & set(stats.prefix_block_hashes)
