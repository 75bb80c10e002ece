"""The soak's traffic: a closed loop of mixed requests on N threads, each tracked to exactly one outcome.

A request ends `completed` (a finish reason came back), `failed` with a status (gRPC names; the HTTP front's
codes are mapped onto them: 429 -> RESOURCE_EXHAUSTED, 504 or a client timeout -> DEADLINE_EXCEEDED, ...),
`cancelled` (we closed the stream mid-way on purpose), or nothing: a stream that ended without a finish reason,
an unexpected exception, or a call that never returned is `lost` (sent minus the three others).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import openai

from bench.soak_cluster import ADAPTERS, MIXED, PD, TENANTS, TIGHT_TENANT, SoakCluster
from router.client import Client, RaylaneError

HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
KINDS = {
    "grpc_unary": 14,
    "grpc_stream": 14,
    "grpc_cancel": 8,
    "grpc_deadline": 6,
    "http_completion": 9,
    "http_completion_stream": 9,
    "http_chat": 8,
    "http_chat_stream": 9,
    "http_cancel": 7,
    "http_deadline": 4,
    "grpc_bad_adapter": 1,
    "http_bad_adapter": 1,
}
"""Request kind -> weight in the mix."""
TENANT_WEIGHTS = {"alice": 45, "bob": 40, TIGHT_TENANT: 15}
WORDS = ("the", "cluster", "scheduler", "moves", "a", "request", "between", "workers", "while", "the", "river", "runs")
CANCEL_AFTER_CHUNKS = 2
SHORT_DEADLINE_S = (0.02, 0.12)
CLIENT_TIMEOUT_S = 120.0


@dataclass(kw_only=True, frozen=True)
class Request:
    """One request the loop sends."""

    kind: str
    """A key of `KINDS`."""
    tenant: str
    deployment: str
    adapter: str | None
    """A LoRA adapter by name, or None for the base model."""
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    timeout_s: float | None
    """A short deadline that should expire (deadline kinds), else the client's default."""


@dataclass(kw_only=True, frozen=True)
class Outcome:
    """How one request ended."""

    result: str
    """`completed`, `failed`, `cancelled` or `lost`."""
    status: str = ""
    """The failure status, or why the request counts as lost."""
    latency_ms: float | None = None
    """TTFT for streams, end to end for unary calls; only for completed requests."""


def make_request(rng: random.Random) -> Request:
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    tenant = rng.choices(list(TENANT_WEIGHTS), weights=list(TENANT_WEIGHTS.values()))[0]
    deployment = MIXED if rng.random() < 0.65 else PD
    adapter = None
    if kind.endswith("bad_adapter"):
        deployment, adapter = MIXED, "no-such-lora"
    elif deployment == MIXED and tenant in ADAPTERS and rng.random() < 0.4:
        adapter = ADAPTERS[tenant]
    long_output = kind.endswith(("cancel", "deadline"))  # long enough to still be running when cut
    sampled = rng.random() < 0.5
    return Request(
        kind=kind,
        tenant=tenant,
        deployment=deployment,
        adapter=adapter,
        prompt=" ".join(rng.choices(WORDS, k=rng.randint(3, 40))),
        max_tokens=rng.randint(32, 64) if long_output else rng.randint(2, 24),
        temperature=0.8 if sampled else 0.0,
        seed=rng.randrange(10_000) if sampled else None,
        timeout_s=rng.uniform(*SHORT_DEADLINE_S) if kind.endswith("deadline") else None,
    )


