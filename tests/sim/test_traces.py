"""Trace parsers (Azure 2023 and BurstGPT), rate scaling, slicing and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.traces import SyntheticTrace, load_any, load_azure, load_burstgpt, overlay, scale_rate, slice_time

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
