"""The dispatch flow: the stream's sequence contract, and `run_placed` on real in-process engines.

`EngineWorkerClient` is a `WorkerClient` over an `AsyncEngine` in this process, so the mixed and
prefill/decode paths run the real engine without Ray.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
from inprocess_workers import EngineWorkerClient

from router.dispatch import SequenceGuard, run_placed
from router.errors import Unavailable
from router.policy import Decision
from workers.engine.async_engine import AsyncEngine
from workers.engine.config import EngineConfig, MiB
from workers.engine.engine import Engine
from workers.engine.sampling_params import SamplingParams
from workers.messages import GenerateCall, TokenChunk

PROMPT = (5, 17, 42, 99, 7, 23, 61, 88, 12, 30, 44, 71, 3, 9, 150, 201, 77, 66)
"""18 tokens: one full KV block and a partial one cross the prefill/decode handoff."""
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """Two engines on the tiny Llama: `a` and `b` serve as mixed, prefill or decode workers as a test needs."""
    config = EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_bytes=8 * MiB)
    built = {name: AsyncEngine(Engine(config)) for name in ("a", "b")}
    yield built
    for engine in built.values():
        engine.shutdown()


@pytest.fixture
def clients(engines) -> dict[str, EngineWorkerClient]:
    return {name: EngineWorkerClient(name, engine) for name, engine in engines.items()}


def call(request_id: str, sampling: SamplingParams = GREEDY) -> GenerateCall:
    return GenerateCall(request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling)


def chunk(seq: int, *token_ids: int, finished: bool = False) -> TokenChunk:
    return TokenChunk(request_id="r", seq=seq, token_ids=list(token_ids), finished=finished)


def collect(decision: Decision, generate_call: GenerateCall, clients) -> list[TokenChunk]:
    async def run() -> list[TokenChunk]:
        return [c async for c in run_placed(decision, generate_call, clients)]

    return asyncio.run(run())


def tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_contiguous(chunks: list[TokenChunk]) -> None:
    expected = 0
    for c in chunks:
        assert c.seq == expected
        expected += len(c.token_ids)
    assert chunks[-1].finished
    assert not any(c.finished for c in chunks[:-1])


# ---- SequenceGuard ------------------------------------------------------------------------------


def test_guard_passes_an_in_order_stream_unchanged():
    guard = SequenceGuard("r")
    stream = [chunk(0, 10), chunk(1, 11, 12), chunk(3, 13, finished=True)]
    assert [guard.admit(c) for c in stream] == stream
    assert guard.next_seq == 4


def test_guard_drops_a_chunk_the_client_already_has():
    guard = SequenceGuard("r")
    guard.admit(chunk(0, 10, 11))
    assert guard.admit(chunk(0, 10, 11)) is None
    assert guard.admit(chunk(1, 11)) is None
    assert guard.admit(chunk(2)) is None
    assert guard.next_seq == 2


def test_guard_trims_the_overlap_of_a_partly_seen_chunk():
    guard = SequenceGuard("r")
    guard.admit(chunk(0, 10, 11, 12))
    admitted = guard.admit(chunk(1, 11, 12, 13, 14))
    assert (admitted.seq, admitted.token_ids) == (3, [13, 14])
    assert guard.next_seq == 5


def test_guard_raises_on_a_gap():
    guard = SequenceGuard("r")
    guard.admit(chunk(0, 10))
    with pytest.raises(Unavailable, match="skipped from 1 to 3"):
        guard.admit(chunk(3, 13))


def test_guard_still_delivers_the_finish_of_an_all_duplicate_final_chunk():
    guard = SequenceGuard("r")
    guard.admit(chunk(0, 10, 11))
    admitted = guard.admit(chunk(1, 11, finished=True))
    assert (admitted.seq, admitted.token_ids, admitted.finished) == (2, [], True)


# ---- run_placed on real engines -----------------------------------------------------------------


def test_mixed_placement_streams_the_engine_output_in_sequence(clients, engines):
    chunks = collect(Decision(worker_id="a"), call("mixed-1"), clients)
    assert_contiguous(chunks)
    assert len(tokens(chunks)) == GREEDY.max_tokens
    assert chunks[-1].finish_reason == "length"
    assert clients["a"].calls == ["generate"]
    assert clients["b"].calls == []


def test_greedy_prefill_then_decode_equals_mixed_generate(clients):
    mixed = collect(Decision(worker_id="a"), call("pd-mixed"), clients)
    disaggregated = collect(Decision(worker_id="b", prefill_worker_id="a"), call("pd-split"), clients)
    assert tokens(disaggregated) == tokens(mixed)
    assert_contiguous(disaggregated)
    assert disaggregated[0].worker_id == "a"
    assert {c.worker_id for c in disaggregated[1:]} == {"b"}
    assert clients["a"].calls == ["generate", "prefill"]
    assert clients["b"].calls == ["decode"]


def test_a_request_finished_at_prefill_never_reaches_the_decode_worker(clients):
    one_token = SamplingParams(max_tokens=1, ignore_eos=True)
    chunks = collect(Decision(worker_id="b", prefill_worker_id="a"), call("pd-one", one_token), clients)
    assert len(chunks) == 1
    assert chunks[0].finished and len(chunks[0].token_ids) == 1
    assert clients["b"].calls == []


def test_a_worker_missing_from_the_clients_is_unavailable_with_a_short_retry(clients):
    with pytest.raises(Unavailable, match="gone-0") as info:
        collect(Decision(worker_id="gone-0"), call("missing-1"), clients)
    assert info.value.retry_after_s == 0.5
    with pytest.raises(Unavailable, match="gone-1"):
        collect(Decision(worker_id="a", prefill_worker_id="gone-1"), call("missing-2"), clients)


def test_closing_the_stream_early_aborts_the_request_on_the_worker(clients, engines):
    long_run = SamplingParams(max_tokens=200, ignore_eos=True)

    async def run() -> bool:
        async with aclosing(run_placed(Decision(worker_id="a"), call("early-close", long_run), clients)) as stream:
            async for _ in stream:
                break
        # The engine queues the abort from a generator finalizer; give the loop a bounded number of turns.
        for _ in range(100):
            if not await engines["a"].acall(lambda engine: engine.has_unfinished()):
                return True
            await asyncio.sleep(0)
        return False

    assert asyncio.run(run()), "the engine still runs the request its consumer left"
