"""Soak: sustained mixed traffic against a local cluster; nothing may be lost, leak memory, fds or KV blocks.

Starts its own cluster (`bench/soak_cluster.py`: control plane, router with its HTTP front, a 2-replica mixed
deployment and a prefill/decode one on a tiny Llama, two LoRAs, three tenants, one on a tight token quota), then
keeps `--concurrency` clients busy (`bench/soak_traffic.py`): gRPC unary and streaming calls (router/client.py),
the official `openai` client on /v1/completions and /v1/chat/completions (whole and streamed), adapters by
name, streams we cancel mid-way, deadlines that expire, an unknown adapter now and then, and the quota tenant's
429s. Every request is tracked to one outcome; `lost = sent - (completed + failed + cancelled)` must be 0.

Phases: warm-up (traffic on, not sampled) -> first sample of RSS and open fds of every process (driver,
control plane, routers, workers, the embedded redis-server) -> `--duration` seconds of traffic -> stop, let the
requests in flight finish -> idle until the workers hold no KV block -> last sample. The baseline of each
process is its own first sample (`rss_growth_pct`). Targets (issue 13): lost == 0, RSS growth < 5% for every
process, 0 KV blocks in use at the end. The exit code is 1 when a target is missed.

    python bench/soak.py --duration 600 --out bench/results_soak.json
    python bench/soak.py --duration 60 --warmup 20 --concurrency 4

stdout is exactly one JSON object; a progress line goes to stderr about every 30 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from bench.overhead_cluster import log, machine_info  # noqa: E402
from bench.soak_cluster import (  # noqa: E402
    ProcessSample,
    SoakCluster,
    kv_blocks_in_use,
    process_pids,
    sample_processes,
    soak_cluster,
)
from bench.soak_traffic import Tally, Traffic  # noqa: E402

NAME = "soak"
MAX_RSS_GROWTH_PCT = 5.0
PROGRESS_EVERY_S = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, required=True, help="seconds of measured traffic after warm-up")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of traffic before the first sample (60)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads, one request each at a time (8)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (0)")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the in-process Ray (8)")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0, help="wait for workers and router (300)")
    parser.add_argument("--drain-timeout-s", type=float, default=180.0, help="wait for requests in flight (180)")
    parser.add_argument("--idle-timeout-s", type=float, default=60.0, help="wait for KV blocks to be freed (60)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.num_cpus < 2:
        parser.error("need --duration > 0, --warmup >= 0, --concurrency >= 1 and --num-cpus >= 2")
    return args


def _progress(tally: Tally, t0: float, total_s: float, phase: str) -> None:
    totals = tally.totals()
    num_failed = sum(totals["failed"].values())
    in_flight = totals["sent"] - totals["completed"] - num_failed - totals["cancelled"]
    rss_mb = psutil.Process().memory_info().rss / 2**20
    log(
        NAME,
        f"{phase} {time.monotonic() - t0:.0f}/{total_s:.0f}s sent={totals['sent']} completed={totals['completed']} "
        f"failed={num_failed} cancelled={totals['cancelled']} in_flight_or_lost={in_flight} driver_rss={rss_mb:.0f}MiB",
    )


def _run_for(seconds: float, tally: Tally, t0: float, total_s: float, phase: str) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(PROGRESS_EVERY_S, left))
        _progress(tally, t0, total_s, phase)


def _wait_idle(timeout_s: float) -> tuple[int, int]:
    """Poll the workers until no request holds a KV block and no stream is open; the last reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        blocks, streams = kv_blocks_in_use()
        if (blocks == 0 and streams == 0) or time.monotonic() > deadline:
            return blocks, streams
        time.sleep(1.0)


