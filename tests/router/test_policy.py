"""LeastLoadedPolicy and its helpers: candidate filtering, scoring, tie-breaks, disaggregated placement."""

from __future__ import annotations

import logging

import pytest

from router.policy import (
    ClusterView,
    Decision,
    LeastLoadedPolicy,
    NoCapacityError,
    RouteRequest,
    WorkerView,
    load_score,
    pick_least_loaded,
)


def worker(worker_id: str, role: str = "mixed", deployment: str = "chat", **load) -> WorkerView:
    return WorkerView(worker_id=worker_id, deployment=deployment, role=role, **load)


def request(deployment: str = "chat", adapter: str | None = None) -> RouteRequest:
    return RouteRequest(request_id="t/r1", deployment=deployment, tenant="t", adapter=adapter)


def view(*workers: WorkerView) -> ClusterView:
    grouped: dict[str, list[WorkerView]] = {}
    for w in workers:
        grouped.setdefault(w.deployment, []).append(w)
    return ClusterView(workers=grouped)


def test_candidates_are_the_healthy_workers_of_one_deployment_and_role():
    cluster = view(
        worker("chat-0"),
        worker("chat-1", is_healthy=False),
        worker("chat-p-0", role="prefill"),
        worker("moe-0", deployment="moe"),
    )
    assert [w.worker_id for w in cluster.candidates("chat", "mixed")] == ["chat-0"]
    assert cluster.candidates("missing", "mixed") == []
    assert cluster.roles("chat") == {"mixed", "prefill"}
    assert cluster.roles("missing") == set()


def test_load_score_counts_queued_running_and_inflight_requests_with_kv_as_tie_breaker():
    assert load_score(worker("w")) == 0.0
    assert load_score(worker("w", num_running=2, num_waiting=1, num_inflight=3, kv_usage=0.25)) == 6.25


def test_pick_least_loaded_prefers_a_worker_with_the_adapter_resident_on_equal_load():
    cold = worker("a-cold")
    warm = worker("b-warm", adapters=frozenset({"support"}))
    chosen, scores = pick_least_loaded([cold, warm], request(adapter="support"))
    assert chosen is warm
    assert scores == {"a-cold": 0.0, "b-warm": 0.0}


def test_pick_least_loaded_lets_load_win_over_adapter_residency():
    warm_but_busy = worker("warm", num_running=3, adapters=frozenset({"support"}))
    idle = worker("idle")
    chosen, _ = pick_least_loaded([warm_but_busy, idle], request(adapter="support"))
    assert chosen is idle


def test_pick_least_loaded_breaks_full_ties_by_worker_id():
    chosen, _ = pick_least_loaded([worker("w-2"), worker("w-1"), worker("w-3")], request())
    assert chosen.worker_id == "w-1"


def test_pick_least_loaded_without_candidates_raises_no_capacity():
    with pytest.raises(NoCapacityError, match="chat"):
        pick_least_loaded([], request())


def test_mixed_deployment_goes_to_the_least_loaded_healthy_worker():
    cluster = view(
        worker("chat-0", num_running=4),
        worker("chat-1", num_running=1, kv_usage=0.9),
        worker("chat-2", is_healthy=False),
        worker("chat-3", num_running=1, kv_usage=0.1),
    )
    decision = LeastLoadedPolicy().route(request(), cluster)
    assert decision.worker_id == "chat-3"
    assert decision.prefill_worker_id is None
    assert set(decision.scores) == {"chat-0", "chat-1", "chat-3"}
    assert decision.scores["chat-0"] == 4.0


def test_disaggregated_deployment_picks_prefill_and_decode_independently():
    cluster = view(
        worker("p-0", role="prefill", num_waiting=2),
        worker("p-1", role="prefill"),
        worker("d-0", role="decode"),
        worker("d-1", role="decode", num_running=5),
    )
    decision = LeastLoadedPolicy().route(request(), cluster)
    assert (decision.prefill_worker_id, decision.worker_id) == ("p-1", "d-0")
    assert set(decision.scores) == {"p-0", "p-1", "d-0", "d-1"}


def test_disaggregated_deployment_without_a_healthy_decode_worker_has_no_capacity():
    cluster = view(worker("p-0", role="prefill"), worker("d-0", role="decode", is_healthy=False))
    with pytest.raises(NoCapacityError):
        LeastLoadedPolicy().route(request(), cluster)


def test_deployment_without_workers_asks_for_a_longer_retry():
    with pytest.raises(NoCapacityError) as info:
        LeastLoadedPolicy().route(request("empty"), view(worker("chat-0")))
    assert info.value.retry_after_s == 2.0


def test_all_workers_unhealthy_raises_no_capacity():
    with pytest.raises(NoCapacityError):
        LeastLoadedPolicy().route(request(), view(worker("chat-0", is_healthy=False)))


def test_route_is_pure_the_same_inputs_give_the_same_decision():
    cluster = view(worker("chat-0", num_running=1), worker("chat-1"), worker("chat-2", num_running=1))
    policy = LeastLoadedPolicy()
    first = policy.route(request(), cluster)
    assert first == Decision(
        worker_id="chat-1", reason="least_loaded mixed", scores={"chat-0": 1.0, "chat-1": 0.0, "chat-2": 1.0}
    )
    assert all(policy.route(request(), cluster) == first for _ in range(3))


def test_every_decision_is_logged_as_one_structured_line(caplog):
    cluster = view(worker("chat-0"), worker("chat-1", num_running=2))
    with caplog.at_level(logging.INFO, logger="router.policy"):
        LeastLoadedPolicy().route(request(adapter="support"), cluster)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.policy"]
    assert len(lines) == 1
    line = lines[0]
    for part in (
        "request_id=t/r1",
        "policy=least_loaded",
        "deployment=chat",
        "adapter=support",
        "candidates=chat-0:0.00,chat-1:2.00",
        "prefill=-",
        "worker=chat-0",
    ):
        assert part in line
