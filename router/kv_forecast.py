"""Forecast each worker's KV demand from the requests this router placed there (Past-Future style).

`KvLedger` records, per worker, the requests this router placed that are still running: prompt length,
tokens generated so far and the predicted output length (p50/p90). A `WorkerKvSnapshot` freezes one
worker's share of it for a `WorkerView`, and `KvForecast` turns a snapshot into the peak KV the running
batch will hold before it drains: sort requests by predicted remaining length; at `t` decode steps from
now the batch holds sum(current_len + t) over the requests still running, a sum that only grows between
finish points, so its maximum is at a finish point. Suffix sums give every finish point in O(n log n).

Plain Python with no clock and no asyncio: the router, the simulator and the tests drive the same objects.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field


def predicted_remaining_tokens(
    *, num_generated: int, max_tokens: int, p50: float | None, p90: float | None, use_p90: bool
) -> int:
    """Tokens a request is still expected to generate, never more than `max_tokens` allows.

    Walks the ladder p50 (unless `use_p90`), p90, `max_tokens` and answers with the first predicted total the
    request has not reached yet: a request that outlived its median is expected to run to its p90, then to
    its cap (the past tells us which part of the distribution it is in). Without a prediction it is the cap.
    """
    ladder = [q for q in ((p90,) if use_p90 else (p50, p90)) if q is not None]
    for predicted_total in ladder:
        total = min(math.ceil(predicted_total), max_tokens)
        if total > num_generated:
            return total - num_generated
    return max(max_tokens - num_generated, 0)


@dataclass(kw_only=True, frozen=True)
class KvForecast:
    """Peak KV of a running batch that admits nothing new, in blocks; built by `KvForecast.build`.

    Each request's tokens are padded by `block_size - 1` so the block counts bound the engine's (which rounds
    every request up to whole blocks) from above, and are exact in tokens when `block_size` is 1.
    """

    block_size: int = 1
    """Tokens per KV block; 1 makes every figure a token count."""
    finish_steps: tuple[int, ...] = ()
    """Predicted remaining steps of each request, ascending."""
    suffix_held: tuple[int, ...] = (0,)
    """`suffix_held[k]`: padded tokens held now by the requests at positions >= k (one extra 0 at the end)."""
    suffix_peak: tuple[int, ...] = (0,)
    """`suffix_peak[k]`: the largest batch size (padded tokens) at the finish points of positions >= k."""
    prefix_peak_plus_step: tuple[int, ...] = ()
    """`prefix_peak_plus_step[k]`: max over positions j <= k of (batch size at finish point j) + finish_steps[j]."""

    @classmethod
    def build(cls, requests: Iterable[tuple[int, int]], *, block_size: int = 1) -> KvForecast:
        """`requests`: (tokens held now, predicted remaining steps) of every running request."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        pad = block_size - 1
        ordered = sorted((max(int(r), 0), int(h) + pad) for h, r in requests)
        n = len(ordered)
        suffix_held = [0] * (n + 1)
        for k in range(n - 1, -1, -1):
            suffix_held[k] = suffix_held[k + 1] + ordered[k][1]
        # At finish point t = r_k every request j with r_j >= r_k still runs and holds held_j + t.
        at_finish = [suffix_held[k] + (n - k) * ordered[k][0] for k in range(n)]
        suffix_peak = [0] * (n + 1)
        for k in range(n - 1, -1, -1):
            suffix_peak[k] = max(suffix_peak[k + 1], at_finish[k])
        prefix: list[int] = []
        for k in range(n):
            prefix.append(max(prefix[-1] if prefix else 0, at_finish[k] + ordered[k][0]))
        return cls(
            block_size=block_size,
            finish_steps=tuple(r for r, _ in ordered),
            suffix_held=tuple(suffix_held),
            suffix_peak=tuple(suffix_peak),
            prefix_peak_plus_step=tuple(prefix),
        )

    @property
    def num_requests(self) -> int:
        return len(self.finish_steps)

    def peak_blocks(self) -> int:
        """The most blocks the batch will hold before it drains (0 for an empty batch)."""
        return self.suffix_peak[0] // self.block_size

    def peak_blocks_with(self, held_tokens: int, remaining_steps: int) -> int:
        """The peak if one more request (holding `held_tokens`, running `remaining_steps` more) joined now. O(log n).

        Finish points after the newcomer's end see the batch unchanged; those at or before it see the newcomer
        too (held + t); the newcomer's own end is one more finish point.
        """
        held = int(held_tokens) + self.block_size - 1
        remaining = max(int(remaining_steps), 0)
        n = self.num_requests
        after = bisect.bisect_right(self.finish_steps, remaining)
        peak = self.suffix_peak[after]
        if after > 0:
            peak = max(peak, self.prefix_peak_plus_step[after - 1] + held)
        first_alive = bisect.bisect_left(self.finish_steps, remaining)
        at_own_end = self.suffix_held[first_alive] + (n - first_alive) * remaining + held + remaining
        return max(peak, at_own_end) // self.block_size


