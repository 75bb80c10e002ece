"""Policies are configured by name."""

from __future__ import annotations

import pytest

from router.policy import ClusterView, RouteRequest, WorkerView
from router.registry import DEFAULT_POLICY, POLICIES, make_policy


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_places_a_request(name):
    view = ClusterView(
        workers={
            "chat": [
                WorkerView(worker_id="a", deployment="chat", role="mixed", num_running=3),
                WorkerView(worker_id="b", deployment="chat", role="mixed"),
            ]
        }
    )
    decision = make_policy(name).route(RouteRequest(request_id="r", deployment="chat", tenant="t"), view)
    assert decision.worker_id in {"a", "b"} and decision.prefill_worker_id is None


def test_each_call_gets_a_fresh_instance():
    assert make_policy("round_robin") is not make_policy("round_robin")


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="least_loaded"):
        make_policy("smartest")
    assert DEFAULT_POLICY in POLICIES


def test_router_config_refuses_an_unknown_policy_at_startup():
    from router.admission import AdmissionConfig
    from router.server import RouterConfig

    with pytest.raises(ValueError, match="unknown routing policy"):
        RouterConfig(policy="smartest")
    assert RouterConfig(policy="raylane", admission=AdmissionConfig(enabled=True)).admission.enabled
