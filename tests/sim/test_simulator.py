"""The event loop: exact timings on hand-checkable scenarios, determinism, conservation, P/D transfers,
preemption, failures and migration."""

from __future__ import annotations

import pytest
from event_checks import check_after_every_event

from control_plane.migration_policy import MigrationPolicyConfig
from router.admission import AdmissionConfig
from router.trace import TraceRequest
from sim.config import FailureConfig, MigrationConfig, PoolConfig, SimConfig, SloConfig, TraceConfig
from sim.simulator import Simulator, run

# 10 ms per step plus 1 ms per prompt token; decodes cost only the fixed part.
LINEAR = {"kind": "linear", "a": 0.01, "b": 0.001}
MIXED1 = (PoolConfig(role="mixed", num_workers=1, kv_blocks=1000),)


def req(arrival: float, prompt: int, output: int) -> TraceRequest:
    return TraceRequest(arrival_s=arrival, prompt_len=prompt, output_len=output)


def config(requests: list[TraceRequest], **overrides) -> SimConfig:
    base = {"requests": tuple(requests), "pools": MIXED1, "cost_model": LINEAR, "policy": "least_outstanding"}
    return SimConfig(**{**base, **overrides})


def test_one_request_exact_ttft_and_e2e() -> None:
    result = run(config([req(0.0, 100, 5)]))
    # Prefill of 100 tokens: 0.01 + 0.1 s emits token 1; four decode steps of 0.01 s follow (one fast-forward run).
    assert result.ttft_s == [pytest.approx(0.11)]
    assert result.e2e_s == [pytest.approx(0.15)]
    assert result.tpot_s == [pytest.approx(0.01)]
    assert result.summary["engine_steps"] == 5


def test_arrival_cuts_a_fast_forward_run_at_the_step_in_progress() -> None:
    result = run(config([req(0.0, 100, 5), req(0.125, 50, 3)]))
    # r0 decodes from 0.11; r1 lands during the step ending at 0.13; the next step mixes r0's decode with
    # r1's 50-token prefill (0.01 + 0.05) and ends at 0.19; then two pure decode steps.
    assert result.ttft_s == [pytest.approx(0.11), pytest.approx(0.19 - 0.125)]
    assert result.e2e_s == [pytest.approx(0.20), pytest.approx(0.21 - 0.125)]


def test_chunked_prefill_respects_token_budget() -> None:
    result = run(config([req(0.0, 250, 2)], max_batched_tokens=100))
    # Chunks of 100, 100, 50: three steps of 0.01 + chunk * 0.001, then one decode step.
    assert result.ttft_s == [pytest.approx(0.11 + 0.11 + 0.06)]
    assert result.e2e_s == [pytest.approx(0.28 + 0.01)]


def test_pd_transfer_timing() -> None:
    pools = (
        PoolConfig(role="prefill", num_workers=1, kv_blocks=100),
        PoolConfig(role="decode", num_workers=1, kv_blocks=100),
    )
    cfg = config(
        [req(0.0, 100, 5)],
        pools=pools,
        kv_bytes_per_token=1000,
        link_bandwidth_gb_s=0.001,  # 1e6 B/s: 100 tokens x 1000 B = 0.1 s
        link_latency_s=0.005,
    )
    result = run(cfg)
    assert result.ttft_s == [pytest.approx(0.11)]  # the first token comes from the prefill worker
    assert result.summary["mean_kv_transfer_s"] == pytest.approx(0.105)
    assert result.e2e_s == [pytest.approx(0.11 + 0.105 + 4 * 0.01)]
    assert result.summary["kv_blocks_in_use_at_end"] == 0


def test_preemption_under_kv_pressure_and_blocks_return() -> None:
    pools = (PoolConfig(role="mixed", num_workers=1, kv_blocks=20),)
    cfg = config([req(0.0, 30, 30), req(0.0, 30, 30), req(0.001, 20, 10)], pools=pools, block_size=4)
    sim = Simulator(cfg)
    result = sim.run()
    assert result.summary["num_preemptions"] >= 1
    assert all(r.num_generated == r.output_len and r.finish_s > 0 for r in sim.requests)
    assert result.summary["kv_blocks_in_use_at_end"] == 0
    assert sum(r.num_preemptions for r in sim.requests) == result.summary["num_preemptions"]


def test_request_larger_than_a_worker_is_rejected() -> None:
    pools = (PoolConfig(role="mixed", num_workers=1, kv_blocks=4),)
    with pytest.raises(ValueError, match=r"needs .* tokens of KV"):
        run(config([req(0.0, 100, 5)], pools=pools))


def synthetic(**overrides) -> SimConfig:
    base = {
        "trace": TraceConfig(
            synthetic={
                "rate_per_s": 40,
                "duration_s": 20,
                "prompt_median": 300,
                "output_median": 60,
                "max_len": 900,
                "seed": 1,
            }
        ),
        "pools": (
            PoolConfig(role="prefill", num_workers=2, kv_blocks=600),
            PoolConfig(role="decode", num_workers=3, kv_blocks=600),
        ),
        "cost_model": {"kind": "roofline", "gpu": "A100", "model": "llama-3-8b", "tp": 1},
        "policy": "raylane",
        "migration": MigrationConfig(
            enabled=True, interval_s=0.2, policy=MigrationPolicyConfig(min_imbalance=0.1, min_interval_s=1.0)
        ),
        "failures": (
            FailureConfig(worker_id="decode-1", at_s=5.0, recover_after_s=3.0),
            FailureConfig(worker_id="prefill-0", at_s=9.0),
        ),
        "slo": SloConfig(ttft_s=1.0, tpot_s=0.05),
    }
    return SimConfig(**{**base, **overrides})