@dataclass(kw_only=True, frozen=True)
class RequestKv:
    """One running request as the ledger sees it."""

    num_prompt_tokens: int
    """Prompt tokens (the router's estimate until the stream reports the real count)."""
    num_generated: int = 0
    """Output tokens streamed so far."""
    max_tokens: int
    """The request's output cap."""
    predicted_output_p50: float | None = None
    """Median predicted output length at placement (None: no predictor)."""
    predicted_output_p90: float | None = None
    """90th-percentile predicted output length at placement."""

    @property
    def held_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    def remaining_tokens(self, *, use_p90: bool) -> int:
        return predicted_remaining_tokens(
            num_generated=self.num_generated,
            max_tokens=self.max_tokens,
            p50=self.predicted_output_p50,
            p90=self.predicted_output_p90,
            use_p90=use_p90,
        )


@dataclass(kw_only=True, frozen=True)
class WorkerKvSnapshot:
    """The requests this router placed on one worker that still run, frozen for one placement decision."""

    requests: tuple[RequestKv, ...] = ()
    """Every tracked running request of the worker."""
    _forecasts: dict[tuple[bool, int], KvForecast] = field(default_factory=dict, compare=False, repr=False)
    """Memo: the scorer and admission ask for the same forecast within one decision."""

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def current_tokens(self) -> int:
        """KV tokens the tracked requests hold now."""
        return sum(r.held_tokens for r in self.requests)

    def current_blocks(self, block_size: int) -> int:
        """KV blocks the tracked requests hold now (each rounded up to whole blocks, as the engine does)."""
        return sum(-(-r.held_tokens // block_size) for r in self.requests)

    def remaining_tokens(self, *, use_p90: bool = False) -> int:
        """Output tokens the tracked requests are still predicted to generate."""
        return sum(r.remaining_tokens(use_p90=use_p90) for r in self.requests)

    def forecast(self, *, use_p90: bool = False, block_size: int = 1) -> KvForecast:
        key = (use_p90, block_size)
        cached = self._forecasts.get(key)
        if cached is None:
            pairs = ((r.held_tokens, r.remaining_tokens(use_p90=use_p90)) for r in self.requests)
            cached = self._forecasts[key] = KvForecast.build(pairs, block_size=block_size)
        return cached

    def steps_until_freed(self, num_blocks: int, *, use_p90: bool = False, block_size: int = 1) -> int | None:
        """Decode steps until predicted completions free `num_blocks`; None if all of them together free less."""
        if num_blocks <= 0:
            return 0
        freed = 0
        ends = sorted((r.remaining_tokens(use_p90=use_p90), r.held_tokens) for r in self.requests)
        for remaining, held in ends:
            freed += -(-(held + remaining) // block_size)
            if freed >= num_blocks:
                return remaining
        return None


EMPTY_SNAPSHOT = WorkerKvSnapshot()
"""A worker this router has placed nothing on (or knows nothing about)."""


@dataclass(slots=True)
class _Entry:
    worker_id: str
    request: RequestKv


class KvLedger:
    """Per worker, the requests this router placed that still run; updated on place, on tokens, on finish.

    Keys are the caller's and must be unique among running requests (the router uses one per attempt).
    Not thread-safe: the router drives it from its event loop.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_worker: dict[str, dict[str, _Entry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def place(
        self,
        key: str,
        *,
        worker_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        predicted_output_p50: float | None = None,
        predicted_output_p90: float | None = None,
    ) -> None:
        """Start tracking `key` on `worker_id`; a key already tracked is a caller bug."""
        if key in self._entries:
            raise ValueError(f"ledger key {key!r} is already tracked on worker {self._entries[key].worker_id!r}")
        if num_prompt_tokens < 0 or max_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got prompt={num_prompt_tokens} max_tokens={max_tokens}")
        request = RequestKv(
            num_prompt_tokens=num_prompt_tokens,
            max_tokens=max_tokens,
            predicted_output_p50=predicted_output_p50,
            predicted_output_p90=predicted_output_p90,
        )
        entry = _Entry(worker_id=worker_id, request=request)
        self._entries[key] = entry
        self._by_worker.setdefault(worker_id, {})[key] = entry

    def record_tokens(self, key: str, num_new_tokens: int, *, num_prompt_tokens: int = 0) -> None:
        """`num_new_tokens` more were streamed; a positive `num_prompt_tokens` replaces the prompt estimate.

        An unknown key is ignored: the stream may report after the entry was released.
        """
        entry = self._entries.get(key)
        if entry is None:
            return
        request = entry.request
        entry.request = RequestKv(
            num_prompt_tokens=num_prompt_tokens if num_prompt_tokens > 0 else request.num_prompt_tokens,
            num_generated=request.num_generated + max(num_new_tokens, 0),
            max_tokens=request.max_tokens,
            predicted_output_p50=request.predicted_output_p50,
            predicted_output_p90=request.predicted_output_p90,
        )

    def set_generated(self, key: str, num_generated: int) -> None:
        """The request has generated `num_generated` tokens in all (a caller that polls progress, e.g. the
        simulator, rather than counting streamed chunks). An unknown key is ignored, as in `record_tokens`."""
        entry = self._entries.get(key)
        if entry is None or entry.request.num_generated == num_generated:
            return
        entry.request = dataclasses.replace(entry.request, num_generated=max(num_generated, 0))

    def move(self, key: str, worker_id: str) -> bool:
        """The request now runs on `worker_id` (failover or migration), with its counts; False if untracked."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.worker_id != worker_id:
            self._drop_from_worker(key, entry.worker_id)
            entry.worker_id = worker_id
            self._by_worker.setdefault(worker_id, {})[key] = entry
        return True

    def finish(self, key: str) -> bool:
        """Stop tracking `key` (finished, cancelled or failed); True if it was tracked. Idempotent."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._drop_from_worker(key, entry.worker_id)
        return True

    def _drop_from_worker(self, key: str, worker_id: str) -> None:
        on_worker = self._by_worker[worker_id]
        del on_worker[key]
        if not on_worker:
            del self._by_worker[worker_id]

    def worker_of(self, key: str) -> str | None:
        entry = self._entries.get(key)
        return entry.worker_id if entry is not None else None

    def worker_ids(self) -> list[str]:
        """Workers with at least one tracked request."""
        return sorted(self._by_worker)

    def num_tracked(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def snapshot(self, worker_id: str) -> WorkerKvSnapshot:
        """The worker's tracked requests, frozen for a `WorkerView`."""
        on_worker = self._by_worker.get(worker_id)
        if not on_worker:
            return EMPTY_SNAPSHOT
        return WorkerKvSnapshot(requests=tuple(e.request for e in on_worker.values()))
