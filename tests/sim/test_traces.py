"""Trace parsers (Azure 2023, BurstGPT, Mooncake), rate scaling, slicing, overlays and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.trace import prefix_sharing
from sim.config import TraceConfig
from sim.traces import (
    SyntheticTrace,
    load_any,
    load_azure,
    load_burstgpt,
    load_mooncake,
    overlay,
    scale_rate,
    slice_time,
)

MOONCAKE_TRACE = Path(__file__).resolve().parents[2] / "data" / "traces" / "mooncake_synthetic_trace.jsonl"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:52.6805900,20,1
"""
BURST = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
2,GPT-4,100,200,300,API log
"""


def test_azure_parser(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE)
    rows = load_azure(path)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(374, 44), (396, 109), (20, 1)]
    assert rows[0].arrival_s == 0
    assert rows[1].arrival_s == pytest.approx(4.314579)
    assert load_any(path) == rows


def test_burstgpt_parser(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_text(BURST)
    rows = load_burstgpt(path)  # the failed row (0 response tokens) is dropped; sorted by time
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in rows] == [(0.0, 100, 200), (3.0, 472, 18)]
    assert [r.prompt_len for r in load_burstgpt(path, model="ChatGPT")] == [472]
    assert len(load_burstgpt(path, drop_failures=False)) == 3
    assert load_any(path) == rows


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_any(path)


def test_scale_and_slice(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE)
    rows = load_azure(path)
    assert [r.arrival_s for r in scale_rate(rows, 2.0)] == pytest.approx([0.0, 2.1572895, 3.0])
    sliced = slice_time(rows, start_s=1.0, duration_s=6.0)
    assert [r.prompt_len for r in sliced] == [396, 20]
    assert sliced[0].arrival_s == pytest.approx(3.314579)
    with pytest.raises(ValueError):
        scale_rate(rows, 0.0)


def test_synthetic_is_seeded_and_hits_its_rate() -> None:
    trace = SyntheticTrace(rate_per_s=50, duration_s=200, cv=2.0, seed=3)
    a, b = trace.generate(), trace.generate()
    assert a == b
    assert len(a) == pytest.approx(50 * 200, rel=0.1)
    assert all(1 <= r.prompt_len <= trace.max_len and 1 <= r.output_len <= trace.max_len for r in a)
    assert SyntheticTrace(rate_per_s=50, duration_s=200, seed=4).generate() != a


def test_overlay_multiplies_rate_over_the_same_span() -> None:
    base = SyntheticTrace(rate_per_s=5, duration_s=100, seed=0).generate()
    merged = overlay(base, 10, seed=1)
    assert len(merged) == 10 * len(base)
    assert all(0 <= r.arrival_s < 101 for r in merged)
    assert [r.arrival_s for r in merged] == sorted(r.arrival_s for r in merged)
    assert sorted(r.prompt_len for r in merged) == sorted(r.prompt_len for r in base for _ in range(10))
    assert overlay(base, 10, seed=1) == merged


MOONCAKE = """{"timestamp": 0, "input_length": 1100, "output_length": 6, "hash_ids": [0, 1, 2]}
{"timestamp": 1500, "input_length": 700, "output_length": 4, "hash_ids": [0, 3]}

{"timestamp": 700, "input_length": 20, "output_length": 3, "hash_ids": [4]}
"""


def test_mooncake_parser_keeps_block_hash_ids(tmp_path: Path) -> None:
    path = tmp_path / "any_name.txt"
    path.write_text(MOONCAKE)
    rows = load_mooncake(path)
    # Milliseconds to seconds, sorted by arrival; blank lines are skipped.
    assert [(r.arrival_s, r.prompt_len, r.output_len, r.block_hash_ids) for r in rows] == [
        (0.0, 1100, 6, (0, 1, 2)),
        (0.7, 20, 3, (4,)),
        (1.5, 700, 4, (0, 3)),
    ]
    assert {r.hash_block_size for r in rows} == {512}
    assert load_any(path) == rows  # detected from the content, not the name
    assert TraceConfig(path=str(path)).load() == rows
    assert TraceConfig(path=str(path), format="mooncake").load() == rows
    with pytest.raises(ValueError, match="trace format"):
        TraceConfig(path=str(path), format="jsonl")


def test_mooncake_parser_names_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(MOONCAKE + '{"timestamp": 9, "input_length": 5, "output_length": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:5: not a Mooncake trace row"):
        load_mooncake(path)
    with pytest.raises(ValueError, match="unknown trace format"):
        load_any(_write(tmp_path / "x.jsonl", '{"a": 1}\n'))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_shipped_mooncake_trace_loads_with_its_prefix_reuse() -> None:
    trace = TraceConfig(path=str(MOONCAKE_TRACE)).load()
    assert len(trace) == 3993
    assert trace[-1].arrival_s == pytest.approx(1022.025)
    # data/traces/README.md: 64% of its blocks repeat an earlier prefix.
    assert prefix_sharing(trace) == {"num_blocks": 121877, "repeated_block_share": 0.6396}


def test_reshaping_keeps_hash_ids_and_overlay_copies_share_no_new_prefixes(tmp_path: Path) -> None:
    rows = load_any(_write(tmp_path / "m.jsonl", MOONCAKE))
    assert [r.block_hash_ids for r in scale_rate(rows, 2.0)] == [r.block_hash_ids for r in rows]
    assert [r.block_hash_ids for r in slice_time(rows, 0.5, 2.0)] == [(4,), (0, 3)]
    merged = overlay(rows, 3, seed=0)
    assert len(merged) == 9
    by_copy = sorted(r.block_hash_ids for r in merged)
    # Copy k shifts every id by k x 5 (largest id 4, plus one): the original ids survive once, and no id of one
    # copy equals an id of another, so the merged trace reuses prefixes exactly as much as the original.
    assert by_copy == sorted(tuple(i + k * 5 for i in r.block_hash_ids) for r in rows for k in range(3))
    assert prefix_sharing(merged)["num_blocks"] == 3 * prefix_sharing(rows)["num_blocks"]
    assert prefix_sharing(merged)["repeated_block_share"] == prefix_sharing(rows)["repeated_block_share"]
