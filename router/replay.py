"""Replay a trace's arrivals through a router and measure what clients see: TTFT, TPOT, E2E, throughput.

Each trace row becomes one streamed `Generate` at its (rate-scaled) arrival time, with a token-id
prompt of the row's (context-scaled) length (random, or sharing the prefixes its block hash ids
share: `trace_prompt`) and exactly its output length (`ignore_eos`), cycling over the given
targets (deployment, adapter, API key).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from router.client import AsyncClient, RaylaneError
from router.trace import TraceRequest, trace_prompt


@dataclass(kw_only=True, frozen=True)
class ReplayTarget:
    """Where a share of the requests goes."""

    deployment: str
    api_key: str
    adapter: str | None = None
    label: str = ""
    """Name in the summary; defaults to `deployment[/adapter]`."""

    @property
    def name(self) -> str:
        return self.label or (f"{self.deployment}/{self.adapter}" if self.adapter else self.deployment)


@dataclass(kw_only=True)
class RequestRecord:
    """What one replayed request saw, times in seconds from the replay's start."""

    target: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int = 0
    first_token_s: float | None = None
    end_s: float | None = None
    error: str | None = None
    token_times_s: list[float] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    """Prompt tokens the worker's prefix cache served, from the final chunk's usage."""

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.arrival_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end_s is None or self.error else (self.end_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.error or self.end_s is None or self.first_token_s is None or self.num_output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1e3 / (self.num_output_tokens - 1)


def select_window(requests: Sequence[TraceRequest], *, rate_scale: float, duration_s: float) -> list[TraceRequest]:
    """The rows arriving in the first `duration_s` of replay time, arrivals divided by `rate_scale`."""
    if rate_scale <= 0 or duration_s <= 0:
        raise ValueError("rate_scale and duration_s must be positive")
    window = []
    for r in requests:
        arrival = r.arrival_s / rate_scale
        if arrival >= duration_s:
            break
        window.append(replace(r, arrival_s=arrival))
    return window


async def replay(
    address: str,
    targets: Sequence[ReplayTarget],
    requests: Sequence[TraceRequest],
    *,
    vocab_size: int,
    seed: int = 0,
    timeout_s: float = 120.0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send every request at its arrival time; returns one record per request, in arrival order."""
    if not targets:
        raise ValueError("give at least one replay target")
    rng = random.Random(seed)
    clients = {t.api_key: AsyncClient(address, t.api_key, timeout_s=timeout_s) for t in targets}
    start = time.perf_counter()

    async def one(i: int, request: TraceRequest) -> RequestRecord:
        target = targets[i % len(targets)]
        prompt = trace_prompt(request, vocab_size, rng)
        record = RequestRecord(target=target.name, arrival_s=request.arrival_s, num_prompt_tokens=len(prompt))
        await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - start)))
        record.arrival_s = time.perf_counter() - start
        try:
            stream = clients[target.api_key].generate(
                target.deployment, prompt, adapter=target.adapter, max_tokens=request.output_len, ignore_eos=True
            )
            async for chunk in stream:
                now = time.perf_counter() - start
                if chunk.token_ids and record.first_token_s is None:
                    record.first_token_s = now
                record.num_output_tokens += len(chunk.token_ids)
                record.token_times_s.extend([now] * len(chunk.token_ids))
                if chunk.usage is not None:
                    record.num_cached_prompt_tokens = chunk.usage.cached_prompt_tokens
        except RaylaneError as exc:
            record.error = exc.code.name
        record.end_s = time.perf_counter() - start
        if on_done is not None:
            on_done(record)
        return record

    try:
        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, `q` in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarize(records: Sequence[RequestRecord]) -> dict:
    """p50/p99 TTFT, TPOT and E2E, throughput and errors, overall and per target."""

    def block(rs: Sequence[RequestRecord]) -> dict:
        ok = [r for r in rs if r.error is None]
        span = max((r.end_s or 0.0) for r in rs) - min(r.arrival_s for r in rs) if rs else 0.0
        out_tokens = sum(r.num_output_tokens for r in ok)
        metrics = {}
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            values = [v for r in ok if (v := getattr(r, name)) is not None]
            metrics[name] = {"p50": _round(percentile(values, 50)), "p99": _round(percentile(values, 99))}
        errors: dict[str, int] = {}
        for r in rs:
            if r.error:
                errors[r.error] = errors.get(r.error, 0) + 1
        return {
            "num_requests": len(rs),
            "num_ok": len(ok),
            "errors": errors,
            "output_tokens": out_tokens,
            "output_tokens_per_s": round(out_tokens / span, 1) if span > 0 else 0.0,
            "requests_per_s": round(len(ok) / span, 2) if span > 0 else 0.0,
            **metrics,
        }

    by_target: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_target.setdefault(r.target, []).append(r)
    return {"overall": block(records), "targets": {name: block(rs) for name, rs in sorted(by_target.items())}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
