"""LAPS, length-aware prefill scheduling: keep short prefills from queueing behind long ones.

A `LengthSplitter` learns the short/long threshold from recent prompt lengths (a decayed log-bucket
histogram) and moves it only past a relative dead band, so classes do not flap. Two ways to use it:

- in space: `LapsPrefillPolicy` (or `LapsPrefillScorer` in a `WeightedPolicy`) sends short and long
  prefills to disjoint subsets of the prefill workers, sized by each class's share of prefill tokens;
- in time, on one worker: `TwoQueueScheduler` serves shorts first, with a bound on how long a long waits.

`ShortPrefillBatcher` holds shorts for at most `window_ms` (or until `max_batch_tokens`) and releases them
together, so one prefill step carries many small prompts. All of it is plain Python; clocks are injected.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from router.policy import ClusterView, Decision, RouteRequest, WorkerView, load_score, log_decision, place_by_role
from router.prefix_affinity import PoolProvider

logger = logging.getLogger(__name__)

LengthClass = Literal["short", "long"]
Clock = Callable[[], float]
"""Seconds on a monotonic clock."""

_RESCALE_AT = 1e150  # lazy decay grows the increment geometrically; fold it back before floats overflow


@dataclass(kw_only=True, frozen=True)
class LapsConfig:
    """How LAPS splits prompts into short and long, partitions workers, batches shorts and orders queues."""

    split: Literal["quantile", "token_balance"] = "quantile"
    """`quantile`: the threshold is a quantile of prompt lengths; `token_balance`: the length below which
    prompts carry `short_token_share` of all prefill tokens."""
    quantile: float = 0.75
    """For `split="quantile"`: the share of requests classed short, in (0, 1)."""
    short_token_share: float = 0.5
    """For `split="token_balance"`: the share of prefill tokens the short class carries, in (0, 1)."""
    initial_threshold: int = 512
    """Threshold in prompt tokens until `min_samples` lengths were seen; a prompt <= threshold is short."""
    min_samples: int = 64
    """Observations before the learned threshold replaces `initial_threshold`; >= 1."""
    half_life: float = 2000.0
    """Observations after which an old prompt counts half; > 0. Lets the threshold follow drift."""
    bins_per_octave: int = 8
    """Histogram resolution: bins per doubling of prompt length; >= 1."""
    hysteresis: float = 0.15
    """Relative dead band: the threshold moves only when the estimate differs by more than this; >= 0."""
    recompute_every: int = 16
    """Re-estimate the threshold every this many observations; >= 1."""
    partition_hysteresis: float = 0.25
    """Extra workers' worth of drift in the ideal split before a worker changes class; >= 0."""
    window_ms: float = 5.0
    """Longest a short prefill waits in the batcher for company; >= 0."""
    max_batch_tokens: int = 4096
    """The batcher releases once its shorts total this many prompt tokens; >= 1."""
    max_short_streak: int = 8
    """Two-queue scheduler: shorts served in a row while a long waits before the long goes next; >= 1."""
    max_long_wait_ms: float = 500.0
    """Two-queue scheduler: a long that waited this long goes next, whatever the streak; >= 0."""

    def __post_init__(self) -> None:
        if self.split not in ("quantile", "token_balance"):
            raise ValueError(f"split must be 'quantile' or 'token_balance', got {self.split!r}")
        for name in ("quantile", "short_token_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("initial_threshold", "min_samples", "bins_per_octave", "recompute_every", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_short_streak < 1:
            raise ValueError(f"max_short_streak must be >= 1, got {self.max_short_streak}")
        if not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be finite and > 0, got {self.half_life}")
        for name in ("hysteresis", "partition_hysteresis", "window_ms", "max_long_wait_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")


# ---- the threshold ----------------------------------------------------------------------------------------------


class LengthSplitter:
    """Streaming short/long threshold over prompt lengths, with exponential forgetting and hysteresis.

    Each length lands in a log-spaced bin; the bin holds a decayed request count and token count. The
    estimate interpolates geometrically within the bin where the cumulative mass crosses the target.
    """

    def __init__(self, config: LapsConfig | None = None) -> None:
        self.config = config or LapsConfig()
        self._init_state()

    def _init_state(self) -> None:
        num_bins = 40 * self.config.bins_per_octave  # up to 2**40 tokens: no real prompt reaches the top bin
        self._counts = [0.0] * num_bins
        self._tokens = [0.0] * num_bins
        self._increment = 1.0
        self._growth = 2.0 ** (1.0 / self.config.half_life)
        self.num_observed = 0
        self.num_threshold_changes = 0
        self.threshold = self.config.initial_threshold

    def classify(self, num_prompt_tokens: int) -> LengthClass:
        return "short" if num_prompt_tokens <= self.threshold else "long"

    def observe(self, num_prompt_tokens: int) -> None:
        """Count one prompt; every `recompute_every` observations, maybe move the threshold."""
        length = max(int(num_prompt_tokens), 1)
        b = self._bin(length)
        self._counts[b] += self._increment
        self._tokens[b] += self._increment * length
        # Growing the weight of new samples is the same as decaying all old ones, at O(1) per observation.
        self._increment *= self._growth
        if self._increment > _RESCALE_AT:
            self._rescale()
        self.num_observed += 1
        if self.num_observed >= self.config.min_samples and self.num_observed % self.config.recompute_every == 0:
            self._maybe_move(self.estimate())

    def estimate(self) -> int:
        """The threshold the recent distribution implies now, before hysteresis."""
        if self.config.split == "quantile":
            return max(round(_weighted_quantile(self._counts, self.config.quantile, self.config.bins_per_octave)), 1)
        share = self.config.short_token_share
        return max(round(_weighted_quantile(self._tokens, share, self.config.bins_per_octave)), 1)

    def long_token_share(self) -> float:
        """Share of recent prefill tokens in prompts above the current threshold, in [0, 1]."""
        total = math.fsum(self._tokens)
        if total == 0:
            return 0.0
        cut = self._bin(self.threshold)
        # The threshold's own bin is split by where the threshold sits inside it, geometrically.
        lo, hi = self._edges(cut)
        inside = math.log(self.threshold / lo) / math.log(hi / lo) if self.threshold > lo else 0.0
        above = math.fsum(self._tokens[cut + 1 :]) + self._tokens[cut] * (1.0 - min(max(inside, 0.0), 1.0))
        return above / total

    def _maybe_move(self, estimate: int) -> None:
        if abs(estimate - self.threshold) <= self.config.hysteresis * self.threshold:
            return
        logger.info(
            "laps threshold old=%d new=%d split=%s observed=%d long_token_share=%.3f",
            self.threshold,
            estimate,
            self.config.split,
            self.num_observed,
            self.long_token_share(),
        )
        self.threshold = estimate
        self.num_threshold_changes += 1

    def _bin(self, length: int) -> int:
        return min(int(math.log2(max(length, 1)) * self.config.bins_per_octave), len(self._counts) - 1)

    def _edges(self, b: int) -> tuple[float, float]:
        per = self.config.bins_per_octave
        return 2.0 ** (b / per), 2.0 ** ((b + 1) / per)

    def _rescale(self) -> None:
        scale = 1.0 / self._increment
        self._counts = [c * scale for c in self._counts]
        self._tokens = [t * scale for t in self._tokens]
        self._increment = 1.0


def _weighted_quantile(mass: Sequence[float], q: float, bins_per_octave: int) -> float:
    """The point below which a share `q` of `mass` lies, interpolated geometrically inside its bin."""
    total = math.fsum(mass)
    if total == 0:
        return 1.0
    target = q * total
    cumulative = 0.0
    for b, m in enumerate(mass):
        if m > 0 and cumulative + m >= target:
            frac = (target - cumulative) / m
            return 2.0 ** ((b + frac) / bins_per_octave)
        cumulative += m
    return 2.0 ** (len(mass) / bins_per_octave)


# ---- in space: disjoint worker subsets ---------------------------------------------------------------------------


def num_long_workers(num_workers: int, long_token_share: float, previous: int | None, hysteresis: float) -> int:
    """Prefill workers reserved for long prompts, proportional to their token share.

    With two or more workers each class keeps at least one, so a burst of the other class cannot block it.
    A single worker serves both (0 reserved). `previous` stays while the ideal is within `0.5 + hysteresis`.
    """
    if num_workers < 2:
        return 0
    ideal = num_workers * min(max(long_token_share, 0.0), 1.0)
    if previous is not None and 1 <= previous <= num_workers - 1 and abs(ideal - previous) < 0.5 + hysteresis:
        return previous
    return min(max(round(ideal), 1), num_workers - 1)


class PrefillPartitioner:
    """Splits each (deployment, role) pool into short and long workers; remembers splits for hysteresis.

    Workers are ordered by id and the long class takes the tail, so a change in size moves one worker at a time.
    """

    def __init__(self, config: LapsConfig) -> None:
        self.config = config
        self._num_long: dict[tuple[str, str], int] = {}

    def members(self, pool: Sequence[WorkerView], length_class: LengthClass, long_token_share: float) -> list[str]:
        """Worker ids of `pool` that serve `length_class` (all of them when the pool has one worker)."""
        if not pool:
            return []
        ordered = sorted(w.worker_id for w in pool)
        key = (pool[0].deployment, pool[0].role)
        k = num_long_workers(len(ordered), long_token_share, self._num_long.get(key), self.config.partition_hysteresis)
        self._num_long[key] = k
        if k == 0:
            return ordered
        return ordered[len(ordered) - k :] if length_class == "long" else ordered[: len(ordered) - k]


class LapsPrefillPolicy:
    """`Policy`: on prefill pools, the least-loaded worker of the request's length class; elsewhere least loaded.

    Stateful like the round-robin baseline: each routed request's prompt length feeds the splitter (after
    it was classified), so decisions depend on the sequence of requests, deterministically.
    """

    name = "laps"

    def __init__(
        self,
        config: LapsConfig | None = None,
        *,
        splitter: LengthSplitter | None = None,
        partition_roles: frozenset[str] = frozenset({"prefill"}),
    ) -> None:
        self.config = config or LapsConfig()
        self.splitter = splitter or LengthSplitter(self.config)
        self.partitioner = PrefillPartitioner(self.config)
        self.partition_roles = partition_roles

    def route(self, request: RouteRequest, view: ClusterView) -> Decision:
        length_class = self.splitter.classify(request.num_prompt_tokens_estimate)
        share = self.splitter.long_token_share()

        def pick(req: RouteRequest, candidates: Sequence[WorkerView], role: str) -> tuple[WorkerView, dict[str, float]]:
            kept = candidates
            if role in self.partition_roles:
                members = set(self.partitioner.members(candidates, length_class, share))
                kept = [w for w in candidates if w.worker_id in members]
            scores = {w.worker_id: load_score(w) for w in kept}
            return min(kept, key=lambda w: (scores[w.worker_id], w.worker_id)), scores

        decision = place_by_role(request, view, pick, policy=self.name)
        detail = f"class={length_class} threshold={self.splitter.threshold} long_token_share={share:.3f}"
        decision = dataclasses.replace(decision, reason=f"{decision.reason} {detail}")
        log_decision(self.name, request, decision)
        self.splitter.observe(request.num_prompt_tokens_estimate)
        return decision


class LapsPrefillScorer:
    """`Scorer`: 0 when `worker` serves the request's length class, 1 when it serves the other class.

    Does not learn: whoever owns the splitter calls `splitter.observe(num_prompt_tokens)` once per request.
    Only workers whose role is in `partition_roles` are partitioned; the others score 0.
    """

    name = "laps"

    def __init__(
        self,
        splitter: LengthSplitter,
        *,
        pool: PoolProvider,
        partition_roles: frozenset[str] = frozenset({"prefill"}),
    ) -> None:
        self.splitter = splitter
        self.partitioner = PrefillPartitioner(splitter.config)
        self.pool = pool
        self.partition_roles = partition_roles
        # One request is scored against every worker of a pool in turn: partition the pool once per request
        # object (identity, not id: callers may reuse request ids, and the splitter may have moved since).
        self._memo_request: RouteRequest | None = None
        self._memo_pool: tuple[str, str] = ("", "")
        self._memo_members: frozenset[str] = frozenset()

    def score(self, request: RouteRequest, worker: WorkerView) -> float:
        if worker.role not in self.partition_roles:
            return 0.0
        pool_key = (worker.deployment, worker.role)
        if request is not self._memo_request or pool_key != self._memo_pool:
            length_class = self.splitter.classify(request.num_prompt_tokens_estimate)
            share = self.splitter.long_token_share()
            self._memo_members = frozenset(self.partitioner.members(self.pool(request, worker), length_class, share))
            self._memo_request, self._memo_pool = request, pool_key
        return 0.0 if worker.worker_id in self._memo_members else 1.0


# ---- in time: batching shorts, and two queues on one worker ------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class QueuedPrefill:
    """One prefill waiting in a LAPS queue or batch."""

    request_id: str
    """The request."""
    num_tokens: int
    """Its prompt length in tokens."""
    enqueued_at: float
    """Clock reading when it arrived."""


@dataclass(kw_only=True, frozen=True)
class PrefillBatch:
    """Short prefills released together."""

    items: tuple[QueuedPrefill, ...]
    """The prefills, in arrival order."""
    num_tokens: int
    """Their total prompt tokens."""
    reason: Literal["size", "window"]
    """`size`: the batch reached `max_batch_tokens`; `window`: its oldest member waited `window_ms`."""


class ShortPrefillBatcher:
    """Collects short prefills for up to `window_ms` or `max_batch_tokens`, then releases them as one batch.

    `add` and `poll` return the batches due now; the caller wakes at `next_release_at()` to poll. A prefill
    that would push the batch past `max_batch_tokens` first releases the batch it cannot join.
    """

    def __init__(self, config: LapsConfig | None = None, *, clock: Clock = time.monotonic) -> None:
        self.config = config or LapsConfig()
        self.clock = clock
        self._pending: list[QueuedPrefill] = []
        self._num_tokens = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def add(self, request_id: str, num_tokens: int) -> list[PrefillBatch]:
        released = self.poll()
        if self._pending and self._num_tokens + num_tokens > self.config.max_batch_tokens:
            released.append(self._release("size"))
        self._pending.append(QueuedPrefill(request_id=request_id, num_tokens=num_tokens, enqueued_at=self.clock()))
        self._num_tokens += num_tokens
        if self._num_tokens >= self.config.max_batch_tokens:
            released.append(self._release("size"))
        return released

    def poll(self) -> list[PrefillBatch]:
        """The pending batch, if its oldest member has waited `window_ms`."""
        deadline = self.next_release_at()
        if deadline is not None and self.clock() >= deadline:
            return [self._release("window")]
        return []

    def next_release_at(self) -> float | None:
        """Clock reading at which the pending batch is due; None when nothing waits."""
        if not self._pending:
            return None
        return self._pending[0].enqueued_at + self.config.window_ms / 1000.0

    def _release(self, reason: Literal["size", "window"]) -> PrefillBatch:
        batch = PrefillBatch(items=tuple(self._pending), num_tokens=self._num_tokens, reason=reason)
        logger.debug(
            "laps batch release reason=%s num_requests=%d num_tokens=%d waited_ms=%.2f",
            reason,
            len(batch.items),
            batch.num_tokens,
            (self.clock() - batch.items[0].enqueued_at) * 1000.0,
        )
        self._pending, self._num_tokens = [], 0
        return batch


def choose_queue(
    short_head_wait_s: float | None, long_head_wait_s: float | None, short_streak: int, config: LapsConfig
) -> LengthClass | None:
    """Which class a worker serves next: shorts first, unless a waiting long hit the starvation bound.

    A `*_wait_s` of None means that queue is empty; `short_streak` counts shorts served since the last long
    (or since a long started waiting). None when both queues are empty.
    """
    if long_head_wait_s is None:
        return None if short_head_wait_s is None else "short"
    if short_head_wait_s is None:
        return "long"
    is_starving = short_streak >= config.max_short_streak or long_head_wait_s * 1000.0 >= config.max_long_wait_ms
    return "long" if is_starving else "short"


class TwoQueueScheduler:
    """One worker, two FIFO queues by length class; `pop` applies `choose_queue`.

    Bound: once a long heads its queue, it goes after at most `max_short_streak` shorts or `max_long_wait_ms`,
    whichever comes first.
    """

    def __init__(self, splitter: LengthSplitter, *, clock: Clock = time.monotonic) -> None:
        self.splitter = splitter
        self.clock = clock
        self._queues: dict[LengthClass, deque[QueuedPrefill]] = {"short": deque(), "long": deque()}
        self._short_streak = 0

    def __len__(self) -> int:
        return len(self._queues["short"]) + len(self._queues["long"])

    def push(self, request_id: str, num_tokens: int) -> LengthClass:
        """Queue a prefill in its class (by the splitter's current threshold); returns the class."""
        length_class = self.splitter.classify(num_tokens)
        if length_class == "long" and not self._queues["long"]:
            self._short_streak = 0  # the bound counts from when this long started waiting at the head
        item = QueuedPrefill(request_id=request_id, num_tokens=num_tokens, enqueued_at=self.clock())
        self._queues[length_class].append(item)
        return length_class

    def pop(self) -> QueuedPrefill | None:
        now = self.clock()
        waits = {c: (now - q[0].enqueued_at if q else None) for c, q in self._queues.items()}
        length_class = choose_queue(waits["short"], waits["long"], self._short_streak, self.splitter.config)
        if length_class is None:
            return None
        item = self._queues[length_class].popleft()
        self._short_streak = self._short_streak + 1 if length_class == "short" else 0
        logger.debug(
            "laps queue pop request_id=%s class=%s num_tokens=%d waited_ms=%.2f short_streak=%d",
            item.request_id,
            length_class,
            item.num_tokens,
            (now - item.enqueued_at) * 1000.0,
            self._short_streak,
        )
        return item
