"""Router overhead: the latency the gRPC router adds to a 1-token request, against calling the worker directly.

One run, one machine: an in-process Ray cluster with the real control plane, its router and one
`mixed` worker on a tiny Llama. Each of N sequential requests (max_tokens=1 unless `--max-tokens`, the same
short token-id prompt, so the worker's prefix cache makes both paths do the same engine work) is sent

  (a) through the router: `router.client.Client.complete` over gRPC (auth, quota, placement,
      then the router's Ray streaming call to the worker), and
  (b) straight to the worker actor: its streaming `generate` with a `GenerateCall`, consumed
      from this process (the baseline),

interleaved (a, b, b, a, ...) so both see the same background noise. `router_added_ms` is the
difference of the two paths' medians (and p99s); the target is a p50 of at most 5 ms.

    python bench/router_overhead.py                      # 200 requests per path
    python bench/router_overhead.py --num-requests 1000 --warmup 50
    python bench/router_overhead.py --max-tokens 64     # the per-token cost of the stream path too

stdout is exactly one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from bench.overhead_cluster import DEPLOYMENT, latency_stats, machine_info, single_worker_cluster  # noqa: E402
from bench.overhead_cluster import log as log_as  # noqa: E402

TARGET_P50_MS = 5.0
NAME = "router_overhead"


def log(msg: str) -> None:
    log_as(NAME, msg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=200, help="measured requests per path (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per path first (default 20)")
    parser.add_argument(
        "--prompt-len", type=int, default=20, help="prompt tokens; >= 16 fills one cacheable KV block (default 20)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1,
        help="tokens per request, EOS ignored (default 1: the fixed cost; more adds each token's path)",
    )
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the in-process Ray (default 8)")
    parser.add_argument(
        "--ready-timeout-s", type=float, default=180.0, help="how long to wait for the worker and router (default 180)"
    )
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.warmup < 0 or not 1 <= args.prompt_len <= 256 or args.num_cpus < 2:
        parser.error("need --num-requests >= 1, --warmup >= 0, 1 <= --prompt-len <= 256 and --num-cpus >= 2")
    if not 1 <= args.max_tokens <= 256:
        parser.error("need 1 <= --max-tokens <= 256")
    return args


class Paths:
    """The two ways of sending the same request."""

    def __init__(self, router_address: str, api_key: str, worker: Any, prompt: list[int], max_tokens: int) -> None:
        from router.client import Client
        from workers.engine.sampling_params import SamplingParams

        self.client = Client(router_address, api_key, timeout_s=60)
        self.worker = worker
        self.prompt = prompt
        self.max_tokens = max_tokens
        # EOS ignored past one token, so both paths generate exactly `max_tokens`.
        self.options: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": max_tokens > 1}
        # What the router builds from these options and the client's other defaults.
        self.sampling = SamplingParams(**self.options)
        self._num_direct = 0
        self.cached_tokens = {"via_router": -1, "direct": -1}
        """Prompt tokens the worker's prefix cache served on each path's last request."""

    def via_router(self) -> float:
        start = time.perf_counter()
        completion = self.client.complete(DEPLOYMENT, self.prompt, **self.options)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if len(completion.token_ids) != self.max_tokens:
            raise RuntimeError(f"router returned {len(completion.token_ids)} tokens, expected {self.max_tokens}")
        self.cached_tokens["via_router"] = completion.usage.cached_prompt_tokens
        return elapsed_ms

    def direct(self) -> float:
        import ray

        from workers.messages import GenerateCall

        self._num_direct += 1
        call = GenerateCall(
            request_id=f"direct-{self._num_direct}", prompt_token_ids=tuple(self.prompt), sampling=self.sampling
        )
        start = time.perf_counter()
        chunks = [ray.get(ref) for ref in self.worker.generate.remote(call)]
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if sum(len(c.token_ids) for c in chunks) != self.max_tokens or not chunks[-1].finished:
            raise RuntimeError(f"the worker did not finish with exactly {self.max_tokens} tokens")
        self.cached_tokens["direct"] = chunks[-1].num_cached_tokens
        return elapsed_ms

    def close(self) -> None:
        self.client.close()


def measure(paths: Paths, num_requests: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        paths.via_router()
        paths.direct()
    router_ms: list[float] = []
    direct_ms: list[float] = []
    for i in range(num_requests):
        # ABBA order: neither path always runs right after the other.
        if i % 2 == 0:
            router_ms.append(paths.via_router())
            direct_ms.append(paths.direct())
        else:
            direct_ms.append(paths.direct())
            router_ms.append(paths.via_router())
        if (i + 1) % 50 == 0:
            log(f"{i + 1}/{num_requests} requests per path")
    return router_ms, direct_ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    prompt = [3 + (7 * i) % 500 for i in range(args.prompt_len)]
    with single_worker_cluster(num_cpus=args.num_cpus, ready_timeout_s=args.ready_timeout_s, name=NAME) as cluster:
        paths = Paths(cluster.router_address, cluster.api_key, cluster.worker, prompt, args.max_tokens)
        try:
            log(f"measuring {args.num_requests} requests per path after {args.warmup} warm-up each")
            router_ms, direct_ms = measure(paths, args.num_requests, args.warmup)
            cached_tokens = dict(paths.cached_tokens)
        finally:
            paths.close()
    return summarize(args, router_ms, direct_ms, cluster.worker_id, cached_tokens)


def summarize(
    args: argparse.Namespace, router_ms: list[float], direct_ms: list[float], worker_id: str, cached: dict[str, int]
) -> dict:
    via_router, direct = latency_stats(router_ms), latency_stats(direct_ms)
    added_p50 = round(via_router["p50"] - direct["p50"], 3)
    return {
        "benchmark": "router_overhead",
        "description": f"latency of a {args.max_tokens}-token request through the gRPC router vs directly on the "
        "worker actor",
        "num_requests_per_path": args.num_requests,
        "num_warmup_per_path": args.warmup,
        "prompt_tokens": args.prompt_len,
        "max_tokens": args.max_tokens,
        "worker_id": worker_id,
        "cached_prompt_tokens_last_request": cached,
        "via_router_ms": via_router,
        "direct_worker_ms": direct,
        "router_added_ms": {"p50": added_p50, "p99": round(via_router["p99"] - direct["p99"], 3)},
        "ratio_router_over_direct": {
            "p50": round(via_router["p50"] / direct["p50"], 3),
            "p99": round(via_router["p99"] / direct["p99"], 3),
        },
        "target": {"router_added_p50_ms_max": TARGET_P50_MS, "met": added_p50 <= TARGET_P50_MS},
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