def _processes(
    pids: dict[str, int], start: dict[str, ProcessSample | None], end: dict[str, ProcessSample | None]
) -> list[dict[str, Any]]:
    rows = []
    for name, pid in pids.items():
        first, last = start[name], end[name]
        growth = None
        if first is not None and last is not None and first.rss_mb > 0:
            growth = round((last.rss_mb - first.rss_mb) / first.rss_mb * 100, 2)
        rows.append(
            {
                "name": name,
                "pid": pid,
                "rss_start_mb": None if first is None else round(first.rss_mb, 1),
                "rss_end_mb": None if last is None else round(last.rss_mb, 1),
                "rss_growth_pct": growth,
                "fds_start": None if first is None else first.num_fds,
                "fds_end": None if last is None else last.num_fds,
            }
        )
    return rows


def _per_minute(tally: Tally) -> list[dict[str, Any]]:
    from router.replay import percentile

    return [
        {
            "minute": minute,
            "requests": len(samples),
            "p50_ms": round(percentile(samples, 50), 2),
            "p99_ms": round(percentile(samples, 99), 2),
        }
        for minute, samples in sorted(tally.latencies_by_minute.items())
    ]


def soak(args: argparse.Namespace, cluster: SoakCluster) -> dict[str, Any]:
    """Run the phases on a started cluster; the report without `leftover_processes` (known only after it stops)."""
    traffic = Traffic(cluster, concurrency=args.concurrency, seed=args.seed)
    total_s = args.warmup + args.duration
    log(NAME, f"traffic on: {args.concurrency} clients, {args.warmup:.0f}s warm-up + {args.duration:.0f}s measured")
    traffic.start()
    t0 = traffic.tally.t0
    try:
        _run_for(args.warmup, traffic.tally, t0, total_s, "warm-up")
        pids = process_pids(cluster)
        start = sample_processes(pids)
        log(NAME, f"first sample of {len(pids)} processes: {', '.join(pids)}")
        _run_for(args.duration, traffic.tally, t0, total_s, "soak")
    finally:
        num_stuck = traffic.stop(args.drain_timeout_s)
    traffic_s = time.monotonic() - t0
    # Counted now: a call still stuck is lost, even if closing the clients below ends it with a status.
    totals, by_kind, lost_reasons = traffic.tally.totals(), traffic.tally.by_kind(), dict(traffic.tally.lost_reasons)
    log(NAME, f"traffic off; {num_stuck} clients still in a call; waiting for the workers to go idle")
    blocks, streams = _wait_idle(args.idle_timeout_s)
    end = sample_processes(pids)
    traffic.close()
    processes = _processes(pids, start, end)
    rss_ok = all(p["rss_growth_pct"] is not None and p["rss_growth_pct"] < MAX_RSS_GROWTH_PCT for p in processes)
    return {
        "benchmark": NAME,
        "description": "sustained mixed gRPC/HTTP traffic: every request accounted for, no memory, fd or KV leak",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "traffic_s": round(traffic_s, 1),
        "concurrency": args.concurrency,
        **totals,
        "requests_per_s": round(totals["sent"] / traffic_s, 2),
        "by_kind": by_kind,
        "lost_reasons": lost_reasons,
        "clients_stuck_at_stop": num_stuck,
        "processes": processes,
        "kv_blocks_in_use_end": blocks,
        "open_streams_end": streams,
        "per_minute": _per_minute(traffic.tally),
        "targets": {
            "lost_zero": totals["lost"] == 0,
            "rss_growth_below_5pct": rss_ok,
            "no_leaked_blocks": blocks == 0,
        },
        "machine": machine_info(),
    }


def _leftovers(pids: dict[str, int], timeout_s: float = 15.0) -> list[str]:
    """Watched processes (the driver aside) still alive after shutdown; actor processes take a moment to exit."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [f"{name}:{pid}" for name, pid in pids.items() if name != "driver" and _is_running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with soak_cluster(num_cpus=args.num_cpus, ready_timeout_s=args.ready_timeout_s, name=NAME) as cluster:
        pids = process_pids(cluster)
        report = soak(args, cluster)
    report["leftover_processes"] = _leftovers({p["name"]: p["pid"] for p in report["processes"]} | pids)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    missed = [name for name, met in report["targets"].items() if not met]
    log(NAME, f"lost={report['lost']} kv_blocks_in_use_end={report['kv_blocks_in_use_end']} missed={missed or 'none'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
