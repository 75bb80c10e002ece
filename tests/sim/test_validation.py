"""The simulator against a real local cluster: a short version of bench/sim_validation.py.

The real side is the production path (control plane, 4 mixed workers on the tiny Llama, the
gRPC router with least_outstanding) replaying ~20 s of the Azure conv trace; the simulated side
runs the same requests at the same send times with the profiled cost model of this machine.

What it asserts, and what it does not: on this machine the simulator gets throughput right
(the bench: within 4%) but misses the 15%/25% latency targets (mean TTFT and TPOT are low by
60-90%, at load 0.35 as at 0.6; see bench/sim_validation.py's docstring for why). So the test holds the
parts that are validated: throughput within 25%; every request simulated with sane latencies;
and the measured serving path (Ray streaming, router, client, CPU sharing) bringing mean TTFT
and TPOT closer to the real cluster than the engine-only model does.
Run it under `flock /tmp/raylane-cpu.lock`.
"""

from __future__ import annotations

from bench.sim_validation import parse_args, validate

THROUGHPUT_BOUND = 0.25


def test_simulator_tracks_a_real_cluster(ray_cluster) -> None:
    args = parse_args(
        [
            "--duration",
            "20",
            "--load",
            "0.5",
            "--serving-batches",
            "1,8",
            "--serving-workers",
            "1",
            "--serving-output-len",
            "32",
        ]
    )
    report = validate(args, init_ray=False, quick=True)
    assert report["num_errors"] == 0
    assert report["num_requests"] >= 50
    assert report["real"]["num_requests"] == report["sim"]["num_requests"] == report["num_requests"]
    errors, engine_only = report["relative_error"], report["engine_only_relative_error"]
    assert errors["output_tokens_per_s"] <= THROUGHPUT_BOUND, (report["real"], report["sim"])
    for name in ("ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_p99_ms"):
        assert 0 < report["sim"][name] < 60_000, name
    # The serving path is real work on this machine: modelling it must bring the latencies closer.
    for name in ("ttft_mean_ms", "tpot_mean_ms"):
        assert errors[name] < engine_only[name], (name, errors, engine_only)
