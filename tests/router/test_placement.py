"""The placement core (predict → admit → place → ledger) and the router's incremental view overlay."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from router.admission import AdmissionConfig
from router.kv_forecast import KvLedger
from router.length_predictor import LengthPredictor
from router.placement import PlacementCore, ViewOverlay, without_workers
from router.policy import ClusterView, LeastLoadedPolicy, NoCapacityError, RouteRequest, WorkerView


def worker(worker_id: str, *, role: str = "mixed", blocks_used: int = 0, healthy: bool = True) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        deployment="chat",
        role=role,
        is_healthy=healthy,
        kv_blocks_total=10,
        kv_blocks_used=blocks_used,
        kv_usage=blocks_used / 10,
        kv_block_size=4,
    )


def request(request_id: str = "r", *, prompt: int = 8, max_tokens: int = 8) -> RouteRequest:
    return RouteRequest(
        request_id=request_id, deployment="chat", tenant="t", num_prompt_tokens_estimate=prompt, max_tokens=max_tokens
    )


def test_predict_fills_the_output_lengths_and_is_a_no_op_without_a_predictor():
    assert PlacementCore(LeastLoadedPolicy()).predict(request()) == request()
    predicted = PlacementCore(LeastLoadedPolicy(), predictor=LengthPredictor()).predict(request())
    assert predicted.predicted_output_p50 is not None and predicted.predicted_output_p90 is not None
    assert predicted.predicted_output_p90 >= predicted.predicted_output_p50


def test_place_tracks_the_request_on_the_chosen_worker_and_move_and_finish_follow_it():
    core = PlacementCore(LeastLoadedPolicy())
    view = ClusterView(workers={"chat": [worker("w0", blocks_used=5), worker("w1")]})
    decision = core.place(request(), view, "r#0")
    assert decision.worker_id == "w1" and core.ledger.worker_of("r#0") == "w1"
    core.ledger.record_tokens("r#0", 3)
    core.move("r#0", "w0")
    assert core.ledger.worker_of("r#0") == "w0" and core.ledger.snapshot("w0").requests[0].num_generated == 3
    assert core.ledger.num_tracked("w1") == 0
    assert core.finish("r#0") and not core.finish("r#0")
    with pytest.raises(ValueError, match="not tracked"):
        core.move("r#0", "w1")


def test_route_decides_without_tracking_and_no_capacity_tracks_nothing():
    core = PlacementCore(LeastLoadedPolicy())
    assert core.route(request(), ClusterView(workers={"chat": [worker("w0")]})).worker_id == "w0"
    assert len(core.ledger) == 0
    with pytest.raises(NoCapacityError):
        core.place(request(), ClusterView(workers={"chat": [worker("w0", healthy=False)]}), "r#1")
    assert len(core.ledger) == 0


def test_admit_is_a_pure_decision_admit_on_the_fitting_workers_or_wait_with_a_hint():
    view = ClusterView(workers={"chat": [worker("full", blocks_used=9), worker("free", blocks_used=2)]})
    assert PlacementCore(LeastLoadedPolicy()).admit(request(), view).view is view  # admission off
    core = PlacementCore(LeastLoadedPolicy(), admission=AdmissionConfig(headroom=1.0))
    verdict = core.admit(request(), view)
    assert [w.worker_id for w in verdict.view.workers["chat"]] == ["free"]
    assert {w.worker_id for w in verdict.candidates} == {"full", "free"}
    crowded = ClusterView(workers={"chat": [worker("a", blocks_used=9), worker("b", blocks_used=9)]})
    waiting = core.admit(request(), crowded)
    assert not waiting.is_admitted and waiting.retry_after_s > 0
    # Pure: asking twice gives the same answer and changes nothing.
    assert core.admit(request(), crowded) == waiting and len(core.ledger) == 0


def test_without_workers_marks_the_lost_ones_unhealthy_in_a_copy():
    view = ClusterView(workers={"chat": [worker("w0"), worker("w1")]})
    lost = without_workers(view, frozenset({"w0"}))
    assert [w.is_healthy for w in lost.workers["chat"]] == [False, True]
    assert view.workers["chat"][0].is_healthy


def full_overlay(base: ClusterView, inflight: Counter[str], ledger: KvLedger) -> ClusterView:
    """What the router's view was before it was incremental: every worker re-derived for every request."""
    return ClusterView(
        workers={
            dep: [
                dataclasses.replace(w, num_inflight=inflight[w.worker_id], kv_ledger=ledger.snapshot(w.worker_id))
                if inflight[w.worker_id] or ledger.num_tracked(w.worker_id)
                else w
                for w in workers
            ]
            for dep, workers in base.workers.items()
        }
    )


