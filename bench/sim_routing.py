"""Routing policies head to head in the simulator, at the rate where the best baseline just meets its SLOs.

Every policy (round-robin, least-outstanding, power-of-two-choices, the SGLang-style longest-cached-prefix
baseline `prefix_cache`, and `raylane`) replays the same trace slice on the same cluster. The rate is found once:
the trace's `rate_scale` is bisected for the highest rate at which the best baseline still meets >= 90% SLO
attainment (DistServe's goodput definition); every policy is then run at that rate. So the baselines sit at ~90%
attainment and a policy wins by the violations it avoids (`violation_reduction`) and the goodput that buys.

    python bench/sim_routing.py --trace PATH [--gpus 16] [--seed 0] [--duration-s 600] [--hetero] [--out PATH]

stdout is one JSON object (also written to `--out`); progress goes to stderr. `--hetero` splits the GPUs into an
H100 and an A100 pool (same model, different roofline costs). Trace credits: Azure LLM inference trace 2023
(Azure/AzurePublicDataset, CC-BY 4.0); Mooncake synthetic trace (kvcache-ai/Mooncake, Apache-2.0), see
data/traces/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from bench.sim_experiments import TARGET_ATTAINMENT, goodput_search  # noqa: E402
from router.registry import POLICIES  # noqa: E402
from router.trace import DEFAULT_TRACE  # noqa: E402
from sim.config import PoolConfig, SimConfig, SloConfig, TraceConfig  # noqa: E402
from sim.simulator import run  # noqa: E402

BASELINES = ("round_robin", "least_outstanding", "p2c", "prefix_cache")
"""Compared against `raylane`; `prefix_cache` routes on the longest cached prefix only, as SGLang's router does."""
CANDIDATE = "raylane"
COST = {"kind": "roofline", "gpu": "H100", "model": "llama-3-8b", "tp": 1}


def log(msg: str) -> None:
    print(f"[sim_routing] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure/BurstGPT CSV or Mooncake JSONL")
    parser.add_argument("--gpus", type=int, default=16, help="GPUs (one Llama-3-8B worker each, mixed pool)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the simulator and sampled policies")
    parser.add_argument("--start-s", type=float, default=0.0, help="slice start, unscaled trace seconds")
    parser.add_argument("--duration-s", type=float, default=600.0, help="trace seconds replayed (before rate scaling)")
    parser.add_argument("--max-requests", type=int, default=None, help="keep at most this many requests of the slice")
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT SLO, seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.05, help="TPOT SLO, seconds")
    parser.add_argument("--chunk", type=int, default=2048, help="token budget per engine step")
    parser.add_argument("--bisect-steps", type=int, default=6, help="bisection steps on the rate")
    parser.add_argument("--hetero", action="store_true", help="half the GPUs H100, half A100")
    parser.add_argument("--synthetic", type=str, default=None, help="JSON fields of sim.traces.SyntheticTrace")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error("--gpus must be >= 2 (routing needs a choice)")
    return args


def make_pools(args: argparse.Namespace) -> tuple[PoolConfig, ...]:
    if not args.hetero:
        return (PoolConfig(role="mixed", num_workers=args.gpus),)
    num_a100 = args.gpus // 2
    return (
        PoolConfig(role="mixed", num_workers=args.gpus - num_a100),
        PoolConfig(role="mixed", num_workers=num_a100, cost_model={**COST, "gpu": "A100"}),
    )


def make_config(args: argparse.Namespace, policy: str, rate_scale: float) -> SimConfig:
    if args.synthetic is not None:
        synthetic = {**json.loads(args.synthetic), "seed": args.seed}
        trace = TraceConfig(synthetic=synthetic, rate_scale=rate_scale, max_requests=args.max_requests)
    else:
        trace = TraceConfig(
            path=str(args.trace),
            start_s=args.start_s,
            duration_s=args.duration_s,
            rate_scale=rate_scale,
            max_requests=args.max_requests,
        )
    return SimConfig(
        trace=trace,
        pools=make_pools(args),
        policy=policy,
        cost_model=COST,
        max_batched_tokens=args.chunk,
        slo=SloConfig(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo),
        sample_interval_s=5.0,
        seed=args.seed,
    )


