"""`bench/routing.py` on a Mooncake trace, without a cluster: the replayed window keeps the trace's prefixes at
the tiny model's scale, each run gets its own hash-id space, and the report compares hit rates and TTFT."""

from __future__ import annotations

import random
from pathlib import Path

from bench.routing import fresh_prefixes, parse_args, prefix_report, slo_report, trace_window
from router.replay import RequestRecord
from router.trace import prefix_sharing, trace_prompt

MOONCAKE = Path(__file__).resolve().parents[2] / "data" / "traces" / "mooncake_synthetic_trace.jsonl"


def test_the_mooncake_window_is_scaled_block_by_block_and_keeps_its_prefixes():
    args = parse_args(["--trace", str(MOONCAKE), "--window-start", "930"])
    assert args.format == "auto" and args.tokens_per_hash_block == 16
    window = trace_window(MOONCAKE, seed=0, max_prompt=384, max_output=96, start_s=930)
    assert 0 <= window[0].arrival_s < 1 and window[-1].arrival_s < 600
    assert all(r.hash_block_size == 16 and 1 <= r.prompt_len <= 384 and r.output_len <= 96 for r in window)
    assert all(len(r.block_hash_ids) * 16 >= r.prompt_len for r in window)
    # The last stretch of the trace reuses prefixes heavily; the scaling keeps that reuse (cut at 24 blocks).
    assert prefix_sharing(window[:200])["repeated_block_share"] > 0.3


def test_each_run_gets_its_own_hash_id_space():
    window = trace_window(MOONCAKE, seed=0, max_prompt=384, max_output=96, start_s=930)[:50]
    first, second = fresh_prefixes(window, 1), fresh_prefixes(window, 2)
    assert fresh_prefixes(window, 0) == window
    assert prefix_sharing(first) == prefix_sharing(second) == prefix_sharing(window)
    ids = [{i for r in run for i in r.block_hash_ids} for run in (window, first, second)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    # So the prompts of one run share no block's tokens with another's: nothing it cached can serve the next.
    a = trace_prompt(first[0], 512, random.Random(0))
    b = trace_prompt(second[0], 512, random.Random(0))
    assert a[:16] != b[:16]


def record(prompt: int, cached: int, ttft_ms: float) -> RequestRecord:
    return RequestRecord(
        target="bench",
        arrival_s=0.0,
        num_prompt_tokens=prompt,
        num_output_tokens=2,
        first_token_s=ttft_ms / 1e3,
        end_s=ttft_ms / 1e3 + 0.01,
        num_cached_prompt_tokens=cached,
    )


def test_the_report_compares_hit_rate_and_ttft_with_least_outstanding():
    reports = {
        "least_outstanding": slo_report(
            [record(100, 16, 50.0), record(100, 0, 70.0)], ttft_ms=1e3, tpot_ms=1e3, duration_s=1
        ),
        "raylane": slo_report([record(100, 48, 30.0), record(100, 16, 40.0)], ttft_ms=1e3, tpot_ms=1e3, duration_s=1),
    }
    assert reports["least_outstanding"]["prefix_hit_rate"] == 0.08
    assert reports["raylane"]["prefix_hit_rate"] == 0.32
    window = trace_window(MOONCAKE, seed=0, max_prompt=384, max_output=96, start_s=930)[:20]
    report = prefix_report(window, reports, 16)
    assert report["trace_reuse"] == prefix_sharing(window)
    assert report["vs_least_outstanding"]["raylane"] == {
        "prefix_hit_rate_ratio": 4.0,
        "ttft_p50_ratio": round(report_p50(reports, "raylane") / report_p50(reports, "least_outstanding"), 3),
        "target_met": True,
    }


def report_p50(reports: dict, name: str) -> float:
    return reports[name]["ttft_ms"]["p50"]