def test_the_overlay_re_derives_only_marked_workers_and_equals_a_full_rebuild():
    inflight: Counter[str] = Counter()
    ledger = KvLedger()
    overlay = ViewOverlay(inflight, ledger)
    base = ClusterView(workers={"chat": [worker(f"w{i}") for i in range(6)]})
    first = list(overlay.view(base).workers["chat"])
    inflight["w2"] += 1
    ledger.place("k", worker_id="w2", num_prompt_tokens=4, max_tokens=4)
    overlay.mark(["w2"])
    second = overlay.view(base).workers["chat"]
    assert [a is b for a, b in zip(first, second, strict=True)] == [True, True, False, True, True, True]
    assert second[2].num_inflight == 1 and second[2].kv_ledger.num_requests == 1
    # A new directory view: only the worker whose base view changed is re-derived.
    changed = dataclasses.replace(base.workers["chat"][4], num_running=7)
    rebased = ClusterView(workers={"chat": [*base.workers["chat"][:4], changed, base.workers["chat"][5]]})
    third = overlay.view(rebased).workers["chat"]
    assert [a is b for a, b in zip(second, third, strict=True)] == [True, True, True, True, False, True]
    assert third[4].num_running == 7


def test_the_overlay_matches_a_full_rebuild_through_random_changes():
    rng = random.Random(7)
    inflight: Counter[str] = Counter()
    ledger = KvLedger()
    overlay = ViewOverlay(inflight, ledger)
    ids = [f"w{i}" for i in range(5)]
    base = ClusterView(workers={"chat": [worker(w) for w in ids]})
    keys: list[str] = []
    for step in range(300):
        op = rng.random()
        wid = rng.choice(ids)
        if op < 0.3:
            key = f"k{step}"
            ledger.place(key, worker_id=wid, num_prompt_tokens=4, max_tokens=8)
            inflight[wid] += 1
            keys.append(key)
            overlay.mark([wid])
        elif op < 0.5 and keys:
            key = keys.pop(rng.randrange(len(keys)))
            old = ledger.worker_of(key)
            ledger.finish(key)
            inflight[old] -= 1
            overlay.mark([old])
        elif op < 0.7 and keys:
            key = rng.choice(keys)
            ledger.record_tokens(key, 1)
            overlay.mark([ledger.worker_of(key)])
        elif op < 0.8 and keys:
            key = rng.choice(keys)
            old = ledger.worker_of(key)
            ledger.move(key, wid)
            inflight[old] -= 1
            inflight[wid] += 1
            overlay.mark([old, wid])
        elif op < 0.9:
            workers = list(base.workers["chat"])
            i = ids.index(wid)
            workers[i] = dataclasses.replace(workers[i], num_running=rng.randrange(10))
            base = ClusterView(workers={"chat": workers})
        view, full = overlay.view(base), full_overlay(base, inflight, ledger)
        assert view == full, step
        for dep, workers in full.workers.items():  # and the index the overlay keeps agrees with a scan
            for role in {w.role for w in workers}:
                assert view.candidates(dep, role) == [w for w in workers if w.role == role and w.is_healthy], step
