"""Replay helpers on hand-built data: the trace window, percentiles, the summary and the PNG report."""

from __future__ import annotations

import pytest

from router.replay import ReplayTarget, RequestRecord, percentile, select_window, summarize
from router.replay_report import write_report_png
from router.trace import TraceRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(arrival_s: float, prompt_len: int = 10, output_len: int = 5) -> TraceRequest:
    return TraceRequest(arrival_s=arrival_s, prompt_len=prompt_len, output_len=output_len)


def record(
    target: str, arrival_s: float, first_token_s: float, end_s: float, num_output_tokens: int, error: str | None = None
) -> RequestRecord:
    step = (end_s - first_token_s) / max(1, num_output_tokens - 1)
    return RequestRecord(
        target=target,
        arrival_s=arrival_s,
        num_prompt_tokens=8,
        num_output_tokens=num_output_tokens,
        first_token_s=first_token_s,
        end_s=end_s,
        error=error,
        token_times_s=[first_token_s + i * step for i in range(num_output_tokens)],
    )


def test_replay_target_names_itself_after_deployment_and_adapter_unless_labelled():
    assert ReplayTarget(deployment="chat", api_key="k").name == "chat"
    assert ReplayTarget(deployment="chat", api_key="k", adapter="legal").name == "chat/legal"
    assert ReplayTarget(deployment="chat", api_key="k", adapter="legal", label="mine").name == "mine"


def test_select_window_keeps_rows_before_the_duration_with_arrivals_scaled():
    trace = [row(0.0), row(2.0, 20, 7), row(5.0), row(9.0)]
    window = select_window(trace, rate_scale=2.0, duration_s=4.0)
    assert window == [row(0.0), row(1.0, 20, 7), row(2.5)]


def test_select_window_slows_arrivals_down_with_a_scale_below_one():
    assert select_window([row(0.0), row(1.0), row(3.0)], rate_scale=0.5, duration_s=3.0) == [row(0.0), row(2.0)]


@pytest.mark.parametrize(("rate_scale", "duration_s"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_select_window_rejects_non_positive_parameters(rate_scale, duration_s):
    with pytest.raises(ValueError, match="positive"):
        select_window([row(0.0)], rate_scale=rate_scale, duration_s=duration_s)


def test_percentile_is_nearest_rank_over_the_sorted_values():
    values = [7.0, 0.0, 10.0, 3.0, 5.0, 1.0, 9.0, 2.0, 8.0, 4.0, 6.0]
    assert percentile(values, 0) == 0.0
    assert percentile(values, 50) == 5.0
    assert percentile(values, 90) == 9.0
    assert percentile(values, 100) == 10.0
    assert percentile([42.0], 99) == 42.0
    assert percentile([], 50) is None


def test_request_record_latencies():
    ok = record("chat", arrival_s=1.0, first_token_s=1.1, end_s=1.5, num_output_tokens=5)
    assert ok.ttft_ms == pytest.approx(100.0)
    assert ok.e2e_ms == pytest.approx(500.0)
    assert ok.tpot_ms == pytest.approx(100.0)
    single = record("chat", arrival_s=0.0, first_token_s=0.2, end_s=0.2, num_output_tokens=1)
    assert single.tpot_ms is None
    failed = record("chat", arrival_s=0.0, first_token_s=0.2, end_s=0.3, num_output_tokens=2, error="UNAVAILABLE")
    assert (failed.e2e_ms, failed.tpot_ms) == (None, None)
    assert RequestRecord(target="chat", arrival_s=0.0, num_prompt_tokens=1).ttft_ms is None


def test_summarize_reports_overall_and_per_target_latency_throughput_and_errors():
    records = [
        record("chat", arrival_s=0.0, first_token_s=0.1, end_s=0.5, num_output_tokens=5),
        record("chat", arrival_s=1.0, first_token_s=1.3, end_s=2.0, num_output_tokens=8),
        record("chat", arrival_s=1.5, first_token_s=1.6, end_s=1.6, num_output_tokens=0, error="UNAVAILABLE"),
        record("moe", arrival_s=0.5, first_token_s=0.7, end_s=4.0, num_output_tokens=7),
    ]
    summary = summarize(records)
    overall = summary["overall"]
    assert (overall["num_requests"], overall["num_ok"]) == (4, 3)
    assert overall["errors"] == {"UNAVAILABLE": 1}
    assert overall["output_tokens"] == 20
    assert overall["output_tokens_per_s"] == 5.0  # 20 tokens from t=0 to t=4
    assert overall["requests_per_s"] == 0.75
    assert overall["ttft_ms"] == {"p50": 200.0, "p99": 300.0}
    chat = summary["targets"]["chat"]
    assert (chat["num_requests"], chat["num_ok"], chat["errors"]) == (3, 2, {"UNAVAILABLE": 1})
    assert chat["e2e_ms"] == {"p50": 500.0, "p99": 1000.0}
    assert chat["tpot_ms"] == {"p50": 100.0, "p99": 100.0}
    assert list(summary["targets"]) == ["chat", "moe"]
    assert summary["targets"]["moe"]["errors"] == {}


def test_summarize_of_only_failures_has_no_latencies():
    summary = summarize([record("chat", 0.0, 0.1, 0.2, 0, error="DEADLINE_EXCEEDED")])
    block = summary["overall"]
    assert block["num_ok"] == 0
    assert block["ttft_ms"] == {"p50": None, "p99": None}
    assert block["output_tokens_per_s"] == 0.0


def test_write_report_png_writes_a_png(tmp_path):
    records = [
        record("chat", arrival_s=0.0, first_token_s=0.1, end_s=1.4, num_output_tokens=6),
        record("moe", arrival_s=0.5, first_token_s=0.9, end_s=2.5, num_output_tokens=4),
        record("moe", arrival_s=0.6, first_token_s=0.9, end_s=1.0, num_output_tokens=0, error="UNAVAILABLE"),
    ]
    path = write_report_png(records, tmp_path / "report.png", title="test replay")
    assert path == tmp_path / "report.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
