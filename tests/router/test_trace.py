from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from bench.engine import latency_from_token_times, percentiles_ms, ratios
from router.trace import (
    DEFAULT_TRACE,
    NUM_SPECIAL_IDS,
    Scaling,
    TraceRequest,
    chain_block_ids,
    fit_to_context,
    load_trace,
    prefix_sharing,
    random_prompt,
    sample_requests,
    scale_hash_blocks,
    scale_requests,
    scaling_summary,
    trace_prompt,
)


def req(prompt_len: int, output_len: int, arrival_s: float = 0.0) -> TraceRequest:
    return TraceRequest(arrival_s=arrival_s, prompt_len=prompt_len, output_len=output_len)


def test_load_trace_reads_every_row_relative_to_the_first():
    # The default trace ships in the repository, so a fresh clone replays it with nothing beside it.
    assert DEFAULT_TRACE.is_relative_to(Path(__file__).resolve().parents[2] / "data" / "traces")
    trace = load_trace()
    assert len(trace) == 19366
    assert trace[0] == req(374, 44, 0.0)
    # Second row: 2023-11-16 18:15:50.9951690 minus 18:15:46.6805900 (7th fractional digit dropped).
    assert trace[1] == req(396, 109, pytest.approx(4.314579))
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(trace))


def test_load_trace_parses_a_small_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0000000,10,2\n2023-11-16 18:01:00.5000009,20,3\n"
    )
    assert load_trace(path) == [req(10, 2, 0.0), req(20, 3, 60.5)]


def test_load_trace_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(ValueError, match="no rows"):
        load_trace(empty)


def test_fit_scales_prompts_by_one_factor_and_caps_outputs():
    reqs = [req(4000, 300), req(100, 900), req(10, 5)]
    scaling = fit_to_context(reqs, max_model_len=2048, max_output_len=512)
    assert scaling == Scaling(prompt_scale=(2048 - 512) / 4000, max_output_len=512)
    scaled = scale_requests(reqs, scaling)
    assert [r.prompt_len for r in scaled] == [1536, 38, 4]
    assert [r.output_len for r in scaled] == [300, 512, 5]
    assert max(r.prompt_len for r in scaled) + max(r.output_len for r in scaled) <= 2048


def test_fit_never_stretches_short_prompts_and_keeps_lengths_positive():
    reqs = [req(10, 4, 1.5), req(1, 1)]
    scaling = fit_to_context(reqs, max_model_len=2048)
    assert scaling == Scaling(prompt_scale=1.0, max_output_len=4)
    assert scale_requests(reqs, scaling) == reqs
    tiny = scale_requests([req(3, 9)], Scaling(prompt_scale=0.01, max_output_len=2))
    assert tiny == [req(1, 2)]


def test_fit_rejects_impossible_contexts():
    with pytest.raises(ValueError, match="no room"):
        fit_to_context([req(10, 100)], max_model_len=50)
    with pytest.raises(ValueError, match="max_output_len"):
        fit_to_context([req(10, 100)], max_model_len=50, max_output_len=0)
    with pytest.raises(ValueError, match="no requests"):
        fit_to_context([], max_model_len=50)


def test_sampling_is_seeded_distinct_and_in_arrival_order():
    trace = [req(i + 1, 1, float(i)) for i in range(100)]
    first = sample_requests(trace, 10, seed=1)
    assert first == sample_requests(trace, 10, seed=1)
    assert first != sample_requests(trace, 10, seed=2)
    assert len(set(first)) == 10
    assert [r.arrival_s for r in first] == sorted(r.arrival_s for r in first)
    with pytest.raises(ValueError, match="num_requests"):
        sample_requests(trace, 101, seed=0)


def test_random_prompts_avoid_special_ids_and_are_reproducible():
    prompt = random_prompt(1000, 50, random.Random(0))
    assert len(prompt) == 1000 and min(prompt) == NUM_SPECIAL_IDS and max(prompt) == 49
    assert prompt == random_prompt(1000, 50, random.Random(0))
    with pytest.raises(ValueError, match="vocab_size"):
        random_prompt(5, NUM_SPECIAL_IDS, random.Random(0))


def test_scaling_summary_reports_before_and_after():
    sample = [req(1000, 700), req(200, 10)]
    scaling = Scaling(prompt_scale=0.5, max_output_len=512)
    summary = scaling_summary(sample, scale_requests(sample, scaling), scaling)
    assert summary["num_outputs_capped"] == 1
    assert summary["trace_prompt_len"] == {"mean": 600.0, "max": 1000}
    assert summary["prompt_len"] == {"mean": 300.0, "max": 500}
    assert summary["output_len"] == {"mean": 261.0, "max": 512}
    assert summary["total_output_tokens"] == 522