def _stable(result) -> dict:
    out = result.to_json(include_requests=True)
    for key in ("wall_s", "events_per_s"):
        out["summary"].pop(key)
    return out


def test_same_seed_same_result() -> None:
    assert _stable(run(synthetic(policy="p2c"))) == _stable(run(synthetic(policy="p2c")))
    assert _stable(run(synthetic())) == _stable(run(synthetic()))


def test_conservation_with_failures_migration_and_preemption() -> None:
    sim = Simulator(synthetic())
    result = sim.run()
    s = result.summary
    assert s["num_requests"] == len(sim.requests) > 500
    for r in sim.requests:  # every request finished exactly once (the simulator asserts on a second finish)
        assert r.num_generated == r.output_len
        assert r.arrival_s <= r.first_token_s <= r.finish_s
    assert s["kv_blocks_in_use_at_end"] == 0
    assert all(w.free_blocks == w.kv_blocks and w.num_pulling == 0 for w in sim.workers.values() if w.is_healthy)
    assert s["num_restarts"] > 0  # both failures hit requests
    assert s["num_preemptions"] > 0
    assert s["migrations"]["committed"] > 0


def test_failed_worker_requests_restart_elsewhere() -> None:
    pools = (PoolConfig(role="mixed", num_workers=2, kv_blocks=1000),)
    requests = [req(0.01 * i, 50, 200) for i in range(6)]
    cfg = config(requests, pools=pools, failures=(FailureConfig(worker_id="mixed-0", at_s=0.5),))
    sim = Simulator(cfg)
    result = sim.run()
    assert result.summary["num_restarts"] == 3  # least-outstanding spread 3 + 3; mixed-0 held 3
    restarted = [r for r in sim.requests if r.num_restarts]
    assert all(r.decode_worker == "mixed-1" and r.num_generated == r.output_len for r in restarted)
    # A restart recomputes prompt + tokens so far, so the restarted ones finish later than the survivors.
    survivors = [r for r in sim.requests if not r.num_restarts]
    assert min(r.finish_s for r in restarted) > max(r.finish_s for r in survivors) - 1.0
    assert sim.workers["mixed-0"].is_healthy is False


def test_no_capacity_retries_until_recovery() -> None:
    pools = (PoolConfig(role="mixed", num_workers=1, kv_blocks=1000),)
    failures = (FailureConfig(worker_id="mixed-0", at_s=0.0, recover_after_s=2.0),)
    result = run(config([req(0.5, 10, 2)], pools=pools, failures=failures))
    assert result.ttft_s[0] >= 1.5  # waited for the worker to come back


def test_admission_holds_a_request_back_until_a_finish_frees_its_kv() -> None:
    pools = (PoolConfig(role="mixed", num_workers=1, kv_blocks=20),)
    requests = [req(0.0, 30, 30), req(0.001, 30, 30)]
    # No predictor: the forecast runs each request to max_tokens (40), so both together (146 tokens) overflow 19 blocks.
    common = {"pools": pools, "block_size": 4, "max_tokens": 40, "use_length_predictor": False}
    sim = Simulator(config(requests, admission=AdmissionConfig(enabled=True, headroom=0.95), **common))
    result = sim.run()
    first, second = sim.requests
    assert second.first_token_s > first.finish_s  # waited, then ran alone
    assert result.summary["num_preemptions"] == 0
    decisions = result.summary["decisions"]
    assert decisions["admission_waits"] >= 1 and decisions["admission_queued"] == 1
    assert decisions["admitted"] == decisions["placed"] == 2
    # Without admission both run at once on the 20 blocks, and one is preempted.
    assert run(config(requests, **common)).summary["num_preemptions"] >= 1


@pytest.mark.parametrize(
    "admission", [AdmissionConfig(), AdmissionConfig(enabled=True, headroom=0.95)], ids=["plain", "admission"]
)
def test_block_accounting_holds_after_every_event(admission: AdmissionConfig) -> None:
    """Every healthy worker's blocks are free, held by a request there, or reserved for KV on its way in."""
    sim = Simulator(synthetic(admission=admission))

    def check() -> None:
        for w in sim.workers.values():
            if not w.is_healthy:
                continue
            here = w.decoding + w.prefilling + w.ready
            held = sum(r.num_blocks for r in here) + sum(r.num_blocks for r in sim.held_for_pull[w.worker_id].values())
            pulls = sum(
                -(-(r.num_computed + 1) // w.block_size)
                for r in sim.transfers.values()
                if r.decode_worker == w.worker_id
            )
            landing = sum(
                r.num_blocks for r in sim.migrations.values() if r.decode_worker == w.worker_id and r not in here
            )
            assert held + pulls + landing + w.free_blocks == w.kv_blocks, (sim.now, w.worker_id)

    check_after_every_event(sim, check)
    sim.run()


def test_prefill_first_scheduling_stalls_decodes() -> None:
    # r1 arrives while r0 decodes: without chunking its whole prompt runs alone and r0's next token waits.
    requests = [req(0.0, 100, 5), req(0.125, 300, 2)]
    chunked = run(config(requests, max_batched_tokens=128))
    whole = run(config(requests, max_batched_tokens=128, chunked_prefill=False))
    # Unchunked: r1's 300-token prompt is one step (0.01 + 0.3) from 0.13; r0's remaining two decodes follow.
    assert whole.ttft_s[1] == pytest.approx(0.13 + 0.31 - 0.125)
    assert whole.e2e_s[0] == pytest.approx(0.44 + 0.02)
    assert chunked.ttft_s[1] > whole.ttft_s[1]  # chunking delays the long prompt ...
    assert chunked.e2e_s[0] < whole.e2e_s[0]  # ... but keeps decoding the short request
