"""Decision provenance: every routing, admission and migration decision the simulator makes comes from the
production objects (the router's policy, `decide_admission` and `KvLedger` through `PlacementCore`, and the
control plane's `plan_rebalance`). Counting spies wrap the real functions and call through; their counts must
equal the decisions the simulator reports."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

import router.placement
import sim.simulator
from control_plane.migration_policy import MigrationPolicyConfig
from router.admission import AdmissionConfig
from router.kv_forecast import KvLedger
from router.length_predictor import LengthPredictor
from router.registry import make_policy
from sim.config import MigrationConfig, PoolConfig, SimConfig, SloConfig, TraceConfig
from sim.simulator import Simulator


def pd_trace_with_admission_and_migration() -> SimConfig:
    """P/D pools, admission on with KV tight enough to make requests wait, and migration on."""
    return SimConfig(
        trace=TraceConfig(
            synthetic={
                "rate_per_s": 40,
                "duration_s": 10,
                "prompt_median": 300,
                "output_median": 60,
                "max_len": 900,
                "seed": 1,
            }
        ),
        pools=(
            PoolConfig(role="prefill", num_workers=2, kv_blocks=600),
            PoolConfig(role="decode", num_workers=3, kv_blocks=600),
        ),
        cost_model={"kind": "roofline", "gpu": "A100", "model": "llama-3-8b", "tp": 1},
        policy="raylane",
        admission=AdmissionConfig(enabled=True, headroom=0.95),
        migration=MigrationConfig(
            enabled=True, interval_s=0.2, policy=MigrationPolicyConfig(min_imbalance=0.1, min_interval_s=1.0)
        ),
        slo=SloConfig(ttft_s=1.0, tpot_s=0.05),
    )


def test_every_decision_comes_from_the_production_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()

    def spy_method(cls: type, name: str) -> None:
        real = getattr(cls, name)

        def counted(self, *args, **kwargs):
            calls[f"{cls.__name__}.{name}"] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    policy_cls = type(make_policy("raylane"))
    spy_method(policy_cls, "route")
    spy_method(KvLedger, "place")
    spy_method(KvLedger, "finish")
    spy_method(LengthPredictor, "predict")

    real_decide = router.placement.decide_admission

    def decide(request, view, config):
        verdict = real_decide(request, view, config)
        calls["admit" if verdict.is_admitted else "wait"] += 1
        return verdict

    monkeypatch.setattr(router.placement, "decide_admission", decide)

    real_plan = sim.simulator.plan_rebalance

    def plan(workers, **kwargs):
        decisions = real_plan(workers, **kwargs)
        calls["plan_rebalance"] += 1
        calls["migration_decisions"] += len(decisions)
        # Remaining lengths come from predictions: one per running request offered to the policy.
        assert {r.request_id for w in workers for r in w.requests} <= set(kwargs["predicted"])
        return decisions

    monkeypatch.setattr(sim.simulator, "plan_rebalance", plan)

    simulator = Simulator(pd_trace_with_admission_and_migration())
    result = simulator.run()
    decisions, migrations = result.summary["decisions"], result.summary["migrations"]

    # Routing: every placement and every no-capacity answer is one call of the production policy.
    assert decisions["placed"] > 0
    assert calls[f"{policy_cls.__name__}.route"] == (
        decisions["placed"] + decisions["no_capacity"] + result.summary["num_decode_reroutes"]
    )
    assert calls["KvLedger.place"] == decisions["placed"]
    assert calls["KvLedger.finish"] >= result.summary["num_requests"]  # one per finish, plus restarts
    assert calls["LengthPredictor.predict"] == result.summary["num_requests"]
    # Admission: every verdict, admitted or wait, came from `decide_admission`.
    assert calls["admit"] == decisions["admitted"] == decisions["placed"] + decisions["no_capacity"] > 0
    assert calls["wait"] == decisions["admission_waits"] > 0
    assert decisions["admission_queued"] > 0
    # Migration: every migration started is a decision of the control plane's policy.
    assert calls["plan_rebalance"] > 0
    assert calls["migration_decisions"] == migrations["started"] > 0
    assert migrations["committed"] > 0
    # Nothing left behind: every request finished and the ledger is empty.
    assert all(r.finish_s >= r.arrival_s for r in simulator.requests)
    assert len(simulator.placement.ledger) == 0


def test_the_simulators_own_migration_policy_is_gone() -> None:
    assert importlib.util.find_spec("sim.migration") is None
