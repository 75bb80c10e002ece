"""The live-migration policy on hand-built worker snapshots."""

from __future__ import annotations

import logging

import pytest

from control_plane.migration_policy import (
    MigrationHistory,
    MigrationPolicyConfig,
    WorkerView,
    demand_fraction,
    is_rate_allowed,
    plan_drain,
    plan_rebalance,
    request_demand_blocks,
)
from workers.messages import RunningRequestInfo

CONFIG = MigrationPolicyConfig(min_imbalance=0.2, headroom_blocks=2, min_interval_s=5.0)
NONE = MigrationHistory()


def _req(rid: str, *, blocks: int, remaining: int = 0, priority: int = 0) -> RunningRequestInfo:
    # block_size 16: the prompt fills `blocks` blocks exactly; `remaining` tokens are left to generate.
    return RunningRequestInfo(
        request_id=rid,
        num_prompt_tokens=blocks * 16,
        num_output_tokens=0,
        max_tokens=remaining,
        priority=priority,
        num_blocks=blocks,
    )


def _worker(wid: str, *requests: RunningRequestInfo, total: int = 100, accepting: bool = True) -> WorkerView:
    used = sum(r.num_blocks for r in requests)
    return WorkerView(
        worker_id=wid, kv_blocks_total=total, kv_blocks_used=used, block_size=16, requests=requests, accepting=accepting
    )


def test_demand_uses_prediction_or_max_tokens():
    r = _req("a", blocks=2, remaining=40)
    assert request_demand_blocks(r, 16) == 2 + 3  # 32 + 40 tokens -> 72 -> 5 blocks
    assert request_demand_blocks(r, 16, {"a": 0}) == 2
    assert demand_fraction(_worker("w", r, total=10)) == 0.5


def test_rebalance_moves_the_request_that_evens_demand_best(caplog):
    hot = _worker("hot", _req("big", blocks=30, remaining=160), _req("mid", blocks=20), _req("small", blocks=4))
    cold = _worker("cold", _req("c", blocks=5))
    with caplog.at_level(logging.INFO, logger="control_plane.migration_policy"):
        decisions = plan_rebalance([hot, cold], history=NONE, now=100.0, config=CONFIG)
    assert [(d.request_id, d.source_id, d.destination_id, d.reason) for d in decisions] == [
        ("mid", "hot", "cold", "rebalance")
    ]
    # hot demand 64/100, cold 5/100: moving "big" (40) leaves 45 on cold; "mid" (20) leaves max(44, 25)=44.
    assert any("migration decision reason=rebalance request_id=mid" in r.message for r in caplog.records)


def test_rebalance_does_nothing_when_balanced_or_rate_limited():
    a = _worker("a", _req("x", blocks=30))
    b = _worker("b", _req("y", blocks=20))
    assert plan_rebalance([a, b], history=NONE, now=0.0, config=CONFIG) == []  # gap 0.1 < 0.2
    hot = _worker("hot", _req("x", blocks=25), _req("w", blocks=25))
    cold = _worker("cold", _req("z", blocks=1))
    recent = MigrationHistory(last_started={"cold": 98.0})
    assert plan_rebalance([hot, cold], history=recent, now=100.0, config=CONFIG) == []
    assert plan_rebalance([hot, cold], history=recent, now=103.0, config=CONFIG) != []
    flying = MigrationHistory(in_flight={"hot": 1})
    assert plan_rebalance([hot, cold], history=flying, now=100.0, config=CONFIG) == []


def test_rebalance_never_just_moves_the_hot_spot_nor_overfills_a_destination():
    lone = _worker("hot", _req("x", blocks=50))
    assert plan_rebalance([lone, _worker("cold", _req("z", blocks=1))], history=NONE, now=0.0, config=CONFIG) == []
    hot = _worker("hot", _req("huge", blocks=90), total=100)
    small = _worker("small", total=50)
    draining = _worker("draining", total=200, accepting=False)
    assert plan_rebalance([hot, small, draining], history=NONE, now=0.0, config=CONFIG) == []


def test_rebalance_one_migration_per_worker_per_round():
    hot = _worker("hot", _req("a", blocks=40), _req("b", blocks=40))
    cold1, cold2 = _worker("c1"), _worker("c2")
    decisions = plan_rebalance([hot, cold1, cold2], history=NONE, now=0.0, config=CONFIG)
    assert len(decisions) == 1 and decisions[0].source_id == "hot"


def test_drain_places_every_request_biggest_first():
    src = _worker("src", *[_req(f"r{i}", blocks=b) for i, b in enumerate([10, 30, 5, 20])])
    a, b = _worker("a", _req("x", blocks=50)), _worker("b", _req("y", blocks=60))
    off = _worker("off", total=500, accepting=False)
    decisions = plan_drain("src", [src, a, b, off], config=CONFIG)
    assert [d.request_id for d in decisions] == ["r1", "r3", "r0", "r2"]
    assert {d.destination_id for d in decisions} <= {"a", "b"}
    placed = {"a": 50, "b": 60}
    for d in decisions:
        placed[d.destination_id] += d.num_blocks
        assert d.reason == "drain"
    assert all(v <= 100 - CONFIG.headroom_blocks for v in placed.values())


def test_drain_leaves_out_what_fits_nowhere_and_rejects_unknown_worker():
    src = _worker("src", _req("big", blocks=90), _req("ok", blocks=5))
    a = _worker("a", _req("x", blocks=50))
    assert [d.request_id for d in plan_drain("src", [src, a], config=CONFIG)] == ["ok"]
    with pytest.raises(ValueError, match="unknown worker"):
        plan_drain("nope", [src, a], config=CONFIG)


def test_rate_limit_and_config_validation():
    history = MigrationHistory(in_flight={"a": 1}, last_started={"b": 10.0})
    assert not is_rate_allowed("a", history, 100.0, CONFIG)
    assert not is_rate_allowed("b", history, 12.0, CONFIG)
    assert is_rate_allowed("b", history, 15.0, CONFIG)
    assert is_rate_allowed("c", history, 0.0, CONFIG)
    with pytest.raises(ValueError, match="min_imbalance"):
        MigrationPolicyConfig(min_imbalance=0)
    with pytest.raises(ValueError, match="unique"):
        plan_drain("a", [_worker("a"), _worker("a")], config=CONFIG)
