"""KvLedger and the Past-Future peak forecast (against a step-by-step simulation), and the length-aware scorer."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from router.kv_forecast import KvForecast, KvLedger, RequestKv, WorkerKvSnapshot, predicted_remaining_tokens
from router.policy import (
    ClusterView,
    LoadScorer,
    PredictedKvScorer,
    RouteRequest,
    WeightedPolicy,
    WeightedTerm,
    WorkerView,
    predicted_peak_kv_blocks,
)
from router.server import RayDirectory, RouterConfig, RoutingState, WorkerEntry
from router.table import RoutingTable
from workers.messages import WorkerStats


def simulated_peak(requests: list[tuple[int, int]], block_size: int = 1) -> int:
    """Step the batch forward one decode step at a time; a request holds held + t until it finishes at t = r."""
    horizon = max((r for _, r in requests), default=0)
    return max(
        (sum(-(-(h + t) // block_size) for h, r in requests if r >= t) for t in range(horizon + 1)),
        default=0,
    )


def random_batch(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(0, 300), rng.randint(0, 200)) for _ in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_the_peak_matches_a_step_by_step_simulation(seed):
    rng = random.Random(seed)
    batch = random_batch(rng, rng.randint(0, 30))
    if seed % 4 == 0:  # ties in remaining length are the tricky case for finish points
        batch = [(h, r - r % 25) for h, r in batch]
    assert KvForecast.build(batch).peak_blocks() == simulated_peak(batch)


@pytest.mark.parametrize("seed", range(40))
def test_adding_one_request_matches_rebuilding_and_the_simulation(seed):
    rng = random.Random(1000 + seed)
    batch = random_batch(rng, rng.randint(0, 25))
    held, remaining = rng.randint(0, 300), rng.choice([0, rng.randint(0, 250), *(r for _, r in batch[:1])])
    forecast = KvForecast.build(batch)
    expected = simulated_peak([*batch, (held, remaining)])
    assert forecast.peak_blocks_with(held, remaining) == expected
    assert KvForecast.build([*batch, (held, remaining)]).peak_blocks() == expected


@pytest.mark.parametrize("seed", range(20))
def test_block_counts_bound_the_engines_rounding_from_above_by_less_than_a_block_per_request(seed):
    rng = random.Random(2000 + seed)
    batch = random_batch(rng, rng.randint(1, 25))
    block_size = rng.choice([4, 16])
    exact = simulated_peak(batch, block_size)
    forecast = KvForecast.build(batch, block_size=block_size)
    assert exact <= forecast.peak_blocks() <= exact + len(batch)
    held, remaining = rng.randint(0, 100), rng.randint(0, 100)
    exact_with = simulated_peak([*batch, (held, remaining)], block_size)
    assert exact_with <= forecast.peak_blocks_with(held, remaining) <= exact_with + len(batch) + 1


def test_an_empty_batch_peaks_at_the_newcomer_alone():
    assert KvForecast.build([]).peak_blocks() == 0
    assert KvForecast.build([]).peak_blocks_with(10, 5) == 15
    with pytest.raises(ValueError, match="block_size"):
        KvForecast.build([], block_size=0)


def test_the_forecast_is_n_log_n_not_a_simulation():
    rng = random.Random(7)
    batch = [(rng.randint(0, 4000), rng.randint(0, 100_000)) for _ in range(20_000)]
    start = time.perf_counter()
    forecast = KvForecast.build(batch, block_size=16)
    for _ in range(1000):
        forecast.peak_blocks_with(rng.randint(0, 4000), rng.randint(0, 100_000))
    assert time.perf_counter() - start < 2.0  # a step-by-step simulation would take minutes


@pytest.mark.parametrize(
    ("generated", "p50", "p90", "use_p90", "expected"),
    [
        (0, 40, 90, False, 40),
        (0, 40, 90, True, 90),
        (39, 40, 90, False, 1),
        (40, 40, 90, False, 50),  # outlived its median: expected to run to its p90
        (95, 40, 90, False, 5),  # outlived both: up to its cap
        (100, 40, 90, False, 0),
        (0, None, None, False, 100),  # no predictor: the cap
        (0, 500, 900, False, 100),  # predictions never pass the cap
        (0, 40.2, None, False, 41),
    ],
)
def test_remaining_tokens_walk_the_ladder_p50_p90_cap(generated, p50, p90, use_p90, expected):
    got = predicted_remaining_tokens(num_generated=generated, max_tokens=100, p50=p50, p90=p90, use_p90=use_p90)
    assert got == expected


def test_the_ledger_tracks_each_workers_running_requests_from_place_to_finish():
    ledger = KvLedger()
    ledger.place("a", worker_id="w0", num_prompt_tokens=10, max_tokens=50, predicted_output_p50=20)
    ledger.place("b", worker_id="w0", num_prompt_tokens=5, max_tokens=8)
    ledger.place("c", worker_id="w1", num_prompt_tokens=7, max_tokens=30, predicted_output_p90=25)
    ledger.record_tokens("a", 1, num_prompt_tokens=12)  # the stream reports the real prompt length
    ledger.record_tokens("a", 3)
    ledger.record_tokens("gone", 3)  # a late chunk of a released request is ignored

    w0 = ledger.snapshot("w0")
    assert w0.num_requests == 2 and ledger.num_tracked("w0") == 2
    assert w0.current_tokens() == (12 + 4) + 5
    assert w0.remaining_tokens() == (20 - 4) + 8
    assert w0.current_blocks(16) == 1 + 1
    assert ledger.worker_ids() == ["w0", "w1"] and ledger.worker_of("c") == "w1"

    with pytest.raises(ValueError, match="already tracked"):
        ledger.place("a", worker_id="w1", num_prompt_tokens=1, max_tokens=1)
    assert ledger.finish("a") and not ledger.finish("a")
    assert ledger.finish("b") and ledger.snapshot("w0").num_requests == 0
    assert ledger.worker_ids() == ["w1"] and len(ledger) == 1 and "c" in ledger


def test_steps_until_freed_walks_predicted_completions():
    snapshot = WorkerKvSnapshot(
        requests=(
            RequestKv(num_prompt_tokens=10, max_tokens=10),  # finishes in 10 steps holding 20 tokens
            RequestKv(num_prompt_tokens=30, max_tokens=40),  # finishes in 40 steps holding 70 tokens
        )
    )
    assert snapshot.steps_until_freed(0) == 0
    assert snapshot.steps_until_freed(20) == 10
    assert snapshot.steps_until_freed(21) == 40
    assert snapshot.steps_until_freed(91) is None


# ---- the length-aware scorer --------------------------------------------------------------------


def decode_worker(worker_id: str, ledger: KvLedger, **fields) -> WorkerView:
    snapshot = ledger.snapshot(worker_id)
    return WorkerView(
        worker_id=worker_id,
        deployment="chat",
        role="mixed",
        num_running=snapshot.num_requests,
        kv_blocks_total=100,
        kv_blocks_used=snapshot.current_blocks(16),
        kv_ledger=snapshot,
        **fields,
    )


def test_the_scorer_prefers_less_predicted_remaining_demand_over_fewer_requests():
    ledger = KvLedger()
    for i in range(4):  # four short answers, nearly done
        ledger.place(f"short-{i}", worker_id="busy-but-draining", num_prompt_tokens=64, max_tokens=8)
        ledger.record_tokens(f"short-{i}", 7)
    # one long essay that has barely started
    ledger.place("essay", worker_id="quiet-but-growing", num_prompt_tokens=64, max_tokens=2000)
    view = ClusterView(workers={"chat": [decode_worker(w, ledger) for w in ("busy-but-draining", "quiet-but-growing")]})
    request = RouteRequest(
        request_id="t/r", deployment="chat", tenant="t", num_prompt_tokens_estimate=64, max_tokens=512
    )
    by_count = WeightedPolicy([WeightedTerm(scorer=LoadScorer())]).route(request, view)
    by_kv = WeightedPolicy([WeightedTerm(scorer=PredictedKvScorer())]).route(request, view)
    assert by_count.worker_id == "quiet-but-growing"
    assert by_kv.worker_id == "busy-but-draining"
    assert by_kv.scores["busy-but-draining"] < by_kv.scores["quiet-but-growing"]
    assert "predicted_kv=" in by_kv.reason


def test_the_scorer_uses_p90_when_asked_and_counts_kv_the_ledger_does_not_explain():
    ledger = KvLedger()
    ledger.place(
        "a", worker_id="w", num_prompt_tokens=16, max_tokens=400, predicted_output_p50=16, predicted_output_p90=320
    )
    worker = decode_worker("w", ledger)
    request = RouteRequest(
        request_id="t/r", deployment="chat", tenant="t", num_prompt_tokens_estimate=16, max_tokens=16
    )
    p50 = PredictedKvScorer().score(request, worker)
    p90 = PredictedKvScorer(use_p90=True).score(request, worker)
    assert 0 < p50 < p90 <= 1
    # Blocks another router holds on the same worker count too.
    other = dataclasses.replace(worker, kv_blocks_used=worker.kv_blocks_used + 50)
    assert predicted_peak_kv_blocks(request, other) == predicted_peak_kv_blocks(request, worker) + 50
    # An unknown pool size is neutral rather than a guess.
    assert PredictedKvScorer().score(request, WorkerView(worker_id="n", deployment="chat", role="mixed")) == 0.0


def test_the_directory_view_carries_the_kv_fields_workers_report():
    directory = RayDirectory(RouterConfig(), control_plane=None)
    directory._state = RoutingState(
        table=RoutingTable(),
        workers={
            "chat-decode-0": WorkerEntry(worker_id="chat-decode-0", deployment="chat", role="decode", handle=None)
        },
    )
    stats = WorkerStats(
        worker_id="chat-decode-0",
        deployment="chat",
        role="decode",
        num_running=3,
        num_waiting=1,
        kv_blocks_used=40,
        kv_blocks_total=100,
        kv_usage=0.4,
        output_tokens_per_s=90.0,
        num_generated_tokens=1000,
        prefix_cache_hit_rate=0.0,
        num_preemptions=0,
        adapters=[],
        expert_counts={},
        kv_bytes_per_block=4096,
    )
    directory._refresh_views()  # what `refresh_table` does once the state arrived
    directory._stats["chat-decode-0"] = (time.monotonic(), stats)
    directory._refresh_worker("chat-decode-0", time.monotonic())  # what a stats answer does
    (worker,) = directory.view().workers["chat"]
    assert (worker.kv_blocks_used, worker.kv_blocks_total, worker.kv_bytes_per_block) == (40, 100, 4096)
    assert worker.output_tokens_per_s == 90.0 and worker.kv_ledger is None


def test_set_generated_and_move_keep_one_entry_per_request():
    ledger = KvLedger()
    ledger.place("a", worker_id="w0", num_prompt_tokens=10, max_tokens=50, predicted_output_p50=20.0)
    ledger.set_generated("a", 7)
    ledger.set_generated("unknown", 3)  # released already: ignored, like record_tokens
    assert ledger.snapshot("w0").requests[0].num_generated == 7
    assert ledger.move("a", "w1") and not ledger.move("unknown", "w1")
    assert ledger.worker_ids() == ["w1"] and ledger.num_tracked("w0") == 0
    assert ledger.snapshot("w1").requests[0] == RequestKv(
        num_prompt_tokens=10, num_generated=7, max_tokens=50, predicted_output_p50=20.0
    )
    assert ledger.finish("a") and len(ledger) == 0 and ledger.worker_ids() == []
