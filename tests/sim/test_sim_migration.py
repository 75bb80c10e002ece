"""The simulator's decode-time rebalancing runs the control plane's `plan_rebalance`: fed predicted remaining
lengths (never the trace's true ones), rate-limited by a `MigrationHistory` kept across ticks."""

from __future__ import annotations

import pytest

from control_plane.migration_policy import MigrationPolicyConfig
from router.trace import TraceRequest
from sim.config import MigrationConfig, PoolConfig, SimConfig, config_from_dict
from sim.simulator import Simulator
from sim.views import migration_view
from sim.worker import SimRequest

LINEAR = {"kind": "linear", "a": 0.01, "b": 0.001}


def simulator(**policy) -> Simulator:
    config = SimConfig(
        requests=(TraceRequest(arrival_s=0.0, prompt_len=10, output_len=2),),
        pools=(PoolConfig(role="mixed", num_workers=2, kv_blocks=1000),),
        cost_model=LINEAR,
        block_size=16,
        max_tokens=2000,
        migration=MigrationConfig(enabled=True, interval_s=0.5, policy=MigrationPolicyConfig(**policy)),
    )
    sim = Simulator(config)
    sim.requests = []  # the tick only asks whether work remains
    return sim


def decoding(sim: Simulator, worker_id: str, index: int, *, generated: int, true_len: int, p50: float) -> SimRequest:
    """A request decoding on `worker_id`, holding prompt + generated tokens of KV."""
    w = sim.workers[worker_id]
    r = SimRequest(index=index, request_id=f"r{index}", arrival_s=0.0, prompt_len=100, output_len=true_len)
    r.num_generated, r.num_computed = generated, 100 + generated
    r.num_blocks = -(-(100 + generated) // w.block_size)
    r.predicted_p50, r.predicted_p90 = p50, 2 * p50
    r.decode_worker = r.prefill_worker = worker_id
    w.free_blocks -= r.num_blocks
    w.decoding.append(r)
    return r


def test_the_policy_sees_predicted_remaining_lengths_not_the_true_ones() -> None:
    sim = simulator()
    decoding(sim, "mixed-0", 0, generated=10, true_len=1500, p50=50)
    decoding(sim, "mixed-0", 1, generated=60, true_len=70, p50=50)  # past its p50: expected to run to its p90
    predicted: dict[str, int] = {}
    view = migration_view(sim.workers["mixed-0"], max_tokens=2000, predicted=predicted)
    assert predicted == {"r0": 50 - 10, "r1": 100 - 60}
    assert [(r.request_id, r.num_output_tokens, r.max_tokens, r.num_blocks) for r in view.requests] == [
        ("r0", 10, 2000, 7),
        ("r1", 60, 2000, 10),
    ]
    assert view.kv_blocks_used == 17 and view.kv_blocks_total == 1000


def test_a_tick_starts_the_policys_moves_and_the_rate_limit_holds_across_ticks() -> None:
    sim = simulator(min_imbalance=0.05, min_interval_s=5.0)
    # mixed-0 holds long requests (by prediction); mixed-1 is empty.
    for i in range(4):
        decoding(sim, "mixed-0", i, generated=10, true_len=20, p50=400)
    sim._on_migration_tick(None, None)
    assert sim.counters.migrations_started == 1  # one migration per worker at once (max_in_flight_per_worker)
    (moving,) = sim.migrations.values()
    assert sim.migration_routes[moving.index] == ("mixed-0", "mixed-1")
    sim.now = 1.0
    sim._on_migration_tick(None, None)
    assert sim.counters.migrations_started == 1  # still in flight, and within min_interval_s
    sim._end_migration(moving)
    sim.now = 4.0
    sim._on_migration_tick(None, None)
    assert sim.counters.migrations_started == 1  # done, but both workers moved a request less than 5 s ago
    sim.now = 5.5
    sim._on_migration_tick(None, None)
    assert sim.counters.migrations_started == 2


def test_short_predicted_remainders_are_not_worth_moving() -> None:
    sim = simulator(min_imbalance=0.05)
    # Long true lengths, but predicted to finish at once: the predicted demand is balanced enough, nothing moves.
    for i in range(4):
        decoding(sim, "mixed-0", i, generated=10, true_len=1900, p50=11)
    sim._on_migration_tick(None, None)
    assert sim.counters.migrations_started == 0


def test_yaml_config_sets_the_production_policy_and_admission_knobs() -> None:
    data = {
        "trace": {"synthetic": {"rate_per_s": 1, "duration_s": 1}},
        "pools": [{"role": "mixed", "num_workers": 1}],
        "migration": {"enabled": True, "interval_s": 0.25, "policy": {"min_imbalance": 0.3, "max_per_round": 2}},
        "admission": {"enabled": True, "headroom": 0.9},
    }
    config = config_from_dict(data)
    assert config.migration.policy == MigrationPolicyConfig(min_imbalance=0.3, max_per_round=2)
    assert config.admission.enabled and config.admission.headroom == 0.9
    with pytest.raises(ValueError, match=r"migration.policy: unknown keys \['min_gap'\]"):
        config_from_dict({**data, "migration": {"policy": {"min_gap": 0.2}}})