def policy_row(summary: dict) -> dict:
    """The per-policy JSON row (the interface: slo_attainment, goodput_rps, ttft_ms, tpot_ms, prefix_hit_rate)."""

    def ms(stats: dict) -> dict:
        return {q: round(stats[q] * 1000, 2) for q in ("p50", "p99")}

    return {
        "slo_attainment": round(summary["slo_attainment"], 4),
        "goodput_rps": round(summary["goodput_rps"], 4),
        "ttft_ms": ms(summary["ttft_s"]),
        "tpot_ms": ms(summary["tpot_s"]),
        # From the simulator's prefix cache; traces without block hashes have none to hit.
        "prefix_hit_rate": round(summary.get("prefix_hit_rate", 0.0), 4),
        "throughput_rps": round(summary["throughput_rps"], 4),
        "num_preemptions": summary["num_preemptions"],
        "sim_wall_s": round(summary["wall_s"], 2),
    }


def compare(candidate: dict, best: dict) -> dict:
    """Goodput ratio and the share of the best baseline's SLO violations the candidate avoids."""
    best_violations = 1 - best["slo_attainment"]
    violations = 1 - candidate["slo_attainment"]
    return {
        "goodput_ratio": round(candidate["goodput_rps"] / best["goodput_rps"], 4) if best["goodput_rps"] > 0 else None,
        "violation_reduction": round(1 - violations / best_violations, 4) if best_violations > 0 else 0.0,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.getLogger("router").setLevel(logging.WARNING)
    logging.getLogger("sim").setLevel(logging.WARNING)
    started = time.perf_counter()
    baselines = [p for p in BASELINES if p in POLICIES]
    skipped = [p for p in BASELINES if p not in POLICIES]
    if skipped:
        log(f"skipping baselines not in router/registry.py: {skipped}")
    summaries: dict[float, dict[str, dict]] = {}

    def run_policy(policy: str, scale: float) -> dict:
        cached = summaries.setdefault(scale, {})
        if policy not in cached:
            cached[policy] = run(make_config(args, policy, scale)).summary
            s = cached[policy]
            log(
                f"{policy} x{scale:.4g}: {s['throughput_rps']:.2f} req/s attainment {s['slo_attainment']:.3f} "
                f"prefix hits {s.get('prefix_hit_rate', 0.0):.3f} ({s['wall_s']:.1f}s wall)"
            )
        return cached[policy]

    def best_baseline(scale: float) -> dict:
        return max((run_policy(p, scale) for p in baselines), key=lambda s: (s["slo_attainment"], s["goodput_rps"]))

    scale, _ = goodput_search(best_baseline, args.bisect_steps)
    rows = {p: policy_row(run_policy(p, scale)) for p in [*baselines, CANDIDATE]}
    best_name = max(baselines, key=lambda p: (rows[p]["goodput_rps"], rows[p]["slo_attainment"]))
    out = {
        "bench": "sim_routing",
        "trace": str(args.trace) if args.synthetic is None else f"synthetic:{args.synthetic}",
        "gpus": args.gpus,
        "seed": args.seed,
        "pools": "H100+A100" if args.hetero else "H100",
        "cost_model": COST,
        "trace_slice_s": {"start": args.start_s, "duration": args.duration_s},
        "slo": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo, "attainment_target": TARGET_ATTAINMENT},
        "rate_scale": round(scale, 5),
        "rate_rps": rows[best_name]["throughput_rps"],
        "best_baseline": best_name,
        "skipped_baselines": skipped,
        "policies": rows,
        "vs_best_baseline": {CANDIDATE: compare(rows[CANDIDATE], rows[best_name])},
        "num_simulations": sum(len(v) for v in summaries.values()),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(out, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
