"""What a simulation produces: per-request latencies, SLO attainment, goodput, GPU-seconds and time series."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.simulator import Simulator


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for an empty list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {
        "mean": math.fsum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


@dataclass(kw_only=True)
class SimResult:
    """One simulation's outcome. Times are seconds; per-request lists are in trace order."""

    summary: dict[str, Any]
    """Headline numbers: latency stats, attainment, goodput, throughput, counters, speed."""
    ttft_s: list[float]
    """Time to first token per request."""
    tpot_s: list[float]
    """Mean time per output token after the first (0 for one-token outputs)."""
    e2e_s: list[float]
    """Arrival to last token per request."""
    meets_slo: list[bool]
    """Both SLOs met, per request."""
    time_series: list[dict[str, float]] = field(default_factory=list)
    """Periodic samples of queued requests, running requests and KV usage per role."""
    workers: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per worker: busy seconds, steps, preemptions, prefix-cache lookups and hits (tokens)."""
    cached_tokens: list[int] = field(default_factory=list)
    """Prompt tokens the prefix cache served at each request's first-token prefill (0 without block hashes)."""

    def __getattr__(self, name: str) -> Any:
        # result.goodput_rps etc. read the summary.
        summary = self.__dict__.get("summary", {})
        if name in summary:
            return summary[name]
        raise AttributeError(name)

    def to_json(self, *, include_requests: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": _clean(self.summary), "time_series": self.time_series}
        out["workers"] = self.workers
        if include_requests:
            out["requests"] = {
                "ttft_s": self.ttft_s,
                "tpot_s": self.tpot_s,
                "e2e_s": self.e2e_s,
                "cached_tokens": self.cached_tokens,
            }
        return out

    def save(self, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
        """Write `result.json` (with per-request latencies) and, if asked, PNG plots; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "result.json"
        path.write_text(json.dumps(self.to_json(include_requests=True), indent=1))
        written = [path]
        if plots:
            written += plot_result(self, out)
        return written


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def build_result(sim: Simulator, *, wall_s: float) -> SimResult:
    cfg, requests = sim.config, sim.requests
    ttft = [r.first_token_s - r.arrival_s for r in requests]
    e2e = [r.finish_s - r.arrival_s for r in requests]
    tpot = [
        (e - t) / (r.output_len - 1) if r.output_len > 1 else 0.0 for r, t, e in zip(requests, ttft, e2e, strict=True)
    ]
    meets_ttft = [t <= cfg.slo.ttft_s for t in ttft]
    meets_tpot = [t <= cfg.slo.tpot_s for t in tpot]
    meets = [a and b for a, b in zip(meets_ttft, meets_tpot, strict=True)]
    n = len(requests)
    # Goodput and throughput over the window requests arrived in (so a drain tail does not dilute them).
    window = max(requests[-1].arrival_s - requests[0].arrival_s, 1e-9) if n > 1 else max(e2e[0], 1e-9)
    makespan = max(r.finish_s for r in requests)
    num_gpus_alive = sum(w.num_gpus for w in sim.workers.values())
    cached = [r.num_cached_tokens for r in requests]
    num_prompt_tokens = sum(r.prompt_len for r in requests)
    summary: dict[str, Any] = {
        "num_requests": n,
        "policy": cfg.policy,
        "cost_model": next(iter(sim.workers.values())).cost.name,
        "pools": {p.role: p.num_workers for p in cfg.pools},
        "num_gpus": num_gpus_alive,
        "arrival_window_s": window,
        "makespan_s": makespan,
        "ttft_s": summarize(ttft),
        "tpot_s": summarize(tpot),
        "e2e_s": summarize(e2e),
        "slo": {"ttft_s": cfg.slo.ttft_s, "tpot_s": cfg.slo.tpot_s},
        "slo_attainment": sum(meets) / n,
        "ttft_attainment": sum(meets_ttft) / n,
        "tpot_attainment": sum(meets_tpot) / n,
        "goodput_rps": sum(meets) / window,
        "throughput_rps": n / window,
        "output_tokens_per_s": sum(r.output_len for r in requests) / makespan,
        "num_preemptions": sum(w.num_preemptions for w in sim.workers.values()),
        "preemptions": sum(w.num_preemptions for w in sim.workers.values()),  # alias used by bench/sim_validation
        "num_restarts": sim.counters.restarts,
        # Cached prompt tokens / prompt tokens, at each request's first-token prefill.
        "prefix_hit_rate": sum(cached) / num_prompt_tokens,
        "num_cached_prompt_tokens": sum(cached),
        "num_prompt_tokens": num_prompt_tokens,
        "num_decode_reroutes": sim.counters.reroutes,
        "decisions": {  # every one made by the production placement core and migration policy
            "placed": sim.counters.placements,
            "no_capacity": sim.counters.no_capacity,
            "admitted": sim.counters.admitted,
            "admission_waits": sim.counters.admission_waits,
            "admission_queued": sim.counters.admission_queued,
        },
        "migrations": {
            "started": sim.counters.migrations_started,
            "committed": sim.counters.migrations_committed,
            "aborted": sim.counters.migrations_aborted,
        },
        "mean_kv_transfer_s": math.fsum(r.transfer_s for r in requests) / n,
        "gpu_seconds": num_gpus_alive * makespan,
        "gpu_busy_seconds": sum(w.busy_s * w.num_gpus for w in sim.workers.values()),
        "kv_blocks_in_use_at_end": sum(w.used_blocks for w in sim.workers.values() if w.is_healthy),
        "engine_steps": sum(w.num_steps for w in sim.workers.values()),
        "events": sim.counters.events,
        "wall_s": wall_s,
        "events_per_s": sim.counters.events / max(wall_s, 1e-9),
    }
    workers = {
        wid: {
            "busy_s": round(w.busy_s, 6),
            "steps": w.num_steps,
            "preemptions": w.num_preemptions,
            "prefix_query_tokens": w.prefix.num_query_tokens,
            "prefix_hit_tokens": w.prefix.num_hit_tokens,
        }
        for wid, w in sim.workers.items()
    }
    return SimResult(
        summary=summary,
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_s=e2e,
        meets_slo=meets,
        time_series=sim.series,
        workers=workers,
        cached_tokens=cached,
    )


def plot_result(result: SimResult, out_dir: Path) -> list[Path]:
    """latency CDFs and the queue/KV time series, as two PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values, slo) in zip(
        axes,
        (
            ("TTFT (s)", result.ttft_s, result.summary["slo"]["ttft_s"]),
            ("TPOT (s)", result.tpot_s, result.summary["slo"]["tpot_s"]),
            ("E2E (s)", result.e2e_s, None),
        ),
        strict=True,
    ):
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
        if slo is not None:
            ax.axvline(slo, color="red", linestyle="--", label="SLO")
            ax.legend()
        ax.set_xlabel(name)
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
    fig.suptitle(f"{result.summary['policy']}: attainment {result.summary['slo_attainment']:.1%}")
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    series = result.time_series
    if series:
        fig, (ax_q, ax_kv) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
        t = [p["t"] for p in series]
        for key in sorted({k for p in series for k in p if k != "t"}):
            values = [p.get(key, math.nan) for p in series]
            if key.endswith("_queued") or key.endswith("_running"):
                ax_q.plot(t, values, label=key)
            elif key.endswith("_kv_mean") or key.endswith("_kv_max"):
                ax_kv.plot(t, values, label=key)
        ax_q.set_ylabel("requests")
        ax_kv.set_ylabel("KV used (fraction)")
        ax_kv.set_xlabel("simulated time (s)")
        ax_q.legend(fontsize=7)
        ax_kv.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "timeseries.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