class Tally:
    """Thread-safe counts of what was sent and how it ended, plus per-minute latencies."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.failed: dict[str, Counter[str]] = defaultdict(Counter)
        self.lost_reasons: Counter[str] = Counter()
        self.latencies_by_minute: dict[int, list[float]] = defaultdict(list)

    def on_send(self, kind: str) -> None:
        with self._lock:
            self.sent[kind] += 1

    def on_outcome(self, kind: str, outcome: Outcome, sent_at: float) -> None:
        with self._lock:
            if outcome.result == "completed":
                self.completed[kind] += 1
                if outcome.latency_ms is not None:
                    self.latencies_by_minute[int((sent_at - self.t0) // 60)].append(outcome.latency_ms)
            elif outcome.result == "cancelled":
                self.cancelled[kind] += 1
            elif outcome.result == "failed":
                self.failed[kind][outcome.status] += 1
            else:  # not counted anywhere: `lost` is what sent leaves over
                self.lost_reasons[outcome.status] += 1

    def totals(self) -> dict[str, Any]:
        with self._lock:
            failed = Counter()
            for by_status in self.failed.values():
                failed.update(by_status)
            sent, completed = sum(self.sent.values()), sum(self.completed.values())
            cancelled = sum(self.cancelled.values())
            return {
                "sent": sent,
                "completed": completed,
                "failed": dict(sorted(failed.items())),
                "cancelled": cancelled,
                "lost": sent - completed - cancelled - sum(failed.values()),
            }

    def by_kind(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = {}
            for kind in sorted(self.sent):
                failed = dict(sorted(self.failed[kind].items()))
                accounted = self.completed[kind] + self.cancelled[kind] + sum(failed.values())
                rows[kind] = {
                    "sent": self.sent[kind],
                    "completed": self.completed[kind],
                    "failed": failed,
                    "cancelled": self.cancelled[kind],
                    "lost": self.sent[kind] - accounted,
                }
            return rows


class Traffic:
    """`concurrency` threads, each sending one request after another until `stop`."""

    def __init__(self, cluster: SoakCluster, *, concurrency: int, seed: int) -> None:
        self.tally = Tally(time.monotonic())
        self._seed = seed
        self._stop = threading.Event()
        keys = cluster.api_keys
        self._grpc = {t: Client(cluster.router_address, keys[t], timeout_s=CLIENT_TIMEOUT_S) for t in TENANTS}
        self._http = {
            t: openai.OpenAI(base_url=cluster.http_base_url, api_key=keys[t], max_retries=0, timeout=CLIENT_TIMEOUT_S)
            for t in TENANTS
        }
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"soak-{i}", daemon=True) for i in range(concurrency)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, drain_timeout_s: float) -> int:
        """Stop sending, wait for the requests in flight; returns how many threads are still stuck in a call."""
        self._stop.set()
        deadline = time.monotonic() + drain_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        for client in self._grpc.values():
            client.close()
        for api in self._http.values():
            api.close()

    def _loop(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        while not self._stop.is_set():
            request = make_request(rng)
            sent_at = time.monotonic()
            self.tally.on_send(request.kind)
            self.tally.on_outcome(request.kind, self._send(request), sent_at)

    def _send(self, request: Request) -> Outcome:
        try:
            if request.kind.startswith("grpc"):
                return self._grpc_call(request)
            return self._http_call(request)
        except RaylaneError as exc:
            return Outcome(result="failed", status=exc.code.name)
        except openai.APITimeoutError:
            return Outcome(result="failed", status="DEADLINE_EXCEEDED")  # our client's deadline expired
        except openai.APIStatusError as exc:
            return Outcome(result="failed", status=HTTP_STATUS.get(exc.status_code, f"HTTP_{exc.status_code}"))
        except openai.APIConnectionError:
            return Outcome(result="failed", status="CONNECTION_ERROR")
        except openai.APIError as exc:  # an error event inside a stream that had started
            code = exc.body.get("code") if isinstance(exc.body, dict) else None
            return Outcome(result="failed", status=f"STREAM_ERROR:{code or 'unknown'}")
        except Exception as exc:  # no status the client could act on: that is a lost request
            return Outcome(result="lost", status=f"{type(exc).__name__}: {exc}"[:200])

    # ---- gRPC (router/client.py) ------------------------------------------------------------------

    def _grpc_call(self, r: Request) -> Outcome:
        client = self._grpc[r.tenant]
        kwargs: dict[str, Any] = dict(
            adapter=r.adapter, max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed, ignore_eos=True
        )
        if r.timeout_s is not None:
            kwargs["timeout_s"] = r.timeout_s
        start = time.perf_counter()
        if r.kind in ("grpc_unary", "grpc_bad_adapter"):
            completion = client.complete(r.deployment, r.prompt, **kwargs)
            if not completion.finish_reason:
                return Outcome(result="lost", status="unary answer without a finish reason")
            return Outcome(result="completed", latency_ms=(time.perf_counter() - start) * 1e3)
        ttft_ms, num_chunks, next_seq = None, 0, 0
        stream = client.generate(r.deployment, r.prompt, **kwargs)
        try:
            for chunk in stream:
                if chunk.seq != next_seq:
                    return Outcome(result="lost", status=f"stream gap or duplicate: seq {chunk.seq} != {next_seq}")
                next_seq += len(chunk.token_ids)
                if ttft_ms is None and chunk.token_ids:
                    ttft_ms = (time.perf_counter() - start) * 1e3
                num_chunks += 1
                if chunk.finished:
                    if not chunk.finish_reason:
                        return Outcome(result="lost", status="finished chunk without a finish reason")
                    return Outcome(result="completed", latency_ms=ttft_ms)
                if r.kind == "grpc_cancel" and num_chunks >= CANCEL_AFTER_CHUNKS:
                    return Outcome(result="cancelled")
        finally:
            stream.close()  # cancels the call when we stop early
        return Outcome(result="lost", status="gRPC stream ended without a finish reason")

    # ---- HTTP (the official openai client) ---------------------------------------------------------

    def _http_call(self, r: Request) -> Outcome:
        api = self._http[r.tenant]
        if r.timeout_s is not None:
            api = api.with_options(timeout=r.timeout_s)
        model = f"{r.deployment}:{r.adapter}" if r.adapter else r.deployment
        is_chat = "chat" in r.kind or (r.kind in ("http_cancel", "http_deadline") and r.max_tokens % 2 == 0)
        is_stream = r.kind.endswith("stream") or r.kind == "http_cancel"
        kwargs: dict[str, Any] = dict(model=model, max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed)
        kwargs["extra_body"] = {"ignore_eos": True}
        if is_chat:
            create, kwargs["messages"] = api.chat.completions.create, [{"role": "user", "content": r.prompt}]
        else:
            create, kwargs["prompt"] = api.completions.create, r.prompt
        start = time.perf_counter()
        if not is_stream:
            response = create(**kwargs)
            if not response.choices or not response.choices[0].finish_reason:
                return Outcome(result="lost", status="HTTP answer without a finish reason")
            return Outcome(result="completed", latency_ms=(time.perf_counter() - start) * 1e3)
        ttft_ms, num_chunks = None, 0
        with create(stream=True, **kwargs) as stream:  # leaving the block closes the connection: a cancel
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text = choice.delta.content if is_chat else choice.text
                if ttft_ms is None and text:
                    ttft_ms = (time.perf_counter() - start) * 1e3
                num_chunks += 1
                if choice.finish_reason:
                    return Outcome(result="completed", latency_ms=ttft_ms)
                if r.kind == "http_cancel" and num_chunks >= CANCEL_AFTER_CHUNKS:
                    return Outcome(result="cancelled")
        return Outcome(result="lost", status="HTTP stream ended without a finish reason")
