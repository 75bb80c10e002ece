"""The simulator's rebalancing policy (pure functions)."""

from __future__ import annotations

from sim.migration import WorkerLoad, pick_request, plan_rebalance


def load(worker_id: str, used: float, queued: float = 0.0, free: int = 100) -> WorkerLoad:
    return WorkerLoad(worker_id=worker_id, used_fraction=used, queued_fraction=queued, free_blocks=free)


def test_pairs_most_with_least_loaded_while_gap_is_large() -> None:
    loads = [load("a", 0.9), load("b", 0.1), load("c", 0.5, queued=0.3), load("d", 0.45)]
    moves = plan_rebalance(loads, min_gap=0.2, max_moves=4)
    assert [(m.source_id, m.destination_id) for m in moves] == [("a", "b"), ("c", "d")]
    assert moves[0].gap == 0.9 - 0.1
    assert plan_rebalance(loads, min_gap=0.2, max_moves=1)[0].source_id == "a"
    assert plan_rebalance([load("a", 0.5), load("b", 0.4)], min_gap=0.2, max_moves=4) == []


def test_pick_request_prefers_cheapest_copy_that_fits_and_has_work_left() -> None:
    candidates = [("long", 4000, 500), ("short", 300, 400), ("almost-done", 100, 3)]
    assert pick_request(candidates, free_blocks=1000, block_size=16) == "short"
    assert pick_request(candidates, free_blocks=10, block_size=16) is None  # nothing fits
    assert pick_request([("almost-done", 100, 3)], free_blocks=1000, block_size=16) is None
