"""Prefix caching in the simulator's workers: a shared prefix is computed once, cached blocks are evicted least
recently used under pressure, P/D pools cache on their prefill workers, and the router's view shows the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from event_checks import check_after_every_event

from router.trace import TraceRequest, chain_block_ids
from sim.config import PoolConfig, SimConfig, TraceConfig, load_config
from sim.cost import LinearCostModel
from sim.simulator import Simulator, run
from sim.worker import SimRequest, SimWorker

# 10 ms per step plus 1 ms per prompt token: a prefill's time says exactly how many tokens it computed.
LINEAR = {"kind": "linear", "a": 0.01, "b": 0.001}
HASH_BLOCK = 64
"""Tokens per hash block in these tests: 4 KV blocks of 16."""


def req(arrival: float, prompt: int, output: int, ids: tuple[int, ...]) -> TraceRequest:
    return TraceRequest(
        arrival_s=arrival, prompt_len=prompt, output_len=output, block_hash_ids=ids, hash_block_size=HASH_BLOCK
    )


def worker(kv_blocks: int) -> SimWorker:
    return SimWorker(
        worker_id="mixed-0",
        role="mixed",
        cost=LinearCostModel(a=0.01, b=0.001),
        kv_blocks=kv_blocks,
        block_size=16,
        max_batched_tokens=2048,
        max_num_seqs=8,
    )


def serve(w: SimWorker, r: SimRequest) -> list[int]:
    """Run `r` alone on `w` to its end; returns the prefill chunk sizes of the steps it took."""
    w.waiting.append(r)
    chunks = []
    while (plan := w.plan_step(0.0)) is not None:
        w.plan = plan
        chunks += [c for q, c in plan.chunks if q is r]
        prefilled, finished = w.finish_plan()
        for q in prefilled:
            if q.num_generated < q.output_len:
                w.decoding.append(q)
            else:
                finished.append(q)
        for q in finished:
            w.release(q)
    return chunks


def test_a_shared_prefix_is_computed_once() -> None:
    w = worker(kv_blocks=100)
    a = SimRequest.from_trace(0, req(0.0, 4 * HASH_BLOCK + 10, 3, (1, 2, 3, 4, 5)), output_len=3)
    b = SimRequest.from_trace(1, req(0.0, 4 * HASH_BLOCK + 10, 3, (1, 2, 3, 4, 9)), output_len=3)
    assert serve(w, a) == [266]
    # b's first four blocks are a's: only its last 10 tokens are prefilled.
    assert serve(w, b) == [10]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 256)
    assert (w.prefix.num_query_tokens, w.prefix.num_hit_tokens) == (532, 256)
    assert w.free_blocks == w.kv_blocks  # cached blocks no one holds are free to allocate
    assert w.prefix_block_hashes() == frozenset(chain_block_ids((1, 2, 3, 4)))
    assert w.prefix_block_size == HASH_BLOCK


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    w = worker(kv_blocks=100)
    first = SimRequest.from_trace(0, req(0.0, 4 * HASH_BLOCK, 2, (1, 2, 3, 4)), output_len=2)
    again = SimRequest.from_trace(1, req(0.0, 4 * HASH_BLOCK, 2, (1, 2, 3, 4)), output_len=2)
    serve(w, first)
    # All four blocks are cached, but a hit may not cover the last token, so the last block is recomputed.
    assert serve(w, again) == [HASH_BLOCK]
    assert again.num_cached_tokens == 3 * HASH_BLOCK


def test_cached_blocks_are_evicted_least_recently_used_tail_first() -> None:
    w = worker(kv_blocks=40)
    a = SimRequest.from_trace(0, req(0.0, 4 * HASH_BLOCK + 1, 2, (1, 2, 3, 4, 5)), output_len=2)
    serve(w, a)
    assert len(w.prefix_block_hashes()) == 4  # 16 of the 40 blocks, all free to allocate
    # 400 unrelated tokens take 25 blocks: of the 15 left, 12 can stay cached, so one hash block goes, the
    # prompt's last (freed first, so a prefix loses its tail before its head).
    serve(w, SimRequest.from_trace(1, TraceRequest(arrival_s=0.0, prompt_len=400, output_len=1), output_len=1))
    assert w.prefix_block_hashes() == frozenset(chain_block_ids((1, 2, 3)))
    b = SimRequest.from_trace(2, req(0.0, 4 * HASH_BLOCK + 1, 2, (1, 2, 3, 4, 6)), output_len=2)
    assert serve(w, b) == [HASH_BLOCK + 1]
    assert b.num_cached_tokens == 3 * HASH_BLOCK
    # A hit refreshes recency: b's blocks, and now its fourth again, are the most recently used.
    assert w.prefix_block_hashes() == frozenset(chain_block_ids((1, 2, 3, 4)))


def test_concurrent_requests_share_cached_blocks_and_accounting_holds() -> None:
    # Many requests on one prefix, overlapping in time: hits on blocks others hold take no new blocks.
    requests = [req(i * 0.05, 8 * HASH_BLOCK + 5, 20, (7, 8, 9, 10, 11, 12, 13, 14, 100 + i)) for i in range(12)]
    sim = Simulator(
        SimConfig(
            requests=tuple(requests),
            pools=(PoolConfig(role="mixed", num_workers=1, kv_blocks=400),),
            cost_model=LINEAR,
            policy="least_outstanding",
        )
    )

    def check() -> None:
        w = sim.workers["mixed-0"]
        here = w.decoding + w.prefilling + w.ready
        # A block several requests share is counted once: by its first holder.
        shared = sum(n - 1 for n in w.prefix.in_use.values()) * (HASH_BLOCK // w.block_size)
        assert sum(r.num_blocks for r in here) - shared + w.free_blocks == w.kv_blocks, sim.now
        assert len(w.prefix.unheld) * (HASH_BLOCK // w.block_size) <= w.free_blocks

    check_after_every_event(sim, check)
    result = sim.run()
    # The first request computes the 512-token prefix; every later one finds it (held by a running request or
    # cached), so the hit rate is 11 x 512 of 12 x 517 prompt tokens.
    assert result.cached_tokens == [0] + [8 * HASH_BLOCK] * 11
    assert result.summary["prefix_hit_rate"] == pytest.approx(11 * 512 / (12 * 517))
    assert sim.workers["mixed-0"].free_blocks == 400


def test_pd_pools_cache_on_the_prefill_workers() -> None:
    requests = [req(0.0, 4 * HASH_BLOCK + 3, 4, (1, 2, 3, 4, 5)), req(1.0, 4 * HASH_BLOCK + 3, 4, (1, 2, 3, 4, 6))]
    pools = (
        PoolConfig(role="prefill", num_workers=1, kv_blocks=200),
        PoolConfig(role="decode", num_workers=1, kv_blocks=200),
    )
    result = run(SimConfig(requests=tuple(requests), pools=pools, cost_model=LINEAR, policy="least_outstanding"))
    assert result.cached_tokens == [0, 256]
    # The second prefill runs 3 tokens instead of 259.
    assert result.ttft_s[1] < result.ttft_s[0] - 0.2
    assert result.workers["prefill-0"]["prefix_hit_tokens"] == 256
    assert result.workers["decode-0"]["prefix_query_tokens"] == 0  # pulled KV is never looked up


def test_the_policy_sees_the_cache_and_the_request_hashes(tmp_path: Path) -> None:
    # A Mooncake-format file, detected from its content. Request 0 keeps the first worker busy, so request 1
    # runs on the second; request 2 (both idle by then) shares request 1's first two (512-token) blocks, and the
    # SGLang-style prefix baseline can only pick the second worker over the first by reading its cache.
    rows = [
        {"timestamp": 0, "input_length": 900, "output_length": 2, "hash_ids": [50, 51]},
        {"timestamp": 10, "input_length": 1300, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"timestamp": 5000, "input_length": 1200, "output_length": 2, "hash_ids": [1, 2, 4]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sim = Simulator(
        SimConfig(
            trace=TraceConfig(path=str(path)),
            pools=(PoolConfig(role="mixed", num_workers=2, kv_blocks=1000),),
            cost_model=LINEAR,
            policy="prefix_cache",
        )
    )
    result = sim.run()
    other, first, again = sim.requests
    assert (other.decode_worker, first.decode_worker) == ("mixed-0", "mixed-1")
    assert again.prompt_hashes.block_size == 512
    assert again.prompt_hashes.hashes == chain_block_ids((1, 2))
    views = {v.worker_id: v for v in sim.views.view(sim.now).workers["sim"]}
    assert views[first.decode_worker].prefix_block_size == 512
    assert set(chain_block_ids((1, 2))) <= views[first.decode_worker].prefix_block_hashes
    assert again.decode_worker == first.decode_worker
    assert result.cached_tokens == [0, 0, 1024]
    assert result.summary["prefix_hit_rate"] == pytest.approx(1024 / 3400)
    assert result.workers["mixed-1"]["prefix_hit_tokens"] == 1024
    assert result.to_json(include_requests=True)["requests"]["cached_tokens"] == [0, 0, 1024]


def test_mixed_hash_and_kv_block_sizes_are_refused() -> None:
    w = worker(kv_blocks=100)
    odd = SimRequest.from_trace(
        0,
        TraceRequest(arrival_s=0.0, prompt_len=100, output_len=1, block_hash_ids=(1, 2), hash_block_size=40),
        output_len=1,
    )
    w.waiting.append(odd)
    with pytest.raises(ValueError, match="multiple of the KV block size"):
        w.plan_step(0.0)


def test_the_mooncake_example_config_loads_requests_with_hashes() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "sim" / "mooncake_prefix.yaml")
    assert config.trace.format == "mooncake"
    requests = config.load_requests()
    assert len(requests) > 1000
    assert all(r.hash_block_size == 512 and r.block_hash_ids for r in requests)
