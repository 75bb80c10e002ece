"""HTTP front overhead: what the OpenAI-compatible HTTP front adds over the gRPC router, and both over the worker.

One run, one machine, the cluster of `bench/overhead_cluster.py` (real control plane, its router, one `mixed`
worker on a tiny Llama). Each of N rounds sends the same 1-token request (max_tokens=1, greedy, the same short
token-id prompt, so the worker's prefix cache makes every path do the same engine work)

  (a) through the HTTP front: `POST /v1/completions` on a kept-alive connection (JSON in, JSON out), sent with
      the standard library's `http.client`: a lean client, as gRPC's C core is (`httpx` itself costs about
      0.6 ms more per request on a 2-core machine, which is the client's cost, not the front's),
  (b) through the gRPC router: `router.client.Client.complete`, and
  (c) straight to the worker actor: its streaming `generate`, consumed from this process (the baseline),

in a rotating order (abc, bca, cab, ...) so every path sees the same background noise. `http_over_grpc_ms` is
the difference of the HTTP and gRPC medians (and p99s); the target is a p50 of at most 1 ms.

    python bench/http_overhead.py                      # 300 requests per path
    python bench/http_overhead.py --num-requests 1000 --warmup 50

stdout is exactly one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from bench.overhead_cluster import (  # noqa: E402
    DEPLOYMENT,
    BenchCluster,
    latency_stats,
    log,
    machine_info,
    single_worker_cluster,
)

TARGET_HTTP_OVER_GRPC_P50_MS = 1.0
NAME = "http_overhead"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=300, help="measured requests per path (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests per path first (default 30)")
    parser.add_argument("--prompt-len", type=int, default=20, help="prompt tokens (default 20: one cached block)")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the in-process Ray (default 8)")
    parser.add_argument("--ready-timeout-s", type=float, default=180.0, help="wait for worker and router (180)")
    args = parser.parse_args(argv)
    if args.num_requests < 1 or args.warmup < 0 or not 1 <= args.prompt_len <= 256 or args.num_cpus < 2:
        parser.error("need --num-requests >= 1, --warmup >= 0, 1 <= --prompt-len <= 256 and --num-cpus >= 2")
    return args


class Paths:
    """The three ways of sending the same 1-token request; each returns its latency in ms."""

    def __init__(self, cluster: BenchCluster, prompt: list[int]) -> None:
        from http.client import HTTPConnection

        from router.client import Client
        from workers.engine.sampling_params import SamplingParams

        self.cluster = cluster
        self.prompt = prompt
        self.grpc = Client(cluster.router_address, cluster.api_key, timeout_s=60)
        host, port = cluster.http_address.rsplit(":", 1)
        self.http = HTTPConnection(host, int(port), timeout=60)
        self.http_headers = {"Authorization": f"Bearer {cluster.api_key}", "Content-Type": "application/json"}
        self.http_body = json.dumps({"model": DEPLOYMENT, "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
        self.sampling = SamplingParams(max_tokens=1)  # what the router builds from the same request
        self._num_direct = 0

    def via_http(self) -> float:
        start = time.perf_counter()
        # One send of head and body (http.client joins them), so Nagle never holds the body back.
        self.http.request("POST", "/v1/completions", body=self.http_body, headers=self.http_headers)
        response = self.http.getresponse()
        body = json.loads(response.read())
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if response.status != 200 or body["usage"]["completion_tokens"] != 1:
            raise RuntimeError(f"HTTP front answered {response.status}: {body}")
        return elapsed_ms

    def via_grpc(self) -> float:
        start = time.perf_counter()
        completion = self.grpc.complete(DEPLOYMENT, self.prompt, max_tokens=1)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if len(completion.token_ids) != 1:
            raise RuntimeError(f"router returned {len(completion.token_ids)} tokens, expected 1")
        return elapsed_ms

    def direct(self) -> float:
        import ray

        from workers.messages import GenerateCall

        self._num_direct += 1
        call = GenerateCall(
            request_id=f"direct-{self._num_direct}", prompt_token_ids=tuple(self.prompt), sampling=self.sampling
        )
        start = time.perf_counter()
        chunks = [ray.get(ref) for ref in self.cluster.worker.generate.remote(call)]
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if sum(len(c.token_ids) for c in chunks) != 1 or not chunks[-1].finished:
            raise RuntimeError("the worker did not return exactly one finished token")
        return elapsed_ms

    def close(self) -> None:
        self.grpc.close()
        self.http.close()


def measure(paths: Paths, num_requests: int, warmup: int) -> dict[str, list[float]]:
    order: list[tuple[str, Callable[[], float]]] = [
        ("http", paths.via_http),
        ("grpc", paths.via_grpc),
        ("direct", paths.direct),
    ]
    for _ in range(warmup):
        for _, send in order:
            send()
    samples: dict[str, list[float]] = {name: [] for name, _ in order}
    for i in range(num_requests):
        rotation = order[i % 3 :] + order[: i % 3]  # abc, bca, cab: no path always follows the same one
        for name, send in rotation:
            samples[name].append(send())
        if (i + 1) % 100 == 0:
            log(NAME, f"{i + 1}/{num_requests} requests per path")
    return samples


def summarize(args: argparse.Namespace, samples: dict[str, list[float]], worker_id: str) -> dict[str, Any]:
    http, grpc, direct = (latency_stats(samples[name]) for name in ("http", "grpc", "direct"))

    def diff(a: dict[str, float], b: dict[str, float], key: str) -> float:
        return round(a[key] - b[key], 3)

    http_over_grpc_p50 = diff(http, grpc, "p50")
    return {
        "benchmark": NAME,
        "description": "latency of a 1-token request through the HTTP front, the gRPC router, and on the worker",
        "num_requests_per_path": args.num_requests,
        "num_warmup_per_path": args.warmup,
        "prompt_tokens": args.prompt_len,
        "max_tokens": 1,
        "worker_id": worker_id,
        "via_http_ms": http,
        "via_grpc_ms": grpc,
        "direct_worker_ms": direct,
        "http_over_grpc_ms_p50": http_over_grpc_p50,
        "http_over_grpc_ms_p99": diff(http, grpc, "p99"),
        "grpc_over_direct_ms_p50": diff(grpc, direct, "p50"),
        "grpc_over_direct_ms_p99": diff(grpc, direct, "p99"),
        "http_over_direct_ms_p50": diff(http, direct, "p50"),
        "http_over_direct_ms_p99": diff(http, direct, "p99"),
        "ratio_http_over_grpc_p50": round(http["p50"] / grpc["p50"], 3),
        "target": {
            "http_over_grpc_p50_ms_max": TARGET_HTTP_OVER_GRPC_P50_MS,
            "met": http_over_grpc_p50 <= TARGET_HTTP_OVER_GRPC_P50_MS,
        },
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompt = [3 + (7 * i) % 500 for i in range(args.prompt_len)]
    with single_worker_cluster(num_cpus=args.num_cpus, ready_timeout_s=args.ready_timeout_s, name=NAME) as cluster:
        paths = Paths(cluster, prompt)
        try:
            log(NAME, f"measuring {args.num_requests} requests per path after {args.warmup} warm-up each")
            samples = measure(paths, args.num_requests, args.warmup)
        finally:
            paths.close()
    print(json.dumps(summarize(args, samples, cluster.worker_id), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
