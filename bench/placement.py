"""Placement cost per request as the fleet grows: the policy's decision plus the view updates that feed it.

For each policy and fleet size (8, 64, 1,000 mixed workers by default) a synthetic fleet is built in the state the
simulator's 1,000-GPU run shows (most workers running a request or two, tracked in the router's KV ledger, some
idle), with a pool index (`router/pool_index.py`) kept in step. Each measured request then does what a router
does: apply `--updates-per-request` workers' fresh stats to the index (the placed worker's in-flight count and
ledger, plus random others' reports), then route. `per_request_us` is the mean of that over `--num-requests`;
`ratio_1000_vs_8` divides the largest fleet's cost by the smallest's (target: <= 2 for every indexed policy).
`raylane_full_scan` is the same policy on the same views without the index: what the index saves.

    python bench/placement.py [--sizes 8 64 1000] [--num-requests 2000] [--policies raylane least_outstanding ...]

stdout is one JSON object; progress goes to stderr. One core, no Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from router.kv_forecast import RequestKv, WorkerKvSnapshot  # noqa: E402
from router.policy import ClusterView, RouteRequest, WorkerView  # noqa: E402
from router.pool_index import ClusterIndex  # noqa: E402
from router.registry import make_policy  # noqa: E402

DEPLOYMENT = "chat"
KV_BLOCKS = 26_674  # an H100 serving Llama-3-8B at 16 tokens a block, as the simulator sizes it
DEFAULT_POLICIES = ("round_robin", "least_outstanding", "p2c", "least_loaded", "prefix_cache", "raylane")
TARGET_RATIO = 2.0


def log(msg: str) -> None:
    print(f"[placement] {msg}", file=sys.stderr, flush=True)


def running(rng: random.Random) -> RequestKv:
    p50 = rng.uniform(50, 400)
    return RequestKv(
        num_prompt_tokens=rng.randint(100, 2000),
        num_generated=rng.randint(0, 300),
        max_tokens=4096,
        predicted_output_p50=p50,
        predicted_output_p90=p50 * 2.5,
    )


def worker_state(worker_id: str, rng: random.Random) -> WorkerView:
    """A worker as the simulator's busy fleet shows it: 0-3 tracked requests, KV use to match."""
    requests = tuple(running(rng) for _ in range(rng.choice((0, 1, 1, 1, 2, 2, 3))))
    used = sum(-(-r.held_tokens // 16) for r in requests)
    return WorkerView(
        worker_id=worker_id,
        deployment=DEPLOYMENT,
        role="mixed",
        num_running=len(requests),
        kv_usage=used / KV_BLOCKS,
        kv_blocks_total=KV_BLOCKS,
        kv_blocks_used=used,
        kv_block_size=16,
        num_pending_prefill_tokens=rng.choice((0, 0, 0, rng.randint(100, 2000))),
        kv_ledger=WorkerKvSnapshot(requests=requests),
    )


def route_request(i: int, rng: random.Random) -> RouteRequest:
    p50 = rng.uniform(50, 400)
    return RouteRequest(
        request_id=f"bench/{i}",
        deployment=DEPLOYMENT,
        tenant="bench",
        num_prompt_tokens_estimate=rng.randint(100, 2000),
        max_tokens=4096,
        predicted_output_p50=p50,
        predicted_output_p90=p50 * 2.5,
    )


def measure(policy_name: str, num_workers: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    ids = [f"w{i:05d}" for i in range(num_workers)]
    views = {wid: worker_state(wid, rng) for wid in ids}
    use_index = policy_name != "raylane_full_scan"
    policy = make_policy("raylane" if policy_name == "raylane_full_scan" else policy_name)
    workers = list(views.values())
    slots = {wid: i for i, wid in enumerate(ids)}
    index = ClusterIndex(workers) if use_index else None
    view = ClusterView(workers={DEPLOYMENT: workers}, index=index)
    requests = [route_request(i, rng) for i in range(args.warmup + args.num_requests)]
    # Updates are drawn up front so the timed loop holds only the router's work.
    reports = [[rng.choice(ids) for _ in range(args.updates_per_request - 1)] for _ in requests]
    fresh = {wid: [worker_state(wid, rng) for _ in range(4)] for wid in ids}
    elapsed = 0.0
    for i, request in enumerate(requests):
        start = time.perf_counter()
        for k, wid in enumerate(reports[i]):
            update(workers, slots, index, fresh[wid][(i + k) % 4])
        decision = policy.route(request, view)
        placed = workers[slots[decision.worker_id]]
        update(workers, slots, index, dataclasses.replace(placed, num_inflight=placed.num_inflight + 1))
        if i >= args.warmup:
            elapsed += time.perf_counter() - start
    return {"per_request_us": round(elapsed / args.num_requests * 1e6, 1), "num_scored_last": len(decision.scores)}


def update(workers: list[WorkerView], slots: dict[str, int], index: ClusterIndex | None, view: WorkerView) -> None:
    workers[slots[view.worker_id]] = view
    if index is not None:
        index.update(view)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 1000], help="fleet sizes (workers)")
    parser.add_argument("--num-requests", type=int, default=2000, help="measured requests per policy and size")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    parser.add_argument("--updates-per-request", type=int, default=3, help="worker views changed per request (>= 1)")
    parser.add_argument("--policies", nargs="+", default=[*DEFAULT_POLICIES, "raylane_full_scan"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.updates_per_request < 1 or min(args.sizes) < 2:
        parser.error("need --num-requests >= 1, --updates-per-request >= 1 and sizes >= 2")
    logging.getLogger("router").setLevel(logging.WARNING)
    sizes = sorted(args.sizes)
    out: dict[str, dict] = {}
    for name in args.policies:
        out[name] = {}
        for n in sizes:
            out[name][str(n)] = measure(name, n, args)
            log(f"{name} {n} workers: {out[name][str(n)]}")
        small, big = out[name][str(sizes[0])], out[name][str(sizes[-1])]
        out[name][f"ratio_{sizes[-1]}_vs_{sizes[0]}"] = round(big["per_request_us"] / small["per_request_us"], 2)
    largest = str(sizes[-1])
    result = {
        "bench": "placement",
        "sizes": sizes,
        "num_requests": args.num_requests,
        "updates_per_request": args.updates_per_request,
        "target_ratio": TARGET_RATIO,
        "policies": out,
        "raylane_index_speedup_at_largest": round(
            out["raylane_full_scan"][largest]["per_request_us"] / out["raylane"][largest]["per_request_us"], 2
        )
        if "raylane" in out and "raylane_full_scan" in out
        else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