def test_percentiles_match_numpy():
    values = random.Random(0).sample(range(10_000), 257)
    got = percentiles_ms([v / 1000 for v in values])
    assert got == {"p50": pytest.approx(np.percentile(values, 50)), "p99": pytest.approx(np.percentile(values, 99))}
    assert percentiles_ms([]) is None


def test_latency_from_token_times():
    # Request a: tokens at 1, 2, 4 -> TTFT 1, TPOT 1.5, gaps 1 and 2. Request b: one token at 3 -> TTFT 3 only.
    stats = latency_from_token_times(0.0, [[1.0, 2.0, 4.0], [3.0]])
    assert stats["ttft_ms"] == {"p50": 2000.0, "p99": pytest.approx(2980.0)}
    assert stats["tpot_ms"] == {"p50": 1500.0, "p99": 1500.0}
    assert stats["itl_ms"] == {"p50": 1500.0, "p99": pytest.approx(1990.0)}


def test_ratios_skip_engines_without_a_result():
    results = {"ours": {"output_tokens_per_s": 300.0}, "vllm": {"output_tokens_per_s": 400.0}, "transformers": {}}
    assert ratios(results) == {"ours_over_vllm": 0.75}


def test_load_trace_detects_mooncake_and_takes_a_format(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 250, "input_length": 600, "output_length": 2, "hash_ids": [4, 5]}\n')
    expected = [TraceRequest(arrival_s=0.0, prompt_len=600, output_len=2, block_hash_ids=(4, 5), hash_block_size=512)]
    assert load_trace(path) == expected
    assert load_trace(path, trace_format="mooncake") == expected
    with pytest.raises(ValueError, match="trace format must be one of auto, azure, mooncake"):
        load_trace(path, trace_format="burst")


def test_scaled_hash_blocks_keep_exactly_the_shared_prefixes():
    trace = [
        TraceRequest(arrival_s=0.0, prompt_len=1300, output_len=1, block_hash_ids=(1, 2, 3), hash_block_size=512),
        TraceRequest(arrival_s=0.0, prompt_len=1100, output_len=1, block_hash_ids=(1, 2, 9), hash_block_size=512),
        TraceRequest(
            arrival_s=0.0, prompt_len=5000, output_len=1, block_hash_ids=tuple(range(10)), hash_block_size=512
        ),
        req(40, 1),
    ]
    a, b, long, plain = scale_hash_blocks(trace, block_size=16, max_prompt_len=96)
    # 1300 / 512 blocks -> 41 tokens of 16-token blocks; the 10-block prompt is cut to 96 tokens (6 blocks).
    assert (a.prompt_len, a.block_hash_ids, a.hash_block_size) == (41, (1, 2, 3), 16)
    assert (long.prompt_len, long.block_hash_ids) == (96, (0, 1, 2, 3, 4, 5))
    assert plain == req(40, 1)
    rng = random.Random(0)
    pa, pb, pl = (trace_prompt(r, 512, rng) for r in (a, b, long))
    assert (len(pa), len(pb), len(pl)) == (41, b.prompt_len, 96)
    assert all(NUM_SPECIAL_IDS <= t < 512 for t in pa + pb + pl)
    # Equal leading ids give equal tokens, block by block; the first differing id ends the shared prefix.
    assert pa[:32] == pb[:32] and pa[32:34] != pb[32:34]
    assert pa[:16] != pl[:16]  # id 1 vs id 0
    # The same request again gives the same shared part whatever the rng (other processes, other seeds).
    assert trace_prompt(a, 512, random.Random(7))[:41] == pa
    # Without ids, prompts are the old random ones, drawn from the same stream.
    assert trace_prompt(plain, 512, random.Random(3)) == random_prompt(40, 512, random.Random(3))


def test_prefix_sharing_counts_blocks_whose_whole_prefix_came_before():
    ids = [(1, 2, 3), (1, 2, 4), (9, 2, 3), (1, 2, 3)]
    trace = [TraceRequest(arrival_s=0, prompt_len=1, output_len=1, block_hash_ids=i, hash_block_size=1) for i in ids]
    # Repeated: (1), (1,2) in the second; none in the third (its own first block differs); all three in the fourth.
    assert prefix_sharing(trace) == {"num_blocks": 12, "repeated_block_share": round(5 / 12, 4)}
    assert len(set(chain_block_ids((1, 2, 3)))) == 3 and chain_block_ids((9, 2, 3))[1] != chain_block_ids((1, 2))[1]
